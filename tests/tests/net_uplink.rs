//! The TAP uplink end to end: `netbridge --uplink tap=up0` inside a
//! network namespace of its own, a fake VMM port on its socket, and the
//! host's side of the TAP observed from inside the namespace.
//!
//! Output commit (rule 11): a frame tagged with a speculation reaches the
//! host only after the speculation commits, untagged, and never if it
//! aborts. Rule 12: a tag on a frame from the host is forged and stripped.
//!
//! Needs root, `ip netns` and `/dev/net/tun`; without them the test is
//! recorded as skipped. Every packet stays inside the namespace, whose only
//! interfaces are `lo` and the TAP; the namespace, the TAP and the bridge
//! process are removed when the test ends, also when it fails.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specvm_tests::{netbridge_bin, record_skip, Netns};
use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, encode_frame, read_message, write_message, Control, Message, Outcome,
};

const TEST: &str = "net_uplink::output_commit_through_a_tap_uplink";
const TAP: &str = "up0";
const HOST_IP: [u8; 4] = [10, 99, 0, 254];
const BROADCAST_IP: [u8; 4] = [10, 99, 0, 255];
const VM_IP: [u8; 4] = [10, 99, 0, 1];
const VM_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(700);
/// How long something that should arrive may take.
const ARRIVAL: Duration = Duration::from_secs(5);

/// The bridge process, started in the namespace, and its directory.
struct Bridge {
    child: Child,
    dir: PathBuf,
}

impl Bridge {
    fn start(ns: &Netns) -> Self {
        let bin = netbridge_bin();
        let dir = std::env::temp_dir().join(format!("specvm-uplink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the bridge's directory");
        // `ip netns exec` execs the bridge: the child's PID is the bridge's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(&bin)
            .arg("--listen")
            .arg(dir.join("br.sock"))
            // Raw test ports do not renew a lease.
            .args(["--lease-ms", "600000"])
            .arg("--uplink")
            .arg(format!("tap={TAP}"))
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("events.log")).expect("event log"))
            .stderr(File::create(dir.join("stderr.log")).expect("stderr log"))
            .spawn()
            .expect("starting netbridge in the namespace");
        let mut bridge = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bridge.dir.join("br.sock").exists() {
            if let Ok(Some(status)) = bridge.child.try_wait() {
                panic!("netbridge exited ({status}): {}", bridge.log("stderr.log"));
            }
            assert!(
                Instant::now() < deadline,
                "the bridge socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        bridge
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Asks the bridge to stop as an operator would, and waits for it.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for netbridge") {
                return status;
            }
            assert!(Instant::now() < deadline, "netbridge ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fake VMM port on the bridge's socket.
struct Port(UnixStream);

impl Port {
    fn connect(bridge: &Bridge, vm: u32) -> (Self, u32) {
        let s = UnixStream::connect(bridge.dir.join("br.sock")).expect("connecting to the bridge");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let mut port = Self(s);
        port.control(&Control::Hello {
            vm,
            speculative: true,
        });
        let deadline = Instant::now() + ARRIVAL;
        while Instant::now() < deadline {
            if let Some(Message::Control(Control::Welcome { next_seq, .. })) = port.recv() {
                return (port, next_seq);
            }
        }
        panic!("no welcome from the bridge");
    }

    fn send(&mut self, msg: &[u8]) {
        write_message(&mut self.0, msg).expect("writing to the bridge");
    }

    fn control(&mut self, c: &Control) {
        self.send(&encode_control(c));
    }

    fn frame(&mut self, f: &[u8]) {
        self.send(&encode_frame(f));
    }

    /// The next message, or None after the read timeout.
    fn recv(&mut self) -> Option<Message> {
        let buf = read_message(&mut self.0).ok()?;
        Some(decode(&buf).expect("a message the bridge sent"))
    }

    /// The first frame holding `marker` within `wait`; other frames (the
    /// host's IPv6 discovery, say) are skipped.
    fn frame_with(&mut self, marker: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(Message::Frame(f)) = self.recv() {
                if contains(&f, marker) {
                    return Some(f);
                }
            }
        }
        None
    }
}

/// An AF_PACKET socket on the TAP, in the namespace: sees every frame
/// that crosses the host's side of the TAP, byte for byte, and sends raw
/// frames from the host into the TAP.
struct Packet(OwnedFd);

impl Packet {
    /// Opens it; must run on a thread in the namespace.
    fn open(ifname: &str) -> io::Result<Self> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and nothing else owns it.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_ll is a valid value (plain data).
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
        // SAFETY: bind(2) reads `addr`, a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which `tv` is.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Sends one frame out of the host's side, into the TAP.
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) reads `frame.len()` bytes of `frame`.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// The first frame holding `marker` within `wait`.
    fn frame_with(&self, marker: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(n) = usize::try_from(n) {
                if contains(&buf[..n], marker) {
                    return Some(buf[..n].to_vec());
                }
            }
        }
        None
    }
}

