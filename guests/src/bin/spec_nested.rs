//! Nested speculations in every order the rules allow (SPECULATIONS.md
//! rules 1, 3 and 5), checking memory, `status()` and `entry(i)` after
//! every step:
//! - (a) S1, S2, abort, abort;
//! - (b) S1, S2, commit, abort;
//! - (c) S1, S2, commit, commit;
//! - (d) S1, S2, abort, commit;
//! - (e) 10 levels, aborted one by one;
//! - (f) 64 levels, the 65th refused with TOO_DEEP, then all committed.
//!
//! Every level L of a scenario writes its own value to a shared page and to
//! its own pages, so the memory state is "levels 1..=k live" for some k.
//! A rollback rewinds every local variable too, so the control flow is
//! driven by the arms of `match speculate()`: the non-zero arm is the only
//! place that knows a rollback happened.
//!
//! Exit status 0 on success; the failing check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::abi::reason::ABORTED_BY_GUEST;
use guest_agent::hypercall::{abort, commit, entry, speculate, status, Error};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
/// Pages each level owns, besides the shared page 0.
const OWN_PAGES: u64 = 2;
/// The VMM's stack limit (SPECULATIONS.md; `vmm` MAX_DEPTH).
const MAX_DEPTH: u64 = 64;
/// Levels of scenario (e).
const DEEP: u64 = 10;

/// Prints the failed check and returns its code from the enclosing function.
macro_rules! check {
    ($cond:expr, $code:expr, $($msg:tt)*) => {
        if !$cond {
            rt::println!("spec_nested: check {} failed: {}", $code, format_args!($($msg)*));
            return Err($code);
        }
    };
}

/// The guest memory the scenarios write: pages from `base`.
#[derive(Clone, Copy)]
struct Mem {
    base: u64,
}

/// The word at index `w` of `page` when the page holds value `v`.
fn word(page: u64, v: u64, w: u64) -> u64 {
    v.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (page << 12) ^ w
}

/// The value level `level` of scenario `scn` writes; level 0 is the
/// scenario's initial content.
fn val(scn: u64, level: u64) -> u64 {
    0x5bec_0000 | (scn << 8) | level
}

impl Mem {
    fn ptr(self, page: u64, w: u64) -> *mut u64 {
        (self.base + page * PAGE + w * 8) as *mut u64
    }

    fn fill(self, page: u64, v: u64) {
        for w in 0..WORDS {
            // SAFETY: `main` checked that every page used lies in free RAM.
            unsafe { self.ptr(page, w).write_volatile(word(page, v, w)) };
        }
    }

    fn holds(self, page: u64, v: u64) -> bool {
        (0..WORDS).all(|w| {
            // SAFETY: as in `fill`.
            let got = unsafe { self.ptr(page, w).read_volatile() };
            got == word(page, v, w)
        })
    }

    /// The first own page of `level` (1-based).
    fn own(level: u64) -> u64 {
        1 + (level - 1) * OWN_PAGES
    }

    /// Writes level `level`'s value to the shared page and its own pages.
    fn write_level(self, scn: u64, level: u64) {
        self.fill(0, val(scn, level));
        for p in 0..OWN_PAGES {
            self.fill(Self::own(level) + p, val(scn, level));
        }
    }

    /// Sets the shared page and the pages of levels 1..=levels to level 0.
    fn reset(self, scn: u64, levels: u64) {
        self.fill(0, val(scn, 0));
        for p in 0..levels * OWN_PAGES {
            self.fill(1 + p, val(scn, 0));
        }
    }

    /// Checks that exactly the writes of levels 1..=live are visible.
    fn expect(self, scn: u64, live: u64, levels: u64, code: u32) -> Result<(), u32> {
        check!(
            self.holds(0, val(scn, live)),
            code,
            "shared page is not level {live}'s"
        );
        for level in 1..=levels {
            let want = if level <= live { level } else { 0 };
            for p in 0..OWN_PAGES {
                let page = Self::own(level) + p;
                check!(
                    self.holds(page, val(scn, want)),
                    code,
                    "page {page} of level {level} is not level {want}'s (live: 1..={live})"
                );
            }
        }
        Ok(())
    }
}

