//! Who owns and who joined every speculation the bridge has seen, how each
//! ended, and which ids each port may use. Pure logic, free of I/O.
//!
//! Rules (SPECULATIONS.md): only the owner decides (8); every member hears
//! the outcome (4, 6); an owner that goes away aborts what it owned, a
//! member that goes away aborts nothing (9); a tag is trusted only for
//! ids its port has a right to (12). The rights (`docs/netbridge.md`,
//! "Which ids a port may use"):
//! - a port *starts* only ids of its own VM, each past the VM's last one;
//! - it is *sent* (offered) an open id when the bridge queues it a frame
//!   tagged with that id, and may *join* only ids it was sent;
//! - it may *carry* (tag frames with) open ids it started or joined;
//! - an id that is neither open nor decided, and whose owner VM is not
//!   connected, counts as aborted.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::protocol::{Decision, Id, Outcome};

/// A port of the bridge.
pub type PortId = u64;

/// How many decided speculations are remembered, so that a late tagged
/// frame or a late join still learns the outcome.
const HISTORY: usize = 65_536;

/// Open ids one port may hold at once: started by its VM, joined, or sent
/// to it and not joined yet. The VMM keeps at most 64 checkpoints
/// (`vmm::controller::MAX_DEPTH`) and a joining checkpoint covers at most
/// the 4 ids of one tag (`codec::MAX_IDS`), so an honest VMM never holds
/// more than 64 × 4 = 256.
pub const IDS_PER_PORT: usize = 256;

/// Errors of registry operations: a port asked for something it has no
/// right to. The bridge refuses the message, counts and logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A port tried to start or decide a speculation of another VM (rule 8).
    #[error(
        "port {port} (VM {vm}) may not start or decide speculation {id:#x}, owned by VM {owner}"
    )]
    NotOwner {
        /// The port.
        port: PortId,
        /// Its VM.
        vm: u32,
        /// The speculation.
        id: Id,
        /// The owner VM.
        owner: u32,
    },
    /// A `started` whose sequence number is not past the VM's last one:
    /// a repeat, a step back, 0, or a wrap past `u32::MAX`.
    #[error("speculation {id:#x} is not past its VM's last sequence number {last}")]
    StaleSeq {
        /// The speculation.
        id: Id,
        /// The VM's last sequence number.
        last: u32,
    },
    /// The owner decided an id it never started.
    #[error("port {port} decided speculation {id:#x}, which it never started")]
    NotOpen {
        /// The port.
        port: PortId,
        /// The speculation.
        id: Id,
    },
    /// A port joined an open id the bridge never sent it.
    #[error("port {port} joined speculation {id:#x}, which the bridge never sent it")]
    NotSent {
        /// The port.
        port: PortId,
        /// The speculation.
        id: Id,
    },
    /// The port holds [`IDS_PER_PORT`] ids already.
    #[error("port {port} holds {IDS_PER_PORT} speculation ids already; {id:#x} refused")]
    TooManyIds {
        /// The port.
        port: PortId,
        /// The speculation refused.
        id: Id,
    },
    /// The port has not acknowledged the bridge's last
    /// [`UNACKED_MAX`](crate::bridge::UNACKED_MAX) outcomes: a late
    /// `joined` is not answered.
    #[error(
        "port {port} has not acknowledged {} outcomes; the late join of {id:#x} is not answered",
        crate::bridge::UNACKED_MAX
    )]
    Unacked {
        /// The port.
        port: PortId,
        /// The speculation.
        id: Id,
    },
    /// A `started` for an id that is open or decided already, though past
    /// its VM's last number here: one a peer opened (two VMs of one id in
    /// the fabric), or one kept for its owner across a restart.
    #[error("speculation {id:#x} is open or decided already")]
    Known {
        /// The speculation.
        id: Id,
    },
    /// A port with no VM behind it (the uplink) or not connected.
    #[error("port {port} has no VM")]
    NoVm {
        /// The port.
        port: PortId,
    },
    /// A second `resume` on one connection.
    #[error("port {port} resumed already")]
    ResumedTwice {
        /// The port.
        port: PortId,
    },
    /// A hello for a VM id that a connected port has already.
    #[error("VM id {vm} is already connected")]
    VmConnected {
        /// The VM.
        vm: u32,
    },
    /// A hello for a VM id whose every sequence number is used: the next
    /// would wrap into ids already decided.
    #[error(
        "VM id {vm} has used every sequence number (its last was {})",
        u32::MAX
    )]
    SeqsUsedUp {
        /// The VM.
        vm: u32,
    },
}

