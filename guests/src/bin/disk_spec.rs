//! A speculative disk from the guest's side, through the virtio-blk driver
//! of `guest_agent::virtio_blk` on the first `--disk` (at least 1 MiB).
//! It first prints `disk_spec: virtio-blk in slot N, S sectors` (`,
//! read-only` added for a read-only disk). `--guest-arg` picks the mode:
//!
//! - 0, nested: writes pattern A over sectors 0..8 and flushes (depth 0:
//!   the base image); speculates (outer) and writes B over 8..16;
//!   speculates again (inner), writes C over 0..4 and 16..24, flushes,
//!   reads C back, and aborts the inner one; back in the outer it reads A
//!   at 0..8, the old content at 16..24 and B at 8..16, then commits; reads
//!   everything once more and prints `disk_spec: nested ok, ...`. The base
//!   image ends with A at 0..8, B at 8..16 and nothing of C.
//! - 1, kill: writes A over 0..8 and flushes, speculates, writes K over
//!   sectors 0..32 and the last 8 sectors, flushes, prints `disk_spec:
//!   spinning inside a speculation` and spins until the VMM is killed. The
//!   base image must keep its content from before the speculation.
//! - 2, read-only: on a `readonly` disk the host filled with pattern O,
//!   reads O at 0..8, writes sector 0 and expects IOERR, reads O again;
//!   prints `disk_spec: read-only ok, write refused with IOERR`.
//! - 3, clone: on a disk the host filled with pattern O, writes A over
//!   0..8 at depth 0 and B over 8..16 in a committed speculation, prints
//!   `disk_spec: ready for a snapshot` and waits for a byte on the serial
//!   console. The host snapshots it there and restores copies; each copy
//!   is sent its own tag byte T (an uppercase letter). A copy checks A at
//!   0..8, B at 8..16 and O at 16..40, writes T over 16..24 at depth 0,
//!   over 24..32 in a committed speculation and over 32..40 in an aborted
//!   one, checks T at 16..32 and O at 32..40, prints `disk_spec: clone T
//!   wrote 16..32`, waits for one more byte (the host lets every copy
//!   write first), checks the same again and prints `disk_spec: clone T
//!   ok`.
//!
//! Byte `i` of sector `s` in pattern `t` is [`pattern_byte`]; the host
//! test computes the same bytes. Exit status 0 on success; otherwise the
//! failed check's number, printed as `disk_spec: check N failed: ...`
//! (2: no virtio-blk device, 3: the driver failed to start, 4: disk
//! smaller than 1 MiB).
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

#[path = "../blk_open.rs"]
mod blk_open;

use guest_agent::abi::reason::ABORTED_BY_GUEST;
use guest_agent::hypercall::{abort, commit, speculate, status};
use guest_agent::virtio_blk::{self, PhysMmio, VirtioBlk, SECTOR_SIZE, S_IOERR};

/// Pattern tags.
const A: u8 = b'A';
const B: u8 = b'B';
const C: u8 = b'C';
const K: u8 = b'K';
const O: u8 = b'O';
/// Sectors per run the scenarios write.
const RUN: u64 = 8;
/// The smallest disk the scenarios accept: 1 MiB.
const MIN_SECTORS: u64 = 2048;

