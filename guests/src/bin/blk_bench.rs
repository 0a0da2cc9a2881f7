//! The disk benchmark's guest (`benches/disk_io.py`): 4 KiB requests to
//! the first `--disk`, one at a time (queue depth 1), in phases.
//! `--guest-arg` = N | (C << 32), N the requests per phase (default
//! 4096); C = 1 runs only `seq-write` and the speculation's phases (the
//! checkpoint benchmark: a disk with N blocks written, then N more under a
//! speculation that aborts).
//!
//! Phases, each printed as `blk_bench: PHASE start` then `blk_bench:
//! PHASE done N` (the host times the lines; a guest clock would not
//! survive the rollback of the last phase):
//! - `seq-write`, `seq-read`: blocks 0, 1, 2, ...;
//! - `rnd-write`, `rnd-read`: blocks `(i * STRIDE) mod blocks`, a stride
//!   that is prime to every power of two, so N requests touch N distinct
//!   blocks spread over the whole disk (the same order `qemu-img bench
//!   -S` takes in the benchmark, which has no random mode);
//! - `spec-write`, `spec-read`: the same as `rnd-*` inside a speculation,
//!   so the writes go to the overlay and the reads find them there; then
//!   `abort` (the host times it with `--stats`), after which the guest
//!   prints `blk_bench: rolled back` and ends.
//!
//! Exit status 0 on success; 2: no virtio-blk device; 3: the driver did
//! not start; 4: the disk is smaller than N blocks; 5: no room for the
//! driver's memory; 6: a request or the speculation failed.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

#[path = "../blk_open.rs"]
mod blk_open;

use guest_agent::hypercall::{abort, speculate};
use guest_agent::virtio_blk::{PhysMmio, VirtioBlk};

/// Bytes per request.
const BLOCK: usize = 4096;
/// Sectors per request.
const BLOCK_SECTORS: u64 = (BLOCK / 512) as u64;
/// The stride of the `rnd-*` phases, in blocks: odd, so it is prime to the
/// block count of any disk whose size is a power of two.
const STRIDE: u64 = 7919;

/// Which block request `i` of a phase touches.
fn block(i: u64, random: bool, blocks: u64) -> u64 {
    if random {
        (i * STRIDE) % blocks
    } else {
        i
    }
}

/// One phase of `n` requests.
fn phase(d: &mut VirtioBlk<PhysMmio>, name: &str, n: u64, write: bool, random: bool) -> u32 {
    let blocks = d.capacity() / BLOCK_SECTORS;
    let mut buf = [0u8; BLOCK];
    rt::println!("blk_bench: {name} start");
    for i in 0..n {
        let sector = block(i, random, blocks) * BLOCK_SECTORS;
        let r = if write {
            buf[..8].copy_from_slice(&i.to_le_bytes());
            d.write(sector, &buf)
        } else {
            d.read(sector, &mut buf)
        };
        if let Err(e) = r {
            rt::println!("blk_bench: {name}: request {i} (sector {sector}): {e}");
            return 6;
        }
    }
    rt::println!("blk_bench: {name} done {n}");
    0
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let n = match arg & 0xffff_ffff {
        0 => 4096,
        n => n,
    };
    let checkpoint_only = arg >> 32 == 1;
    let mut d = match blk_open::open("blk_bench", mem_size, free_base) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if d.capacity() / BLOCK_SECTORS < n {
        rt::println!(
            "blk_bench: {} blocks on the disk, {n} needed",
            d.capacity() / BLOCK_SECTORS
        );
        return 4;
    }
    for (name, write, random) in [
        ("seq-write", true, false),
        ("seq-read", false, false),
        ("rnd-write", true, true),
        ("rnd-read", false, true),
    ] {
        if checkpoint_only && name != "seq-write" {
            continue;
        }
        let r = phase(&mut d, name, n, write, random);
        if r != 0 {
            return r;
        }
    }
    match speculate() {
        Ok(0) => {
            for (name, write) in [("spec-write", true), ("spec-read", false)] {
                let r = phase(&mut d, name, n, write, true);
                if r != 0 {
                    return r;
                }
            }
            let e = abort();
            rt::println!("blk_bench: abort failed: {e:?}");
            6
        }
        Ok(_) => {
            rt::println!("blk_bench: rolled back");
            0
        }
        Err(e) => {
            rt::println!("blk_bench: speculate failed: {e:?}");
            6
        }
    }
}
