//! The bridge's state and decisions, free of I/O: MAC learning, flooding,
//! per-port queues, output commit for ports that cannot roll back, and
//! anti-messages on abort. The server (`server.rs`) moves bytes; this
//! decides where they go.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use crate::protocol::{Control, Id, Outcome};
use crate::registry::{Notice, PortId, Registry};

/// Frames queued for one port before new ones are dropped (and counted).
pub const QUEUE_MAX: usize = 1024;
/// Bytes of frames queued for one port before new ones are dropped (and
/// counted). With the MTU the VMMs use (1,460), [`QUEUE_MAX`] frames fit;
/// 64 KiB frames stop at 32, so a port that floods with them cannot make
/// the bridge hold 64 MiB for each port that reads slowly.
pub const QUEUE_BYTES_MAX: usize = 2 << 20;
/// Frames held for output commit on one port before new ones are dropped
/// (and counted): the sender's speculation must resolve to free room.
pub const HELD_MAX: usize = 4096;
/// Bytes of frames held for output commit on one port before new ones are
/// dropped (and counted): [`HELD_MAX`] frames of the VMMs' MTU fit, 128
/// frames of 64 KiB do.
pub const HELD_BYTES_MAX: usize = 8 << 20;

/// Reads the speculation tags of a frame. The bridge is built with the
/// codec's parser; tests substitute their own.
pub type TagReader = fn(&[u8]) -> Result<Vec<Id>, String>;
/// Removes the tag of a frame before it leaves for a port that cannot roll
/// back.
pub type TagStripper = fn(&[u8]) -> Result<Vec<u8>, String>;

/// Per-port counters.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Counters {
    /// Frames received from the port.
    pub rx: u64,
    /// Frames queued to the port.
    pub tx: u64,
    /// Frames dropped because their tag held an aborted id (rule 10).
    pub dropped_aborted: u64,
    /// Frames dropped because the queue or the hold buffer was full, in
    /// frames or in bytes.
    pub dropped_full: u64,
    /// Frames dropped because their IPv4 header or tag was malformed.
    pub dropped_malformed: u64,
    /// Frames held for output commit so far (rule 11).
    pub held: u64,
    /// Held frames released after every id in their tag committed.
    pub released: u64,
    /// Frames from a port with no VM behind it (the TAP uplink) whose
    /// IPOPT_SPEC was stripped as forged before switching (rule 12).
    pub forged: u64,
}

#[derive(Debug)]
struct Queued {
    frame: Vec<u8>,
    tags: Vec<Id>,
}

#[derive(Debug)]
struct Port {
    speculative: bool,
    /// Whether tags on the port's frames are believed: true for VMM ports,
    /// whose VMM writes the true set (rule 12); false for the uplink.
    trusts_tags: bool,
    queue: VecDeque<Queued>,
    /// Bytes of the frames in `queue`.
    queue_bytes: usize,
    held: VecDeque<Queued>,
    /// Bytes of the frames in `held`.
    held_bytes: usize,
    counters: Counters,
    next_seq: u64,
    unacked: BTreeMap<u64, Id>,
}

/// What one port's queue and hold buffer hold now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Frames queued to the port.
    pub queued: usize,
    /// Their bytes.
    pub queued_bytes: usize,
    /// Frames held for output commit.
    pub held: usize,
    /// Their bytes.
    pub held_bytes: usize,
}

/// Something the server must send besides frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Send {
    /// A control message to a port.
    Control(PortId, Control),
}

/// An event for the bridge's event stream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// `started`, `joined`, `committed`, `aborted`, `acked`, `port-up`,
    /// `port-down`, `refused`.
    pub event: &'static str,
    /// The speculation, as `vm:seq`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The port concerned.
    pub port: PortId,
}

fn show(id: Id) -> String {
    id.to_string()
}

/// The bridge.
pub struct Bridge {
    ports: BTreeMap<PortId, Port>,
    macs: HashMap<[u8; 6], PortId>,
    registry: Registry,
    read_tags: TagReader,
    strip_tag: TagStripper,
    /// Events since the last [`Bridge::take_events`].
    events: Vec<Event>,
}