impl RegistryError {
    /// The speculation the error is about, if any.
    pub fn id(&self) -> Option<Id> {
        match *self {
            Self::NotOwner { id, .. }
            | Self::StaleSeq { id, .. }
            | Self::NotOpen { id, .. }
            | Self::NotSent { id, .. }
            | Self::TooManyIds { id, .. }
            | Self::Known { id }
            | Self::Unacked { id, .. } => Some(id),
            Self::NoVm { .. }
            | Self::ResumedTwice { .. }
            | Self::VmConnected { .. }
            | Self::SeqsUsedUp { .. } => None,
        }
    }
}

/// The owner VM of a speculation id.
pub fn owner_vm(id: Id) -> u32 {
    id.vm
}

#[derive(Debug, Default)]
struct Spec {
    /// Ports that joined it.
    members: BTreeSet<PortId>,
    /// Ports it was sent to (a tagged frame queued) that have not joined.
    offered: BTreeSet<PortId>,
}

/// A VM's port, as the registry sees it.
#[derive(Debug)]
struct VmPort {
    vm: u32,
    /// Open ids it owns, joined or was offered: at most [`IDS_PER_PORT`].
    held: usize,
    /// It sent its `resume` (once per connection).
    resumed: bool,
}

/// A notice the bridge must send: tell `port` that `id` ended so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The member to tell.
    pub port: PortId,
    /// The speculation.
    pub id: Id,
    /// How it ended.
    pub outcome: Outcome,
}

/// What came of a `joined` message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Joins {
    /// Ids the port joined now.
    pub joined: Vec<Id>,
    /// Ids decided already, or of an owner not connected (aborted): the
    /// port joined late and must act on the outcome at once.
    pub late: Vec<Notice>,
    /// Ids the port had no right to join.
    pub refused: Vec<RegistryError>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Registry {
    /// VM port → its VM id and how many ids it holds.
    ports: HashMap<PortId, VmPort>,
    /// Connected VM id → its port.
    vms: HashMap<u32, PortId>,
    active: HashMap<Id, Spec>,
    decided: HashMap<Id, Outcome>,
    order: VecDeque<Id>,
    /// The last sequence number each VM id started; only the VM moves it.
    max_seq: HashMap<u32, u32>,
    /// Set at start, cleared by [`Registry::end_recovery`]: while set, a
    /// `resume` that names an id of an owner not connected keeps it open
    /// for that owner to come back (the bridge restarted).
    recovering: bool,
    /// Open ids whose owner VM is behind a peer bridge, and that peer
    /// (`peer/`, docs/netbridge.md "Peering"): their owner counts as
    /// present, and the peer tells their outcome.
    homes: HashMap<Id, PortId>,
}

/// What a VMM's `resume` told the registry ([`Registry::resume`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// The port's own open ids, now open here.
    pub started: Vec<Id>,
    /// Ids the port is a member of again.
    pub joined: Vec<Id>,
    /// Outcomes the registry learnt now (it had lost or never seen them).
    pub decided: Vec<Decision>,
    /// Who to tell about outcomes: members of what was decided now, the
    /// port itself for ids it named that were decided already.
    pub notices: Vec<Notice>,
    /// What the port had no right to.
    pub refused: Vec<RegistryError>,
}

