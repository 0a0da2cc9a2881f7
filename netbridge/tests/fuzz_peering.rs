//! Fuzz target of the bridge core with peers (`netbridge::bridge`, no
//! I/O; docs/netbridge.md "Peering"): VM ports coming and going and
//! speculating, and two peer bridges that send any frame, tell any
//! outcome, ask about any id. Checked against what the bridge announced.
//! How to run it longer: `docs/fuzzing.md`.

#[path = "support/fuzz.rs"]
mod fuzz;
#[path = "support/gen.rs"]
mod gen;

use std::collections::{HashMap, HashSet};

use arbitrary::Arbitrary;
use fuzz::{Seq, Target};
use gen::{outcome, small_id, AnyFrame, IDS_SEQS, IDS_VMS};
use netbridge::bridge::{Bridge, Send, HELD_BYTES_MAX, HELD_MAX, QUEUE_BYTES_MAX, QUEUE_MAX};
use netbridge::tags;
use specwire::codec::{self, SpecId};
use specwire::protocol::{Control, Decision, Outcome};

/// The two peers' ports.
const PEERS: [u64; 2] = [1000, 1001];

/// What a VM port or a peer does to the bridge.
#[derive(Debug, Arbitrary)]
enum Op {
    Connect {
        vm: u8,
        speculative: bool,
    },
    Disconnect(u8),
    /// Starts an id of the port's own VM (a pool sequence number).
    Start(u8, u8),
    /// Decides an id of the port's own VM, as its owner.
    Decide(u8, u8, bool),
    /// Joins pool ids.
    Join(u8, Seq<u8>),
    Frame(u8, AnyFrame),
    PeerFrame(bool, AnyFrame),
    PeerDecided(bool, Seq<(u8, bool)>),
    PeerHold(bool, Seq<u8>, bool),
    PeerOpen(bool, Seq<u8>),
    /// Takes up to that many frames queued for a port (a peer's too).
    Pop(u8, u8),
    EndRecovery,
}

struct Model {
    bridge: Bridge,
    /// Live VM ports: (port, speculative, vm).
    ports: Vec<(u64, bool, u32)>,
    next_port: u64,
    decided: HashMap<SpecId, Outcome>,
    /// Ids announced started by their owner here, or opened from a peer.
    known: HashSet<SpecId>,
}

fn peer(second: bool) -> u64 {
    PEERS[usize::from(second)]
}

impl Model {
    fn new() -> Self {
        let mut bridge = Bridge::new(tags::read, tags::strip);
        bridge.add_peer(PEERS[0], "192.0.2.1:4789");
        bridge.add_peer(PEERS[1], "192.0.2.2:4789");
        Self {
            bridge,
            ports: Vec::new(),
            next_port: 1,
            decided: HashMap::new(),
            known: HashSet::new(),
        }
    }

    fn port(&self, i: u8) -> Option<(u64, bool, u32)> {
        match self.ports.len() {
            0 => None,
            n => Some(self.ports[usize::from(i) % n]),
        }
    }

    fn connected(&self, vm: u32) -> bool {
        self.ports.iter().any(|&(_, _, v)| v == vm)
    }

    fn live(&self, p: u64) -> bool {
        PEERS.contains(&p) || self.ports.iter().any(|&(q, _, _)| q == p)
    }

    fn note_events(&mut self) {
        for e in self.bridge.take_events() {
            let id = || -> SpecId {
                e.id.as_deref()
                    .and_then(|i| i.parse().ok())
                    .expect("the event names its id as vm:seq")
            };
            let o = match e.event {
                "started" | "remote-open" => {
                    self.known.insert(id());
                    continue;
                }
                "committed" => Outcome::Commit,
                "aborted" => Outcome::Abort,
                _ => continue,
            };
            let id = id();
            if PEERS.contains(&e.port) {
                assert!(
                    !self.connected(id.vm),
                    "peer {} decided {id}, of VM {} connected here",
                    e.port,
                    id.vm
                );
            }
            let first = *self.decided.entry(id).or_insert(o);
            assert_eq!(first, o, "{id} announced {first:?}, then {o:?}");
        }
    }

    fn check_sends(&self, sends: &[Send]) {
        for Send::Control(p, c) in sends {
            assert!(self.live(*p), "{c:?} for port {p}, which is gone");
            assert!(
                matches!(c, Control::Decided { .. }),
                "the bridge sent {c:?}"
            );
        }
    }

    fn pop(&mut self, port: u64, speculative: bool) -> bool {
        let Some(f) = self.bridge.pop(port) else {
            return false;
        };
        let tags = codec::parse_tags(&f).expect("a queued frame parses");
        let tags = tags.unwrap_or_default();
        assert!(
            speculative || tags.is_empty(),
            "a tagged frame {tags:?} reached port {port}, which cannot roll back"
        );
        for t in tags {
            assert_ne!(
                self.decided.get(&t),
                Some(&Outcome::Abort),
                "a frame tagged with aborted {t} reached port {port}"
            );
            assert!(
                self.known.contains(&t),
                "a frame tagged with {t}, never started here nor opened from a peer, reached port {port}"
            );
        }
        true
    }

