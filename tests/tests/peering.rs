//! Bridge peering (issue 15, part 2; docs/netbridge.md "Peering"): two
//! "hosts", network namespaces joined by a veth pair, each with its own
//! `netbridge` bound on its veth address and peering with the other over
//! UDP in VXLAN framing.
//!
//! - `a_speculation_crosses_the_peering_and_its_outcomes_follow` (KVM): a
//!   `net_node` VM on bridge A speculates and broadcasts; the VM on bridge
//!   B joins; commit and abort both reach B, which rolls back on abort;
//!   what reaches B's TAP uplink (a namespace's stack: the outside world)
//!   is held until commit, B's member's own output included, and dropped
//!   on abort.
//! - `two_hosts_with_two_vms_each_share_speculations_through_etcd` (KVM):
//!   the same namespaces with two VMs on each bridge and the bridges'
//!   registry in an etcd run in A's namespace (Debian's `etcd-server`,
//!   fetched by `tests/tools/fetch-etcd.sh`); commit and abort reach all
//!   three members, B's uplink holds until commit, and etcd ends with both
//!   outcomes and nothing open.
//! - `a_commit_...` and `an_abort_decided_while_the_members_bridge_restarts_reaches_it`
//!   (KVM): bridge B is killed while its VM is a member of A's
//!   speculation, A decides meanwhile, B restarts: B's VMM resumes, B asks
//!   its peers (`find`), and the member gets the outcome;
//! - `a_bridge_takes_datagrams_only_from_its_peers` (no KVM): the test
//!   plays peer A with UDP sockets of its own against bridge B and a fake
//!   VMM port on B: an unconfigured sender is ignored, malformed VXLAN
//!   packets are dropped and counted (the `peer-stats` event), an unknown
//!   id of B's own VM gets the rule for unknown ids (stripped as forged),
//!   an id of a VM behind the peer is opened, joined, asked for (`hold`)
//!   and aborted by the peer's `decided`.
//!
//! Needs root, `ip netns` and veth (and KVM and /dev/net/tun for the
//! first); without them a test is recorded as skipped. Every packet stays
//! in the two namespaces; bridges, VMs and namespaces go when a test
//! ends, also when it fails (Drop).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netbridge::registry::backend::RegistryBackend;
use netbridge::registry::etcd::{Etcd, DEFAULT_PREFIX};
use specvm_tests::etcd::EtcdCluster;
use specvm_tests::net_node::{poll, NetNode as Node};
use specvm_tests::{kvm_available, netbridge_bin, record_skip, Netns};
use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, read_message, write_message, Control, Decision, Message, Outcome,
};

/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long something that must not arrive is watched for.
const QUIET: Duration = Duration::from_millis(800);
/// Host A's and B's addresses on the veth pair, and their VXLAN sockets.
const A_IP: &str = "10.199.0.1";
const B_IP: &str = "10.199.0.2";
const A_ADDR: &str = "10.199.0.1:4789";
const B_ADDR: &str = "10.199.0.2:4789";
/// The frames' VNI (netbridge's default) and the control messages'.
const VNI: u32 = 42;
const CONTROL_VNI: u32 = 43;
/// B's TAP uplink, and the host side's address in the guests' /24.
const TAP: &str = "pbtap0";
const HOST_CIDR: &str = "10.0.0.254/24";
/// `net_node`'s UDP port.
const NODE_PORT: u16 = 7777;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why these tests cannot run here, if they cannot.
fn unsupported(tap: bool) -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces)".into());
    }
    if tap && !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

/// Two namespaces joined by a veth pair: A at [`A_IP`], B at [`B_IP`].
/// Deleting the namespaces (on drop) deletes the pair; the tests' lock is
/// released after that (fields drop in order), since every test uses the
/// same names.
struct Fabric {
    a: Netns,
    b: Netns,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// What a test needs of this machine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Namespaces only (the test plays the VMs' ports itself).
    Namespaces,
    /// Namespaces and KVM for `net_node` VMs.
    Vms,
    /// That, and /dev/net/tun for B's uplink.
    VmsAndTap,
}

