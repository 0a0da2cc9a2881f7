//! Snapshots end to end: `specvm ctl snapshot --path DIR` on a running
//! `counter` guest, and `specvm run --restore DIR` (docs/snapshots.md).
//! The second half tests the snapshot directory's own guarantees: one
//! writer, deleting only specvm's files, checked memory layers, a full
//! disk, and files that are not regular.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, spawn_specvm, Spawned};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A private directory for one test, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("UTF-8 path").to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for_socket(sock: &str) {
    for _ in 0..400 {
        if Path::new(sock).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the API socket {sock} never appeared");
}

/// Boots the counter guest with 64 MiB and an API socket.
fn start_counter(sock: &str) -> Spawned {
    let g = bare_guest("counter");
    let g = g.to_str().expect("UTF-8 path");
    let vm = spawn_specvm(&["run", "--bare", g, "--memory", "64M", "--api-sock", sock]);
    wait_for_socket(sock);
    vm
}

/// Restores `dir`, with extra flags.
fn restore(dir: &str, extra: &[&str]) -> Spawned {
    let mut args = vec!["run", "--restore", dir];
    args.extend_from_slice(extra);
    spawn_specvm(&args)
}

/// The next `counter: N` value the VM prints.
fn next_count(vm: &mut Spawned) -> u64 {
    loop {
        let l = vm
            .wait_for_line("counter: ", TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(n) = l
            .trim()
            .strip_prefix("counter: ")
            .and_then(|n| n.parse().ok())
        {
            return n;
        }
    }
}

/// `specvm ctl --api-sock SOCK OP [--path DIR]`: (exit status, stdout).
fn ctl(sock: &str, op: &str, path: Option<&str>) -> (i32, String) {
    let mut args = vec!["ctl", "--api-sock", sock, op];
    if let Some(p) = path {
        args.extend_from_slice(&["--path", p]);
    }
    let r = run_specvm(&args, TIMEOUT);
    (r.status, r.stdout)
}

/// Lets the counter print a few lines, snapshots it into `snap`, and
/// returns the last value printed before the snapshot and the answer.
fn count_then_snapshot(vm: &mut Spawned, sock: &str, snap: &str) -> (u64, String) {
    let mut last = 0;
    for _ in 0..4 {
        last = next_count(vm);
    }
    let (st, out) = ctl(sock, "snapshot", Some(snap));
    assert_eq!(st, 0, "snapshot failed: {out}");
    (last, out)
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn restored_twice_each_vm_counts_on_from_the_snapshot() {
    skip_without_kvm!();
    let d = Dir::new("twice");
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let mut vm = start_counter(&sock);
    let (before, out) = count_then_snapshot(&mut vm, &sock, &snap);
    assert!(out.contains(r#""kind":"full""#), "{out}");
    drop(vm);
    // Two independent VMs from one snapshot, running at the same time.
    let mut a = restore(&snap, &["--serial", "stdout"]);
    let mut b = restore(&snap, &["--serial", "stdout"]);
    for (name, vm) in [("first", &mut a), ("second", &mut b)] {
        let n = next_count(vm);
        assert!(
            n > before,
            "{name} restore printed {n}, not past {before}: it did not go on from the snapshot"
        );
        let m = next_count(vm);
        assert!(m > n, "{name} restore stopped counting: {n} then {m}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_diff_snapshot_restores_the_newer_state() {
    skip_without_kvm!();
    let d = Dir::new("diff");
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let mut vm = start_counter(&sock);
    let (_, out) = count_then_snapshot(&mut vm, &sock, &snap);
    assert!(out.contains(r#""kind":"full""#), "{out}");
    let (before, out) = count_then_snapshot(&mut vm, &sock, &snap);
    assert!(out.contains(r#""kind":"diff""#), "{out}");
    drop(vm);
    let memory_files = std::fs::read_dir(&snap)
        .expect("snapshot dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("memory-"))
        })
        .count();
    assert_eq!(memory_files, 2, "a full layer and a diff layer");
    let mut r = restore(&snap, &[]);
    let n = next_count(&mut r);
    assert!(n > before, "restore printed {n}, not past {before}");
}

/// Takes a snapshot of a counter into `d/snap` and stops the VM.
fn make_snapshot(d: &Dir) -> String {
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let mut vm = start_counter(&sock);
    count_then_snapshot(&mut vm, &sock, &snap);
    snap
}

/// `specvm run --restore dir extra...` must fail with `needle` in stderr.
fn assert_refused(dir: &str, extra: &[&str], needle: &str) {
    let mut args = vec!["run", "--restore", dir, "--serial", "null"];
    args.extend_from_slice(extra);
    let r = run_specvm(&args, TIMEOUT);
    assert!(
        !r.timed_out,
        "the restore ran instead of being refused: {r}"
    );
    r.assert_failed();
    r.assert_stderr_contains(needle);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn damaged_state_files_are_refused() {
    skip_without_kvm!();
    let d = Dir::new("damaged");
    let snap = make_snapshot(&d);
    let state = Path::new(&snap).join("state");
    let good = std::fs::read(&state).expect("state file");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        (
            "corrupt",
            {
                let mut b = good.clone();
                b[200] ^= 1;
                b
            },
            "corrupt: its checksum",
        ),
        (
            "reserved",
            {
                let mut b = good.clone();
                b[12] = 1;
                b
            },
            "the reserved header word is 0x1, not 0",
        ),
        (
            "version",
            {
                let mut b = good.clone();
                b[8] = 99;
                b
            },
            "format version 99 is not supported",
        ),
    ];
    for (what, bytes, needle) in cases {
        std::fs::write(&state, &bytes).expect("writing the damaged state");
        eprintln!("{what}");
        assert_refused(&snap, &[], needle);
    }
    std::fs::write(&state, &good).expect("restoring the state");
    let mut vm = restore(&snap, &[]);
    next_count(&mut vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn restoring_with_another_memory_size_or_cpu_count_is_refused() {
    skip_without_kvm!();
    let d = Dir::new("shape");
    let snap = make_snapshot(&d);
    assert_refused(
        &snap,
        &["--memory", "128M"],
        "--memory 128M (134217728 bytes) differs from the snapshot's 67108864 bytes",
    );
    assert_refused(
        &snap,
        &["--cpus", "2"],
        "--cpus 2 differs from the snapshot's 1 vCPUs",
    );
    let mut vm = restore(&snap, &["--memory", "64M", "--cpus", "1"]);
    next_count(&mut vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_speculating_vm_is_not_snapshotted() {
    skip_without_kvm!();
    let d = Dir::new("spec");
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let mut vm = start_counter(&sock);
    next_count(&mut vm);
    assert_eq!(ctl(&sock, "speculate", None).0, 0);
    let (st, out) = ctl(&sock, "snapshot", Some(&snap));
    assert_ne!(st, 0, "{out}");
    assert!(
        out.contains("snapshot refused: the VM holds 1 speculation checkpoint(s)")
            && out.contains("commit or abort them first"),
        "{out}"
    );
    assert!(!Path::new(&snap).join("state").exists());
    assert_eq!(ctl(&sock, "commit", None).0, 0);
    let (st, out) = ctl(&sock, "snapshot", Some(&snap));
    assert_eq!(st, 0, "{out}");
}

/// Every memory file in `snap`, with its content.
fn memory_files(snap: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(snap)
        .expect("snapshot dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("memory-"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("memory file"))
        })
        .collect();
    v.sort();
    v
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_restored_vm_speculates_without_touching_the_snapshot() {
    skip_without_kvm!();
    let d = Dir::new("respec");
    let snap = make_snapshot(&d);
    let before = memory_files(&snap);
    let sock = d.path("restored.sock");
    let mut vm = restore(&snap, &["--api-sock", &sock]);
    wait_for_socket(&sock);
    let first = next_count(&mut vm);
    // The first checkpoint gives the VM a memory file of its own; the
    // rollback then writes into that one, never into the snapshot's.
    assert_eq!(ctl(&sock, "speculate", None).0, 0);
    next_count(&mut vm);
    assert_eq!(ctl(&sock, "abort", None).0, 0);
    let after_abort = next_count(&mut vm);
    assert!(after_abort > first, "{after_abort} after {first}");
    assert!(
        memory_files(&snap) == before,
        "the snapshot's memory changed"
    );
    drop(vm);
    let mut again = restore(&snap, &[]);
    let n = next_count(&mut again);
    assert!(
        n < after_abort,
        "a second restore starts from the snapshot ({n}), not from the first restore's state"
    );
}

// The snapshot directory: every test below failed before the change that
// made it pass (the issue's findings 1, 2, 4, 5 and 11).

/// Starts a counter with 64 MiB that first fills `fill_mib` MiB.
fn start_filled(sock: &str, fill_mib: u32) -> Spawned {
    let g = bare_guest("counter");
    let g = g.to_str().expect("UTF-8 path");
    let fill = fill_mib.to_string();
    let vm = spawn_specvm(&[
        "run",
        "--bare",
        g,
        "--memory",
        "64M",
        "--api-sock",
        sock,
        "--guest-arg",
        &fill,
    ]);
    wait_for_socket(sock);
    vm
}

/// The names in `dir`, sorted.
fn names(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("reading the snapshot dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The layer files `dir/state` names, sorted: its payload (after the
/// 32-byte header) starts with the snapshot id and the layer count, then
/// each layer's id, extents (16 bytes each) and checksums (8 bytes each).
fn state_layers(dir: &str) -> Vec<String> {
    let b = std::fs::read(Path::new(dir).join("state")).expect("state");
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("u32")) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("u64"));
    let mut at = 32 + 8;
    let n = u32_at(at);
    at += 4;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(format!("memory-{:016x}", u64_at(at)));
        at += 8;
        at += 4 + 16 * u32_at(at);
        at += 4 + 8 * u32_at(at);
    }
    out.sort();
    out
}

/// A restore of `dir` that prints its counter.
fn assert_restores(dir: &str) {
    let mut vm = restore(dir, &["--serial", "stdout"]);
    next_count(&mut vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn two_vms_snapshotting_into_one_directory_never_break_it() {
    skip_without_kvm!();
    let d = Dir::new("two-writers");
    let snap = d.path("snap");
    let socks = [d.path("a.sock"), d.path("b.sock")];
    let _vms: Vec<Spawned> = socks.iter().map(|s| start_counter(s)).collect();
    let mut refused = 0;
    for round in 0..20 {
        let answers: Vec<(i32, String)> = std::thread::scope(|sc| {
            let hs: Vec<_> = socks
                .iter()
                .map(|s| sc.spawn(|| ctl(s, "snapshot", Some(&snap))))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("ctl thread"))
                .collect()
        });
        for (st, out) in &answers {
            if *st != 0 {
                assert!(
                    out.contains("another specvm is writing a snapshot into"),
                    "round {round}: {out}"
                );
                refused += 1;
            }
        }
        assert!(
            answers.iter().any(|(st, _)| *st == 0),
            "round {round}: {answers:?}"
        );
        let n = names(&snap);
        let files: Vec<String> = n
            .iter()
            .filter(|n| n.starts_with("memory-"))
            .cloned()
            .collect();
        assert_eq!(files, state_layers(&snap), "round {round}: {n:?}");
        assert!(
            !n.iter().any(|n| n.ends_with(".new")),
            "round {round}: {n:?}"
        );
        assert_restores(&snap);
    }
    eprintln!("{refused} of 40 snapshots found the other one writing");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_users_files_in_the_snapshot_directory_are_kept() {
    skip_without_kvm!();
    let d = Dir::new("users-files");
    let snap = d.path("snap");
    std::fs::create_dir_all(&snap).expect("mkdir");
    let theirs = [
        ("memory-notes.txt", "notes"),
        ("memory-0123456789abcdef", "named like a layer"),
        ("state.new", "also theirs"),
    ];
    for (n, text) in theirs {
        std::fs::write(Path::new(&snap).join(n), text).expect("write");
    }
    let (sa, sb) = (d.path("a.sock"), d.path("b.sock"));
    let mut a = start_counter(&sa);
    let mut b = start_counter(&sb);
    count_then_snapshot(&mut a, &sa, &snap);
    let (_, out) = count_then_snapshot(&mut a, &sa, &snap);
    assert!(out.contains(r#""kind":"diff""#), "{out}");
    // Another VM's full snapshot replaces both of a's layers.
    count_then_snapshot(&mut b, &sb, &snap);
    for (n, text) in theirs {
        let got = std::fs::read_to_string(Path::new(&snap).join(n));
        assert_eq!(got.ok().as_deref(), Some(text), "{n}");
    }
    let layers = names(&snap)
        .into_iter()
        .filter(|n| n.starts_with("memory-"))
        .count();
    assert_eq!(layers, 3, "b's layer and the two files named like layers");
    assert_restores(&snap);
}

/// The snapshot's layer files, largest data first (the full one, then the
/// diff ones), with the first data offset of each.
fn layers_by_data(snap: &str) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64, u64)> = names(snap)
        .into_iter()
        .filter(|n| n.starts_with("memory-"))
        .map(|n| {
            let p = Path::new(snap).join(n);
            let md = std::fs::metadata(&p).expect("layer");
            let f = std::fs::File::open(&p).expect("layer");
            // SAFETY: lseek on a descriptor we own.
            let data =
                unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_DATA) };
            assert!(data >= 0, "{} holds no data", p.display());
            (p, std::os::unix::fs::MetadataExt::blocks(&md), data as u64)
        })
        .collect();
    v.sort_by_key(|(_, blocks, _)| std::cmp::Reverse(*blocks));
    v.into_iter().map(|(p, _, d)| (p, d)).collect()
}

fn rewrite(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, off).expect("rewrite");
}

/// The counter's entry point: its code, in guest memory and so in the
/// base layer at that offset.
fn entry_point() -> u64 {
    let elf = std::fs::read(bare_guest("counter")).expect("counter ELF");
    u64::from_le_bytes(elf[24..32].try_into().expect("e_entry"))
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn damaged_memory_layers_are_refused() {
    skip_without_kvm!();
    let d = Dir::new("layers");
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let mut vm = start_counter(&sock);
    count_then_snapshot(&mut vm, &sock, &snap);
    let (_, out) = count_then_snapshot(&mut vm, &sock, &snap);
    assert!(out.contains(r#""kind":"diff""#), "{out}");
    drop(vm);
    let other_dir = Dir::new("layers-other");
    let other = make_snapshot(&other_dir);
    let layers = layers_by_data(&snap);
    let (base, diff) = (layers[0].0.clone(), layers[1].clone());
    let pristine = [
        std::fs::read(&base).expect("base"),
        std::fs::read(&diff.0).expect("diff"),
    ];
    let other_base = layers_by_data(&other)[0].0.clone();
    let code = entry_point();
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Damage); 4] = [
        (
            "one rewritten word",
            Box::new(|| rewrite(&base, code + 0x800, &0x1234_5678u64.to_le_bytes())),
        ),
        (
            "a flipped byte of guest code",
            Box::new(|| {
                let b = pristine[0][code as usize + 0x10];
                rewrite(&base, code + 0x10, &[b ^ 0x01]);
            }),
        ),
        (
            "a layer copied in from another snapshot",
            Box::new(|| {
                std::fs::copy(&other_base, &base).expect("copy");
            }),
        ),
        (
            "a rewritten page in a diff layer",
            Box::new(|| rewrite(&diff.0, diff.1, &[0x55; 4096])),
        ),
    ];
    for (what, damage) in cases {
        damage();
        // The default (before-output: the guest may run, its output waits
        // for the check) and before-start (no vCPU runs first).
        for verify in ["before-output", "before-start"] {
            eprintln!("{what}, --verify {verify}");
            let args = [
                "run",
                "--restore",
                &snap,
                "--verify",
                verify,
                "--serial",
                "stdout",
            ];
            let r = run_specvm(&args, TIMEOUT);
            assert!(!r.timed_out, "{what}: the damaged snapshot ran on: {r}");
            r.assert_failed();
            r.assert_stderr_contains("is damaged: bytes");
            assert!(
                !r.stdout.contains("counter:"),
                "{what}: the guest's output left it: {r}"
            );
        }
        std::fs::write(&base, &pristine[0]).expect("put back");
        std::fs::write(&diff.0, &pristine[1]).expect("put back");
    }
    // In the background, the check ends a VM that already runs.
    rewrite(&base, code + 0x800, &0x1234_5678u64.to_le_bytes());
    let args = [
        "run",
        "--restore",
        &snap,
        "--verify",
        "background",
        "--serial",
        "null",
    ];
    let r = run_specvm(&args, TIMEOUT);
    assert!(!r.timed_out, "the damaged snapshot ran on: {r}");
    r.assert_status(1);
    r.assert_stderr_contains("found by the background check; the VM is stopped");
    std::fs::write(&base, &pristine[0]).expect("put back");
    assert_restores(&snap);
}

/// `--verify before-output`: a guest that prints without pause, restored
/// from a snapshot whose memory layer was damaged, runs while the check
/// reads the layer, and none of its output leaves it. The same snapshot
/// with `--verify background` lets lines out: the guest had output to give
/// before the verdict. Whole again, the held guest's output flows once the
/// check passes.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn output_held_for_the_check_never_leaves_a_damaged_vm() {
    skip_without_kvm!();
    const FREE_BASE: u64 = 16 << 20; // guest_agent::abi::BARE_FREE_BASE
    const FILL: u64 = 160 << 20;
    let d = Dir::new("held");
    let (sock, snap) = (d.path("api.sock"), d.path("snap"));
    let g = bare_guest("chatter");
    // Prints for ever, after writing one word in each page of 160 MiB: a
    // layer that takes a while to check.
    let arg = (FILL >> 20 << 32).to_string();
    let g = g.to_str().expect("UTF-8 path");
    let mut vm = spawn_specvm(&[
        "run",
        "--bare",
        g,
        "--memory",
        "256M",
        "--api-sock",
        &sock,
        "--guest-arg",
        &arg,
    ]);
    wait_for_socket(&sock);
    vm.wait_for_line("chatter 000000000100", TIMEOUT)
        .expect("the guest prints");
    let (st, out) = ctl(&sock, "snapshot", Some(&snap));
    assert_eq!(st, 0, "snapshot failed: {out}");
    drop(vm);
    let base = layers_by_data(&snap)[0].0.clone();
    // The last page the guest filled, at its guest-physical address in the
    // layer: its first word is the page's offset in the fill, plus one.
    let last = FREE_BASE + FILL - 4096;
    let f = std::fs::File::open(&base).expect("layer");
    let mut word = [0u8; 8];
    f.read_exact_at(&mut word, last).expect("read");
    assert_eq!(
        u64::from_le_bytes(word),
        (FILL - 4096) | 1,
        "the fill's layout"
    );
    rewrite(&base, last, &0x5555_5555u64.to_le_bytes());
    let run = |mode: &str| {
        let args = [
            "run",
            "--restore",
            &snap,
            "--verify",
            mode,
            "--serial",
            "stdout",
            "--log-level",
            "info",
        ];
        run_specvm(&args, TIMEOUT)
    };
    let r = run("before-output");
    assert!(!r.timed_out, "the damaged snapshot ran on: {r}");
    assert!(
        !r.stdout.contains("chatter"),
        "held output left the VM: {r}"
    );
    r.assert_status(1);
    r.assert_stderr_contains("is damaged: bytes");
    r.assert_stderr_contains("none of its output left it");
    r.assert_stderr_contains("the guest's output waits for the check of its memory");
    let r = run("background");
    r.assert_status(1);
    r.assert_stderr_contains("found by the background check");
    assert!(
        r.stdout.contains("chatter"),
        "the guest printed nothing before the verdict: {r}"
    );
    rewrite(&base, last, &word);
    let mut vm = restore(
        &snap,
        &[
            "--verify",
            "before-output",
            "--serial",
            "stdout",
            "--log-level",
            "info",
        ],
    );
    vm.wait_for_line("chatter", TIMEOUT)
        .expect("the output flows after the check");
    let r = vm.finish(Duration::from_millis(300));
    assert!(
        r.stderr
            .contains("snapshot memory checked; the guest's output flows"),
        "{r}"
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(Dir);

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Result<Self, String> {
        let d = Dir::new(name);
        let dir = d.0.to_str().expect("UTF-8 path");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir])
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !st.success() {
            return Err(format!("cannot mount a tmpfs on {dir} ({st}; not root?)"));
        }
        Ok(Self(d))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.0 .0)
            .status();
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_full_disk_leaves_no_partial_layer_behind() {
    skip_without_kvm!();
    let disk = match Tmpfs::mount("full", "6m") {
        Ok(t) => t,
        Err(why) => {
            specvm_tests::record_skip("a_full_disk_leaves_no_partial_layer_behind", &why);
            return;
        }
    };
    let snap = disk.0.path("snap");
    let d = Dir::new("full-socks");
    let (sa, sb, sc) = (d.path("a.sock"), d.path("b.sock"), d.path("c.sock"));
    let mut small = start_counter(&sa);
    count_then_snapshot(&mut small, &sa, &snap);
    let before = names(&snap);
    let mut big = start_filled(&sb, 8);
    next_count(&mut big);
    for attempt in 0..3 {
        let (st, out) = ctl(&sb, "snapshot", Some(&snap));
        assert_ne!(st, 0, "attempt {attempt}: 8 MiB fit in 6: {out}");
        assert!(
            out.contains("No space left on device"),
            "attempt {attempt}: {out}"
        );
        assert_eq!(names(&snap), before, "attempt {attempt} left files");
    }
    // The previous snapshot is whole, and a snapshot that fits still does.
    assert_restores(&snap);
    let mut fits = start_filled(&sc, 2);
    next_count(&mut fits);
    let (st, out) = ctl(&sc, "snapshot", Some(&snap));
    assert_eq!(st, 0, "{out}");
    assert_restores(&snap);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn fifos_devices_and_links_out_of_the_directory_are_refused() {
    skip_without_kvm!();
    let d = Dir::new("special");
    let snap = make_snapshot(&d);
    let state = Path::new(&snap).join("state");
    let good = std::fs::read(&state).expect("state");
    let mkfifo = |p: &Path| {
        let st = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .expect("mkfifo");
        assert!(st.success());
    };
    std::fs::remove_file(&state).expect("rm");
    mkfifo(&state);
    assert_refused(&snap, &[], "state is a FIFO");
    std::fs::remove_file(&state).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &state).expect("link");
    assert_refused(&snap, &[], "state is a symbolic link");
    std::fs::remove_file(&state).expect("rm");
    std::fs::write(&state, &good).expect("state");
    let layer = layers_by_data(&snap)[0].0.clone();
    let outside = d.0.join("layer-outside");
    std::fs::rename(&layer, &outside).expect("mv");
    std::os::unix::fs::symlink(&outside, &layer).expect("link");
    assert_refused(&snap, &[], "is a symbolic link");
    std::fs::remove_file(&layer).expect("rm");
    mkfifo(&layer);
    assert_refused(&snap, &[], "is a FIFO");
    std::fs::remove_file(&layer).expect("rm");
    std::fs::rename(&outside, &layer).expect("mv back");
    assert_restores(&snap);
}
