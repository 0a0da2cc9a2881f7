//! Fuzz targets of the bridge behind the port protocol: its decisions
//! (`netbridge::bridge`, no I/O) under random port operations, checked
//! against what it announced; and the `netbridge` binary's framed reader
//! under hostile byte streams, with two honest ports that must keep
//! talking. How to run them longer: `docs/fuzzing.md`.

#[path = "support/fuzz.rs"]
mod fuzz;
#[path = "support/gen.rs"]
mod gen;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use fuzz::{Bytes, Seq, Target};
use gen::{mac, outcome, small_id, AnyControl, AnyFrame, AnyMessage, Udp, IDS_SEQS, IDS_VMS};
use netbridge::bridge::{
    Bridge, Send, HELD_BYTES_MAX, HELD_MAX, QUEUE_BYTES_MAX, QUEUE_MAX, UNACKED_MAX,
};
use netbridge::registry::IDS_PER_PORT;
use netbridge::tags;
use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, encode_frame, framed, Control, Message, Outcome, MAX_MESSAGE,
};

/// What a port does to the bridge.
#[derive(Debug, Arbitrary)]
enum PortOp {
    /// A new port (a fresh port number, as the server gives).
    Connect {
        vm: u8,
        speculative: bool,
    },
    Uplink,
    Disconnect(u8),
    Control(u8, AnyControl),
    /// A control message with ids from the pool, so it hits open
    /// speculations.
    Spec(u8, SpecOp),
    Frame(u8, AnyFrame),
    /// Takes up to that many frames queued for the port.
    Pop(u8, u8),
}

#[derive(Debug, Arbitrary)]
enum SpecOp {
    Started(u8),
    Joined(Seq<u8>),
    Resolved(u8, bool),
    /// A decision on an id of the port's own VM, as its owner.
    Decide(u8, bool),
    /// A speculation of the port's own VM, as its owner starts one.
    StartOwn(u8),
    Ack(u8),
}

/// An id of VM `vm`, with one of [`IDS_SEQS`] sequence numbers.
fn own_id(vm: u32, seq: u8) -> SpecId {
    SpecId::new(vm, u32::from(seq) % IDS_SEQS as u32)
}

impl SpecOp {
    fn to_control(&self, vm: u32) -> Control {
        match self {
            SpecOp::Started(i) => Control::Started { id: small_id(*i) },
            SpecOp::Decide(seq, c) => Control::Resolved {
                id: own_id(vm, *seq),
                outcome: outcome(*c),
            },
            SpecOp::StartOwn(seq) => Control::Started {
                id: own_id(vm, *seq),
            },
            SpecOp::Joined(v) => Control::Joined {
                ids: v.0.iter().map(|&i| small_id(i)).collect(),
            },
            SpecOp::Resolved(i, c) => Control::Resolved {
                id: small_id(*i),
                outcome: outcome(*c),
            },
            SpecOp::Ack(s) => Control::Ack { seq: u64::from(*s) },
        }
    }
}

struct BridgeModel {
    bridge: Bridge,
    /// Live ports: (port, speculative).
    ports: Vec<(u64, bool)>,
    /// The VM of each VM port.
    vms: HashMap<u64, u32>,
    next_port: u64,
    /// The first outcome the bridge announced for each id: the one its
    /// registry keeps.
    decided: HashMap<SpecId, Outcome>,
    /// Announcements that contradict an earlier one for the same id.
    contradictions: Vec<(SpecId, &'static str)>,
    /// Ids the bridge announced as started by their owner.
    started: HashSet<SpecId>,
}

impl BridgeModel {
    fn new() -> Self {
        Self {
            bridge: Bridge::new(tags::read, tags::strip),
            ports: Vec::new(),
            vms: HashMap::new(),
            next_port: 1,
            decided: HashMap::new(),
            contradictions: Vec::new(),
            started: HashSet::new(),
        }
    }

    fn port(&self, i: u8) -> Option<(u64, bool)> {
        match self.ports.len() {
            0 => None,
            n => Some(self.ports[usize::from(i) % n]),
        }
    }

