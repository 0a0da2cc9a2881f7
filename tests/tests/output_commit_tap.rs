//! Output commit on a `tap=` card (issue 12, SPECULATIONS.md rule 11): a
//! UDP datagram a speculating guest sends through a TAP reaches the host's
//! stack only once its speculation commits, and never when it aborts.
//!
//! The TAP sits in a network namespace of the test's own: it is made there
//! (`ip tuntap add`, persistent, with an address), `specvm` runs in the
//! namespace (`ip netns exec`) with `--net tap=NAME`, and a UDP socket
//! bound in the namespace stands for the listener of the original finding.
//! The guest is `net_node`, as in `output_commit.rs`: it broadcasts UDP to
//! 10.0.0.255:7777 from 10.0.0.<last byte of its MAC>, so no ARP is needed.
//!
//! Needs KVM, root, `ip netns` and `/dev/net/tun`; without them the test is
//! recorded as skipped. Every packet stays inside the namespace, whose only
//! interfaces are `lo` and the TAP; `specvm`, the listener and the
//! namespace (which takes the TAP with it) go when the test ends, also when
//! it fails.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use specvm_tests::{
    bare_guest, record_skip, skip_without_kvm, spawn_command, specvm_bin, Netns, Spawned,
    TempDir as Dir,
};

const TEST: &str = "output_commit_tap::speculative_output_on_a_tap_waits_for_commit";
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long a datagram that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(800);
/// How long after an abort its datagram is still watched for.
const AFTER_ABORT: Duration = Duration::from_secs(1);
/// The TAP, inside the namespace.
const TAP: &str = "octap0";
/// The guest's MAC: `net_node` sends from 10.0.0.5.
const GUEST_MAC: &str = "02:00:00:00:00:05";
/// The host's side of the TAP, in the guest's /24.
const HOST_CIDR: &str = "10.0.0.254/24";
/// `net_node`'s UDP port.
const PORT: u16 = 7777;

/// A UDP socket on port [`PORT`] in the namespace, read by a thread that
/// entered it; the payloads arrive on a channel. Dropping it stops the
/// thread, which closes the socket.
struct Listener {
    payloads: Receiver<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &Netns) -> Self {
        let entry = ns.entry();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = channel::<()>();
        let (tx, payloads) = channel();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // This thread ends with the listener.
            entry.enter();
            let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
                .expect("binding the listener in the namespace");
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("read timeout");
            ready_tx.send(()).expect("the test waits for the listener");
            let mut buf = [0u8; 2048];
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send(text).is_err() {
                        return;
                    }
                }
            }
        });
        // A thread that failed to set up drops its sender: the error shows
        // when it is joined below.
        let mut listener = Self {
            payloads,
            stop,
            thread: Some(thread),
        };
        if ready.recv_timeout(TIMEOUT).is_err() {
            let thread = listener.thread.take().expect("the listener's thread");
            match thread.join() {
                Err(e) => std::panic::resume_unwind(e),
                Ok(()) => panic!("the listener never became ready"),
            }
        }
        listener
    }

    /// The next payload that arrives within `wait`, or `None`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.payloads.recv_timeout(wait).ok()
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

/// Why the test cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a network namespace and a TAP)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

fn ctl(api: &Path, op: &str) {
    let r = specvm_tests::run_specvm(&["ctl", "--api-sock", api.to_str().unwrap(), op], TIMEOUT);
    r.assert_status(0);
    assert!(r.stdout.contains(r#""ok":true"#), "{op}: {r}");
}

/// Has the guest send `text` and waits for its word that it did.
fn send(vm: &mut Spawned, text: &str) {
    vm.send(format!("s {text}\n").as_bytes()).unwrap();
    vm.wait_for_line(&format!("net_node: sent {text}"), TIMEOUT)
        .unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn speculative_output_on_a_tap_waits_for_commit() {
    skip_without_kvm!();
    if let Some(reason) = unsupported() {
        return record_skip(TEST, &reason);
    }
    let ns = match Netns::add("specvm-oc-tap") {
        Ok(ns) => ns,
        Err(reason) => return record_skip(TEST, &reason),
    };
    if let Err(reason) = ns.try_ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]) {
        return record_skip(TEST, &reason);
    }
    ns.ip(&["addr", "add", HOST_CIDR, "brd", "+", "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    let listener = Listener::start(&ns);

    let dir = Dir::new("oc-tap");
    let api = dir.join("api.sock");
    let guest = bare_guest("net_node");
    // `ip netns exec` execs specvm: the child's PID is specvm's, which the
    // harness kills on drop. The API socket is a path, which every network
    // namespace sees.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .arg(specvm_bin())
        .args(["run", "--bare"])
        .arg(&guest)
        .args(["--memory", "64M", "--net"])
        .arg(format!("tap={TAP},mac={GUEST_MAC}"))
        .arg("--api-sock")
        .arg(&api);
    let mut vm = spawn_command(cmd);
    vm.wait_for_line("net_node: ready", TIMEOUT).unwrap();

    // Outside any speculation a datagram goes out at once.
    send(&mut vm, "tap-pre");
    assert_eq!(listener.next(TIMEOUT).as_deref(), Some("tap-pre"));

    // Held until the commit, then delivered.
    ctl(&api, "speculate");
    send(&mut vm, "tap-kept");
    assert_eq!(
        listener.next(QUIET),
        None,
        "speculative output crossed the TAP before the commit"
    );
    ctl(&api, "commit");
    assert_eq!(listener.next(TIMEOUT).as_deref(), Some("tap-kept"));

    // Dropped by the abort: not before it, not after it.
    ctl(&api, "speculate");
    send(&mut vm, "tap-aborted");
    assert_eq!(
        listener.next(QUIET),
        None,
        "speculative output crossed the TAP before the abort"
    );
    ctl(&api, "abort");
    assert_eq!(
        listener.next(AFTER_ABORT),
        None,
        "the output of an aborted speculation crossed the TAP"
    );
    // The card still works, and nothing of the aborted run comes first.
    send(&mut vm, "tap-post");
    assert_eq!(listener.next(TIMEOUT).as_deref(), Some("tap-post"));

    vm.send(b"q\n").unwrap();
    vm.finish(TIMEOUT).assert_status(0);
}
