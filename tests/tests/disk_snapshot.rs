//! Snapshots and clones of a VM with a `--disk` (docs/disk.md): the
//! `disk_spec` guest in its clone mode (`--guest-arg 3`) writes under
//! depth 0 and a committed speculation on a private disk, is snapshotted,
//! and restored twice; each restored copy reads the snapshot's data,
//! writes its own, and never sees the other's, and the image file keeps
//! its bytes throughout.

use std::path::Path;
use std::time::Duration;

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, spawn_specvm, Spawned, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;
/// Image size: 1 MiB, the least `disk_spec` takes.
const IMAGE_SECTORS: u64 = 2048;

/// Byte `i` of sector `sector` in pattern `tag`: the same function as
/// `pattern_byte` in `guests/src/bin/disk_spec.rs`.
fn pattern_byte(tag: u8, sector: u64, i: usize) -> u8 {
    tag ^ (sector as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(3) ^ (i >> 8) as u8
}

/// An image of pattern O.
fn o_image() -> Vec<u8> {
    let mut image = vec![0; IMAGE_SECTORS as usize * SECTOR];
    for (k, b) in image.iter_mut().enumerate() {
        *b = pattern_byte(b'O', (k / SECTOR) as u64, k % SECTOR);
    }
    image
}

fn wait_for_socket(sock: &Path) {
    for _ in 0..400 {
        if sock.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the API socket {} never appeared", sock.display());
}

/// `specvm ctl --api-sock SOCK OP [--path DIR]`: (exit status, stdout).
fn ctl(sock: &Path, op: &str, path: Option<&Path>) -> (i32, String) {
    let sock = sock.to_str().expect("UTF-8 path");
    let mut args = vec!["ctl", "--api-sock", sock, op];
    if let Some(p) = path {
        args.extend_from_slice(&["--path", p.to_str().expect("UTF-8 path")]);
    }
    let r = run_specvm(&args, TIMEOUT);
    (r.status, r.stdout)
}

fn disk_arg(path: &Path, flags: &str) -> String {
    format!("--disk=path={}{flags}", path.display())
}

/// Panics unless `img` holds exactly `want`.
fn assert_image(img: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(img).expect("read the image");
    assert!(got == want, "{what}: the image file changed");
}

fn wait(vm: &mut Spawned, line: &str) {
    vm.wait_for_line(line, TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Starts the clone-mode guest on `img` with `flags`, lets it write, and
/// snapshots it into `snap` (after checking that a snapshot inside a
/// speculation is refused). The VM is stopped before this returns.
fn write_and_snapshot(dir: &TempDir, img: &Path, flags: &str, snap: &Path) {
    let sock = dir.join("api.sock");
    let guest = bare_guest("disk_spec");
    let disk = disk_arg(img, flags);
    let mut vm = spawn_specvm(&[
        "run",
        "--bare",
        guest.to_str().expect("UTF-8 path"),
        "--memory",
        "64M",
        "--guest-arg",
        "3",
        "--api-sock",
        sock.to_str().expect("UTF-8 path"),
        &disk,
    ]);
    wait(&mut vm, "disk_spec: ready for a snapshot");
    wait_for_socket(&sock);
    // Inside a speculation a snapshot is refused: it holds no checkpoint
    // stack (and no disk level of one).
    assert_eq!(ctl(&sock, "speculate", None).0, 0);
    let (st, out) = ctl(&sock, "snapshot", Some(snap));
    assert_ne!(st, 0, "a snapshot inside a speculation was taken: {out}");
    assert!(out.contains("speculation checkpoint"), "{out}");
    assert_eq!(ctl(&sock, "abort", None).0, 0);
    let (st, out) = ctl(&sock, "snapshot", Some(snap));
    assert_eq!(st, 0, "snapshot failed: {out}");
    // SAFETY: a signal to the child this test started and has not reaped.
    let rc = unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    vm.finish(TIMEOUT);
}

/// What clone `tag`'s disk holds once it has written: A at sectors 0..8
/// and B at 8..16 (the snapshot's), its tag at 16..32 (depth 0 and a
/// committed speculation), and O elsewhere (32..40 was written in an
/// aborted speculation).
fn clone_view(tag: u8) -> Vec<u8> {
    let mut image = o_image();
    for (k, b) in image.iter_mut().enumerate().take(32 * SECTOR) {
        let sector = (k / SECTOR) as u64;
        let t = match sector {
            0..8 => b'A',
            8..16 => b'B',
            _ => tag,
        };
        *b = pattern_byte(t, sector, k % SECTOR);
    }
    image
}

/// Restores `snap` over `img` (with `flags`) twice, at once, and runs
/// both copies through their writes, each with its own tag. Once both
/// have written, each one's disk is exported (`specvm ctl disk-export`)
/// into `dir` and must hold exactly that clone's view.
fn two_clones(dir: &TempDir, snap: &Path, img: &Path, flags: &str) {
    let disk = disk_arg(img, flags);
    let snap = snap.to_str().expect("UTF-8 path");
    // Names apart for each call (the private one, and the other).
    let run = if flags.is_empty() { "s" } else { "p" };
    let sock = |t: &str| dir.join(&format!("clone-{t}{run}.sock"));
    let (sx, sy) = (sock("X"), sock("Y"));
    let api = |s: &Path| format!("--api-sock={}", s.display());
    let mut x = spawn_specvm(&["run", "--restore", snap, &disk, &api(&sx)]);
    let mut y = spawn_specvm(&["run", "--restore", snap, &disk, &api(&sy)]);
    x.send(b"X").expect("send to X");
    y.send(b"Y").expect("send to Y");
    // Both have written before either checks again.
    wait(&mut x, "disk_spec: clone X wrote 16..32");
    wait(&mut y, "disk_spec: clone Y wrote 16..32");
    for (tag, s) in [(b'X', &sx), (b'Y', &sy)] {
        let out = dir.join(&format!("export-{}{run}.img", tag as char));
        let (st, msg) = ctl(s, "disk-export", Some(&out));
        assert_eq!(st, 0, "disk-export of clone {}: {msg}", tag as char);
        assert!(msg.contains(r#""granules":"#), "{msg}");
        assert_image(&out, &clone_view(tag), "the exported disk");
        // The file is the user's now: a second export never replaces it.
        let (st, msg) = ctl(s, "disk-export", Some(&out));
        assert_ne!(st, 0, "a second export over {}: {msg}", out.display());
        assert!(msg.contains("never replaces"), "{msg}");
    }
    x.send(b".").expect("send to X");
    y.send(b".").expect("send to Y");
    wait(&mut x, "disk_spec: clone X ok");
    wait(&mut y, "disk_spec: clone Y ok");
    for (name, vm) in [("X", x), ("Y", y)] {
        let r = vm.finish(TIMEOUT);
        assert_eq!(r.status, 0, "clone {name}: {r}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn clones_of_a_disk_snapshot_each_write_their_own_view() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-clones");
    let img = dir.join("disk.img");
    let image = o_image();
    std::fs::write(&img, &image).unwrap();
    let snap = dir.join("snap");
    // Private: the writes before the snapshot live only in the VMM, so
    // the clones can only read them from the snapshot.
    write_and_snapshot(&dir, &img, ",private", &snap);
    assert_image(&img, &image, "after the private VM");
    two_clones(&dir, &snap, &img, "");
    assert_image(&img, &image, "after the clones");
    // Once more: the clones wrote nothing into the snapshot either.
    two_clones(&dir, &snap, &img, ",private");
    assert_image(&img, &image, "after the second pair of clones");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_shared_disk_is_snapshotted_with_its_image_and_cloned() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-clones-shared");
    let img = dir.join("disk.img");
    std::fs::write(&img, o_image()).unwrap();
    let snap = dir.join("snap");
    // Not private: A and B are in the image when the snapshot is taken.
    write_and_snapshot(&dir, &img, "", &snap);
    let after = std::fs::read(&img).unwrap();
    assert_ne!(
        after,
        o_image(),
        "the shared disk's writes did not reach the image"
    );
    two_clones(&dir, &snap, &img, "");
    assert_image(&img, &after, "after the clones");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_changed_or_missing_image_is_refused_at_restore() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-identity");
    let img = dir.join("disk.img");
    std::fs::write(&img, o_image()).unwrap();
    let snap = dir.join("snap");
    write_and_snapshot(&dir, &img, ",private", &snap);
    let snap_s = snap.to_str().expect("UTF-8 path");

    // No --disk: the snapshot names what it needs.
    let r = run_specvm(&["run", "--restore", snap_s], TIMEOUT);
    assert_eq!(r.status, 1, "{r}");
    r.assert_stderr_contains("the snapshot has 1 disk(s)");
    r.assert_stderr_contains(&img.display().to_string());

    // Another file with the same bytes: another inode.
    let copy = dir.join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let r = run_specvm(&["run", "--restore", snap_s, &disk_arg(&copy, "")], TIMEOUT);
    assert_eq!(r.status, 1, "{r}");
    r.assert_stderr_contains("changed since the snapshot");
    r.assert_stderr_contains("inode");

    // The image itself rewritten after the snapshot: one byte in its
    // middle (outside the sampled ends), so only its time tells.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::os::unix::fs::FileExt::write_all_at(&f, b"z", 512 * 1024).unwrap();
    drop(f);
    let r = run_specvm(&["run", "--restore", snap_s, &disk_arg(&img, "")], TIMEOUT);
    assert_eq!(r.status, 1, "{r}");
    r.assert_stderr_contains(&format!(
        "disk image {} changed since the snapshot: mtime",
        img.display()
    ));
    assert!(r.stdout.is_empty(), "the guest ran: {r}");
}