    fn note_events(&mut self) {
        for e in self.bridge.take_events() {
            let outcome = match e.event {
                "aborted" => Outcome::Abort,
                "committed" => Outcome::Commit,
                "started" => {
                    self.started.insert(parse_id(e.id.as_deref()));
                    continue;
                }
                _ => continue,
            };
            let id = parse_id(e.id.as_deref());
            let first = *self.decided.entry(id).or_insert(outcome);
            if first != outcome {
                self.contradictions.push((id, e.event));
            }
        }
    }

    fn check_sends(&self, sends: &[Send]) {
        for Send::Control(p, c) in sends {
            assert!(
                self.ports.iter().any(|&(q, _)| q == *p),
                "{c:?} for port {p}, which is gone"
            );
            assert!(
                matches!(c, Control::Decided { .. }),
                "the bridge sent {c:?}"
            );
        }
    }

    /// Takes one frame queued for `port` and checks it may go there.
    fn pop(&mut self, port: u64, speculative: bool) -> bool {
        let Some(f) = self.bridge.pop(port) else {
            return false;
        };
        let tags = codec::parse_tags(&f).expect("a queued frame parses");
        let tags = tags.unwrap_or_default();
        assert!(
            speculative || tags.is_empty(),
            "a tagged frame {tags:x?} reached port {port}, which cannot roll back"
        );
        for t in tags {
            assert_ne!(
                self.decided.get(&t),
                Some(&Outcome::Abort),
                "a frame tagged with aborted id {t:#x} reached port {port}"
            );
            assert!(
                self.started.contains(&t),
                "a frame tagged with {t:#x}, which its owner never started, reached port {port}"
            );
        }
        true
    }

    fn check_usage(&self) {
        for &(p, _) in &self.ports {
            let u = self.bridge.usage(p).expect("a live port has usage");
            assert!(
                u.queued <= QUEUE_MAX && u.queued_bytes <= QUEUE_BYTES_MAX,
                "{u:?}"
            );
            assert!(
                u.held <= HELD_MAX && u.held_bytes <= HELD_BYTES_MAX,
                "{u:?}"
            );
            assert!(
                u.ids <= IDS_PER_PORT && u.unacked <= UNACKED_MAX + IDS_PER_PORT,
                "{u:?}"
            );
        }
    }