impl Registry {
    /// An empty registry, recovering (see [`Registry::end_recovery`]).
    pub fn new() -> Self {
        Self {
            recovering: true,
            ..Self::default()
        }
    }

    /// A port said hello as VM `vm`. Returns the first sequence number the
    /// VM may use: past every one it started before. Refused while another
    /// port of `vm` is connected (two VMs with one id would both own its
    /// speculations, rule 8), and once the VM has used `u32::MAX`, rather
    /// than wrap into its old, decided ids.
    pub fn add_port(&mut self, port: PortId, vm: u32) -> Result<u32, RegistryError> {
        if self.vms.contains_key(&vm) {
            return Err(RegistryError::VmConnected { vm });
        }
        let next = self.next_seq(vm).ok_or(RegistryError::SeqsUsedUp { vm })?;
        self.ports.insert(
            port,
            VmPort {
                vm,
                held: 0,
                resumed: false,
            },
        );
        self.vms.insert(vm, port);
        Ok(next)
    }

    /// Whether a port of VM `vm` is connected.
    pub fn vm_connected(&self, vm: u32) -> bool {
        self.vms.contains_key(&vm)
    }

    /// The first sequence number VM `vm` may use, past every one it
    /// started; `None` once it has used them all.
    pub fn next_seq(&self, vm: u32) -> Option<u32> {
        self.max_seq.get(&vm).map_or(Some(1), |s| s.checked_add(1))
    }

    /// How `id` ended, if the registry remembers.
    pub fn outcome(&self, id: Id) -> Option<Outcome> {
        self.decided.get(&id).copied()
    }

    /// Whether `id` is known and still open.
    pub fn is_active(&self, id: Id) -> bool {
        self.active.contains_key(&id)
    }

    /// How many ids are open.
    pub fn open_ids(&self) -> usize {
        self.active.len()
    }

    /// How many open ids `port` holds (owns, joined or was sent).
    pub fn held(&self, port: PortId) -> usize {
        self.ports.get(&port).map_or(0, |p| p.held)
    }

    fn vm_port(&self, port: PortId) -> Result<&VmPort, RegistryError> {
        self.ports.get(&port).ok_or(RegistryError::NoVm { port })
    }

    /// The VM on `port` started `id`. Only its own ids (`id`'s VM half is
    /// the port's VM), each past the last one it started, and at most
    /// [`IDS_PER_PORT`] held at once.
    pub fn started(&mut self, port: PortId, id: Id) -> Result<(), RegistryError> {
        let p = self.vm_port(port)?;
        let vm = p.vm;
        if owner_vm(id) != vm {
            let owner = owner_vm(id);
            return Err(RegistryError::NotOwner {
                port,
                vm,
                id,
                owner,
            });
        }
        let last = self.max_seq.get(&vm).copied().unwrap_or(0);
        if id.seq <= last {
            return Err(RegistryError::StaleSeq { id, last });
        }
        if p.held >= IDS_PER_PORT {
            return Err(RegistryError::TooManyIds { port, id });
        }
        if self.active.contains_key(&id) || self.decided.contains_key(&id) {
            return Err(RegistryError::Known { id });
        }
        self.max_seq.insert(vm, id.seq);
        self.active.insert(id, Spec::default());
        self.add_held(port, 1);
        Ok(())
    }