impl Bridge {
    /// An empty bridge using `read_tags` and `strip_tag` on frames.
    pub fn new(read_tags: TagReader, strip_tag: TagStripper) -> Self {
        Self {
            ports: BTreeMap::new(),
            macs: HashMap::new(),
            registry: Registry::new(),
            read_tags,
            strip_tag,
            events: Vec::new(),
        }
    }

    fn event(&mut self, event: &'static str, id: Option<Id>, port: PortId) {
        self.events.push(Event {
            event,
            id: id.map(show),
            port,
        });
    }

    /// The events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Adds a port for VM `vm`, and returns the first sequence number the
    /// VM may use. A non-speculative port (the uplink, or a VM with
    /// speculation off) gets tagged frames only after commit. A second port
    /// for a VM id that is connected already is refused: two VMs with one
    /// id would both own its speculations (rule 8).
    pub fn add_port(&mut self, port: PortId, vm: u32, speculative: bool) -> Result<u32, String> {
        if self.registry.vm_connected(vm) {
            self.event("refused", None, port);
            return Err(format!("VM id {vm} is already connected"));
        }
        self.registry.add_port(port, vm);
        self.insert_port(port, speculative, true);
        Ok(self.registry.next_seq(vm))
    }

    /// Adds a port with no VM behind it: the TAP uplink to the host. It
    /// cannot roll back, so tagged frames reach it only after commit (rule
    /// 11); it owns and joins no speculation, so it takes no VM id from the
    /// VMs; and a tag on a frame it sends is forged, since nothing it says
    /// depends on an open speculation: the tag is stripped and the frame
    /// switched as the untagged frame it truly is (rule 12).
    pub fn add_uplink(&mut self, port: PortId) {
        self.insert_port(port, false, false);
    }

    fn insert_port(&mut self, port: PortId, speculative: bool, trusts_tags: bool) {
        self.ports.insert(
            port,
            Port {
                speculative,
                trusts_tags,
                queue: VecDeque::new(),
                queue_bytes: 0,
                held: VecDeque::new(),
                held_bytes: 0,
                counters: Counters::default(),
                next_seq: 1,
                unacked: BTreeMap::new(),
            },
        );
        self.event("port-up", None, port);
    }

    /// The port is gone (rule 9). Returns the control messages to send.
    pub fn remove_port(&mut self, port: PortId) -> Vec<Send> {
        self.ports.remove(&port);
        self.macs.retain(|_, p| *p != port);
        self.event("port-down", None, port);
        let (aborted, notices) = self.registry.port_gone(port);
        for &id in &aborted {
            self.event("aborted", Some(id), port);
            self.purge(id);
        }
        self.notify(notices)
    }

    /// Takes the next frame queued for `port`.
    pub fn pop(&mut self, port: PortId) -> Option<Vec<u8>> {
        let p = self.ports.get_mut(&port)?;
        let q = p.queue.pop_front()?;
        p.queue_bytes -= q.frame.len();
        Some(q.frame)
    }

    /// What `port`'s queue and hold buffer hold now.
    pub fn usage(&self, port: PortId) -> Option<Usage> {
        self.ports.get(&port).map(|p| Usage {
            queued: p.queue.len(),
            queued_bytes: p.queue_bytes,
            held: p.held.len(),
            held_bytes: p.held_bytes,
        })
    }

    /// The port's counters.
    pub fn counters(&self, port: PortId) -> Option<Counters> {
        self.ports.get(&port).map(|p| p.counters.clone())
    }

    /// Control messages sent to `port` and not acknowledged yet.
    pub fn unacked(&self, port: PortId) -> usize {
        self.ports.get(&port).map_or(0, |p| p.unacked.len())
    }

