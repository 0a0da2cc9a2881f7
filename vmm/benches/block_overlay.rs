//! Costs of the speculative disk's level operations (issue 14): they must
//! follow the blocks written, not the disk's size. For a sparse image of
//! 1 GiB and of 16 GiB and 10 / 1,000 / 100,000 granules (4 KiB) written
//! under a speculation, prints the time to write them, to roll them back,
//! to fold an inner level holding them into an outer level holding the
//! same granules, and to fold the outermost level into the base (writes
//! plus fdatasync; the granules are spread over the disk, so each is its
//! own pwrite).
//!
//! Run with `benches/block_overlay.sh` (or `cargo bench -p vmm --bench
//! block_overlay`). `SPECVM_BENCH_DIR` chooses where the sparse images go
//! (default: the temporary folder).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::devices::virtio::block::overlay::GRANULE;
use vmm::devices::virtio::block::{FileBase, SpecDisk};

const GIB: u64 = 1 << 30;

fn image(dir: &std::path::Path, size: u64) -> PathBuf {
    let path = dir.join(format!("specvm-bench-{}g.img", size / GIB));
    let f = std::fs::File::create(&path).expect("creating the image");
    f.set_len(size).expect("sizing the sparse image");
    path
}

fn open(path: &std::path::Path, size: u64) -> SpecDisk<FileBase> {
    let base = FileBase::open(path, false).expect("opening the image");
    SpecDisk::new(base, size, false, u64::MAX)
}

/// Writes `n` granules spread over the disk into the top level.
fn write_spread(d: &mut SpecDisk<FileBase>, n: u64, byte: u8) -> Duration {
    let stride = (d.size() / GRANULE / n).max(1) * GRANULE;
    let data = vec![byte; GRANULE as usize];
    let t = Instant::now();
    for i in 0..n {
        d.write(i * stride, &data).expect("write");
    }
    t.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    let dir = std::env::var_os("SPECVM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "| disk | granules | write ms | rollback ms | fold inner ms | fold outer ms (+fdatasync) |"
    );
    println!("|---|---|---|---|---|---|");
    for size in [GIB, 16 * GIB] {
        let path = image(&dir, size);
        for n in [10u64, 1_000, 100_000] {
            let mut d = open(&path, size);
            d.push_level();
            let write = write_spread(&mut d, n, 1);
            let t = Instant::now();
            d.rollback_to(0).expect("rollback");
            let rollback = t.elapsed();

            // Both levels hold the same n granules: every one of the
            // inner level's replaces one of the outer level's.
            d.push_level();
            write_spread(&mut d, n, 2);
            d.push_level();
            write_spread(&mut d, n, 3);
            let t = Instant::now();
            d.fold(1).expect("inner fold");
            let inner = t.elapsed();
            let t = Instant::now();
            d.fold(0).expect("outer fold");
            let outer = t.elapsed();
            println!(
                "| {} GiB | {n} | {} | {} | {} | {} |",
                size / GIB,
                ms(write),
                ms(rollback),
                ms(inner),
                ms(outer)
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