    fn add_held(&mut self, port: PortId, n: usize) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.held += n;
        }
    }

    fn drop_held(&mut self, port: PortId) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.held = p.held.saturating_sub(1);
        }
    }

    /// Whether `port` may tag frames with `id`: an open id its VM started
    /// or that it joined.
    pub fn may_carry(&self, port: PortId, id: Id) -> bool {
        match (self.ports.get(&port), self.active.get(&id)) {
            (Some(p), Some(s)) => owner_vm(id) == p.vm || s.members.contains(&port),
            _ => false,
        }
    }

    /// The open ids of `tags` that `port` would hold anew if sent a frame
    /// so tagged: neither its own, joined, nor sent to it already.
    pub fn unheld(&self, port: PortId, tags: &[Id]) -> Vec<Id> {
        let vm = self.ports.get(&port).map(|p| p.vm);
        tags.iter()
            .copied()
            .filter(|&id| {
                self.active.get(&id).is_some_and(|s| {
                    Some(owner_vm(id)) != vm
                        && !s.members.contains(&port)
                        && !s.offered.contains(&port)
                })
            })
            .collect()
    }

    /// How many more ids `port` may hold.
    pub fn room(&self, port: PortId) -> usize {
        self.ports
            .get(&port)
            .map_or(0, |p| IDS_PER_PORT.saturating_sub(p.held))
    }

    /// `port` was sent a frame tagged with `ids` (from [`Registry::unheld`]):
    /// it may join them now.
    pub fn offer(&mut self, port: PortId, ids: &[Id]) {
        let mut n = 0;
        for id in ids {
            if let Some(s) = self.active.get_mut(id) {
                n += usize::from(s.offered.insert(port));
            }
        }
        self.add_held(port, n);
    }

    /// `port` joined `ids`: the open ones it was sent become its, decided
    /// ones and ones of an owner not connected (aborted) come back as late
    /// notices, and the rest are refused.
    pub fn joined(&mut self, port: PortId, ids: &[Id]) -> Joins {
        self.join_ids(port, ids, true)
    }

    /// The join rule of [`Registry::joined`]; with `absent_owner_aborts`
    /// an open id whose owner is not connected comes back aborted (the
    /// shared registry's bridges pass false: the owner may be on another
    /// bridge).
    pub(crate) fn join_ids(
        &mut self,
        port: PortId,
        ids: &[Id],
        absent_owner_aborts: bool,
    ) -> Joins {
        let mut out = Joins::default();
        let Some(vm) = self.ports.get(&port).map(|p| p.vm) else {
            out.refused = vec![RegistryError::NoVm { port }];
            return out;
        };
        for &id in ids {
            let outcome = match self.outcome(id) {
                Some(o) => Some(o),
                None if absent_owner_aborts && !self.owner_present(id) => Some(Outcome::Abort),
                None => None,
            };
            if let Some(outcome) = outcome {
                out.late.push(Notice { port, id, outcome });
                continue;
            }
            match self.active.get_mut(&id) {
                Some(s) if owner_vm(id) == vm || s.members.contains(&port) => {}
                Some(s) if s.offered.contains(&port) => {
                    s.offered.remove(&port);
                    s.members.insert(port);
                    out.joined.push(id);
                }
                _ => out.refused.push(RegistryError::NotSent { port, id }),
            }
        }
        out
    }

    /// The owner on `port` decided `id`. Returns the members to tell.
    /// Deciding twice tells nobody again; deciding an id never started is
    /// refused.
    pub fn resolved(
        &mut self,
        port: PortId,
        id: Id,
        outcome: Outcome,
    ) -> Result<Vec<Notice>, RegistryError> {
        let vm = self.vm_port(port)?.vm;
        if owner_vm(id) != vm {
            return Err(RegistryError::NotOwner {
                port,
                vm,
                id,
                owner: owner_vm(id),
            });
        }
        if self.decided.contains_key(&id) {
            return Ok(Vec::new());
        }
        // An id that came from a peer is its owner's there, whatever VM id
        // this port has.
        if !self.active.contains_key(&id) || self.homes.contains_key(&id) {
            return Err(RegistryError::NotOpen { port, id });
        }
        Ok(self.decide(id, outcome))
    }

    fn decide(&mut self, id: Id, outcome: Outcome) -> Vec<Notice> {
        if self.decided.contains_key(&id) {
            return Vec::new();
        }
        let spec = self.active.remove(&id).unwrap_or_default();
        if let Some(&owner) = self.vms.get(&owner_vm(id)) {
            self.drop_held(owner);
        }
        for &port in spec.members.iter().chain(&spec.offered) {
            self.drop_held(port);
        }
        self.homes.remove(&id);
        self.decided.insert(id, outcome);
        self.order.push_back(id);
        if self.order.len() > HISTORY {
            if let Some(old) = self.order.pop_front() {
                self.decided.remove(&old);
            }
        }
        spec.members
            .into_iter()
            .map(|port| Notice { port, id, outcome })
            .collect()
    }

    /// `port` went away (rule 9): every open speculation its VM owns is
    /// aborted, and it stops being a member of the others or being offered
    /// them. Returns the aborted ids and the members to tell.
    pub fn port_gone(&mut self, port: PortId) -> (Vec<Id>, Vec<Notice>) {
        let vm = self.ports.remove(&port).map(|p| p.vm);
        if let Some(vm) = vm {
            self.vms.remove(&vm);
        }
        for spec in self.active.values_mut() {
            spec.members.remove(&port);
            spec.offered.remove(&port);
        }
        let mut owned: Vec<Id> = match vm {
            Some(vm) => self
                .active
                .keys()
                .copied()
                .filter(|&id| owner_vm(id) == vm && !self.homes.contains_key(&id))
                .collect(),
            None => Vec::new(),
        };
        owned.sort_unstable();
        let notices = owned
            .iter()
            .flat_map(|&id| self.decide(id, Outcome::Abort))
            .collect();
        // What members kept open for an absent owner (a `resume`) and no
        // one holds any more is forgotten: nobody waits for its outcome.
        let vms = &self.vms;
        self.active.retain(|id, s| {
            vms.contains_key(&owner_vm(*id)) || !s.members.is_empty() || !s.offered.is_empty()
        });
        let active = &self.active;
        self.homes.retain(|id, _| active.contains_key(id));
        (owned, notices)
    }

    /// A VMM that reconnected says what it holds (`resume`): the registry
    /// is soft state, the VMMs are the truth. Once per connection. In
    /// order:
    /// - `outcomes`, its own decisions: those the registry does not know
    ///   are decided now and their members told;
    /// - `started`, its open ids: open here again (an id the registry has
    ///   decided meanwhile, such as one aborted because its lease expired,
    ///   is told back to the port: the owner must act on it too);
    /// - `joined`, ids it is a member of: it is a member again. A decided
    ///   one comes back as a late notice; an open or unknown one is
    ///   trusted (the bridge that sent it may be gone), and an unknown one
    ///   of an owner not connected is kept open while recovering, else
    ///   aborted (rule 9).
    pub fn resume(
        &mut self,
        port: PortId,
        started: &[Id],
        joined: &[Id],
        outcomes: &[Decision],
    ) -> Resumed {
        let mut out = Resumed::default();
        let vm = match self.ports.get_mut(&port) {
            Some(p) if p.resumed => {
                out.refused.push(RegistryError::ResumedTwice { port });
                return out;
            }
            Some(p) => {
                p.resumed = true;
                p.vm
            }
            None => {
                out.refused.push(RegistryError::NoVm { port });
                return out;
            }
        };
        for d in outcomes {
            if let Err(e) = self.own(port, vm, d.id) {
                out.refused.push(e);
            } else if !self.decided.contains_key(&d.id) {
                self.reopen(port, d.id);
                out.notices.extend(self.decide(d.id, d.outcome));
                out.decided.push(*d);
            }
        }
        for &id in started {
            match (self.own(port, vm, id), self.outcome(id)) {
                (Err(e), _) => out.refused.push(e),
                (Ok(()), Some(outcome)) => out.notices.push(Notice { port, id, outcome }),
                (Ok(()), None) if self.room(port) == 0 => {
                    out.refused.push(RegistryError::TooManyIds { port, id });
                }
                (Ok(()), None) => {
                    self.reopen(port, id);
                    out.started.push(id);
                }
            }
        }
        for &id in joined {
            self.rejoin(port, vm, id, &mut out);
        }
        out
    }

    /// Checks that `id` is the own id of `vm` (on `port`), and keeps the
    /// VM's numbers past it.
    fn own(&mut self, port: PortId, vm: u32, id: Id) -> Result<(), RegistryError> {
        if owner_vm(id) != vm {
            let owner = owner_vm(id);
            return Err(RegistryError::NotOwner {
                port,
                vm,
                id,
                owner,
            });
        }
        let last = self.max_seq.entry(vm).or_insert(0);
        *last = (*last).max(id.seq);
        Ok(())
    }

    /// Opens the owner's `id` again on its new `port` (it may be open
    /// already, kept for it by a member's resume), counting it for the port.
    fn reopen(&mut self, port: PortId, id: Id) {
        self.active.entry(id).or_default();
        self.add_held(port, 1);
    }

    /// One id of a `resume`'s `joined`.
    fn rejoin(&mut self, port: PortId, vm: u32, id: Id, out: &mut Resumed) {
        if owner_vm(id) == vm {
            return;
        }
        if let Some(outcome) = self.outcome(id) {
            out.notices.push(Notice { port, id, outcome });
            return;
        }
        let absent = !self.owner_present(id);
        if absent && !self.recovering {
            out.notices.push(Notice {
                port,
                id,
                outcome: Outcome::Abort,
            });
            return;
        }
        if self.room(port) == 0 {
            out.refused.push(RegistryError::TooManyIds { port, id });
            return;
        }
        let s = self.active.entry(id).or_default();
        let was_offered = s.offered.remove(&port);
        if s.members.insert(port) && !was_offered {
            self.add_held(port, 1);
        }
        out.joined.push(id);
    }

    /// The bridge's recovery after its start is over: every open id whose
    /// owner VM has not come back is aborted (rule 9: an owner that lives
    /// reconnects within its lease). Returns the ids and the members to
    /// tell. From now on an unknown id of an absent owner counts as
    /// aborted at once.
    pub fn end_recovery(&mut self) -> (Vec<Id>, Vec<Notice>) {
        self.recovering = false;
        let mut orphans: Vec<Id> = self
            .active
            .keys()
            .copied()
            .filter(|&id| !self.owner_present(id))
            .collect();
        orphans.sort_unstable();
        let notices = orphans
            .iter()
            .flat_map(|&id| self.decide(id, Outcome::Abort))
            .collect();
        (orphans, notices)
    }

    /// Every open speculation and its members, for status reports.
    pub fn snapshot(&self) -> Vec<(Id, Vec<PortId>)> {
        let mut v: Vec<(Id, Vec<PortId>)> = self
            .active
            .iter()
            .map(|(&id, s)| (id, s.members.iter().copied().collect()))
            .collect();
        v.sort_unstable();
        v
    }
}