impl Fabric {
    /// The two hosts for `test`, one test at a time; `None` after
    /// recording why they cannot be had here.
    fn for_test(test: &str, needs: Needs) -> Option<Self> {
        let why = match needs {
            Needs::VmsAndTap => kvm_available().err().or_else(|| unsupported(true)),
            Needs::Vms => kvm_available().err().or_else(|| unsupported(false)),
            Needs::Namespaces => unsupported(false),
        };
        if let Some(reason) = why {
            record_skip(test, &reason);
            return None;
        }
        let serial = one_at_a_time();
        match Self::new(serial) {
            Ok(f) => Some(f),
            Err(reason) => {
                record_skip(test, &reason);
                None
            }
        }
    }

    /// B's TAP uplink (made by B's bridge) addressed and up, and a listener
    /// on B's side of it: the outside world.
    fn outside_of_b(&self) -> Listener {
        self.b
            .ip(&["addr", "add", HOST_CIDR, "brd", "+", "dev", TAP]);
        self.b.ip(&["link", "set", TAP, "up"]);
        Listener::start(&self.b)
    }

    fn new(serial: std::sync::MutexGuard<'static, ()>) -> Result<Self, String> {
        let a = Netns::add("specvm-peer-a")?;
        let b = Netns::add("specvm-peer-b")?;
        a.try_ip(&[
            "link",
            "add",
            "pva",
            "type",
            "veth",
            "peer",
            "name",
            "pvb",
            "netns",
            b.name(),
        ])?;
        a.ip(&["addr", "add", &format!("{A_IP}/24"), "dev", "pva"]);
        b.ip(&["addr", "add", &format!("{B_IP}/24"), "dev", "pvb"]);
        for (ns, dev) in [(&a, "pva"), (&b, "pvb")] {
            ns.ip(&["link", "set", dev, "up"]);
            ns.ip(&["link", "set", "lo", "up"]);
        }
        Ok(Self {
            a,
            b,
            _serial: serial,
        })
    }
}

/// A netbridge in a namespace, peering, which a test may kill and start
/// again (each run has its own event log). Dropping it kills it (by PID)
/// and removes its directory.
struct PeerBridge {
    child: Option<Child>,
    dir: PathBuf,
    /// `ip netns exec NS netbridge ARGS`: what [`PeerBridge::spawn`] runs.
    args: Vec<String>,
    runs: usize,
}

impl PeerBridge {
    fn start(ns: &Netns, name: &str, listen: &str, peer: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("specvm-peer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the bridge's directory");
        let mut args: Vec<String> = vec!["netns".into(), "exec".into(), ns.name().into()];
        args.push(netbridge_bin().to_str().expect("UTF-8 path").into());
        args.push("--listen".into());
        args.push(dir.join("br.sock").to_str().expect("UTF-8 path").into());
        for a in ["--vxlan-listen", listen, "--peer", peer]
            .iter()
            .chain(extra)
        {
            args.push((*a).into());
        }
        let mut b = Self {
            child: None,
            dir,
            args,
            runs: 0,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        self.runs += 1;
        // `ip netns exec` execs the bridge: the child's PID is the bridge's.
        let child = Command::new("ip")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(File::create(self.dir.join(self.events_name())).expect("event log"))
            .stderr(File::create(self.dir.join("stderr.log")).expect("stderr log"))
            .spawn()
            .expect("starting netbridge in the namespace");
        let child = self.child.insert(child);
        let sock = self.dir.join("br.sock");
        let up = poll(TIMEOUT, || {
            sock.exists() || matches!(child.try_wait(), Ok(Some(_)))
        });
        assert!(
            up && sock.exists(),
            "netbridge did not start: {}",
            self.log("stderr.log")
        );
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn events_name(&self) -> String {
        format!("events-{}.log", self.runs)
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("br.sock")
    }

    fn net_arg(&self, mac: &str) -> String {
        format!("bridge={},mac={mac}", self.sock().display())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// The events of the bridge's current run.
    fn events(&self) -> String {
        self.log(&self.events_name())
    }

    fn wait_event(&self, needle: &str) {
        assert!(
            poll(TIMEOUT, || self.events().contains(needle)),
            "no event with {needle} in:\n{}",
            self.events()
        );
    }
}

impl Drop for PeerBridge {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// VM `id` on `bridge`, with the MAC `mac`.
fn node(bridge: &PeerBridge, id: u32, mac: &str) -> Node {
    Node::start(&bridge.dir, id, &bridge.net_arg(mac))
}

/// A UDP socket on [`NODE_PORT`] in a namespace, read by a thread that
/// entered it: what the outside world (B's host stack, through B's TAP
/// uplink) receives. Dropping it stops the thread.
struct Listener {
    payloads: Receiver<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &Netns) -> Self {
        let entry = ns.entry();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, payloads) = channel();
        let (ready_tx, ready) = channel();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            entry.enter();
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, NODE_PORT))
                .expect("binding the listener in the namespace");
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("read timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        ready.recv_timeout(TIMEOUT).expect("the listener is ready");
        Self {
            payloads,
            stop,
            thread: Some(thread),
        }
    }

    /// Payloads that arrive within `wait`.
    fn within(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Ok(p) = self
            .payloads
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            got.push(p);
        }
        got
    }

