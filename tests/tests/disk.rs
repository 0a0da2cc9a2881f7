//! `--disk` from a bare guest's side: the `disk_spec` guest drives the
//! virtio-blk device with `guest_agent::virtio_blk`, and the tests check
//! the image file's bytes afterwards.
//!
//! Images are filled with pattern O (see [`pattern_byte`], the guest's
//! function) so a sector that wrongly went back to zeros, or kept a
//! speculative write, shows.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::Path;
use std::time::Duration;

use specvm_tests::{
    bare_guest, run_specvm, skip_without_kvm, spawn_specvm, FrameListener, RunResult, TempDir,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;
/// Image size: 1 MiB, the least `disk_spec` takes.
const IMAGE_SECTORS: u64 = 2048;

/// Byte `i` of sector `sector` in pattern `tag`: the same function as
/// `pattern_byte` in `guests/src/bin/disk_spec.rs`.
fn pattern_byte(tag: u8, sector: u64, i: usize) -> u8 {
    tag ^ (sector as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(3) ^ (i >> 8) as u8
}

/// Writes pattern `tag` over sectors `first..first + n` of `image`.
fn put(image: &mut [u8], tag: u8, first: u64, n: u64) {
    for s in first..first + n {
        let at = s as usize * SECTOR;
        for (i, b) in image[at..at + SECTOR].iter_mut().enumerate() {
            *b = pattern_byte(tag, s, i);
        }
    }
}

/// An image of `sectors` sectors filled with pattern O.
fn o_image(sectors: u64) -> Vec<u8> {
    let mut image = vec![0; sectors as usize * SECTOR];
    put(&mut image, b'O', 0, sectors);
    image
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// Panics unless the file at `path` holds exactly `want`; names the first
/// sector that differs.
fn assert_image(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).expect("read the image");
    assert_eq!(got.len(), want.len(), "{what}: image size changed");
    if digest(&got) == digest(want) && got == want {
        return;
    }
    let first = got
        .chunks(SECTOR)
        .zip(want.chunks(SECTOR))
        .position(|(g, w)| g != w)
        .unwrap_or(0);
    panic!(
        "{what}: image hash {:016x}, expected {:016x}; first different sector {first}: \
         starts {:02x?}, expected {:02x?}",
        digest(&got),
        digest(want),
        &got[first * SECTOR..first * SECTOR + 8],
        &want[first * SECTOR..first * SECTOR + 8],
    );
}

/// `run --bare disk_spec --memory 64M --guest-arg ARG` followed by `extra`.
fn disk_args(arg: &str, extra: &[&str]) -> Vec<String> {
    let guest = bare_guest("disk_spec");
    let mut args: Vec<String> = ["run", "--bare", guest.to_str().expect("UTF-8 path")]
        .into_iter()
        .chain(["--memory", "64M", "--guest-arg", arg])
        .map(str::to_owned)
        .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn run_disk(arg: &str, extra: &[&str]) -> RunResult {
    let args = disk_args(arg, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_specvm(&args, TIMEOUT)
}

fn disk_arg(path: &Path, flags: &str) -> String {
    format!("--disk=path={}{flags}", path.display())
}

/// Panics, showing the run, unless stdout has a line starting `prefix`.
fn assert_line(r: &RunResult, prefix: &str) {
    assert!(
        r.stdout.lines().any(|l| l.starts_with(prefix)),
        "expected a line starting {prefix:?}, got {r}"
    );
}

/// The image after mode 0: A at 0..8, B at 8..16, the rest untouched.
fn nested_result() -> Vec<u8> {
    let mut want = o_image(IMAGE_SECTORS);
    put(&mut want, b'A', 0, 8);
    put(&mut want, b'B', 8, 8);
    want
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn nested_speculation_reaches_the_image_only_through_the_commit() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-nested");
    let img = dir.join("disk.img");
    std::fs::write(&img, o_image(IMAGE_SECTORS)).unwrap();
    let r = run_disk("0", &[&disk_arg(&img, "")]);
    r.assert_status(0);
    assert_line(&r, "disk_spec: virtio-blk in slot 0, 2048 sectors");
    assert_line(
        &r,
        "disk_spec: nested ok, A at 0..8, B at 8..16, C rolled back, id spvm",
    );
    assert_image(&img, &nested_result(), "after the nested run");
}

/// The disk comes after the `--net` card: the guest finds it in slot 1.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_disk_follows_the_net_cards() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-after-net");
    let img = dir.join("disk.img");
    std::fs::write(&img, o_image(IMAGE_SECTORS)).unwrap();
    let sock = dir.join("net.sock");
    let _frames = FrameListener::bind(&sock).collect();
    let net = format!("--net=socket={}", sock.display());
    let r = run_disk("0", &[&net, &disk_arg(&img, "")]);
    r.assert_status(0);
    assert_line(&r, "disk_spec: virtio-blk in slot 1, 2048 sectors");
    assert_image(&img, &nested_result(), "after the nested run");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_vmm_killed_inside_a_speculation_leaves_the_image_as_before_it() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-kill");
    let img = dir.join("disk.img");
    std::fs::write(&img, o_image(IMAGE_SECTORS)).unwrap();
    // Before the speculation the guest writes A over 0..8 at depth 0.
    let mut before = o_image(IMAGE_SECTORS);
    put(&mut before, b'A', 0, 8);
    let disk = disk_arg(&img, "");
    let args = disk_args("1", &[&disk]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = spawn_specvm(&args);
    vm.wait_for_line("disk_spec: spinning inside a speculation", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The speculation's writes and flush are in the VMM's overlay only.
    assert_image(&img, &before, "while the guest spins in the speculation");
    // SAFETY: a signal to the child this test started and has not reaped.
    let rc = unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let r = vm.finish(TIMEOUT);
    r.assert_status(128 + libc::SIGKILL);
    assert_image(&img, &before, "after SIGKILL");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_read_only_disk_answers_a_write_with_ioerr() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-ro");
    let img = dir.join("disk.img");
    let image = o_image(IMAGE_SECTORS);
    std::fs::write(&img, &image).unwrap();
    let r = run_disk("2", &[&disk_arg(&img, ",readonly")]);
    r.assert_status(0);
    assert_line(
        &r,
        "disk_spec: virtio-blk in slot 0, 2048 sectors, read-only",
    );
    assert_line(&r, "disk_spec: read-only ok, write refused with IOERR");
    assert_image(&img, &image, "a read-only disk");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn without_a_disk_the_guest_finds_none() {
    skip_without_kvm!();
    let r = run_disk("0", &[]);
    r.assert_status(2);
    assert_line(&r, "disk_spec: no virtio-blk device");
}

/// Panics unless the run failed with a `specvm: error:` line containing
/// `needle`.
fn assert_refused(r: &RunResult, needle: &str) {
    r.assert_status(1);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with("specvm: error:") && l.contains(needle)),
        "expected a `specvm: error:` line with {needle:?}, got {r}"
    );
    assert!(r.stdout.is_empty(), "the guest ran: {r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_missing_image_is_refused_with_its_path() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-missing");
    let img = dir.join("no-such.img");
    let r = run_disk("0", &[&disk_arg(&img, "")]);
    assert_refused(&r, &img.display().to_string());
    r.assert_stderr_contains("does not exist");
    assert!(!img.exists(), "specvm created the image");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn an_image_of_partial_sectors_is_refused_with_its_size() {
    skip_without_kvm!();
    let dir = TempDir::new("disk-size");
    let img = dir.join("odd.img");
    std::fs::write(&img, vec![0u8; 1000]).unwrap();
    let r = run_disk("0", &[&disk_arg(&img, "")]);
    assert_refused(&r, "1000 bytes");
    r.assert_stderr_contains("multiple of 512");
    assert_eq!(std::fs::read(&img).unwrap(), vec![0u8; 1000]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_bad_disk_option_is_refused() {
    skip_without_kvm!();
    let r = run_disk("0", &["--disk", "file=x.img"]);
    assert_refused(&r, "file=x.img");
}
