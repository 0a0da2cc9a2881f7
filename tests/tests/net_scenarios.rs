//! Speculation across three VMs on netbridge, scripted from the host.
//!
//! Every VM runs the `net_node` guest, which sends UDP broadcasts and
//! prints its log of received payloads on command (serial input), and has
//! a control API socket through which the test acts as its owner
//! (`specvm ctl speculate|commit|abort`). VM ids: A = 1, B = 2, C = 3, so
//! A's first speculation is `1:1`.
//!
//! The test waits on output lines and bridge events, never on fixed
//! sleeps. Before reading a log after a rollback it waits for the VM's
//! status to show the rollback done; then the `p` typed afterwards cannot
//! race it. Timings printed (`--nocapture`) count from the moment the
//! test starts the `ctl` (or the kill): when `ctl` returned, and when each
//! member's status showed the outcome applied. Tests run one at a time:
//! each one's VMs spin on their devices, and CI has two cores.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use specvm_tests::{
    bare_guest, run_specvm, skip_without_kvm, spawn_specvm, NetBridge, RunResult, Spawned,
};

/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How often to look again at a status or the event log.
const POLL: Duration = Duration::from_millis(2);

/// Serializes the tests of this file (see the crate doc).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one may still run.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A netbridge with its directory (bridge socket, event log, the VMs' API
/// sockets), counting the ports that connected.
struct Bridge {
    inner: NetBridge,
    /// Ports that connected so far.
    ports: usize,
}

impl std::ops::Deref for Bridge {
    type Target = NetBridge;

    fn deref(&self) -> &NetBridge {
        &self.inner
    }
}

impl Bridge {
    fn start(name: &str) -> Self {
        Self {
            inner: NetBridge::start(&format!("nsc-{name}")),
            ports: 0,
        }
    }