    fn step(&mut self, op: &PortOp) {
        match op {
            PortOp::Connect { vm, speculative } => {
                let port = self.next_port;
                self.next_port += 1;
                let vm = u32::from(*vm) % IDS_VMS as u32;
                if self.bridge.add_port(port, vm, *speculative).is_ok() {
                    self.ports.push((port, *speculative));
                    self.vms.insert(port, vm);
                }
            }
            PortOp::Uplink => {
                let port = self.next_port;
                self.next_port += 1;
                self.bridge.add_uplink(port);
                self.ports.push((port, false));
            }
            PortOp::Disconnect(i) => {
                if let Some((port, _)) = self.port(*i) {
                    self.ports.retain(|&(p, _)| p != port);
                    let sends = self.bridge.remove_port(port);
                    self.check_sends(&sends);
                }
            }
            PortOp::Control(i, c) => {
                if let Some((port, _)) = self.port(*i) {
                    let (sends, _) = self.bridge.control(port, c.to_control());
                    self.check_sends(&sends);
                }
            }
            PortOp::Spec(i, s) => {
                if let Some((port, _)) = self.port(*i) {
                    let vm = self.vms.get(&port).copied().unwrap_or(u32::MAX);
                    let (sends, _) = self.bridge.control(port, s.to_control(vm));
                    self.check_sends(&sends);
                }
            }
            PortOp::Frame(i, f) => {
                if let Some((port, _)) = self.port(*i) {
                    self.bridge.ingress(port, f.bytes());
                }
            }
            PortOp::Pop(i, n) => {
                if let Some((port, spec)) = self.port(*i) {
                    self.note_events();
                    for _ in 0..*n {
                        if !self.pop(port, spec) {
                            break;
                        }
                    }
                }
            }
        }
        self.note_events();
        self.check_usage();
    }
}

/// An id of an event, `vm:seq`.
fn parse_id(id: Option<&str>) -> SpecId {
    id.and_then(|id| id.parse().ok())
        .expect("the event names its id as vm:seq")
}

#[test]
fn bridge_core_under_hostile_ports() {
    Target {
        name: "bridge_core_under_hostile_ports",
        default_cases: 30_000,
        max_len: 4096,
    }
    .run(|Seq(ops): Seq<PortOp>| {
        let mut m = BridgeModel::new();
        for op in &ops {
            m.step(op);
        }
        // Every queue drains to empty, and its byte count with it.
        for (port, spec) in m.ports.clone() {
            while m.pop(port, spec) {}
            let u = m.bridge.usage(port).unwrap();
            assert_eq!((u.queued, u.queued_bytes), (0, 0), "port {port}");
        }
        // Once every port has gone, no id is left open.
        for (port, _) in m.ports.clone() {
            m.step(&PortOp::Disconnect(0));
            assert_eq!(m.bridge.usage(port), None);
        }
        assert_eq!(m.bridge.open_ids(), 0);
    });
}

/// Found by `bridge_core_under_hostile_ports` (case 22393 of the default
/// seed, before the target learnt to tolerate it), shrunk by hand: an owner
/// resolves its speculation twice, commit then abort. The registry keeps
/// the first outcome (commit), but `Bridge::control` announces the second
/// ("aborted" on the event stream) and purges the id's queued frames, so a
/// committed frame is lost. Rule 6 wants repeated messages to change
/// nothing. The fix belongs in `netbridge/src/bridge.rs` (`Control::Resolved`):
/// announce, purge and release only when the registry decided just now.
#[test]
fn regression_a_second_resolved_changes_nothing() {
    let udp = Udp {
        src: 0,
        dst: None,
        payload: 0,
        tag: 4, // id 0:1, owned by VM 0
        more_tags: None,
    };
    let mut m = BridgeModel::new();
    for op in [
        PortOp::Connect {
            vm: 0,
            speculative: true,
        },
        PortOp::Connect {
            vm: 1,
            speculative: true,
        },
        PortOp::Spec(0, SpecOp::StartOwn(1)),
        PortOp::Frame(0, AnyFrame::Udp(udp)),
        PortOp::Spec(0, SpecOp::Decide(1, true)),
        PortOp::Spec(0, SpecOp::Decide(1, false)),
    ] {
        m.step(&op);
    }
    assert!(m.pop(2, true), "the committed frame for port 2 was purged");
    assert_eq!(
        m.contradictions,
        vec![],
        "the bridge announced both outcomes"
    );
}

// ---------------------------------------------------------------------
// The `netbridge` binary's framed reader, fed hostile byte streams.

/// The bridge process, with its stderr in a file (a panic in a port task
/// shows there, and nowhere else: tokio keeps the process up).
struct BridgeProcess {
    child: Child,
    dir: PathBuf,
}

impl BridgeProcess {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netbridge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_netbridge"))
            .arg("--listen")
            .arg(dir.join("bridge.sock"))
            .args(["--quiet", "--log-level", "error", "--lease-ms", "600000"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !dir.join("bridge.sock").exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.dir.join("bridge.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    }

    /// A well-behaved port for VM `vm`.
    fn port(&self, vm: u32) -> UnixStream {
        let mut s = self.connect();
        s.write_all(&framed(&encode_control(&Control::Hello {
            vm,
            speculative: true,
        })))
        .unwrap();
        match read_message(&mut s, Duration::from_secs(5)) {
            Some(Message::Control(Control::Welcome { .. })) => s,
            other => panic!("no welcome for VM {vm}: {other:?}"),
        }
    }

    /// Fails if the process ended or a task panicked.
    fn check_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the bridge exited"
        );
        let err = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        assert!(!err.contains("panicked"), "the bridge panicked:\n{err}");
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next message, if one starts within `wait`, or `None`. Once its
/// first byte is in, the rest is waited for (the bridge writes whole
/// messages), so the stream never loses its framing.
fn read_message(s: &mut UnixStream, wait: Duration) -> Option<Message> {
    s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .unwrap();
    let mut first = [0u8; 1];
    if s.read(&mut first).ok()? == 0 {
        return None;
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let buf = specwire::protocol::read_message(&mut first.chain(&mut *s)).ok()?;
    decode(&buf).ok()
}

/// A piece of what a hostile port writes.
#[derive(Debug, Arbitrary)]
enum Chunk {
    /// A length-prefixed message.
    Message(AnyMessage),
    /// A length-prefixed frame.
    Frame(AnyFrame),
    /// A length past `MAX_MESSAGE`.
    TooLong(u32),
    /// A length, then fewer bytes than it says.
    Short(u16, Bytes),
    /// Bytes with no framing.
    Raw(Bytes),
}

#[derive(Debug, Arbitrary)]
struct Stream {
    hello: Option<(u8, bool)>,
    /// Read what the bridge answers before closing.
    linger: bool,
    chunks: Seq<Chunk>,
}

impl Stream {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some((vm, speculative)) = self.hello {
            let vm = 2000 + u32::from(vm % 8);
            out.extend(framed(&encode_control(&Control::Hello { vm, speculative })));
        }
        for c in &self.chunks.0 {
            match c {
                Chunk::Message(m) => out.extend(framed(&m.bytes())),
                Chunk::Frame(f) => out.extend(framed(&encode_frame(&f.bytes()))),
                Chunk::TooLong(n) => {
                    let n = (MAX_MESSAGE as u32 + 1).saturating_add(*n % 1_000_000);
                    out.extend_from_slice(&n.to_le_bytes());
                }
                Chunk::Short(n, b) => {
                    out.extend_from_slice(&(u32::from(*n) + b.0.len() as u32 + 1).to_le_bytes());
                    out.extend_from_slice(&b.0);
                }
                Chunk::Raw(b) => out.extend_from_slice(&b.0),
            }
        }
        out
    }
}

/// The bridge and its two honest ports, a and b.
struct Honest {
    bridge: BridgeProcess,
    a: UnixStream,
    b: UnixStream,
    marker: u64,
}

impl Honest {
    /// The bridge is up, and two honest ports still talk: a broadcast from
    /// a reaches b (resent, since a full queue may drop one).
    fn check(&mut self) {
        self.marker += 1;
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac(1));
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&self.marker.to_be_bytes());
        let end = Instant::now() + Duration::from_secs(5);
        let mut next_send = Instant::now();
        loop {
            assert!(Instant::now() < end, "b got no frame from a");
            if Instant::now() >= next_send {
                self.a.write_all(&framed(&encode_frame(&f))).unwrap();
                next_send = Instant::now() + Duration::from_millis(500);
            }
            match read_message(&mut self.b, Duration::from_millis(50)) {
                Some(Message::Frame(g)) if g == f => break,
                _ => {}
            }
        }
        // What a got meanwhile (hostile broadcasts), so its queue never fills.
        while read_message(&mut self.a, Duration::from_millis(1)).is_some() {}
        self.bridge.check_alive();
    }
}

#[test]
fn bridge_process_under_hostile_streams() {
    let bridge = BridgeProcess::start("fuzz-streams");
    let (a, b) = (bridge.port(1001), bridge.port(1002));
    let honest = std::cell::RefCell::new(Honest {
        bridge,
        a,
        b,
        marker: 0,
    });
    let target = Target {
        name: "bridge_process_under_hostile_streams",
        default_cases: 300,
        max_len: 8192,
    };
    target.run(|stream: Stream| {
        let mut h = honest.borrow_mut();
        {
            let mut s = h.bridge.connect();
            // The bridge may close the port half way: later writes fail.
            let _ = s.write_all(&stream.bytes());
            if stream.linger {
                while read_message(&mut s, Duration::from_millis(20)).is_some() {}
            }
        }
        h.check();
    });
}
