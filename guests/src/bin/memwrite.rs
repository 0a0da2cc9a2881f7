//! Writes a pattern over N pages of free guest RAM, reads it back and checks
//! it. N is the `--guest-arg` (64 when zero).
//!
//! Exit status: 0 when every word matched, 2 when the pages do not fit in
//! guest RAM, 3 at the first mismatch (which is printed).
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

/// Pages written when the argument is zero.
const DEFAULT_PAGES: u64 = 64;
const PAGE_SIZE: u64 = 4096;
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// The word expected at byte `offset` of page `page`.
fn pattern(page: u64, offset: u64) -> u64 {
    (page << 32) ^ offset ^ 0x5eed
}

/// The address of word `word` of page `page`.
fn word_ptr(free_base: u64, page: u64, word: u64) -> *mut u64 {
    (free_base + page * PAGE_SIZE + word * 8) as *mut u64
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let pages = if arg == 0 { DEFAULT_PAGES } else { arg };
    let end = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| len.checked_add(free_base));
    match end {
        Some(end) if end <= mem_size => {}
        _ => {
            rt::println!(
                "memwrite: {pages} pages from {free_base:#x} do not fit in {mem_size:#x} bytes of RAM"
            );
            return 2;
        }
    }

    for page in 0..pages {
        for word in 0..WORDS_PER_PAGE {
            // SAFETY: the range free_base..end was checked to lie in guest
            // RAM, which the VMM maps identity and writable, and which this
            // program uses for nothing else (its code and stack are below
            // free_base). Volatile makes every store reach memory.
            unsafe { word_ptr(free_base, page, word).write_volatile(pattern(page, word * 8)) };
        }
    }

    for page in 0..pages {
        for word in 0..WORDS_PER_PAGE {
            let want = pattern(page, word * 8);
            // SAFETY: as for the writes above.
            let got = unsafe { word_ptr(free_base, page, word).read_volatile() };
            if got != want {
                let addr = word_ptr(free_base, page, word) as u64;
                rt::println!(
                    "memwrite: mismatch at {addr:#x} (page {page}): got {got:#x}, want {want:#x}"
                );
                return 3;
            }
        }
    }

    rt::println!("memwrite: wrote {pages} pages, ok");
    0
}