/// The host's side, opened in the namespace.
struct Host {
    /// Bound to the host's address: what the host's stack accepts.
    udp: UdpSocket,
    /// Sends the host's broadcasts to the VMs.
    sender: UdpSocket,
    /// Every frame on the TAP, raw.
    packet: Packet,
}

impl Host {
    fn open(ns: &Netns) -> Self {
        ns.run(|| {
            let ip = Ipv4Addr::from(HOST_IP);
            let udp = UdpSocket::bind(SocketAddrV4::new(ip, 0)).expect("binding the host's socket");
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("read timeout");
            let sender = UdpSocket::bind(SocketAddrV4::new(ip, 0)).expect("binding the sender");
            sender.set_broadcast(true).expect("SO_BROADCAST");
            let packet = Packet::open(TAP).expect("an AF_PACKET socket on the TAP");
            Self {
                udp,
                sender,
                packet,
            }
        })
    }

    fn port(&self) -> u16 {
        self.udp.local_addr().expect("local address").port()
    }

    /// Whether the host's stack delivers a datagram holding `marker` to
    /// the host's socket within `wait` (with a zero `wait`: among those
    /// it has already taken).
    fn receives(&self, marker: &[u8], wait: Duration) -> bool {
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + wait;
        loop {
            // At least one read, of up to the socket's 100 ms timeout.
            if let Ok(n) = self.udp.recv(&mut buf) {
                if contains(&buf[..n], marker) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A UDP/IPv4 frame, tagged with `tags`.
fn udp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, dst): ([u8; 4], [u8; 4]),
    dst_port: u16,
    payload: &[u8],
    tags: &[SpecId],
) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(40_000, dst_port)
        .write(&mut f, payload)
        .expect("building a frame");
    codec::retag(&f, tags).expect("tagging a frame")
}

/// The TAP's MAC address, from `ip -o link show`.
fn tap_mac(ns: &Netns) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", TAP]);
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"));
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("a MAC address");
    }
    mac
}

/// Why the test cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a network namespace and a TAP)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