    /// Event lines containing `needle`.
    fn count(&self, needle: &str) -> usize {
        self.events().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` event lines contain `needle`.
    fn wait_event(&self, needle: &str, n: usize) {
        let found = poll(|| self.count(needle) >= n);
        assert!(
            found,
            "fewer than {n} events with {needle}:\n{}",
            self.events()
        );
    }

    /// Asserts that no event line contains `needle`.
    fn assert_no_event(&self, needle: &str) {
        let ev = self.events();
        assert!(!ev.contains(needle), "unexpected {needle} in:\n{ev}");
    }
}

/// Calls `f` every [`POLL`] until it is true or [`TIMEOUT`] passes.
fn poll(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    assert!(poll(f), "{what}: still not there after {TIMEOUT:?}");
}

/// One VM running `net_node`, a port on the bridge, with an API socket.
/// Dropping it kills the VMM if it still runs.
struct Node {
    vm: Spawned,
    name: &'static str,
    sock: PathBuf,
    /// Output lines read but not taken yet.
    pending: VecDeque<String>,
}

impl Node {
    /// Starts VM `id` as `name` and waits until the guest is ready and the
    /// bridge has its port.
    fn start(bridge: &mut Bridge, name: &'static str, id: u32) -> Self {
        let sock = bridge.dir.join(format!("vm{id}.sock"));
        let guest = bare_guest("net_node");
        let net = bridge.net_arg();
        let id_arg = id.to_string();
        let vm = spawn_specvm(&[
            "run",
            "--bare",
            guest.to_str().expect("UTF-8 path"),
            "--id",
            &id_arg,
            "--net",
            &net,
            "--api-sock",
            sock.to_str().expect("UTF-8 path"),
        ]);
        let mut node = Self {
            vm,
            name,
            sock,
            pending: VecDeque::new(),
        };
        node.expect("net_node: ready");
        wait_until("the API socket", || node.sock.exists());
        bridge.ports += 1;
        bridge.wait_event(r#""event":"port-up""#, bridge.ports);
        node
    }

    /// Takes the first output line equal to `line`, waiting for it.
    fn expect(&mut self, line: &str) {
        self.take(|l| l == line);
    }

    /// Takes the first output line for which `want` holds, waiting for it.
    fn take(&mut self, want: impl Fn(&str) -> bool) -> String {
        if let Some(i) = self.pending.iter().position(|l| want(l)) {
            return self.pending.remove(i).expect("a pending line");
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.vm.wait_for_line("", left) {
                Ok(l) if want(&l) => return l,
                Ok(l) => self.pending.push_back(l),
                Err(e) => panic!("VM {}: {e}", self.name),
            }
        }
    }

    /// Types `line` on the guest's console.
    fn type_line(&mut self, line: &str) {
        self.vm
            .send(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("VM {}: writing its console: {e}", self.name));
    }

    /// Broadcasts `text` and waits until the guest says it sent it.
    fn say(&mut self, text: &str) {
        self.type_line(&format!("s {text}"));
        self.expect(&format!("net_node: sent {text}"));
    }

    /// Waits until the guest printed that `text` arrived.
    fn got(&mut self, text: &str) {
        self.expect(&format!("net_node: got {text}"));
    }

    /// The guest's log, as it prints it: `[a,b]`.
    fn log(&mut self) -> String {
        self.type_line("p");
        let line = self.take(|l| l.starts_with("net_node: log "));
        line["net_node: log ".len()..].to_string()
    }

    /// `specvm ctl OP` on this VM; asserts it succeeds and returns its
    /// answer line.
    fn ctl(&self, op: &str) -> String {
        let sock = self.sock.to_str().expect("UTF-8 path");
        let r = run_specvm(&["ctl", "--api-sock", sock, op], TIMEOUT);
        assert_eq!(r.status, 0, "VM {}: ctl {op} failed: {r}", self.name);
        r.stdout.trim_end().to_string()
    }

    /// `ctl OP` (speculate, commit or abort) must answer with `id`.
    fn ctl_id(&self, op: &str, id: &str) {
        let want = format!(r#"{{"ok":true,"id":"{id}"}}"#);
        assert_eq!(self.ctl(op), want, "VM {}: ctl {op}", self.name);
    }

    /// The checkpoint stack entries, as `ctl status` prints them.
    fn entries(&self) -> String {
        entries_of(&self.ctl("status"))
    }

    /// Waits until the stack has `depth` entries; returns the time since
    /// `since`. Asks the API socket directly, which is cheaper than `ctl`.
    fn wait_depth(&self, depth: usize, since: Instant) -> Duration {
        let mut last = String::new();
        let reached = poll(|| {
            last = api_status(&self.sock);
            depth_of(&last) == Some(depth)
        });
        assert!(reached, "VM {}: depth never {depth}: {last}", self.name);
        since.elapsed()
    }

    /// Ends the guest with `q`; it must exit 0.
    fn quit(mut self) {
        self.type_line("q");
        self.expect("net_node: bye");
        let name = self.name;
        let r = self.vm.finish(TIMEOUT);
        assert_eq!(r.status, 0, "VM {name}: {r}");
    }

    /// Kills the VMM with SIGKILL, by its PID, as a crash would, and reaps
    /// it.
    fn kill(self) -> RunResult {
        let pid = self.vm.pid().to_string();
        // The shell's builtin kill: no procps needed.
        let killed = Command::new("sh")
            .args(["-c", "kill -KILL \"$1\"", "sh", &pid])
            .status()
            .expect("running sh");
        assert!(killed.success(), "kill -KILL {pid}: {killed}");
        let r = self.vm.finish(TIMEOUT);
        assert_eq!(r.status, 128 + 9, "VM {}: {r}", self.name);
        r
    }
}

/// One `{"op":"status"}` on the API socket `sock`; the answer line.
fn api_status(sock: &Path) -> String {
    let mut s = UnixStream::connect(sock).expect("connecting to the API socket");
    s.set_read_timeout(Some(TIMEOUT)).expect("socket timeout");
    s.write_all(b"{\"op\":\"status\"}\n").expect("API request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("API answer");
    line
}

/// The `depth` of a status answer.
fn depth_of(status: &str) -> Option<usize> {
    let rest = &status[status.find(r#""depth":"#)? + r#""depth":"#.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `entries` array of a status answer, brackets included.
fn entries_of(status: &str) -> String {
    let Some(start) = status.find(r#""entries":["#) else {
        panic!("no entries in {status}");
    };
    let rest = &status[start + r#""entries":"#.len()..];
    let end = rest.find(']').map_or(rest.len(), |i| i + 1);
    rest[..end].to_string()
}

/// An entry of a status answer's stack.
fn entry(id: &str, explicit: bool) -> String {
    format!(r#"{{"id":"{id}","explicit":{explicit}}}"#)
}

fn event(kind: &str, id: &str) -> String {
    format!(r#"{{"event":"{kind}","id":"{id}""#)
}

/// a. A→B→C: B joins A's speculation on A's frame, C joins it on B's (it
/// was not on the bridge when A sent); A aborts and both roll back.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn an_abort_at_the_owner_rolls_back_a_transitive_chain() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("chain");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.got("x");
    assert_eq!(b.entries(), format!("[{}]", entry("1:1", false)));
    let mut c = Node::start(&mut bridge, "C", 3);
    b.say("y");
    c.got("y");
    a.got("y");
    assert_eq!(c.entries(), format!("[{}]", entry("1:1", false)));
    assert_eq!((b.log(), c.log()), ("[x]".into(), "[y]".into()));
    let t = Instant::now();
    a.ctl_id("abort", "1:1");
    let ctl = t.elapsed();
    let tb = b.wait_depth(0, t);
    let tc = c.wait_depth(0, t);
    println!("timing: abort: ctl done {ctl:?}, depth 0: B {tb:?}, C {tc:?}");
    assert_eq!(b.log(), "[]", "B is back to before x");
    assert_eq!(c.log(), "[]", "C is back to before y");
    assert_eq!(a.log(), "[]", "A is back to before its speculate");
    assert_eq!((b.entries(), c.entries()), ("[]".into(), "[]".into()));
    bridge.wait_event(&event("joined", "1:1"), 2);
    bridge.wait_event(&event("aborted", "1:1"), 1);
    bridge.wait_event(&event("acked", "1:1"), 2);
    // The network still works after the rollback, untagged.
    b.say("z");
    c.got("z");
    assert_eq!(c.log(), "[z]");
    assert_eq!(c.entries(), "[]");
    for n in [a, b, c] {
        n.quit();
    }
}

/// b. B speculates itself, gets an untagged `pre`, then joins A's
/// speculation with `x`; A aborts: B keeps its own entry and `pre`.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_member_keeps_its_own_speculation_and_what_came_before_the_join() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("own");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    b.ctl_id("speculate", "2:1");
    a.say("pre");
    b.got("pre");
    assert_eq!(b.entries(), format!("[{}]", entry("2:1", true)));
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.got("x");
    assert_eq!(
        b.entries(),
        format!("[{},{}]", entry("2:1", true), entry("1:1", false))
    );
    let t = Instant::now();
    a.ctl_id("abort", "1:1");
    let ctl = t.elapsed();
    let tb = b.wait_depth(1, t);
    println!("timing: abort: ctl done {ctl:?}, B depth 1 {tb:?}");
    assert_eq!(b.entries(), format!("[{}]", entry("2:1", true)));
    assert_eq!(b.log(), "[pre]");
    bridge.wait_event(&event("acked", "1:1"), 1);
    // B's own speculation is intact and still B's to decide.
    b.ctl_id("commit", "2:1");
    assert_eq!(b.entries(), "[]");
    assert_eq!(b.log(), "[pre]");
    bridge.wait_event(&event("committed", "2:1"), 1);
    bridge.assert_no_event(&event("aborted", "2:1"));
    a.quit();
    b.quit();
}

/// c. Nested at A: B joins s1 with `x` and s2 with `z`; A aborts s2 only,
/// then commits s1.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn aborting_a_nested_speculation_leaves_members_in_the_outer_one() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("nested");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.got("x");
    a.ctl_id("speculate", "1:2");
    a.say("z");
    b.got("z");
    assert_eq!(
        b.entries(),
        format!("[{},{}]", entry("1:1", false), entry("1:2", false))
    );
    let t = Instant::now();
    a.ctl_id("abort", "1:2");
    let ctl = t.elapsed();
    let tb = b.wait_depth(1, t);
    println!("timing: inner abort: ctl done {ctl:?}, B depth 1 {tb:?}");
    assert_eq!(b.entries(), format!("[{}]", entry("1:1", false)));
    assert_eq!(b.log(), "[x]");
    assert_eq!(a.entries(), format!("[{}]", entry("1:1", true)));
    let t = Instant::now();
    a.ctl_id("commit", "1:1");
    let ctl = t.elapsed();
    let tb = b.wait_depth(0, t);
    println!("timing: commit: ctl done {ctl:?}, B depth 0 {tb:?}");
    assert_eq!(b.log(), "[x]");
    bridge.wait_event(&event("aborted", "1:2"), 1);
    bridge.wait_event(&event("committed", "1:1"), 1);
    bridge.assert_no_event(&event("aborted", "1:1"));
    a.quit();
    b.quit();
}

/// d. A's VMM dies mid-speculation: the bridge aborts it (rule 9) and B
/// and C, which joined it, roll back.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_owners_death_rolls_back_every_member() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("ownerdies");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    let mut c = Node::start(&mut bridge, "C", 3);
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.got("x");
    c.got("x");
    assert_eq!(b.entries(), format!("[{}]", entry("1:1", false)));
    assert_eq!(c.entries(), format!("[{}]", entry("1:1", false)));
    let t = Instant::now();
    a.kill();
    let tb = b.wait_depth(0, t);
    let tc = c.wait_depth(0, t);
    println!("timing: SIGKILL of A: depth 0: B {tb:?}, C {tc:?}");
    assert_eq!(b.log(), "[]");
    assert_eq!(c.log(), "[]");
    bridge.wait_event(r#""event":"port-down""#, 1);
    bridge.wait_event(&event("aborted", "1:1"), 1);
    bridge.wait_event(&event("acked", "1:1"), 2);
    // The survivors still talk.
    b.say("after");
    c.got("after");
    assert_eq!(c.log(), "[after]");
    b.quit();
    c.quit();
}

/// e. B, a member, dies: nothing aborts; A commits and C keeps `x`.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_members_death_aborts_nothing() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("memberdies");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    let mut c = Node::start(&mut bridge, "C", 3);
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.got("x");
    c.got("x");
    bridge.wait_event(&event("joined", "1:1"), 2);
    b.kill();
    bridge.wait_event(r#""event":"port-down""#, 1);
    assert_eq!(a.entries(), format!("[{}]", entry("1:1", true)));
    assert_eq!(c.entries(), format!("[{}]", entry("1:1", false)));
    let t = Instant::now();
    a.ctl_id("commit", "1:1");
    let ctl = t.elapsed();
    let tc = c.wait_depth(0, t);
    println!("timing: commit: ctl done {ctl:?}, C depth 0 {tc:?}");
    assert_eq!(c.log(), "[x]");
    assert_eq!(a.entries(), "[]");
    bridge.wait_event(&event("committed", "1:1"), 1);
    bridge.wait_event(&event("acked", "1:1"), 1);
    bridge.assert_no_event(r#""event":"aborted""#);
    a.quit();
    c.quit();
}

/// f. A guest writes its own IPOPT_SPEC (VM 99, seq 7): its VMM strips it
/// (rule 12), so the receiver joins nothing; when A speculates, the tag
/// is A's true set, not the forged one.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_forged_tag_joins_nobody() {
    skip_without_kvm!();
    let _serial = one_at_a_time();
    let mut bridge = Bridge::start("forge");
    let mut a = Node::start(&mut bridge, "A", 1);
    let mut b = Node::start(&mut bridge, "B", 2);
    a.type_line("f");
    a.expect("net_node: sent forged");
    b.got("forged");
    assert_eq!(b.entries(), "[]");
    assert_eq!(b.log(), "[forged]");
    bridge.assert_no_event(r#""event":"joined""#);
    a.ctl_id("speculate", "1:1");
    a.type_line("f");
    a.expect("net_node: sent forged");
    b.got("forged");
    assert_eq!(b.entries(), format!("[{}]", entry("1:1", false)));
    bridge.wait_event(&event("joined", "1:1"), 1);
    a.ctl_id("abort", "1:1");
    b.wait_depth(0, Instant::now());
    assert_eq!(b.log(), "[forged]");
    bridge.assert_no_event("99:7");
    a.quit();
    b.quit();
}