    /// A frame from `from`. Returns the ports that got something queued.
    pub fn ingress(&mut self, from: PortId, mut frame: Vec<u8>) -> Vec<PortId> {
        let Some(p) = self.ports.get_mut(&from) else {
            return Vec::new();
        };
        p.counters.rx += 1;
        let mut tags = match (self.read_tags)(&frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(port = from, "malformed frame dropped: {e}");
                p.counters.dropped_malformed += 1;
                return Vec::new();
            }
        };
        if !p.trusts_tags && !tags.is_empty() {
            match (self.strip_tag)(&frame) {
                Ok(f) => {
                    tracing::debug!(port = from, "forged tag {tags:x?} stripped");
                    p.counters.forged += 1;
                    frame = f;
                    tags.clear();
                }
                Err(e) => {
                    tracing::debug!(port = from, "malformed frame dropped: {e}");
                    p.counters.dropped_malformed += 1;
                    return Vec::new();
                }
            }
        }
        if tags
            .iter()
            .any(|&t| self.registry.outcome(t) == Some(Outcome::Abort))
        {
            p.counters.dropped_aborted += 1;
            return Vec::new();
        }
        if frame.len() >= 12 {
            let mut src = [0u8; 6];
            src.copy_from_slice(&frame[6..12]);
            if src[0] & 1 == 0 {
                self.macs.insert(src, from);
            }
        }
        let dsts: Vec<PortId> = match frame.get(0..6).and_then(|d| <[u8; 6]>::try_from(d).ok()) {
            Some(dst) if dst[0] & 1 == 0 => match self.macs.get(&dst) {
                Some(&p) if p != from => vec![p],
                Some(_) => Vec::new(),
                None => self.ports.keys().copied().filter(|&p| p != from).collect(),
            },
            _ => self.ports.keys().copied().filter(|&p| p != from).collect(),
        };
        dsts.into_iter()
            .filter(|&d| self.deliver(d, frame.clone(), tags.clone()))
            .collect()
    }

    /// Queues or holds a frame for `port`. True if something was queued.
    fn deliver(&mut self, port: PortId, frame: Vec<u8>, tags: Vec<Id>) -> bool {
        let committed = tags
            .iter()
            .all(|&t| self.registry.outcome(t) == Some(Outcome::Commit));
        let strip = self.strip_tag;
        let Some(p) = self.ports.get_mut(&port) else {
            return false;
        };
        if p.speculative || tags.is_empty() {
            return push(p, Queued { frame, tags });
        }
        if committed {
            match strip(&frame) {
                Ok(f) => {
                    return push(
                        p,
                        Queued {
                            frame: f,
                            tags: Vec::new(),
                        },
                    )
                }
                Err(_) => {
                    p.counters.dropped_malformed += 1;
                    return false;
                }
            }
        }
        if p.held.len() >= HELD_MAX || p.held_bytes + frame.len() > HELD_BYTES_MAX {
            p.counters.dropped_full += 1;
            return false;
        }
        p.counters.held += 1;
        p.held_bytes += frame.len();
        p.held.push_back(Queued { frame, tags });
        false
    }

    /// A control message from `port`. Returns the messages to send and the
    /// ports whose queues changed.
    pub fn control(&mut self, port: PortId, c: Control) -> (Vec<Send>, Vec<PortId>) {
        match c {
            Control::Started { id } => {
                self.registry.started(id);
                self.event("started", Some(id), port);
                (Vec::new(), Vec::new())
            }
            Control::Joined { ids } => {
                for &id in &ids {
                    self.event("joined", Some(id), port);
                }
                let late = self.registry.joined(port, &ids);
                (self.notify(late), Vec::new())
            }
            Control::Resolved { id, outcome } => {
                // Rule 3: the owner decides once. A second `resolved` (a
                // buggy or hostile owner's) changes nothing: no event, and
                // no purge of frames that the first outcome released.
                let first = self.registry.outcome(id);
                match self.registry.resolved(port, id, outcome) {
                    Ok(_) if first.is_some() => {
                        tracing::warn!(
                            port,
                            ?outcome,
                            ?first,
                            "{id:#x} was already decided; ignored"
                        );
                        (Vec::new(), Vec::new())
                    }
                    Ok(notices) => {
                        let name = if outcome == Outcome::Commit {
                            "committed"
                        } else {
                            "aborted"
                        };
                        self.event(name, Some(id), port);
                        let woke = match outcome {
                            Outcome::Abort => {
                                self.purge(id);
                                Vec::new()
                            }
                            Outcome::Commit => self.release(),
                        };
                        (self.notify(notices), woke)
                    }
                    Err(e) => {
                        tracing::warn!("{e}");
                        self.event("refused", Some(id), port);
                        (Vec::new(), Vec::new())
                    }
                }
            }
            Control::Ack { seq } => {
                if let Some(id) = self
                    .ports
                    .get_mut(&port)
                    .and_then(|p| p.unacked.remove(&seq))
                {
                    self.event("acked", Some(id), port);
                }
                (Vec::new(), Vec::new())
            }
            Control::Hello { .. } | Control::Decided { .. } | Control::Welcome { .. } => {
                tracing::warn!(port, "unexpected control message {c:?}");
                (Vec::new(), Vec::new())
            }
        }
    }

    /// Turns notices into Decided messages, remembering them until acked.
    fn notify(&mut self, notices: Vec<Notice>) -> Vec<Send> {
        let mut out = Vec::new();
        for n in notices {
            if let Some(p) = self.ports.get_mut(&n.port) {
                let seq = p.next_seq;
                p.next_seq += 1;
                p.unacked.insert(seq, n.id);
                out.push(Send::Control(
                    n.port,
                    Control::Decided {
                        id: n.id,
                        outcome: n.outcome,
                        seq,
                    },
                ));
            }
        }
        out
    }

    /// Rule 10: drops every queued or held frame whose tag holds `id`.
    fn purge(&mut self, id: Id) {
        for p in self.ports.values_mut() {
            let before = p.queue.len() + p.held.len();
            p.queue.retain(|q| !q.tags.contains(&id));
            p.held.retain(|q| !q.tags.contains(&id));
            p.counters.dropped_aborted += (before - p.queue.len() - p.held.len()) as u64;
            p.queue_bytes = p.queue.iter().map(|q| q.frame.len()).sum();
            p.held_bytes = p.held.iter().map(|q| q.frame.len()).sum();
        }
    }

    /// Rule 11: releases held frames whose every id has committed, in
    /// order, stripped of their tag. Returns the ports that got frames.
    fn release(&mut self) -> Vec<PortId> {
        let registry = &self.registry;
        let strip = self.strip_tag;
        let mut woke = Vec::new();
        for (&id, p) in self.ports.iter_mut() {
            let mut keep = VecDeque::new();
            let mut any = false;
            while let Some(q) = p.held.pop_front() {
                if q.tags
                    .iter()
                    .all(|&t| registry.outcome(t) == Some(Outcome::Commit))
                {
                    if let Ok(frame) = strip(&q.frame) {
                        p.counters.released += 1;
                        any |= push(
                            p,
                            Queued {
                                frame,
                                tags: Vec::new(),
                            },
                        );
                    }
                } else {
                    keep.push_back(q);
                }
            }
            p.held_bytes = keep.iter().map(|q| q.frame.len()).sum();
            p.held = keep;
            if any {
                woke.push(id);
            }
        }
        woke
    }

    /// Open speculations and their members, for status.
    pub fn speculations(&self) -> Vec<(String, Vec<PortId>)> {
        self.registry
            .snapshot()
            .into_iter()
            .map(|(id, m)| (show(id), m))
            .collect()
    }
}