/// Checks depth, dependency-set size and own count all equal `depth`.
fn expect_status(depth: u64, code: u32) -> Result<(), u32> {
    let s = status();
    check!(
        s.depth == depth && s.deps == depth && s.own == depth,
        code,
        "status {s:?}, expected depth/deps/own {depth}"
    );
    Ok(())
}

/// Checks the dependency set holds `n` explicit entries with distinct ids
/// sharing one VM id, and nothing past them; stores the ids in `ids`.
fn expect_entries(n: usize, ids: &mut [u64; MAX_DEPTH as usize], code: u32) -> Result<(), u32> {
    for i in 0..n {
        let e = entry(i as u64);
        check!(
            matches!(e, Ok((_, true))),
            code,
            "entry({i}) = {e:?}, expected explicit"
        );
        let id = e.map(|(id, _)| id).unwrap_or(0);
        check!(
            i == 0 || id >> 32 == ids[0] >> 32,
            code,
            "entry({i}) = {id:#x}: VM id differs from {:#x}",
            ids[0]
        );
        check!(
            !ids[..i].contains(&id),
            code,
            "entry({i}) = {id:#x} repeats an id below it"
        );
        ids[i] = id;
    }
    let past = entry(n as u64);
    check!(
        past == Err(Error::BadArg),
        code,
        "entry({n}) past the end = {past:?}"
    );
    Ok(())
}

/// Reports that a hypercall failed (`what`), returning `code`.
fn failed(code: u32, what: &str, e: Error) -> u32 {
    rt::println!("spec_nested: check {code} failed: {what} returned {e:?}");
    code
}

/// The non-zero return of a speculation that should never roll back.
fn unexpected_rollback(code: u32, what: &str, reason: u64) -> u32 {
    rt::println!("spec_nested: check {code} failed: {what} rolled back (reason {reason})");
    code
}

/// (a) S1, S2, abort (back in S2's checkpoint), abort (back in S1's).
fn scenario_a(m: Mem) -> Result<(), u32> {
    m.reset(1, 2);
    match speculate() {
        Ok(0) => {
            expect_status(1, 10)?;
            m.write_level(1, 1);
            a_inner(m)
        }
        Ok(r) => {
            check!(r == ABORTED_BY_GUEST, 11, "S1 returned {r}");
            expect_status(0, 12)?;
            m.expect(1, 0, 2, 13)
        }
        Err(e) => Err(failed(14, "S1", e)),
    }
}

fn a_inner(m: Mem) -> Result<(), u32> {
    match speculate() {
        Ok(0) => {
            expect_status(2, 15)?;
            expect_entries(2, &mut [0; MAX_DEPTH as usize], 16)?;
            m.write_level(1, 2);
            m.expect(1, 2, 2, 17)?;
            Err(failed(18, "abort of S2", abort()))
        }
        Ok(r) => {
            check!(r == ABORTED_BY_GUEST, 19, "S2 returned {r}");
            expect_status(1, 20)?;
            expect_entries(1, &mut [0; MAX_DEPTH as usize], 21)?;
            m.expect(1, 1, 2, 22)?;
            Err(failed(23, "abort of S1", abort()))
        }
        Err(e) => Err(failed(24, "S2", e)),
    }
}

/// (b) S1, S2, commit (S2), abort (S1): S2's writes go with S1's.
fn scenario_b(m: Mem) -> Result<(), u32> {
    m.reset(2, 2);
    match speculate() {
        Ok(0) => {
            m.write_level(2, 1);
            b_inner(m)
        }
        Ok(r) => {
            check!(r == ABORTED_BY_GUEST, 30, "S1 returned {r}");
            expect_status(0, 31)?;
            m.expect(2, 0, 2, 32)
        }
        Err(e) => Err(failed(33, "S1", e)),
    }
}