/// Open remote ids one peer may introduce (see [`Registry::open_remote`]):
/// a peer that names ever new ids cannot make the registry grow without
/// end. 16 times [`IDS_PER_PORT`]: sixteen VMs' worth.
pub const REMOTE_IDS_PER_PEER: usize = 16 * IDS_PER_PORT;

/// What the registry knows of an id a peer asks about (`hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Decided so (or counted aborted: neither open nor decided, and its
    /// owner is neither connected nor behind a peer, after the recovery).
    Decided(Outcome),
    /// Open.
    Open,
    /// Not known, and not counted aborted yet.
    Unknown,
}

/// Speculations whose owner is behind a peer bridge (docs/netbridge.md,
/// "Peering"). A peer port is no VM port: it owns nothing here, and it is
/// made a *member* of the open ids it is sent, so that their outcome is
/// told to it as to any member.
impl Registry {
    /// Whether `id`'s owner counts as present: its VM is connected here,
    /// or the id came from a peer.
    pub fn owner_present(&self, id: Id) -> bool {
        self.vm_connected(owner_vm(id)) || self.homes.contains_key(&id)
    }

    /// Opens `id`, named by a frame from the peer `home` and unknown here,
    /// as a speculation owned behind that peer. Refused for an id of a VM
    /// connected here (a peer cannot speak for this bridge's own VMs) and
    /// past [`REMOTE_IDS_PER_PEER`]. Returns whether it was opened now.
    pub fn open_remote(&mut self, id: Id, home: PortId) -> Result<bool, RegistryError> {
        if self.decided.contains_key(&id) || self.active.contains_key(&id) {
            return Ok(false);
        }
        if self.vm_connected(owner_vm(id)) {
            return Err(RegistryError::NotOpen { port: home, id });
        }
        if self.homes.values().filter(|&&h| h == home).count() >= REMOTE_IDS_PER_PEER {
            return Err(RegistryError::TooManyIds { port: home, id });
        }
        self.active.insert(id, Spec::default());
        self.homes.insert(id, home);
        Ok(true)
    }

