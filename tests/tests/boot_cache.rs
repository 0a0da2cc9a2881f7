//! `specvm run --boot-cache` end to end with the `ready` bare guest
//! (docs/boot-cache.md): the first start boots and saves the guest at its
//! `READY` hypercall, the second restores it, and every change to what the
//! saved guest depends on (the program, the memory size, the guest
//! argument), or damage to the entry, makes the VMM boot again and say why.
//! The Linux test (`tests/linux.rs`) covers the same for a kernel and
//! initramfs, on the entry its one boot saves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, RunResult, TempDir as Dir};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the guest `program` with the boot cache in `cache`.
fn run(program: &str, cache: &Dir, extra: &[&str]) -> RunResult {
    let mut args = vec![
        "run",
        "--bare",
        program,
        "--boot-cache",
        "--boot-cache-dir",
        cache.str(),
    ];
    args.extend_from_slice(extra);
    let r = run_specvm(&args, TIMEOUT);
    r.assert_status(0);
    r
}

/// The token the guest printed on its `up` line.
fn token(r: &RunResult) -> String {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("ready: up, token "))
        .and_then(|t| t.split(',').next())
        .unwrap_or_else(|| panic!("no `up` line: {r}"))
        .to_string()
}

/// A cold start boots (the guest prints its boot line) and saves; what the
/// VMM reports says so.
fn assert_booted_and_saved(r: &RunResult, why: &str) {
    assert!(r.stdout.contains("ready: booting"), "no boot: {r}");
    r.assert_stderr_contains(why);
    r.assert_stderr_contains("boot cache: saved the ready guest");
}

/// A warm start restores: no boot line, the saved boot's token.
fn assert_restored(r: &RunResult, saved_token: &str) {
    r.assert_stderr_contains("boot cache: restoring the ready guest");
    assert!(!r.stdout.contains("ready: booting"), "it booted: {r}");
    assert_eq!(token(r), saved_token, "{r}");
}

/// Waits until `path` last changed over a second ago: the cache keeps a
/// file's hash for later starts only if it was taken that long after the
/// file's last change (docs/boot-cache.md).
fn settled(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).unwrap();
    let changed = std::time::UNIX_EPOCH
        + Duration::new(md.ctime() as u64, md.ctime_nsec() as u32)
        + Duration::from_millis(1100);
    if let Ok(left) = changed.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// The one entry folder in `cache`.
fn only_entry(cache: &Dir) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("boot"))
        .expect("the cache has a boot folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_second_start_restores_the_ready_guest() {
    skip_without_kvm!();
    let cache = Dir::new("bc-warm");
    let g = bare_guest("ready");
    settled(&g);
    let g = g.to_str().unwrap();
    let cold = run(g, &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&cold, "no entry in");
    let saved = token(&cold);
    let warm = run(g, &cache, &["--memory", "64M"]);
    assert_restored(&warm, &saved);
    // And again: a restore leaves the entry as it was.
    let again = run_specvm(
        &[
            "--log-level",
            "info",
            "run",
            "--bare",
            g,
            "--boot-cache",
            "--boot-cache-dir",
            cache.str(),
            "--memory",
            "64M",
        ],
        TIMEOUT,
    );
    again.assert_status(0);
    assert_restored(&again, &saved);
    // The program's hash came from the entry's record, not from reading
    // it (it was hashed more than a second after it was built).
    again.assert_stderr_contains("boot cache: key's file hashes read=0 recorded=1");
    again.assert_stderr_contains("snapshot memory checked before start");
    // A real boot gives another token: the restored one is the saved boot's.
    let other = Dir::new("bc-warm-other");
    let fresh = run(g, &other, &["--memory", "64M"]);
    assert_ne!(token(&fresh), saved, "two boots gave the same token");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_changed_program_memory_or_argument_boots_again_and_says_why() {
    skip_without_kvm!();
    let cache = Dir::new("bc-changes");
    let g = bare_guest("ready");
    let g = g.to_str().unwrap();
    assert_booted_and_saved(&run(g, &cache, &["--memory", "64M"]), "no entry in");

    // One byte more at the end of the ELF file: the loader ignores it, the
    // cache does not.
    let copy = cache.join("ready-copy");
    let mut bytes = std::fs::read(g).unwrap();
    bytes.push(0);
    std::fs::write(&copy, &bytes).unwrap();
    let r = run(copy.to_str().unwrap(), &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&r, "differs in: program (its content changed)");

    let r = run(g, &cache, &["--memory", "96M"]);
    assert_booted_and_saved(&r, "memory (100663296 now, 67108864 saved)");

    let r = run(g, &cache, &["--memory", "64M", "--guest-arg", "20"]);
    assert_booted_and_saved(&r, "guest_arg (20 now, 0 saved)");
    assert!(r.stdout.contains("20 pages intact"), "{r}");

    // Each of those saved its own entry: all of them now restore.
    for extra in [
        &["--memory", "64M"][..],
        &["--memory", "96M"],
        &["--memory", "64M", "--guest-arg", "20"],
    ] {
        let r = run(g, &cache, extra);
        r.assert_stderr_contains("boot cache: restoring");
    }
}

/// The memory layer in snapshot folder `snap`.
fn memory_layer(snap: &Path) -> PathBuf {
    std::fs::read_dir(snap)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("memory-")
        })
        .expect("a memory layer")
}