fn b_inner(m: Mem) -> Result<(), u32> {
    match speculate() {
        Ok(0) => {}
        Ok(r) => return Err(unexpected_rollback(34, "committed S2", r)),
        Err(e) => return Err(failed(35, "S2", e)),
    }
    m.write_level(2, 2);
    expect_status(2, 36)?;
    commit().map_err(|e| failed(37, "commit of S2", e))?;
    expect_status(1, 38)?;
    expect_entries(1, &mut [0; MAX_DEPTH as usize], 39)?;
    m.expect(2, 2, 2, 40)?;
    Err(failed(41, "abort of S1", abort()))
}

/// Speculates where no rollback may come back; `code` on any failure.
fn speculate_once(what: &str, code: u32) -> Result<(), u32> {
    match speculate() {
        Ok(0) => Ok(()),
        Ok(r) => Err(unexpected_rollback(code, what, r)),
        Err(e) => Err(failed(code, what, e)),
    }
}

/// (c) S1, S2, commit, commit: everything kept. Stores the two ids in `ids`.
fn scenario_c(m: Mem, ids: &mut [u64; MAX_DEPTH as usize]) -> Result<(), u32> {
    m.reset(3, 2);
    speculate_once("S1", 50)?;
    m.write_level(3, 1);
    speculate_once("S2", 51)?;
    m.write_level(3, 2);
    expect_status(2, 52)?;
    expect_entries(2, ids, 53)?;
    commit().map_err(|e| failed(54, "commit of S2", e))?;
    expect_status(1, 55)?;
    check!(
        entry(0) == Ok((ids[0], true)),
        56,
        "entry(0) after commit is {:?}",
        entry(0)
    );
    m.expect(3, 2, 2, 57)?;
    commit().map_err(|e| failed(58, "commit of S1", e))?;
    expect_status(0, 59)?;
    m.expect(3, 2, 2, 60)?;
    check!(
        commit() == Err(Error::NoSpeculation),
        61,
        "a third commit succeeded"
    );
    check!(
        abort() == Error::NoSpeculation,
        62,
        "abort after the commits did not fail"
    );
    Ok(())
}

/// (d) S1, S2, abort (S2), commit (S1): S1's writes kept, S2's gone.
fn scenario_d(m: Mem) -> Result<(), u32> {
    m.reset(4, 2);
    speculate_once("S1", 70)?;
    m.write_level(4, 1);
    match speculate() {
        Ok(0) => {
            m.write_level(4, 2);
            expect_status(2, 71)?;
            return Err(failed(72, "abort of S2", abort()));
        }
        Ok(r) => check!(r == ABORTED_BY_GUEST, 73, "S2 returned {r}"),
        Err(e) => return Err(failed(74, "S2", e)),
    }
    expect_status(1, 75)?;
    m.expect(4, 1, 2, 76)?;
    commit().map_err(|e| failed(77, "commit of S1", e))?;
    expect_status(0, 78)?;
    m.expect(4, 1, 2, 79)
}

/// (e) `DEEP` levels, each writing its own pages, then aborted one by one.
fn scenario_e(m: Mem) -> Result<(), u32> {
    m.reset(5, DEEP);
    // Levels live at this point; after a rollback it is the value it had
    // at that checkpoint, which is how we know where we are.
    let mut live = 0;
    while live < DEEP {
        match speculate() {
            Ok(0) => {
                live += 1;
                expect_status(live, 90)?;
                m.write_level(5, live);
            }
            Ok(r) => return e_rolled_back(m, live, r),
            Err(e) => return Err(failed(91, "a deep speculate", e)),
        }
    }
    expect_entries(DEEP as usize, &mut [0; MAX_DEPTH as usize], 92)?;
    m.expect(5, DEEP, DEEP, 93)?;
    Err(failed(94, "abort of the top level", abort()))
}