    /// The peer `id` came from, if it came from one.
    pub fn home(&self, id: Id) -> Option<PortId> {
        self.homes.get(&id).copied()
    }

    /// Room for more ids from the peer `home`.
    pub fn remote_room(&self, home: PortId) -> usize {
        let n = self.homes.values().filter(|&&h| h == home).count();
        REMOTE_IDS_PER_PEER.saturating_sub(n)
    }

    /// The peer `home` says it has `id` open: it is the peer to ask, for an
    /// open id here of an owner that is not here and that no peer claimed
    /// yet (one kept for a member after a restart).
    pub fn set_home(&mut self, id: Id, home: PortId) {
        if self.active.contains_key(&id) && !self.owner_present(id) {
            self.homes.insert(id, home);
        }
    }

    /// The peer port `peer` was sent a frame tagged with `ids`: it becomes
    /// a member of the open ones, and is told their outcome; not of those
    /// that came from it, whose outcome it tells.
    pub fn peer_sent(&mut self, peer: PortId, ids: &[Id]) {
        for id in ids {
            if self.homes.get(id) == Some(&peer) {
                continue;
            }
            if let Some(s) = self.active.get_mut(id) {
                s.members.insert(peer);
            }
        }
    }

    /// A peer told the outcome of `id`. Taken only for an open id whose
    /// owner VM is not connected here (rule 8: a peer speaks for its own
    /// side only). The members to tell, or `None` if not taken.
    pub fn decide_remote(&mut self, id: Id, outcome: Outcome) -> Option<Vec<Notice>> {
        if !self.active.contains_key(&id) || self.vm_connected(owner_vm(id)) {
            return None;
        }
        Some(self.decide(id, outcome))
    }

