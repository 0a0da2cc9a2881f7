//! The control API end to end: `specvm run --api-sock` and `specvm ctl`.

use std::path::PathBuf;
use std::time::Duration;

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, spawn_specvm, Spawned};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A private directory for one test's sockets, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }
    fn sock(&self) -> String {
        self.0
            .join("api.sock")
            .to_str()
            .expect("UTF-8 path")
            .to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(guest: &str, sock: &str, extra: &[&str]) -> Spawned {
    let g = bare_guest(guest);
    let mut args = vec![
        "run",
        "--bare",
        g.to_str().expect("UTF-8 path"),
        "--memory",
        "64M",
        "--api-sock",
        sock,
    ];
    args.extend_from_slice(extra);
    let vm = spawn_specvm(&args);
    for _ in 0..400 {
        if std::path::Path::new(sock).exists() {
            return vm;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the API socket {sock} never appeared");
}

/// Runs `specvm ctl --api-sock SOCK OP`; returns (exit status, stdout).
fn ctl(sock: &str, op: &str) -> (i32, String) {
    let r = run_specvm(&["ctl", "--api-sock", sock, op], TIMEOUT);
    (r.status, r.stdout)
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn host_speculates_commits_and_aborts() {
    skip_without_kvm!();
    let dir = Dir::new("ops");
    let sock = dir.sock();
    let vm = start("spin", &sock, &["--id", "42"]);
    let (st, out) = ctl(&sock, "status");
    assert_eq!(st, 0, "{out}");
    assert!(
        out.contains(r#""depth":0"#) && out.contains(r#""vm_id":42"#),
        "{out}"
    );
    assert_eq!(
        ctl(&sock, "speculate"),
        (0, "{\"ok\":true,\"id\":\"42:1\"}\n".into())
    );
    assert_eq!(ctl(&sock, "speculate").1, "{\"ok\":true,\"id\":\"42:2\"}\n");
    let (_, out) = ctl(&sock, "status");
    assert!(
        out.contains(r#"{"id":"42:1","explicit":true},{"id":"42:2","explicit":true}"#),
        "{out}"
    );
    assert_eq!(ctl(&sock, "commit").1, "{\"ok\":true,\"id\":\"42:2\"}\n");
    assert_eq!(ctl(&sock, "abort").1, "{\"ok\":true,\"id\":\"42:1\"}\n");
    let (st, out) = ctl(&sock, "abort");
    assert_eq!(st, 1, "abort with nothing to abort fails: {out}");
    assert!(out.contains("no speculation of its own"), "{out}");
    assert_eq!(ctl(&sock, "pause").0, 0);
    assert!(ctl(&sock, "status").1.contains(r#""paused":true"#));
    assert_eq!(ctl(&sock, "resume").0, 0);
    drop(vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn host_abort_makes_the_guests_speculate_return_2_and_events_stream() {
    skip_without_kvm!();
    let dir = Dir::new("demo");
    let sock = dir.sock();
    let mut vm = start("spec_demo", &sock, &["--id", "1", "--start-paused"]);
    let mut events = spawn_specvm(&["ctl", "--api-sock", &sock, "events"]);
    // The guest runs only once the stream listens: a fixed 200 ms wait
    // lost the first event once, on a loaded machine.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !ctl(&sock, "status").1.contains(r#""event_clients":1"#) {
        assert!(
            std::time::Instant::now() < deadline,
            "the events client never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ctl(&sock, "resume").0, 0);
    vm.wait_for_line("waiting for the host", TIMEOUT)
        .expect("the demo reached its wait");
    assert_eq!(ctl(&sock, "abort").1, "{\"ok\":true,\"id\":\"1:3\"}\n");
    vm.wait_for_line("speculate() = 2: the host aborted, balance 70", TIMEOUT)
        .expect("speculate returned 2 with the committed balance");
    let r = vm.finish(TIMEOUT);
    r.assert_status(0);
    for (i, want) in [
        r#"{"event":"speculate","id":"1:1","depth":1,"by":"guest"}"#,
        r#"{"event":"abort","id":"1:1","depth":0,"by":"guest"}"#,
        r#"{"event":"speculate","id":"1:2","depth":1,"by":"guest"}"#,
        r#"{"event":"commit","id":"1:2","depth":0,"by":"guest"}"#,
        r#"{"event":"speculate","id":"1:3","depth":1,"by":"guest"}"#,
        r#"{"event":"abort","id":"1:3","depth":0,"by":"host"}"#,
    ]
    .iter()
    .enumerate()
    {
        let got = events
            .wait_for_line("event", TIMEOUT)
            .unwrap_or_else(|e| panic!("event {i}: {e}"));
        assert_eq!(got.trim(), *want, "event {i}");
    }
    drop(events);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn bad_requests_get_errors_and_the_socket_is_removed_on_sigterm() {
    skip_without_kvm!();
    use std::io::{BufRead, BufReader, Write};
    let dir = Dir::new("bad");
    let sock = dir.sock();
    let vm = start("spin", &sock, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut rd = BufReader::new(s.try_clone().expect("clone"));
    let not_utf8: &[u8] = b"{\"op\":\"st\xffatus\"}\n";
    for req in [
        &b"{\"op\":\"explode\"}\n"[..],
        b"not json\n",
        b"{}\n",
        not_utf8,
    ] {
        s.write_all(req).expect("write");
        let mut line = String::new();
        rd.read_line(&mut line).expect("read");
        assert!(
            line.starts_with(r#"{"ok":false,"error":"bad request"#),
            "{:?} -> {line}",
            String::from_utf8_lossy(req)
        );
    }
    // The connection still serves good requests afterwards.
    s.write_all(b"{\"op\":\"status\"}\n").expect("write");
    let mut line = String::new();
    rd.read_line(&mut line).expect("read");
    assert!(line.starts_with(r#"{"ok":true"#), "{line}");
    // SIGTERM to the VMM this test started, by its PID.
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &vm.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(killed.success());
    let r = vm.finish(TIMEOUT);
    assert_eq!(r.status, 128 + 15, "{r}");
    assert!(r.stderr.contains("stopped by signal 15"), "{r}");
    assert!(!std::path::Path::new(&sock).exists(), "socket left behind");
}

#[test]
fn ctl_without_a_vm_is_a_clear_error() {
    let r = run_specvm(
        &["ctl", "--api-sock", "/nonexistent/api.sock", "status"],
        TIMEOUT,
    );
    r.assert_status(1);
    r.assert_stderr_contains("/nonexistent/api.sock");
}

/// clap's own parse errors print the one `specvm: error:` line and exit 1,
/// as every other error does; help and version still exit 0.
#[test]
fn command_line_errors_are_one_line() {
    for args in [
        &["run", "--bare", "/bin/true", "--memory", "-1"][..],
        &["run", "--bare", "/bin/true", "--cpus", "x"],
        &["run", "--bogus"],
        &["ctl", "status"],
        &[],
    ] {
        let r = run_specvm(args, TIMEOUT);
        r.assert_status(1);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("specvm: error: "),
            "{args:?}: {r}"
        );
    }
    let r = run_specvm(&["--help"], TIMEOUT);
    r.assert_status(0);
    assert!(r.stdout.contains("Usage: specvm"), "{r}");
    let r = run_specvm(&["run", "--help"], TIMEOUT);
    r.assert_status(0);
    assert!(r.stdout.contains("--api-sock-group"), "{r}");
    let r = run_specvm(&["--version"], TIMEOUT);
    r.assert_status(0);
    assert!(r.stdout.starts_with("specvm "), "{r}");
}

/// A host abort that lands while the guest's `status` call waits: the
/// call belongs to the timeline the rollback threw away. Served after the
/// rollback, its answer used to overwrite the checkpoint's registers, and
/// `speculate` returned 0 again instead of 2. The guest calls `status` in
/// a tight loop, so most of the ten aborts meet a waiting call.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_host_abort_voids_a_hypercall_that_waits() {
    skip_without_kvm!();
    poll_rounds("poll", |sock, round| {
        let (status, out) = ctl(sock, "abort");
        assert_eq!(status, 0, "abort in round {round}: {out}");
    });
}

/// Runs ten rounds of the `spec_poll` guest: in each, once the guest
/// polls inside its speculation, `host` acts through the API socket and
/// must end that speculation with a host abort; then `speculate` must
/// have returned 2, and the guest must end with 0.
fn poll_rounds(name: &str, host: impl Fn(&str, u32)) {
    let dir = Dir::new(name);
    let sock = dir.sock();
    let rounds = 10;
    let mut vm = start("spec_poll", &sock, &["--guest-arg", &rounds.to_string()]);
    for round in 0..rounds {
        vm.wait_for_line(&format!("round {round} polling"), TIMEOUT)
            .expect("the guest speculates and polls");
        host(&sock, round);
        let line = vm
            .wait_for_line(&format!("round {round}:"), TIMEOUT)
            .expect("speculate returned after the abort");
        assert!(
            line.ends_with("speculate() = 2"),
            "round {round}: {line:?}, want speculate() = 2"
        );
    }
    vm.finish(TIMEOUT).assert_status(0);
}

/// `pause` and `resume` from the API while the guest speculates, commits
/// and aborts as fast as it can: a pause that asked a vCPU to park just as
/// it made a hypercall (and parked for that) left its request behind, and
/// the vCPU parked again, unasked, after the call was served; the
/// controller thought it ran, and the guest hung. Before the fix this
/// test failed that way (a timeout), as did every such run by hand, with
/// one vCPU or more.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn api_pauses_during_guest_speculations_never_strand_a_vcpu() {
    skip_without_kvm!();
    let dir = Dir::new("pauses");
    let sock = dir.sock();
    let reps: u64 = 1000;
    // 1 dirty page per step, `reps` repetitions (spec_bench's argument).
    let arg = (1 | (reps << 32)).to_string();
    let vm = start("spec_bench", &sock, &["--cpus", "2", "--guest-arg", &arg]);
    let mut pauses = 0;
    while pauses < 150 {
        let (p, out) = ctl(&sock, "pause");
        if p != 0 {
            // The guest finished and the VM ended: its socket is gone.
            assert!(
                !std::path::Path::new(&sock).exists(),
                "pause {pauses} failed with the VM up: {out}"
            );
            break;
        }
        let (r, out) = ctl(&sock, "resume");
        assert_eq!(r, 0, "resume after pause {pauses}: {out}");
        pauses += 1;
    }
    assert!(
        pauses >= 50,
        "only {pauses} pauses landed while the guest ran"
    );
    let r = vm.finish(TIMEOUT);
    r.assert_status(0);
    assert!(
        r.stdout.contains(&format!(
            "spec_bench: {reps} repetitions with 1 dirty pages, ok"
        )),
        "the guest did not finish its loop:\n{}",
        r.stdout
    );
}

/// A host speculation taken while the guest's `status` call waits, then
/// aborted: the guest is back to waiting on that call, which must be
/// served again. Before, it came back unanswered: `status` returned its
/// own op number as the depth (the guest prints it and ends with 5). Then
/// a second abort ends the guest's own speculation, and `speculate`
/// returns 2. The guest calls `status` in a tight loop, so most of the
/// host's checkpoints meet a waiting call.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_call_that_waited_at_a_checkpoint_is_served_again_after_a_rollback_there() {
    skip_without_kvm!();
    poll_rounds("reissue", |sock, round| {
        for op in ["speculate", "abort"] {
            let (status, out) = ctl(sock, op);
            assert_eq!(status, 0, "{op} in round {round}: {out}");
        }
        // The guest polls on, on the host's rolled-back state, for a while.
        std::thread::sleep(Duration::from_millis(20));
        let (status, out) = ctl(sock, "abort");
        assert_eq!(
            status, 0,
            "the second abort in round {round} (the guest stopped?): {out}"
        );
    });
}