fn push(p: &mut Port, q: Queued) -> bool {
    if p.queue.len() >= QUEUE_MAX || p.queue_bytes + q.frame.len() > QUEUE_BYTES_MAX {
        p.counters.dropped_full += 1;
        return false;
    }
    p.counters.tx += 1;
    p.queue_bytes += q.frame.len();
    p.queue.push_back(q);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test frames: dst(6) src(6) then a tag list as text "t:1,2".
    fn frame(dst: u8, src: u8, tags: &[Id]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src];
        let t: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        f.extend_from_slice(format!("t:{}", t.join(",")).as_bytes());
        f
    }

    fn read(f: &[u8]) -> Result<Vec<Id>, String> {
        let s = std::str::from_utf8(f.get(12..).unwrap_or_default()).map_err(|e| e.to_string())?;
        let list = s.strip_prefix("t:").ok_or("no tag list")?;
        list.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().map_err(|_| "bad id".to_string()))
            .collect()
    }

    fn strip(f: &[u8]) -> Result<Vec<u8>, String> {
        let mut v = f[..12].to_vec();
        v.extend_from_slice(b"t:");
        Ok(v)
    }

    const S: Id = Id::new(1, 1); // VM 1's first speculation

    fn bridge() -> Bridge {
        let mut b = Bridge::new(read, strip);
        assert_eq!(b.add_port(1, 1, true), Ok(1));
        b.add_port(2, 2, true).unwrap();
        b.add_port(3, 3, false).unwrap(); // an uplink
        assert!(b.add_port(4, 1, true).is_err(), "VM 1 is connected already");
        b
    }

    #[test]
    fn learns_macs_and_floods_unknown() {
        let mut b = bridge();
        assert_eq!(b.ingress(1, frame(9, 1, &[])), vec![2, 3], "unknown: flood");
        assert_eq!(b.ingress(2, frame(1, 2, &[])), vec![1], "learned");
        assert_eq!(b.pop(1), Some(frame(1, 2, &[])));
        assert_eq!(b.counters(1).unwrap().rx, 1);
    }

    #[test]
    fn output_commit_holds_until_commit() {
        let mut b = bridge();
        b.ingress(3, frame(3, 3, &[])); // learn the uplink's MAC
        assert!(b.ingress(1, frame(3, 1, &[S])).is_empty(), "held");
        assert_eq!(b.pop(3), None);
        let (sends, woke) = b.control(
            1,
            Control::Resolved {
                id: S,
                outcome: Outcome::Commit,
            },
        );
        assert!(sends.is_empty());
        assert_eq!(woke, vec![3]);
        assert_eq!(
            b.pop(3),
            Some(strip(&frame(3, 1, &[S])).unwrap()),
            "released stripped"
        );
        assert_eq!(b.counters(3).unwrap().released, 1);
    }

    #[test]
    fn abort_drops_queued_and_held_frames_and_later_ones() {
        let mut b = bridge();
        b.ingress(1, frame(9, 1, &[S])); // flood: queued to 2, held for 3
        b.control(2, Control::Joined { ids: vec![S] });
        let (sends, _) = b.control(
            1,
            Control::Resolved {
                id: S,
                outcome: Outcome::Abort,
            },
        );
        assert_eq!(
            sends,
            vec![Send::Control(
                2,
                Control::Decided {
                    id: S,
                    outcome: Outcome::Abort,
                    seq: 1
                }
            )]
        );
        assert_eq!(b.pop(2), None, "anti-message: the queued frame is gone");
        assert_eq!(b.counters(3).unwrap().dropped_aborted, 1);
        assert!(
            b.ingress(1, frame(9, 1, &[S])).is_empty(),
            "late frames of an aborted id are dropped"
        );
        assert_eq!(b.unacked(2), 1);
        b.control(2, Control::Ack { seq: 1 });
        assert_eq!(b.unacked(2), 0);
    }

    #[test]
    fn a_non_owner_cannot_decide() {
        let mut b = bridge();
        b.control(2, Control::Joined { ids: vec![S] });
        let (sends, _) = b.control(
            2,
            Control::Resolved {
                id: S,
                outcome: Outcome::Abort,
            },
        );
        assert!(sends.is_empty());
        assert_eq!(b.speculations(), vec![("1:1".to_string(), vec![2])]);
    }

    #[test]
    fn owner_disconnect_aborts_and_tells_members() {
        let mut b = bridge();
        b.control(2, Control::Joined { ids: vec![S] });
        let sends = b.remove_port(1);
        assert_eq!(
            sends,
            vec![Send::Control(
                2,
                Control::Decided {
                    id: S,
                    outcome: Outcome::Abort,
                    seq: 1
                }
            )]
        );
        let ev = b.take_events();
        assert!(ev
            .iter()
            .any(|e| e.event == "aborted" && e.id.as_deref() == Some("1:1")));
    }

    #[test]
    fn the_uplink_takes_no_vm_id_and_its_tags_are_stripped_as_forged() {
        let mut b = bridge();
        b.add_uplink(5);
        b.add_uplink(6);
        assert_eq!(b.speculations(), vec![], "an uplink joins nothing");
        // A tag from the host is forged: stripped, then switched untagged.
        assert_eq!(b.ingress(5, frame(9, 5, &[S])), vec![1, 2, 3, 6]);
        assert_eq!(b.pop(1), Some(strip(&frame(9, 5, &[S])).unwrap()));
        assert_eq!(b.pop(6), Some(strip(&frame(9, 5, &[S])).unwrap()));
        let c = b.counters(5).unwrap();
        assert_eq!((c.rx, c.forged, c.dropped_malformed), (1, 1, 0));
        // A VMM port's tag is believed: held for the uplinks (rule 11).
        assert_eq!(b.ingress(1, frame(9, 1, &[S])), vec![2]);
        assert_eq!(b.counters(5).unwrap().held, 1);
        assert_eq!(b.counters(1).unwrap().forged, 0);
        // The uplink going away aborts nothing.
        assert!(b.remove_port(5).is_empty());
        assert_eq!(b.pop(5), None);
    }

    /// A frame of `len` bytes: `frame`'s, padded with empty list entries.
    fn big(dst: u8, src: u8, tags: &[Id], len: usize) -> Vec<u8> {
        let mut f = frame(dst, src, tags);
        f.resize(len, b',');
        f
    }

    #[test]
    fn queues_and_hold_buffers_are_bounded_in_bytes() {
        let mut b = bridge();
        b.ingress(2, frame(1, 2, &[])); // learn 2's MAC
        b.ingress(3, frame(1, 3, &[])); // and the uplink's
        while b.pop(2).is_some() {}
        let sixty_four_k = 64 << 10;
        for _ in 0..100 {
            b.ingress(1, big(2, 1, &[], sixty_four_k));
        }
        let u = b.usage(2).unwrap();
        assert_eq!(u.queued, QUEUE_BYTES_MAX / sixty_four_k);
        assert_eq!(u.queued_bytes, u.queued * sixty_four_k);
        assert_eq!(b.counters(2).unwrap().dropped_full, 100 - u.queued as u64);
        // Held for output commit: bounded in bytes too.
        for _ in 0..200 {
            b.ingress(1, big(3, 1, &[S], sixty_four_k));
        }
        let u = b.usage(3).unwrap();
        assert_eq!(u.held, HELD_BYTES_MAX / sixty_four_k);
        assert_eq!(u.held_bytes, u.held * sixty_four_k);
        assert_eq!(b.counters(3).unwrap().dropped_full, 200 - u.held as u64);
        // Popping frees room; a commit moves held frames into the queue,
        // as far as its byte budget goes.
        while b.pop(2).is_some() {}
        assert_eq!(b.usage(2).unwrap(), Usage::default());
        b.control(
            1,
            Control::Resolved {
                id: S,
                outcome: Outcome::Commit,
            },
        );
        let u = b.usage(3).unwrap();
        assert_eq!((u.held, u.held_bytes), (0, 0));
        // The test's strip() shortens frames to their header.
        assert_eq!(u.queued, u.queued_bytes / 14);
        assert_eq!(b.counters(3).unwrap().released, 128);
    }

    #[test]
    fn purging_an_aborted_id_frees_its_bytes() {
        let mut b = bridge();
        b.ingress(3, frame(1, 3, &[]));
        b.ingress(1, big(3, 1, &[S], 1000));
        b.ingress(1, big(3, 1, &[], 500));
        let u = b.usage(3).unwrap();
        assert_eq!((u.held_bytes, u.queued_bytes), (1000, 500));
        b.control(
            1,
            Control::Resolved {
                id: S,
                outcome: Outcome::Abort,
            },
        );
        let u = b.usage(3).unwrap();
        assert_eq!((u.held_bytes, u.queued_bytes), (0, 500));
    }

    #[test]
    fn malformed_frames_are_counted() {
        let mut b = bridge();
        let mut f = frame(9, 1, &[]);
        f.truncate(12);
        assert!(b.ingress(1, f).is_empty());
        assert_eq!(b.counters(1).unwrap().dropped_malformed, 1);
    }
}