    /// What a peer asking about `id` is told: as a `joined` would be, an
    /// id neither open nor decided whose owner is absent counts as
    /// aborted once the recovery is over, but only if its owner VM was a
    /// VM of this bridge (it started ids here): of another VM this bridge
    /// knows nothing, and a peer that took it for the owner's side (the id
    /// reached it through a member here) must not be told a guess.
    pub fn lookup(&self, id: Id) -> Lookup {
        let ours = self.max_seq.contains_key(&owner_vm(id));
        match self.outcome(id) {
            Some(o) => Lookup::Decided(o),
            None if self.active.contains_key(&id) => Lookup::Open,
            None if ours && !self.recovering && !self.owner_present(id) => {
                Lookup::Decided(Outcome::Abort)
            }
            None => Lookup::Unknown,
        }
    }

    /// The open ids whose owner VM is not connected here, each with the
    /// peer it came from (`None`: not known, as after a restart), sorted.
    pub fn remote_open(&self) -> Vec<(Id, Option<PortId>)> {
        let mut v: Vec<(Id, Option<PortId>)> = self
            .active
            .keys()
            .filter(|id| !self.vm_connected(owner_vm(**id)))
            .map(|&id| (id, self.homes.get(&id).copied()))
            .collect();
        v.sort_unstable();
        v
    }
}

pub mod backend;
#[doc(hidden)]
pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod link;
pub mod shared_rules;

#[cfg(test)]
mod tests;