#[test]
fn output_commit_through_a_tap_uplink() {
    if let Some(reason) = unsupported() {
        return record_skip(TEST, &reason);
    }
    let ns = match Netns::add("specvm-uplink") {
        Ok(ns) => ns,
        Err(reason) => return record_skip(TEST, &reason),
    };
    let mut bridge = Bridge::start(&ns);
    ns.ip(&["addr", "add", "10.99.0.254/24", "brd", "+", "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    let tap = tap_mac(&ns);
    let host = Host::open(&ns);
    let (mut vm, seq) = Port::connect(&bridge, 1);
    let to_host = |payload: &[u8], tags: &[SpecId]| {
        udp_frame((VM_MAC, tap), (VM_IP, HOST_IP), host.port(), payload, tags)
    };

    // Host to VM: a broadcast from the host's stack reaches the VM port.
    host.sender
        .send_to(
            b"uplink-from-host",
            SocketAddrV4::new(BROADCAST_IP.into(), 9),
        )
        .expect("sending the host's broadcast");
    let f = vm
        .frame_with(b"uplink-from-host", ARRIVAL)
        .expect("the host's broadcast never reached the VM port");
    assert_eq!(codec::parse_tags(&f), Ok(None));

    // Rule 12: a host frame carrying IPOPT_SPEC reaches the VM without it.
    let forged = udp_frame(
        (tap, [0xff; 6]),
        (HOST_IP, BROADCAST_IP),
        9,
        b"uplink-forged-tag",
        &[SpecId::new(1, seq)],
    );
    host.packet.send(&forged).expect("sending the forged frame");
    let f = vm
        .frame_with(b"uplink-forged-tag", ARRIVAL)
        .expect("the forged frame never reached the VM port");
    assert_eq!(f, codec::strip(&forged).expect("strip"), "tag stripped");

    // The path to the host works: an untagged frame arrives at once.
    vm.frame(&to_host(b"uplink-plain", &[]));
    assert!(
        host.receives(b"uplink-plain", ARRIVAL),
        "untagged frame lost"
    );

    // Rule 11, commit: held while the speculation is open, then released
    // without its tag, and the host's stack takes it.
    let s = SpecId::new(1, seq);
    vm.control(&Control::Started { id: s });
    let tagged = to_host(b"uplink-spec-commit", &[s]);
    vm.frame(&tagged);
    assert!(
        host.packet
            .frame_with(b"uplink-spec-commit", QUIET)
            .is_none(),
        "a tagged frame crossed the TAP before its speculation committed"
    );
    assert!(
        !host.receives(b"uplink-spec-commit", Duration::ZERO),
        "the host's stack took a held frame"
    );
    vm.control(&Control::Resolved {
        id: s,
        outcome: Outcome::Commit,
    });
    let seen = host
        .packet
        .frame_with(b"uplink-spec-commit", ARRIVAL)
        .expect("not released on commit");
    assert_eq!(
        seen,
        codec::strip(&tagged).expect("strip"),
        "released untagged"
    );
    assert_eq!(codec::parse_tags(&seen), Ok(None));
    assert!(
        host.receives(b"uplink-spec-commit", ARRIVAL),
        "the host's stack did not take it"
    );

    // Rule 11, abort: dropped, never reaches the host.
    let s2 = SpecId::new(1, seq + 1);
    vm.control(&Control::Started { id: s2 });
    vm.frame(&to_host(b"uplink-spec-abort", &[s2]));
    vm.control(&Control::Resolved {
        id: s2,
        outcome: Outcome::Abort,
    });
    // An untagged frame sent after the abort arrives; the aborted one did
    // not come before it and does not come after.
    vm.frame(&to_host(b"uplink-after-abort", &[]));
    assert!(
        host.receives(b"uplink-after-abort", ARRIVAL),
        "path lost after abort"
    );
    assert!(
        host.packet
            .frame_with(b"uplink-spec-abort", QUIET)
            .is_none(),
        "a frame of an aborted speculation reached the host"
    );
    assert!(
        !host.receives(b"uplink-spec-abort", Duration::ZERO),
        "the host's stack took an aborted frame"
    );

    let events = bridge.log("events.log");
    for e in [
        r#""event":"committed","id":"1:"#,
        r#""event":"aborted","id":"1:"#,
    ] {
        assert!(events.contains(e), "missing {e} in {events}");
    }
    // SIGTERM: the bridge exits cleanly, and the TAP it made goes with it.
    drop(vm);
    let status = bridge.terminate();
    assert!(
        status.success(),
        "netbridge: {status}: {}",
        bridge.log("stderr.log")
    );
    let gone = Command::new("ip")
        .args(["-n", ns.name(), "link", "show", TAP])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("running ip");
    assert!(!gone.success(), "the TAP outlived the bridge");
}
