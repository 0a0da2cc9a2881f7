//! Snapshots end to end: `specvm ctl snapshot --path DIR` on a running
//! `counter` guest, and `specvm run --restore DIR` (docs/snapshots.md).

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
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        (
            "corrupt",
            {
                let mut b = good.clone();
                b[200] ^= 1;
                b
            },
            "corrupt: CRC-32",
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