    /// Waits for each of `want` (in any order); returns everything seen.
    fn wait_for(&self, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while !want.iter().all(|w| got.iter().any(|g| g == w)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.payloads.recv_timeout(left) {
                Ok(p) => got.push(p),
                Err(_) => panic!("the outside world never got {want:?}; it got {got:?}"),
            }
        }
        got
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_speculation_crosses_the_peering_and_its_outcomes_follow() {
    const TEST: &str = "peering::a_speculation_crosses_the_peering_and_its_outcomes_follow";
    let Some(fab) = Fabric::for_test(TEST, Needs::VmsAndTap) else {
        return;
    };
    let a = PeerBridge::start(&fab.a, "a", A_ADDR, B_ADDR, &[]);
    let uplink = format!("tap={TAP}");
    let b = PeerBridge::start(&fab.b, "b", B_ADDR, A_ADDR, &["--uplink", &uplink]);
    let outside = fab.outside_of_b();
    let mut va = node(&a, 1, "02:00:00:00:00:01");
    let mut vb = node(&b, 2, "02:00:00:00:00:02");

    // Outside any speculation: A's frame reaches B's VM and B's outside.
    va.say("pre");
    vb.expect("net_node: got pre");
    outside.wait_for(&["pre"]);

    // Commit: B joins A's 1:1 through the peering; its output, and A's,
    // reach the outside only once A commits.
    assert_eq!(va.ctl("speculate"), r#"{"ok":true,"id":"1:1"}"#);
    va.say("x");
    vb.expect("net_node: got x");
    b.wait_event(r#""event":"joined","id":"1:1""#);
    vb.wait_depth(1, Instant::now());
    vb.say("bx");
    va.expect("net_node: got bx");
    assert_eq!(
        outside.within(QUIET),
        Vec::<String>::new(),
        "speculative output crossed B's uplink before the commit"
    );
    assert_eq!(va.ctl("commit"), r#"{"ok":true,"id":"1:1"}"#);
    vb.wait_depth(0, Instant::now());
    b.wait_event(r#""event":"committed","id":"1:1""#);
    outside.wait_for(&["x", "bx"]);
    assert_eq!(vb.log(), "[pre,x]");

    // Abort: B rolls back, and nothing of 1:2 ever reaches the outside.
    assert_eq!(va.ctl("speculate"), r#"{"ok":true,"id":"1:2"}"#);
    va.say("y");
    vb.expect("net_node: got y");
    b.wait_event(r#""event":"joined","id":"1:2""#);
    vb.wait_depth(1, Instant::now());
    vb.say("by");
    va.expect("net_node: got by");
    assert_eq!(va.ctl("abort"), r#"{"ok":true,"id":"1:2"}"#);
    vb.wait_depth(0, Instant::now());
    b.wait_event(r#""event":"aborted","id":"1:2""#);
    assert_eq!(vb.log(), "[pre,x]", "B rolled back to before y");
    assert_eq!(
        outside.within(QUIET),
        Vec::<String>::new(),
        "the output of an aborted speculation crossed B's uplink"
    );
    // The fabric works on, and nothing of the aborted run comes first.
    va.say("post");
    vb.expect("net_node: got post");
    assert_eq!(outside.wait_for(&["post"]), vec!["post".to_string()]);
    va.quit();
    vb.quit();
}

/// Two hosts on one etcd, two VMs on each: the namespaces of
/// [`a_speculation_crosses_the_peering_and_its_outcomes_follow`], with the
/// bridges' registry in an etcd that runs in A's namespace (B reaches it
/// over the veth pair). VM 1 on A speculates; VM 2 on A and VMs 3 and 4 on
/// B join; the commit and the abort reach all three, B's uplink holds B's
/// speculative output until the commit, and etcd holds both outcomes and
/// no open speculation at the end.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn two_hosts_with_two_vms_each_share_speculations_through_etcd() {
    const TEST: &str = "peering::two_hosts_with_two_vms_each_share_speculations_through_etcd";
    let Some(fab) = Fabric::for_test(TEST, Needs::VmsAndTap) else {
        return;
    };
    let etcd = match EtcdCluster::start_in("peering-two-hosts", 1, &fab.a, A_IP) {
        Ok(e) => e,
        Err(reason) => return record_skip(TEST, &reason),
    };
    let url = etcd.url();
    let registry = |name: &'static str| -> [String; 6] {
        [
            "--registry".into(),
            url.clone(),
            "--registry-name".into(),
            name.into(),
            "--lease-ms".into(),
            "1000".into(),
        ]
    };
    let ra = registry("host-a");
    let a = PeerBridge::start(
        &fab.a,
        "ea",
        A_ADDR,
        B_ADDR,
        &ra.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let uplink = format!("tap={TAP}");
    let mut rb: Vec<String> = registry("host-b").into();
    rb.extend(["--uplink".to_string(), uplink]);
    let b = PeerBridge::start(
        &fab.b,
        "eb",
        B_ADDR,
        A_ADDR,
        &rb.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let outside = fab.outside_of_b();
    let mut v1 = node(&a, 1, "02:00:00:00:00:01");
    let mut v2 = node(&a, 2, "02:00:00:00:00:02");
    let mut v3 = node(&b, 3, "02:00:00:00:00:03");
    let mut v4 = node(&b, 4, "02:00:00:00:00:04");

    v1.say("pre");
    for v in [&mut v2, &mut v3, &mut v4] {
        v.expect("net_node: got pre");
    }
    outside.wait_for(&["pre"]);

    // Commit: the three others join 1:1; B's member speaks, and nothing
    // of it leaves B's uplink before the commit.
    assert_eq!(v1.ctl("speculate"), r#"{"ok":true,"id":"1:1"}"#);
    a.wait_event(r#""event":"started","id":"1:1""#);
    v1.say("x");
    for v in [&mut v2, &mut v3, &mut v4] {
        v.expect("net_node: got x");
        v.wait_depth(1, Instant::now());
    }
    v3.say("b3");
    v1.expect("net_node: got b3");
    assert_eq!(
        outside.within(QUIET),
        Vec::<String>::new(),
        "speculative output crossed B's uplink before the commit"
    );
    assert_eq!(v1.ctl("commit"), r#"{"ok":true,"id":"1:1"}"#);
    for v in [&v2, &v3, &v4] {
        v.wait_depth(0, Instant::now());
    }
    outside.wait_for(&["x", "b3"]);
    // What each kept (b3 was broadcast: VM 3 does not hear itself).
    let kept = ["[pre,x,b3]", "[pre,x]", "[pre,x,b3]"];
    for (v, want) in [&mut v2, &mut v3, &mut v4].into_iter().zip(kept) {
        assert_eq!(v.log(), want, "a member after the commit");
    }

    // Abort: every member rolls back, on both hosts.
    assert_eq!(v1.ctl("speculate"), r#"{"ok":true,"id":"1:2"}"#);
    a.wait_event(r#""event":"started","id":"1:2""#);
    v1.say("y");
    for v in [&mut v2, &mut v3, &mut v4] {
        v.expect("net_node: got y");
        v.wait_depth(1, Instant::now());
    }
    v4.say("b4");
    v1.expect("net_node: got b4");
    assert_eq!(v1.ctl("abort"), r#"{"ok":true,"id":"1:2"}"#);
    for v in [&v2, &v3, &v4] {
        v.wait_depth(0, Instant::now());
    }
    b.wait_event(r#""event":"aborted","id":"1:2""#);
    for (v, want) in [&mut v2, &mut v3, &mut v4].into_iter().zip(kept) {
        assert_eq!(v.log(), want, "a member rolled back to before y and b4");
    }
    assert_eq!(
        outside.within(QUIET),
        Vec::<String>::new(),
        "the output of an aborted speculation crossed B's uplink"
    );

    // etcd holds both outcomes (read from A's namespace).
    let endpoints = etcd.endpoints();
    let (outcomes, open) = fab.a.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            let r = Etcd::connect(&endpoints, DEFAULT_PREFIX, Duration::from_secs(5))
                .await
                .expect("an etcd client");
            let (_, mut outcomes) = r.outcomes().await.expect("the outcomes in etcd");
            outcomes.sort_by_key(|d| d.id);
            let open = r.open_ids().await.expect("the open speculations in etcd");
            (outcomes, open)
        })
    });
    let want = vec![
        Decision {
            id: SpecId::new(1, 1),
            outcome: Outcome::Commit,
        },
        Decision {
            id: SpecId::new(1, 2),
            outcome: Outcome::Abort,
        },
    ];
    assert_eq!(outcomes, want, "etcd's outcomes");
    assert_eq!(open, Vec::<SpecId>::new(), "speculations left open in etcd");
    for v in [v1, v2, v3, v4] {
        v.quit();
    }
}

/// Bridge B dies while its VM is a member of A's 1:1; A's VM decides
/// while B is away; B restarts, its VMM reconnects and resumes, B asks
/// every peer (`find`) and A answers: the member gets the outcome.
fn restart_with(outcome: &str, log_after: &str, test: &str) {
    let Some(fab) = Fabric::for_test(test, Needs::Vms) else {
        return;
    };
    let a = PeerBridge::start(&fab.a, &format!("ra-{outcome}"), A_ADDR, B_ADDR, &[]);
    let mut b = PeerBridge::start(&fab.b, &format!("rb-{outcome}"), B_ADDR, A_ADDR, &[]);
    let mut va = node(&a, 1, "02:00:00:00:00:01");
    let mut vb = node(&b, 2, "02:00:00:00:00:02");
    assert_eq!(va.ctl("speculate"), r#"{"ok":true,"id":"1:1"}"#);
    va.say("x");
    vb.expect("net_node: got x");
    b.wait_event(r#""event":"joined","id":"1:1""#);
    vb.wait_depth(1, Instant::now());
    b.kill();
    assert_eq!(va.ctl(outcome), r#"{"ok":true,"id":"1:1"}"#);
    std::thread::sleep(QUIET);
    assert_eq!(
        vb.depth(),
        Some(1),
        "the member keeps its speculation meanwhile"
    );
    let t = Instant::now();
    b.spawn();
    vb.wait_depth(0, Instant::now());
    println!(
        "timing: bridge B's restart -> {outcome} reached its member: {:?}",
        t.elapsed()
    );
    let word = if outcome == "commit" {
        "committed"
    } else {
        "aborted"
    };
    b.wait_event(&format!(r#""event":"{word}","id":"1:1""#));
    assert_eq!(vb.log(), log_after);
    va.quit();
    vb.quit();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_commit_decided_while_the_members_bridge_restarts_reaches_it() {
    restart_with(
        "commit",
        "[x]",
        "peering::a_commit_decided_while_the_members_bridge_restarts_reaches_it",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn an_abort_decided_while_the_members_bridge_restarts_reaches_it() {
    restart_with(
        "abort",
        "[]",
        "peering::an_abort_decided_while_the_members_bridge_restarts_reaches_it",
    );
}

/// A fake VMM port on a bridge's socket.
struct Port(UnixStream);

impl Port {
    fn connect(sock: &Path, vm: u32) -> Self {
        let s = UnixStream::connect(sock).expect("connecting to the bridge");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let mut port = Self(s);
        port.control(&Control::Hello {
            vm,
            speculative: true,
        });
        let welcome = port.next(TIMEOUT, |m| {
            matches!(m, Message::Control(Control::Welcome { .. }))
        });
        assert!(welcome.is_some(), "no welcome from the bridge");
        port
    }

    fn control(&mut self, c: &Control) {
        write_message(&mut self.0, &encode_control(c)).expect("writing to the bridge");
    }

    /// The first message within `wait` that `want` takes.
    fn next(&mut self, wait: Duration, want: impl Fn(&Message) -> bool) -> Option<Message> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(buf) = read_message(&mut self.0) {
                let m = decode(&buf).expect("a message the bridge sent");
                if want(&m) {
                    return Some(m);
                }
            }
        }
        None
    }

    /// The first frame holding `marker` within `wait`.
    fn frame_with(&mut self, marker: &str, wait: Duration) -> Option<Vec<u8>> {
        let m = self.next(
            wait,
            |m| matches!(m, Message::Frame(f) if contains(f, marker.as_bytes())),
        );
        match m {
            Some(Message::Frame(f)) => Some(f),
            _ => None,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A broadcast UDP/IPv4 frame carrying `marker`, tagged with `tags`.
fn frame(marker: &str, tags: &[SpecId]) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x70], [0xff; 6])
        .ipv4([10, 0, 0, 0x70], [10, 0, 0, 255], 64)
        .udp(40_000, NODE_PORT)
        .write(&mut f, marker.as_bytes())
        .expect("building a frame");
    codec::retag(&f, tags).expect("tagging a frame")
}

/// A VXLAN packet (RFC 7348: flags with the I bit, 3 reserved bytes, the
/// 24-bit VNI, 1 reserved byte), written here by hand, independently of
/// the bridge's codec.
fn vxlan(flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(inner);
    d
}

/// A control message: an Ethernet header of EtherType 0x88B5, then JSON.
fn control_frame(json: &str) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(json.as_bytes());
    f
}

/// The last `peer-stats` line of the bridge's events, if any.
fn last_stats(b: &PeerBridge) -> String {
    b.events()
        .lines()
        .rev()
        .find(|l| l.contains(r#""event":"peer-stats""#))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_bridge_takes_datagrams_only_from_its_peers() {
    const TEST: &str = "peering::a_bridge_takes_datagrams_only_from_its_peers";
    let Some(fab) = Fabric::for_test(TEST, Needs::Namespaces) else {
        return;
    };
    // Fake ports renew no lease.
    let b = PeerBridge::start(&fab.b, "bad", B_ADDR, A_ADDR, &["--lease-ms", "600000"]);
    let mut port = Port::connect(&b.sock(), 5);
    // The test is peer A, and a stranger on A's host. Sockets keep the
    // namespace they were made in.
    let (peer, stranger) = fab.a.run(|| {
        let peer = UdpSocket::bind(A_ADDR).expect("binding peer A's address");
        let stranger = UdpSocket::bind((A_IP, 4000)).expect("binding a stranger");
        (peer, stranger)
    });
    let send = |s: &UdpSocket, d: &[u8]| {
        s.send_to(d, B_ADDR).expect("sending to bridge B");
    };

    // A stranger's well-formed frame is ignored.
    send(&stranger, &vxlan(0x08, VNI, &frame("stranger", &[])));
    assert_eq!(port.frame_with("stranger", QUIET), None);
    // Malformed packets from the peer are dropped and counted.
    send(&peer, &[0x08, 0, 0]);
    send(&peer, &vxlan(0x00, VNI, &frame("noflag", &[])));
    send(&peer, &vxlan(0x08, 99, &frame("othervni", &[])));
    send(
        &peer,
        &vxlan(0x08, CONTROL_VNI, &control_frame("{not json")),
    );
    // The peer's good frame passes.
    send(&peer, &vxlan(0x08, VNI, &frame("good", &[])));
    assert!(
        port.frame_with("good", TIMEOUT).is_some(),
        "the peer's frame"
    );
    let counted = poll(TIMEOUT, || {
        let s = last_stats(&b);
        [
            r#""unconfigured":1"#,
            r#""short":1"#,
            r#""bad_flags":1"#,
            r#""wrong_vni":1"#,
            r#""bad_control":1"#,
            r#""rx_frames":1"#,
        ]
        .iter()
        .all(|c| s.contains(c))
    });
    assert!(counted, "the counts: {}", last_stats(&b));
    for marker in ["noflag", "othervni"] {
        assert!(!b.events().contains(marker));
    }

    // The rule for unknown ids: VM 5 is B's, and never started 5:9; the
    // peer cannot speak for it: the tag is stripped, counted as forged.
    send(
        &peer,
        &vxlan(0x08, VNI, &frame("own", &[SpecId::new(5, 9)])),
    );
    let f = port
        .frame_with("own", TIMEOUT)
        .expect("the frame, untagged");
    assert_eq!(codec::parse_tags(&f).unwrap(), None);
    b.wait_event(r#""event":"forged","id":"5:9""#);
    let counted = poll(TIMEOUT, || last_stats(&b).contains(r#""forged":1"#));
    assert!(counted, "the peer port's count: {}", last_stats(&b));

    // An id of VM 8, behind the peer: opened, joined, asked for, aborted.
    let remote = SpecId::new(8, 1);
    send(&peer, &vxlan(0x08, VNI, &frame("remote", &[remote])));
    let f = port
        .frame_with("remote", TIMEOUT)
        .expect("the frame, tagged");
    assert_eq!(codec::parse_tags(&f).unwrap(), Some(vec![remote]));
    b.wait_event(r#""event":"remote-open","id":"8:1""#);
    port.control(&Control::Joined { ids: vec![remote] });
    b.wait_event(r#""event":"joined","id":"8:1""#);
    // B asks the peer for the outcome it waits for.
    peer.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut buf = [0u8; 2048];
    let hold = format!(r#"{{"type":"hold","ids":[{}]}}"#, remote.to_u64());
    let asked = (0..100).any(|_| match peer.recv_from(&mut buf) {
        Ok((n, _)) => buf[..n].starts_with(&vxlan(0x08, CONTROL_VNI, &control_frame(&hold))),
        Err(_) => false,
    });
    assert!(asked, "bridge B never sent {hold}");
    // The stranger's word on it is ignored; the peer's is taken.
    let abort = format!(
        r#"{{"type":"decided","outcomes":[{{"id":{},"outcome":"abort"}}]}}"#,
        remote.to_u64()
    );
    send(
        &stranger,
        &vxlan(
            0x08,
            CONTROL_VNI,
            &control_frame(&abort.replace("abort", "commit")),
        ),
    );
    send(&peer, &vxlan(0x08, CONTROL_VNI, &control_frame(&abort)));
    let told = port.next(TIMEOUT, |m| {
        matches!(m, Message::Control(Control::Decided { .. }))
    });
    match told {
        Some(Message::Control(Control::Decided { id, outcome, .. })) => {
            assert_eq!((id, outcome), (remote, Outcome::Abort));
        }
        other => panic!("the member was not told the abort: {other:?}"),
    }
    b.wait_event(r#""event":"aborted","id":"8:1""#);
    assert!(!b.events().contains(r#""event":"committed","id":"8:1""#));
}