/// Byte `i` of sector `sector` in pattern `tag` (the host test's copy is
/// in `tests/tests/disk.rs`).
fn pattern_byte(tag: u8, sector: u64, i: usize) -> u8 {
    tag ^ (sector as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(3) ^ (i >> 8) as u8
}

/// Up to [`RUN`] sectors of data.
type Buf = [u8; RUN as usize * SECTOR_SIZE];

/// Fills the first `n` sectors of `buf` with pattern `tag` for sectors
/// `first..first + n`.
fn fill(buf: &mut Buf, tag: u8, first: u64, n: u64) -> &[u8] {
    let len = n as usize * SECTOR_SIZE;
    for (k, b) in buf[..len].iter_mut().enumerate() {
        *b = pattern_byte(tag, first + (k / SECTOR_SIZE) as u64, k % SECTOR_SIZE);
    }
    &buf[..len]
}

/// Whether `data` is pattern `tag` for sectors from `first` on.
fn holds(data: &[u8], tag: u8, first: u64) -> bool {
    data.iter()
        .enumerate()
        .all(|(k, &b)| b == pattern_byte(tag, first + (k / SECTOR_SIZE) as u64, k % SECTOR_SIZE))
}

/// Prints the failed check and returns its code from the enclosing function.
macro_rules! check {
    ($cond:expr, $code:expr, $($msg:tt)*) => {
        if !$cond {
            rt::println!("disk_spec: check {} failed: {}", $code, format_args!($($msg)*));
            return Err($code);
        }
    };
}

/// Runs a driver call; on an error prints it as check `code` and returns.
macro_rules! io {
    ($call:expr, $code:expr, $what:expr) => {
        match $call {
            Ok(v) => v,
            Err(e) => {
                rt::println!("disk_spec: check {} failed: {}: {}", $code, $what, e);
                return Err($code);
            }
        }
    };
}

type Disk = VirtioBlk<PhysMmio>;

/// Writes pattern `tag` over sectors `first..first + n` (n <= RUN).
fn write_pattern(d: &mut Disk, tag: u8, first: u64, n: u64, code: u32) -> Result<(), u32> {
    let mut buf = [0; RUN as usize * SECTOR_SIZE];
    io!(d.write(first, fill(&mut buf, tag, first, n)), code, "write");
    Ok(())
}

/// Reads sectors `first..first + n` (n <= RUN) and checks they hold `tag`.
fn expect_pattern(d: &mut Disk, tag: u8, first: u64, n: u64, code: u32) -> Result<(), u32> {
    let mut buf = [0; RUN as usize * SECTOR_SIZE];
    let data = &mut buf[..n as usize * SECTOR_SIZE];
    io!(d.read(first, data), code, "read");
    check!(
        holds(data, tag, first),
        code,
        "sectors {first}..{} do not hold pattern {}",
        first + n,
        tag as char
    );
    Ok(())
}

/// Mode 0: the nested speculation.
fn nested(d: &mut Disk) -> Result<(), u32> {
    let id = io!(d.get_id(), 10, "get_id");
    check!(id.starts_with(b"spvm"), 11, "serial number {id:?}");
    write_pattern(d, A, 0, RUN, 12)?;
    io!(d.flush(), 13, "flush at depth 0");
    expect_pattern(d, A, 0, RUN, 14)?;
    // Sectors 16..24 as they were before any speculation.
    let mut before: Buf = [0; RUN as usize * SECTOR_SIZE];
    io!(d.read(2 * RUN, &mut before), 15, "read of 16..24");
    match speculate() {
        Ok(0) => {}
        Ok(r) => {
            rt::println!("disk_spec: check 16 failed: the outer speculation rolled back ({r})");
            return Err(16);
        }
        Err(e) => {
            rt::println!("disk_spec: check 17 failed: outer speculate: {e:?}");
            return Err(17);
        }
    }
    write_pattern(d, B, RUN, RUN, 18)?;
    inner(d)?;
    // Back in the outer speculation, the inner one rolled back.
    check!(
        status().depth == 1,
        30,
        "depth {} after the abort",
        status().depth
    );
    expect_pattern(d, A, 0, RUN, 31)?;
    expect_pattern(d, B, RUN, RUN, 32)?;
    let mut now: Buf = [0; RUN as usize * SECTOR_SIZE];
    io!(d.read(2 * RUN, &mut now), 33, "read of 16..24");
    check!(
        now == before,
        33,
        "sectors 16..24 kept the inner speculation's writes"
    );
    if let Err(e) = commit() {
        rt::println!("disk_spec: check 34 failed: commit: {e:?}");
        return Err(34);
    }
    check!(
        status().depth == 0,
        35,
        "depth {} after the commit",
        status().depth
    );
    expect_pattern(d, A, 0, RUN, 36)?;
    expect_pattern(d, B, RUN, RUN, 37)?;
    io!(d.read(2 * RUN, &mut now), 38, "read of 16..24");
    check!(now == before, 38, "sectors 16..24 changed after the commit");
    io!(d.flush(), 39, "flush after the commit");
    let id = core::str::from_utf8(&id)
        .unwrap_or("?")
        .trim_end_matches('\0');
    rt::println!("disk_spec: nested ok, A at 0..8, B at 8..16, C rolled back, id {id}");
    Ok(())
}

/// The inner speculation: C over 0..4 and 16..24, checked, then aborted.
/// Returns when the abort came back to its checkpoint.
fn inner(d: &mut Disk) -> Result<(), u32> {
    match speculate() {
        Ok(0) => {
            write_pattern(d, C, 0, RUN / 2, 19)?;
            write_pattern(d, C, 2 * RUN, RUN, 20)?;
            io!(d.flush(), 21, "flush at depth 2");
            expect_pattern(d, C, 0, RUN / 2, 22)?;
            expect_pattern(d, A, RUN / 2, RUN / 2, 23)?;
            expect_pattern(d, B, RUN, RUN, 24)?;
            expect_pattern(d, C, 2 * RUN, RUN, 25)?;
            let e = abort();
            rt::println!("disk_spec: check 26 failed: abort returned {e:?}");
            Err(26)
        }
        Ok(r) => {
            check!(r == ABORTED_BY_GUEST, 27, "inner speculate returned {r}");
            Ok(())
        }
        Err(e) => {
            rt::println!("disk_spec: check 28 failed: inner speculate: {e:?}");
            Err(28)
        }
    }
}

/// Mode 1: writes inside a speculation, then waits to be killed.
fn killed(d: &mut Disk) -> Result<(), u32> {
    write_pattern(d, A, 0, RUN, 50)?;
    io!(d.flush(), 51, "flush at depth 0");
    match speculate() {
        Ok(0) => {}
        Ok(r) => {
            rt::println!("disk_spec: check 52 failed: rolled back ({r})");
            return Err(52);
        }
        Err(e) => {
            rt::println!("disk_spec: check 53 failed: speculate: {e:?}");
            return Err(53);
        }
    }
    for first in (0..4 * RUN).step_by(RUN as usize) {
        write_pattern(d, K, first, RUN, 54)?;
    }
    let last = d.capacity() - RUN;
    write_pattern(d, K, last, RUN, 55)?;
    io!(d.flush(), 56, "flush inside the speculation");
    expect_pattern(d, K, 0, RUN, 57)?;
    rt::println!("disk_spec: spinning inside a speculation");
    loop {
        core::hint::spin_loop();
    }
}

/// Mode 2: a read-only disk refuses a write.
fn read_only(d: &mut Disk) -> Result<(), u32> {
    check!(
        d.read_only(),
        60,
        "the device does not offer VIRTIO_BLK_F_RO"
    );
    expect_pattern(d, O, 0, RUN, 61)?;
    let one = [0x5a; SECTOR_SIZE];
    match d.write(0, &one) {
        Err(virtio_blk::Error::Status(S_IOERR)) => {}
        r => {
            rt::println!("disk_spec: check 62 failed: write to a read-only disk: {r:?}");
            return Err(62);
        }
    }
    expect_pattern(d, O, 0, RUN, 63)?;
    rt::println!("disk_spec: read-only ok, write refused with IOERR");
    Ok(())
}

/// Speculates; returns whether this is the first return (0), with check
/// `code` on an error.
fn spec_first(code: u32) -> Result<bool, u32> {
    match speculate() {
        Ok(0) => Ok(true),
        Ok(r) if r == ABORTED_BY_GUEST => Ok(false),
        Ok(r) => {
            rt::println!("disk_spec: check {code} failed: speculate returned {r}");
            Err(code)
        }
        Err(e) => {
            rt::println!("disk_spec: check {code} failed: speculate: {e:?}");
            Err(code)
        }
    }
}

/// Commits the open speculation, with check `code` on an error.
fn commit_or(code: u32) -> Result<(), u32> {
    commit().map_err(|e| {
        rt::println!("disk_spec: check {code} failed: commit: {e:?}");
        code
    })
}

/// Mode 3: the state a snapshot takes, then one clone's own writes.
fn clone(d: &mut Disk) -> Result<(), u32> {
    expect_pattern(d, O, 0, RUN, 70)?;
    write_pattern(d, A, 0, RUN, 71)?;
    io!(d.flush(), 72, "flush at depth 0");
    check!(spec_first(73)?, 73, "the speculation rolled back");
    write_pattern(d, B, RUN, RUN, 74)?;
    commit_or(75)?;
    rt::println!("disk_spec: ready for a snapshot");
    let tag = rt::console().read_byte();
    check!(tag.is_ascii_uppercase(), 76, "tag byte {tag:#x}");
    // A restored copy from here on.
    expect_pattern(d, A, 0, RUN, 77)?;
    expect_pattern(d, B, RUN, RUN, 78)?;
    for first in (2 * RUN..5 * RUN).step_by(RUN as usize) {
        expect_pattern(d, O, first, RUN, 79)?;
    }
    write_pattern(d, tag, 2 * RUN, RUN, 80)?;
    io!(d.flush(), 81, "flush at depth 0");
    check!(spec_first(82)?, 82, "the speculation rolled back");
    write_pattern(d, tag, 3 * RUN, RUN, 83)?;
    commit_or(84)?;
    if spec_first(85)? {
        write_pattern(d, tag, 4 * RUN, RUN, 86)?;
        let e = abort();
        rt::println!("disk_spec: check 87 failed: abort returned {e:?}");
        return Err(87);
    }
    let check_own = |d: &mut Disk, code: u32| -> Result<(), u32> {
        expect_pattern(d, A, 0, RUN, code)?;
        expect_pattern(d, B, RUN, RUN, code)?;
        expect_pattern(d, tag, 2 * RUN, RUN, code)?;
        expect_pattern(d, tag, 3 * RUN, RUN, code)?;
        expect_pattern(d, O, 4 * RUN, RUN, code)
    };
    check_own(d, 88)?;
    rt::println!("disk_spec: clone {} wrote 16..32", tag as char);
    let _ = rt::console().read_byte();
    check_own(d, 89)?;
    rt::println!("disk_spec: clone {} ok", tag as char);
    Ok(())
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let mut d = match blk_open::open("disk_spec", mem_size, free_base) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if d.capacity() < MIN_SECTORS {
        rt::println!(
            "disk_spec: disk of {} sectors, {MIN_SECTORS} needed",
            d.capacity()
        );
        return 4;
    }
    let r = match arg {
        0 => nested(&mut d),
        1 => killed(&mut d),
        2 => read_only(&mut d),
        3 => clone(&mut d),
        _ => {
            rt::println!("disk_spec: --guest-arg must be 0, 1, 2 or 3");
            Err(1)
        }
    };
    match r {
        Ok(()) => 0,
        Err(code) => code,
    }
}
