//! The bridge's state and decisions, free of I/O: MAC learning, flooding,
//! per-port queues, output commit for ports that cannot roll back,
//! anti-messages on abort, and the ids each port may use (`vet.rs`,
//! `registry.rs`). The server (`server.rs`) moves bytes; this decides
//! where they go.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use crate::protocol::{Control, Id, Outcome};
use crate::registry::{Joins, Notice, PortId, Registry, RegistryError};
use crate::vet::{self, show_all, worth_logging, TagWriter};

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
/// `decided` messages sent to one port and not acknowledged, past which
/// the bridge sends it no frame tagged with an id new to it and answers
/// no late `joined`: a port that does not act on outcomes cannot make the
/// bridge remember ever more of them. An honest VMM acknowledges each one
/// as it acts, and holds at most [`IDS_PER_PORT`](crate::registry::IDS_PER_PORT)
/// ids to be told about.
pub const UNACKED_MAX: usize = 1024;
/// Source MAC addresses learned per port; past it, frames to a new address
/// of the port are flooded instead. The MAC table cannot grow by a port
/// that sends from ever new addresses.
pub const MACS_PER_PORT: usize = 4096;

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
    /// Frames from the port whose tag held ids it may not carry, stripped
    /// before switching (rule 12): every id, for the uplink; ids its VM
    /// neither started nor joined, for a VMM port.
    pub forged: u64,
    /// Control messages (counted per id) from the port that broke the
    /// rules on ids: `started` for another VM's id or a used number,
    /// `joined` for an id never sent to it, `resolved` by a non-owner or
    /// for an id never started, more than the port may hold.
    pub refused: u64,
    /// Frames not queued to the port because they would take it past the
    /// ids it may hold, or past [`UNACKED_MAX`] unacknowledged outcomes.
    pub dropped_ids: u64,
}

#[derive(Debug)]
struct Queued {
    frame: Vec<u8>,
    tags: Vec<Id>,
}

#[derive(Debug)]
struct Port {
    speculative: bool,
    /// Whether tags on the port's frames may be believed (for the ids the
    /// port has a right to): true for VMM ports, false for the uplink.
    trusts_tags: bool,
    queue: VecDeque<Queued>,
    /// Bytes of the frames in `queue`.
    queue_bytes: usize,
    held: VecDeque<Queued>,
    /// Bytes of the frames in `held`.
    held_bytes: usize,
    /// Source MACs learned on this port.
    macs: usize,
    /// A peer bridge (`peering.rs`): its tags are taken as sent, it holds
    /// no id budget, and frames from a peer never go to another peer.
    peer: bool,
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
    /// Open speculation ids the port holds (owns, joined, or was sent).
    pub ids: usize,
    /// `decided` messages it has not acknowledged.
    pub unacked: usize,
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
    /// `port-down`, `refused`, `forged`, `lease-expired`. `refused` and `forged` come for
    /// a port's 1st, 2nd, 4th, 8th... one (its counters have them all).
    pub event: &'static str,
    /// The speculation, as `vm:seq`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The port concerned.
    pub port: PortId,
    /// When the bridge recorded it: microseconds since the Unix epoch (0
    /// if the clock is before it). `specvm-graph` draws its time axis
    /// from it (docs/graph.md).
    pub us: u64,
    /// Peering: the peer's address (`peer-up`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Peering: the counters of the peering (`peer-stats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peering: Option<crate::peer::Stats>,
}

/// The bridge.
pub struct Bridge {
    ports: BTreeMap<PortId, Port>,
    macs: HashMap<[u8; 6], PortId>,
    registry: Registry,
    read_tags: TagReader,
    strip_tag: TagStripper,
    write_tag: TagWriter,
    /// Events since the last [`Bridge::take_events`].
    events: Vec<Event>,
    /// Whether outcomes are in a shared registry (`bridge/shared.rs`).
    shared: bool,
    /// Ops for the shared registry since the last [`Bridge::take_ops`].
    ops: Vec<crate::registry::link::Op>,
}

impl Bridge {
    /// An empty bridge using `read_tags` and `strip_tag` on frames, and
    /// the codec to rewrite a tag without its forged ids.
    pub fn new(read_tags: TagReader, strip_tag: TagStripper) -> Self {
        Self {
            ports: BTreeMap::new(),
            macs: HashMap::new(),
            registry: Registry::new(),
            read_tags,
            strip_tag,
            write_tag: vet::retag,
            events: Vec::new(),
            shared: false,
            ops: Vec::new(),
        }
    }