/// Flips one byte of `path` at `offset`.
fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], offset).unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_damaged_entry_is_refused_and_replaced() {
    skip_without_kvm!();
    let cache = Dir::new("bc-damage");
    let g = bare_guest("ready");
    let g = g.to_str().unwrap();
    let cold = run(g, &cache, &["--memory", "64M"]);
    let saved = token(&cold);
    let entry = only_entry(&cache);
    let snap = entry.join("snapshot");
    let memory = memory_layer(&snap);

    // One bit of guest memory: the program's own page at 4 MiB. The
    // restore's check finds it, before any vCPU runs, and the VMM boots.
    flip(&memory, 0x40_0000 + 100);
    let r = run(g, &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&r, "is damaged: bytes 0x400000..");
    r.assert_stderr_contains("damaged entry");
    assert_ne!(token(&r), saved, "it restored the damaged guest");
    // The boot replaced the damaged entry with a good one.
    let replaced = token(&r);
    assert_eq!(only_entry(&cache), entry);
    assert_restored(&run(g, &cache, &["--memory", "64M"]), &replaced);

    // A truncated state file.
    let state = snap.join("state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let r = run(g, &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&r, "state is");

    // A record that is not JSON.
    std::fs::write(entry.join("entry.json"), b"{ not json").unwrap();
    let r = run(g, &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&r, "damaged entry");
    r.assert_stderr_contains("entry.json");
    // A missing memory layer.
    let memory = memory_layer(&snap);
    std::fs::remove_file(&memory).unwrap();
    let r = run(g, &cache, &["--memory", "64M"]);
    assert_booted_and_saved(&r, "damaged entry");
    assert_eq!(only_entry(&cache), entry);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_guest_that_never_says_ready_saves_nothing() {
    skip_without_kvm!();
    let cache = Dir::new("bc-never");
    let g = bare_guest("hello");
    let r = run(g.to_str().unwrap(), &cache, &["--memory", "64M"]);
    r.assert_stderr_contains("never said it was ready");
    assert!(!cache.join("boot").exists() || only_entry_count(&cache) == 0);
}

fn only_entry_count(cache: &Dir) -> usize {
    std::fs::read_dir(cache.join("boot"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn bad_combinations_are_refused_with_one_line() {
    let cache = Dir::new("bc-bad");
    let g = bare_guest("ready");
    let g = g.to_str().unwrap();
    let r = run_specvm(
        &[
            "run",
            "--bare",
            g,
            "--boot-cache",
            "--boot-cache-dir",
            cache.str(),
            "--checkpoint",
            "full-copy",
        ],
        TIMEOUT,
    );
    r.assert_failed();
    r.assert_stderr_contains("specvm: error: boot cache: --boot-cache saves a snapshot");
    let r = run_specvm(&["run", "--restore", cache.str(), "--boot-cache"], TIMEOUT);
    r.assert_failed();
    r.assert_stderr_contains("cannot be used with");
    let r = run_specvm(
        &["run", "--bare", g, "--boot-cache-dir", cache.str()],
        TIMEOUT,
    );
    r.assert_failed();
    r.assert_stderr_contains("--boot-cache");
}

/// With `--disk`, the boot runs the disk private (the image keeps its
/// bytes and time), the key hashes the image's content: an image with the
/// same bytes under another inode restores, one with other bytes boots
/// again and says why.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_disk_is_part_of_the_key_and_is_never_written() {
    skip_without_kvm!();
    let cache = Dir::new("bc-disk");
    let img = cache.join("disk.img");
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let mtime = || std::fs::metadata(&img).unwrap().modified().unwrap();
    let before = mtime();
    let disk = format!("--disk=path={}", img.display());
    let g = bare_guest("ready");
    let g = g.to_str().unwrap();
    let args = ["--memory", "64M", disk.as_str()];
    let cold = run(g, &cache, &args);
    assert_booted_and_saved(&cold, "no entry in");
    let saved = token(&cold);
    assert_restored(&run(g, &cache, &args), &saved);
    assert_eq!(mtime(), before, "the image was written");
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x5a; 1 << 20]);

    // Same content, another inode and time (an image rebuilt, or a fresh
    // clone's): the key hashed the content, so the entry restores over it.
    let copy = cache.join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    std::fs::rename(&copy, &img).unwrap();
    assert_restored(&run(g, &cache, &args), &saved);

    // Another content: another key.
    std::fs::write(&img, vec![0x5b; 1 << 20]).unwrap();
    let r = run(g, &cache, &args);
    assert_booted_and_saved(&r, "disks (an image's content");
}
