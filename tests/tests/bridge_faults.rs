//! Faults of the bridge and of an owner's VMM (issue 12, findings 3, 4
//! and 6; SPECULATIONS.md rules 9, 13, 14):
//! - an owner VMM stopped with SIGSTOP loses its lease and its members
//!   roll back; a VM paused through the API keeps its lease;
//! - the bridge is killed and restarted mid-speculation: the VMMs
//!   reconnect, resume, and the owner's decision (taken while the bridge
//!   was away) reaches the member, commit and abort alike;
//! - a stopped bridge blocks no VMM: `ctl` answers and SIGTERM ends it.
//!
//! Every VM runs `net_node` (see `net_scenarios.rs`). Timings are printed
//! (`--nocapture`). Tests run one at a time (two cores in CI).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use specvm_tests::net_node::{api_status, depth_of, poll, NetNode as Node};
use specvm_tests::{netbridge_bin, skip_without_kvm};

/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The bridge's lease: netbridge's documented default.
const LEASE: Duration = Duration::from_millis(1000);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `sig` (`STOP`, `CONT`, `KILL`, `TERM`) to `pid` with the shell's
/// builtin kill.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -{sig} \"$1\""), "sh", &pid.to_string()])
        .status()
        .expect("running sh");
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// A netbridge that the test may kill and start again on the same socket.
/// Dropping it continues (if stopped) and kills it, and removes its
/// directory.
struct Bridge {
    child: Option<Child>,
    dir: PathBuf,
    /// Event logs of earlier runs, then of this one.
    runs: usize,
}

impl Bridge {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("specvm-bf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the bridge's directory");
        let mut b = Self {
            child: None,
            dir,
            runs: 0,
        };
        b.spawn();
        b
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("br.sock")
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log()).expect("event log");
        let child = Command::new(netbridge_bin())
            .arg("--listen")
            .arg(self.sock())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .spawn()
            .expect("starting netbridge");
        self.child = Some(child);
        wait_until("the bridge socket", || self.sock().exists());
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("events-{}.log", self.runs))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn events(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn wait_event(&self, needle: &str) {
        wait_until(needle, || self.events().contains(needle));
    }

    fn net_arg(&self) -> String {
        format!("bridge={}", self.sock().display())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            signal(c.id(), "CONT");
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    assert!(poll(TIMEOUT, f), "{what}: not there after {TIMEOUT:?}");
}

/// VM `id` on `bridge`.
fn node(bridge: &Bridge, id: u32) -> Node {
    Node::start(&bridge.dir, id, &bridge.net_arg())
}

/// A and B on `bridge`; A speculates (1:1) and B joins it with `x`.
fn a_speculation_b_joined(bridge: &Bridge) -> (Node, Node) {
    let mut a = node(bridge, 1);
    let mut b = node(bridge, 2);
    assert_eq!(a.ctl("speculate"), r#"{"ok":true,"id":"1:1"}"#);
    a.say("x");
    b.expect("net_node: got x");
    bridge.wait_event(r#"{"event":"joined","id":"1:1""#);
    (a, b)
}

/// Finding 3: an owner whose VMM is stopped stops renewing its lease; the
/// bridge aborts its speculation and the member rolls back within about
/// a lease. Once continued, the owner learns the abort and rolls back too.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_stopped_owner_loses_its_lease_and_its_members_roll_back() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let bridge = Bridge::start("lease");
    let (mut a, mut b) = a_speculation_b_joined(&bridge);
    signal(a.pid(), "STOP");
    let t = Instant::now();
    let tb = b.depth_within(0, t, 10 * LEASE);
    signal(a.pid(), "CONT");
    let tb = tb.expect("B stayed speculative with its owner stopped");
    println!("timing: SIGSTOP of the owner -> member rolled back: {tb:?} (lease {LEASE:?})");
    assert!(tb >= LEASE / 2, "before the lease could expire: {tb:?}");
    assert_eq!(b.log(), "[]");
    bridge.wait_event(r#""event":"lease-expired""#);
    // The owner, back, hears that its speculation was aborted.
    let ta = a.wait_depth(0, t);
    println!("timing: owner rolled back after SIGCONT: {ta:?}");
    assert_eq!(a.log(), "[]");
    a.quit();
    b.quit();
}

/// Finding 3: pausing is not failure. A paused owner keeps its lease.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_paused_owner_keeps_its_lease() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let bridge = Bridge::start("paused");
    let (a, mut b) = a_speculation_b_joined(&bridge);
    a.ctl("pause");
    std::thread::sleep(3 * LEASE);
    assert!(!bridge.events().contains("lease-expired"));
    assert_eq!(depth_of(&api_status(b.sock())), Some(1));
    a.ctl("resume");
    assert_eq!(a.ctl("commit"), r#"{"ok":true,"id":"1:1"}"#);
    b.wait_depth(0, Instant::now());
    assert_eq!(b.log(), "[x]");
    a.quit();
    b.quit();
}

/// Finding 4: the bridge dies mid-speculation; the owner decides while it
/// is away; the bridge restarts and the member learns the decision.
fn restart_with(outcome: &str, log_after: &str) {
    let mut bridge = Bridge::start(outcome);
    let (a, mut b) = a_speculation_b_joined(&bridge);
    bridge.kill();
    std::thread::sleep(LEASE / 2);
    assert_eq!(depth_of(&api_status(b.sock())), Some(1), "kept while away");
    assert_eq!(a.ctl(outcome), r#"{"ok":true,"id":"1:1"}"#);
    let t = Instant::now();
    bridge.spawn();
    let tb = b.wait_depth(0, t);
    println!("timing: bridge restart -> {outcome} delivered to the member: {tb:?}");
    assert_eq!(b.log(), log_after);
    let acked = r#"{"event":"acked","id":"1:1""#;
    bridge.wait_event(acked);
    std::thread::sleep(LEASE);
    assert_eq!(bridge.events().matches(acked).count(), 1, "once");
    a.quit();
    b.quit();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_commit_decided_while_the_bridge_restarts_reaches_the_member() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    restart_with("commit", "[x]");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn an_abort_decided_while_the_bridge_restarts_reaches_the_member() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    restart_with("abort", "[]");
}

/// Finding 6: a stopped bridge blocks no VMM. A's guest fills the socket
/// to the bridge; then `ctl speculate` and `ctl status` answer and SIGTERM
/// ends the VMM.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_stopped_bridge_blocks_no_vmm() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let bridge = Bridge::start("stopped");
    let mut a = node(&bridge, 1);
    signal(bridge.pid(), "STOP");
    let flood: String = (0..1500).map(|i| format!("s f{i}\n")).collect();
    a.vm().send(flood.as_bytes()).expect("console");
    a.expect("net_node: sent f1499");
    let within = Duration::from_secs(5);
    assert_eq!(
        a.ctl_within("speculate", within),
        r#"{"ok":true,"id":"1:1"}"#
    );
    a.ctl_within("status", within);
    let t = Instant::now();
    signal(a.pid(), "TERM");
    let r = a.into_vm().finish(within);
    assert!(!r.timed_out, "SIGTERM did not end the VMM: {r}");
    println!(
        "timing: SIGTERM with the bridge stopped: ended in {:?}",
        t.elapsed()
    );
}