/// Back in the checkpoint taken with `live` levels live: check, go on down.
fn e_rolled_back(m: Mem, live: u64, reason: u64) -> Result<(), u32> {
    check!(
        reason == ABORTED_BY_GUEST,
        95,
        "level {} returned {reason}",
        live + 1
    );
    expect_status(live, 96)?;
    m.expect(5, live, DEEP, 97)?;
    rt::println!("spec_nested: (e) back at depth {live}");
    if live == 0 {
        return Ok(());
    }
    Err(failed(98, "abort of a deep level", abort()))
}

/// (f) 64 levels; the 65th is refused with TOO_DEEP; then all committed.
/// `earlier` holds the ids of (c), which must not come back.
fn scenario_f(m: Mem, earlier: &[u64]) -> Result<(), u32> {
    m.reset(6, MAX_DEPTH);
    for level in 1..=MAX_DEPTH {
        speculate_once("a level of 64", 110)?;
        m.write_level(6, level);
    }
    expect_status(MAX_DEPTH, 111)?;
    let over = speculate();
    check!(
        over == Err(Error::TooDeep),
        112,
        "speculate at depth 64 returned {over:?}"
    );
    expect_status(MAX_DEPTH, 113)?;
    let mut ids = [0; MAX_DEPTH as usize];
    expect_entries(MAX_DEPTH as usize, &mut ids, 114)?;
    check!(
        !ids.iter().any(|id| earlier.contains(id)),
        115,
        "an id of (c) was reused"
    );
    m.expect(6, MAX_DEPTH, MAX_DEPTH, 116)?;
    for depth in (0..MAX_DEPTH).rev() {
        commit().map_err(|e| failed(117, "a commit of the 64", e))?;
        expect_status(depth, 118)?;
    }
    check!(
        commit() == Err(Error::NoSpeculation),
        119,
        "commit at depth 0 succeeded"
    );
    m.expect(6, MAX_DEPTH, MAX_DEPTH, 120)
}

/// The checks with no speculation at all.
fn idle_checks() -> Result<(), u32> {
    expect_status(0, 2)?;
    check!(
        commit() == Err(Error::NoSpeculation),
        3,
        "commit without a speculation"
    );
    check!(
        abort() == Error::NoSpeculation,
        4,
        "abort without a speculation"
    );
    check!(
        entry(0) == Err(Error::BadArg),
        5,
        "entry(0) without a speculation"
    );
    Ok(())
}

fn run(m: Mem) -> Result<(), u32> {
    idle_checks()?;
    scenario_a(m)?;
    rt::println!("spec_nested: (a) S1 S2 abort abort: ok");
    scenario_b(m)?;
    rt::println!("spec_nested: (b) S1 S2 commit abort: ok");
    let mut c_ids = [0; MAX_DEPTH as usize];
    scenario_c(m, &mut c_ids)?;
    rt::println!("spec_nested: (c) S1 S2 commit commit: ok");
    scenario_d(m)?;
    rt::println!("spec_nested: (d) S1 S2 abort commit: ok");
    scenario_e(m)?;
    rt::println!("spec_nested: (e) {DEEP} levels aborted one by one: ok");
    scenario_f(m, &c_ids[..2])?;
    rt::println!("spec_nested: (f) 64 levels, TOO_DEEP at 65, committed: ok");
    expect_status(0, 6)
}

fn main(mem_size: u64, free_base: u64, _arg: u64) -> u32 {
    let pages = 1 + MAX_DEPTH * OWN_PAGES;
    if free_base + pages * PAGE > mem_size {
        rt::println!("spec_nested: {pages} pages do not fit");
        return 1;
    }
    match run(Mem { base: free_base }) {
        Ok(()) => {
            rt::println!("spec_nested: ok");
            0
        }
        Err(code) => code,
    }
}