    fn check_usage(&self) {
        for p in self.ports.iter().map(|&(p, _, _)| p).chain(PEERS) {
            let u = self.bridge.usage(p).expect("a live port has usage");
            assert!(
                u.queued <= QUEUE_MAX && u.queued_bytes <= QUEUE_BYTES_MAX,
                "{u:?}"
            );
            assert!(
                u.held <= HELD_MAX && u.held_bytes <= HELD_BYTES_MAX,
                "{u:?}"
            );
            if PEERS.contains(&p) {
                assert_eq!(u.unacked, 0, "a peer acknowledges nothing");
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Connect { vm, speculative } => {
                let port = self.next_port;
                self.next_port += 1;
                let vm = u32::from(*vm) % IDS_VMS as u32;
                if self.bridge.add_port(port, vm, *speculative).is_ok() {
                    self.ports.push((port, *speculative, vm));
                }
            }
            Op::Disconnect(i) => {
                if let Some((port, _, _)) = self.port(*i) {
                    self.ports.retain(|&(p, _, _)| p != port);
                    let sends = self.bridge.remove_port(port);
                    self.check_sends(&sends);
                }
            }
            Op::Start(i, seq) | Op::Decide(i, seq, _) => {
                if let Some((port, _, vm)) = self.port(*i) {
                    let id = SpecId::new(vm, u32::from(*seq) % IDS_SEQS as u32);
                    let c = match op {
                        Op::Decide(_, _, commit) => Control::Resolved {
                            id,
                            outcome: outcome(*commit),
                        },
                        _ => Control::Started { id },
                    };
                    let (sends, _) = self.bridge.control(port, c);
                    self.check_sends(&sends);
                }
            }
            Op::Join(i, ids) => {
                if let Some((port, _, _)) = self.port(*i) {
                    let ids = ids.0.iter().map(|&i| small_id(i)).collect();
                    let (sends, _) = self.bridge.control(port, Control::Joined { ids });
                    self.check_sends(&sends);
                }
            }
            Op::Frame(i, f) => {
                if let Some((port, _, _)) = self.port(*i) {
                    self.bridge.ingress(port, f.bytes());
                }
            }
            Op::PeerFrame(second, f) => {
                let woke = self.bridge.ingress(peer(*second), f.bytes());
                assert!(
                    !woke.iter().any(|p| PEERS.contains(p)),
                    "a frame from a peer was queued to a peer: {woke:?}"
                );
            }
            Op::PeerDecided(second, d) => {
                let d: Vec<Decision> =
                    d.0.iter()
                        .map(|&(i, c)| Decision {
                            id: small_id(i),
                            outcome: outcome(c),
                        })
                        .collect();
                let (sends, _) = self.bridge.peer_decided(peer(*second), &d);
                self.check_sends(&sends);
            }
            Op::PeerHold(second, ids, strict) => {
                let ids: Vec<SpecId> = ids.0.iter().map(|&i| small_id(i)).collect();
                let a = self.bridge.peer_hold(peer(*second), &ids, *strict);
                for d in &a.decided {
                    assert!(ids.contains(&d.id), "answered {d:?}, never asked");
                    if let Some(&o) = self.decided.get(&d.id) {
                        assert_eq!(o, d.outcome, "told {d:?}, announced {o:?}");
                    }
                }
                for id in &a.open {
                    assert!(
                        !self.decided.contains_key(id),
                        "{id} told open, announced decided"
                    );
                }
            }
            Op::PeerOpen(second, ids) => {
                let ids: Vec<SpecId> = ids.0.iter().map(|&i| small_id(i)).collect();
                self.bridge.peer_open(peer(*second), &ids);
            }
            Op::Pop(i, n) => {
                self.note_events();
                let all: Vec<(u64, bool)> = self
                    .ports
                    .iter()
                    .map(|&(p, s, _)| (p, s))
                    .chain(PEERS.map(|p| (p, true)))
                    .collect();
                let (port, spec) = all[usize::from(*i) % all.len()];
                for _ in 0..*n {
                    if !self.pop(port, spec) {
                        break;
                    }
                }
            }
            Op::EndRecovery => {
                let sends = self.bridge.end_recovery();
                self.check_sends(&sends);
            }
        }
        self.note_events();
        self.check_usage();
    }
}

#[test]
fn bridge_core_under_hostile_peers() {
    Target {
        name: "bridge_core_under_hostile_peers",
        default_cases: 20_000,
        max_len: 4096,
    }
    .run(|Seq(ops): Seq<Op>| {
        let mut m = Model::new();
        for op in &ops {
            m.step(op);
        }
        // Every queue drains to empty, and its byte count with it.
        let all: Vec<(u64, bool)> = m
            .ports
            .iter()
            .map(|&(p, s, _)| (p, s))
            .chain(PEERS.map(|p| (p, true)))
            .collect();
        for (port, spec) in all {
            while m.pop(port, spec) {}
            let u = m.bridge.usage(port).unwrap();
            assert_eq!((u.queued, u.queued_bytes), (0, 0), "port {port}");
        }
    });
}
