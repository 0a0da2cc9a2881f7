//! A checker for the memory tracker's one assumption: that every write to
//! guest memory shows up in KVM's dirty log or in vm-memory's bitmap.
//!
//! After a flush (at a checkpoint) and after a rollback, every private copy
//! in the guest's `MAP_PRIVATE` mapping must equal the memory file: a flush
//! wrote each dirty page into the file, and a rollback copied the file
//! back over each dirty page's copy. A private page that differs from the
//! file was written without being reported dirty, so the checkpoint (or
//! the rollback) missed it. The checker finds such pages through
//! `/proc/self/pagemap`: only a present page that is not the file's own
//! page is a private copy, so it compares just those, never the whole of
//! memory.
//!
//! It costs a read of the pagemap (8 bytes per page of guest memory) and a
//! compare per private page, so it runs only when `SPECVM_VERIFY_MEMORY` is
//! set; it is a diagnostic for new hosts and guests, not part of the
//! checkpoint. With `SPECVM_VERIFY_MEMORY=repair` it also repairs what it
//! finds (flushes the page at a checkpoint, drops it at a rollback), so a
//! guest that only failed from missed pages runs on correctly; the log says
//! how many pages were repaired.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::vstate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// What `SPECVM_VERIFY_MEMORY` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Report pages missed by dirty tracking.
    Report,
    /// Report them and repair them.
    Repair,
}

impl VerifyMode {
    /// The mode from the environment, if any.
    pub fn from_env() -> Option<Self> {
        match std::env::var("SPECVM_VERIFY_MEMORY").ok()?.as_str() {
            "" | "0" => None,
            "repair" => Some(Self::Repair),
            _ => Some(Self::Report),
        }
    }
}

/// The private pages (indexes into the `len`-byte mapping at `host`) that
/// differ from `file_page(i)`.
///
/// # Safety
/// `host..host+len` must be a live mapping and `file_page` must return a
/// readable page for every index; the vCPUs must be paused.
pub unsafe fn differing_private_pages(
    host: *const u8,
    len: u64,
    file_page: impl Fn(u64) -> *const u8,
) -> io::Result<Vec<u64>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let pages = len / PAGE;
    let first = host as u64 / PAGE;
    let mut out = Vec::new();
    // 64 Ki entries (256 MiB of guest memory) per read.
    let chunk = 65536u64;
    let mut buf = vec![0u8; (chunk * 8) as usize];
    let mut i = 0;
    while i < pages {
        let n = chunk.min(pages - i);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first + i) * 8)?;
        for (j, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if e & PM_PRESENT == 0 || e & PM_FILE_OR_SHARED != 0 {
                continue;
            }
            let p = i + j as u64;
            // SAFETY: both pages are mapped and readable (caller's promise).
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(host.add((p * PAGE) as usize), PAGE_SIZE),
                    std::slice::from_raw_parts(file_page(p), PAGE_SIZE),
                )
            };
            if a != b {
                out.push(p);
            }
        }
        i += n;
    }
    Ok(out)
}