    /// The bridge with `write_tag` to rewrite tags (tests' own frames).
    pub fn with_tag_writer(mut self, write_tag: TagWriter) -> Self {
        self.write_tag = write_tag;
        self
    }

    fn event(&mut self, event: &'static str, id: Option<Id>, port: PortId) {
        self.events.push(Event {
            event,
            id: id.as_ref().map(Id::to_string),
            port,
            us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            addr: None,
            peering: None,
        });
    }

    /// The events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Adds a port for VM `vm`, and returns the first sequence number the
    /// VM may use. A non-speculative port (a VM with speculation off) gets
    /// tagged frames only after commit. Refused for a VM id that is
    /// connected already (two VMs with one id would both own its
    /// speculations, rule 8), and for one that has used every sequence
    /// number ([`RegistryError::SeqsUsedUp`]).
    pub fn add_port(
        &mut self,
        port: PortId,
        vm: u32,
        speculative: bool,
    ) -> Result<u32, RegistryError> {
        match self.registry.add_port(port, vm) {
            Ok(next_seq) => {
                self.insert_port(port, speculative, true);
                self.op(crate::registry::link::Op::VmUp { vm });
                Ok(next_seq)
            }
            Err(e) => {
                self.event("refused", None, port);
                Err(e)
            }
        }
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
                macs: 0,
                peer: false,
                counters: Counters::default(),
                next_seq: 1,
                unacked: BTreeMap::new(),
            },
        );
        self.event("port-up", None, port);
    }

    /// The port is gone (rule 9). Returns the control messages to send.
    /// Everything the bridge kept for the port goes: its frames, its MACs,
    /// the ids it held (its own are aborted and decided).
    pub fn remove_port(&mut self, port: PortId) -> Vec<Send> {
        if self.shared {
            return self.remove_port_shared(port);
        }
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

    /// `port` renewed nothing within its lease (rule 13): the server closes
    /// it, and [`Bridge::remove_port`] aborts what it owns.
    pub fn lease_expired(&mut self, port: PortId) {
        self.event("lease-expired", None, port);
    }

    /// Takes the next frame queued for `port`.
    pub fn pop(&mut self, port: PortId) -> Option<Vec<u8>> {
        let p = self.ports.get_mut(&port)?;
        let q = p.queue.pop_front()?;
        p.queue_bytes -= q.frame.len();
        Some(q.frame)
    }

    /// What `port`'s queue and hold buffer hold now, and its ids.
    pub fn usage(&self, port: PortId) -> Option<Usage> {
        self.ports.get(&port).map(|p| Usage {
            queued: p.queue.len(),
            queued_bytes: p.queue_bytes,
            held: p.held.len(),
            held_bytes: p.held_bytes,
            ids: self.registry.held(port),
            unacked: p.unacked.len(),
        })
    }

    /// How many speculation ids are open on the bridge.
    pub fn open_ids(&self) -> usize {
        self.registry.open_ids()
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
    pub fn ingress(&mut self, from: PortId, frame: Vec<u8>) -> Vec<PortId> {
        let Some(p) = self.ports.get_mut(&from) else {
            return Vec::new();
        };
        p.counters.rx += 1;
        let from_peer = p.peer;
        let tags = match (self.read_tags)(&frame) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(port = from, "malformed frame dropped: {e}");
                p.counters.dropped_malformed += 1;
                return Vec::new();
            }
        };
        let Some((frame, tags)) = self.vet_frame(from, frame, tags) else {
            return Vec::new();
        };
        self.learn(from, &frame);
        let dsts: Vec<PortId> = match frame.get(0..6).and_then(|d| <[u8; 6]>::try_from(d).ok()) {
            Some(dst) if dst[0] & 1 == 0 => match self.macs.get(&dst) {
                Some(&p) if p != from => vec![p],
                Some(_) => Vec::new(),
                None => self.ports.keys().copied().filter(|&p| p != from).collect(),
            },
            _ => self.ports.keys().copied().filter(|&p| p != from).collect(),
        };
        // Split horizon: peers form a full mesh, and a frame from one peer
        // reached every other one from its source already.
        let dsts: Vec<PortId> = dsts
            .into_iter()
            .filter(|&d| !(from_peer && self.is_peer(d)))
            .collect();
        dsts.into_iter()
            .filter(|&d| self.deliver(d, frame.clone(), tags.clone()))
            .collect()
    }

    /// Rule 12 on a frame from `from` ([`vet::vet`]): strips the ids the
    /// port may not carry (counted and logged as forged), and drops the
    /// frame if a kept id aborted (rule 10). The frame and its tag as they
    /// are switched, or `None` if dropped.
    fn vet_frame(
        &mut self,
        from: PortId,
        frame: Vec<u8>,
        tags: Vec<Id>,
    ) -> Option<(Vec<u8>, Vec<Id>)> {
        if tags.is_empty() {
            return Some((frame, tags));
        }
        let (peer, trusted) = self.ports.get(&from).map(|p| (p.peer, p.trusts_tags))?;
        let v = match peer {
            true => self.vet_peer(from, tags)?,
            false => vet::vet(&self.registry, from, trusted, tags),
        };
        let p = self.ports.get_mut(&from)?;
        if !v.forged.is_empty() {
            p.counters.forged += 1;
            if worth_logging(p.counters.forged) {
                tracing::warn!(
                    port = from,
                    "forged tag: ids {} stripped ({} frames so far)",
                    show_all(&v.forged),
                    p.counters.forged
                );
                self.event("forged", v.forged.first().copied(), from);
            }
        }
        let p = self.ports.get_mut(&from)?;
        if v.aborted {
            p.counters.dropped_aborted += 1;
            return None;
        }
        if v.forged.is_empty() {
            return Some((frame, v.kept));
        }
        let rewritten = if v.kept.is_empty() {
            (self.strip_tag)(&frame)
        } else {
            (self.write_tag)(&frame, &v.kept)
        };
        match rewritten {
            Ok(f) => Some((f, v.kept)),
            Err(e) => {
                tracing::debug!(port = from, "malformed frame dropped: {e}");
                p.counters.dropped_malformed += 1;
                None
            }
        }
    }

    /// Learns the source MAC of a frame from `from`, up to
    /// [`MACS_PER_PORT`] per port.
    fn learn(&mut self, from: PortId, frame: &[u8]) {
        let Some(src) = frame.get(6..12).and_then(|s| <[u8; 6]>::try_from(s).ok()) else {
            return;
        };
        if src[0] & 1 != 0 {
            return;
        }
        let before = self.macs.get(&src).copied();
        if before == Some(from) {
            return;
        }
        let Some(p) = self.ports.get_mut(&from) else {
            return;
        };
        if p.macs >= MACS_PER_PORT {
            return;
        }
        p.macs += 1;
        if let Some(q) = before.and_then(|q| self.ports.get_mut(&q)) {
            q.macs = q.macs.saturating_sub(1);
        }
        self.macs.insert(src, from);
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
        if tags.is_empty() {
            return push(p, Queued { frame, tags });
        }
        if p.peer {
            // The peer's bridge holds its own ports' budgets and output.
            let queued = push(
                p,
                Queued {
                    frame,
                    tags: tags.clone(),
                },
            );
            if queued {
                self.registry.peer_sent(port, &tags);
            }
            return queued;
        }
        if p.speculative {
            // The port may join the open ids it is sent: within its budget.
            let new = self.registry.unheld(port, &tags);
            if !new.is_empty()
                && (new.len() > self.registry.room(port) || p.unacked.len() >= UNACKED_MAX)
            {
                p.counters.dropped_ids += 1;
                return false;
            }
            let queued = push(p, Queued { frame, tags });
            if queued {
                self.registry.offer(port, &new);
            }
            return queued;
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
                match self.registry.started(port, id) {
                    Ok(()) => {
                        self.event("started", Some(id), port);
                        let vm = crate::registry::owner_vm(id);
                        self.op(crate::registry::link::Op::Start { vm, id });
                    }
                    Err(e) => self.refuse(port, &e),
                }
                (Vec::new(), Vec::new())
            }
            Control::Joined { ids } if self.shared => (self.joined_shared(port, &ids), Vec::new()),
            Control::Joined { ids } => {
                let joins = self.registry.joined(port, &ids);
                (self.joined(port, joins), Vec::new())
            }
            Control::Resolved { id, outcome } if self.shared => {
                self.resolved_shared(port, id, outcome)
            }
            Control::Resolved { id, outcome } => self.resolved(port, id, outcome),
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
            // Any message renews the lease; the server keeps the time.
            Control::Renew => (Vec::new(), Vec::new()),
            Control::Resume {
                started,
                joined,
                outcomes,
            } if self.shared => self.resume_shared(port, &started, &joined, &outcomes),
            Control::Resume {
                started,
                joined,
                outcomes,
            } => self.resume(port, &started, &joined, &outcomes),
            Control::Hello { .. } | Control::Decided { .. } | Control::Welcome { .. } => {
                tracing::warn!(port, "unexpected control message {c:?}");
                (Vec::new(), Vec::new())
            }
        }
    }

    /// Counts and (thinned out) logs a refused control message.
    fn refuse(&mut self, port: PortId, e: &RegistryError) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        p.counters.refused += 1;
        let n = p.counters.refused;
        if worth_logging(n) {
            tracing::warn!(port, "refused ({n} so far): {e}");
            self.event("refused", e.id(), port);
        }
    }

    /// What came of a `joined`: events for the ids joined, refusals, and
    /// the late outcomes, as far as the port's [`UNACKED_MAX`] goes.
    fn joined(&mut self, port: PortId, joins: Joins) -> Vec<Send> {
        for &id in &joins.joined {
            self.event("joined", Some(id), port);
        }
        for e in &joins.refused {
            self.refuse(port, e);
        }
        let room = UNACKED_MAX.saturating_sub(self.unacked(port));
        let mut late = joins.late;
        for n in late.split_off(room.min(late.len())) {
            self.refuse(port, &RegistryError::Unacked { port, id: n.id });
        }
        self.notify(late)
    }

    /// The owner decided. Rule 3: the owner decides once; a second
    /// `resolved` (a buggy or hostile owner's) changes nothing: no event,
    /// and no purge of frames that the first outcome released.
    fn resolved(&mut self, port: PortId, id: Id, outcome: Outcome) -> (Vec<Send>, Vec<PortId>) {
        let first = self.registry.outcome(id);
        match self.registry.resolved(port, id, outcome) {
            Ok(_) if first.is_some() => {
                tracing::warn!(
                    port,
                    ?outcome,
                    ?first,
                    "{} was already decided; ignored",
                    id
                );
                (Vec::new(), Vec::new())
            }
            Ok(notices) => {
                let woke = self.apply(port, id, outcome);
                (self.notify(notices), woke)
            }
            Err(e) => {
                self.refuse(port, &e);
                (Vec::new(), Vec::new())
            }
        }
    }

    /// A reconnected VMM's `resume` ([`Registry::resume`]): the registry
    /// learns again what the VMMs hold, and each outcome it learns now is
    /// applied as a `resolved` would be (events, anti-messages, output
    /// commit) and told to the members.
    fn resume(
        &mut self,
        port: PortId,
        started: &[Id],
        joined: &[Id],
        outcomes: &[crate::protocol::Decision],
    ) -> (Vec<Send>, Vec<PortId>) {
        let r = self.registry.resume(port, started, joined, outcomes);
        for &id in &r.started {
            self.event("started", Some(id), port);
        }
        for &id in &r.joined {
            self.event("joined", Some(id), port);
        }
        for e in &r.refused {
            self.refuse(port, e);
        }
        let mut woke = Vec::new();
        for d in &r.decided {
            woke.extend(self.apply(port, d.id, d.outcome));
        }
        (self.notify(r.notices), woke)
    }

    /// The events and frames of an outcome just decided: anti-messages for
    /// an abort (rule 10), release for a commit (rule 11).
    fn apply(&mut self, port: PortId, id: Id, outcome: Outcome) -> Vec<PortId> {
        match outcome {
            Outcome::Abort => {
                self.event("aborted", Some(id), port);
                self.purge(id);
                Vec::new()
            }
            Outcome::Commit => {
                self.event("committed", Some(id), port);
                self.release()
            }
        }
    }

    /// The recovery after the bridge's start is over
    /// ([`Registry::end_recovery`]): what members kept open for owners
    /// that did not come back is aborted. Returns the messages to send.
    pub fn end_recovery(&mut self) -> Vec<Send> {
        if self.shared {
            // The shared registry judges absent owners (their leases).
            return Vec::new();
        }
        let (aborted, notices) = self.registry.end_recovery();
        for &id in &aborted {
            tracing::warn!("{id}: its owner did not come back after the restart; aborted");
            self.event("aborted", Some(id), 0);
            self.purge(id);
        }
        self.notify(notices)
    }

    /// Turns notices into Decided messages, remembering them until acked.
    fn notify(&mut self, notices: Vec<Notice>) -> Vec<Send> {
        let mut out = Vec::new();
        for n in notices {
            if let Some(p) = self.ports.get_mut(&n.port) {
                let seq = p.next_seq;
                p.next_seq += 1;
                // A peer acknowledges nothing: it asks again (`hold`) for
                // what it missed.
                if !p.peer {
                    p.unacked.insert(seq, n.id);
                }
                out.push(Send::Control(
                    n.port,
                    Control::decided(n.id, n.outcome, seq),
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
            .map(|(id, m)| (id.to_string(), m))
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

mod peering;
mod shared;
#[cfg(test)]
mod tests;
