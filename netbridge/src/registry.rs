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

use crate::protocol::{Id, Outcome};

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
    /// A port with no VM behind it (the uplink) or not connected.
    #[error("port {port} has no VM")]
    NoVm {
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
            | Self::Unacked { id, .. } => Some(id),
            Self::NoVm { .. } | Self::VmConnected { .. } | Self::SeqsUsedUp { .. } => None,
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
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
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
        self.ports.insert(port, VmPort { vm, held: 0 });
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
        let mut out = Joins::default();
        let Some(vm) = self.ports.get(&port).map(|p| p.vm) else {
            out.refused = vec![RegistryError::NoVm { port }];
            return out;
        };
        for &id in ids {
            let outcome = match self.outcome(id) {
                Some(o) => Some(o),
                None if !self.vm_connected(owner_vm(id)) => Some(Outcome::Abort),
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
        if !self.active.contains_key(&id) {
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
                .filter(|&id| owner_vm(id) == vm)
                .collect(),
            None => Vec::new(),
        };
        owned.sort_unstable();
        let notices = owned
            .iter()
            .flat_map(|&id| self.decide(id, Outcome::Abort))
            .collect();
        (owned, notices)
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;

    fn id(vm: u32, seq: u32) -> Id {
        Id::new(vm, seq)
    }

    fn reg() -> Registry {
        let mut r = Registry::new();
        for (port, vm) in [(10, A), (20, B), (30, C)] {
            assert_eq!(r.add_port(port, vm), Ok(1));
        }
        r
    }

    /// `port` is sent `id` and joins it.
    fn join(r: &mut Registry, port: PortId, id: Id) {
        let new = r.unheld(port, &[id]);
        r.offer(port, &new);
        assert_eq!(r.joined(port, &[id]).joined, vec![id]);
    }

    #[test]
    fn the_owner_decides_and_members_hear_it() {
        let mut r = reg();
        let s = id(A, 1);
        r.started(10, s).unwrap();
        join(&mut r, 20, s);
        join(&mut r, 30, s);
        let n = r.resolved(10, s, Outcome::Commit).unwrap();
        assert_eq!(n.len(), 2);
        assert!(n.iter().all(|x| x.outcome == Outcome::Commit && x.id == s));
        assert_eq!(r.outcome(s), Some(Outcome::Commit));
        assert!(
            r.resolved(10, s, Outcome::Abort).unwrap().is_empty(),
            "decided once"
        );
        assert_eq!(r.outcome(s), Some(Outcome::Commit));
        assert_eq!((r.held(10), r.held(20), r.held(30)), (0, 0, 0));
    }

    #[test]
    fn sequence_numbers_continue_past_what_the_vm_started() {
        let mut r = reg();
        assert_eq!(r.next_seq(A), Some(1));
        r.started(10, id(A, 7)).unwrap();
        assert_eq!(
            r.started(20, id(A, 9)),
            Err(RegistryError::NotOwner {
                port: 20,
                vm: B,
                id: id(A, 9),
                owner: A
            })
        );
        assert_eq!(r.joined(20, &[id(A, 9)]).refused.len(), 1);
        assert_eq!(r.next_seq(A), Some(8), "only VM 1 moves its numbers");
        assert_eq!(
            r.started(10, id(A, 7)),
            Err(RegistryError::StaleSeq {
                id: id(A, 7),
                last: 7
            })
        );
        r.port_gone(10);
        assert!(!r.vm_connected(A));
        assert_eq!(r.add_port(11, A), Ok(8), "remembered after the VM left");
        r.started(11, id(A, u32::MAX)).unwrap();
        assert_eq!(r.next_seq(A), None);
        r.port_gone(11);
        assert_eq!(r.add_port(12, A), Err(RegistryError::SeqsUsedUp { vm: A }));
        assert_eq!(r.add_port(13, B), Err(RegistryError::VmConnected { vm: B }));
    }

    #[test]
    fn only_the_owner_decides() {
        let mut r = reg();
        let s = id(A, 1);
        r.started(10, s).unwrap();
        join(&mut r, 20, s);
        assert!(matches!(
            r.resolved(20, s, Outcome::Abort),
            Err(RegistryError::NotOwner { .. })
        ));
        assert!(r.is_active(s));
        assert_eq!(
            r.resolved(10, id(A, 2), Outcome::Abort),
            Err(RegistryError::NotOpen {
                port: 10,
                id: id(A, 2)
            }),
            "never started"
        );
    }

    #[test]
    fn a_port_joins_only_what_it_was_sent() {
        let mut r = reg();
        let s = id(A, 1);
        r.started(10, s).unwrap();
        let j = r.joined(20, &[s]);
        assert_eq!(j.refused, vec![RegistryError::NotSent { port: 20, id: s }]);
        assert!(!r.may_carry(20, s));
        assert!(r.may_carry(10, s), "the owner carries its own");
        join(&mut r, 20, s);
        assert!(r.may_carry(20, s));
        assert!(!r.may_carry(30, s));
        assert_eq!(r.snapshot(), vec![(s, vec![20])]);
    }

    #[test]
    fn a_late_joiner_learns_the_outcome() {
        let mut r = reg();
        let s = id(A, 1);
        r.started(10, s).unwrap();
        r.resolved(10, s, Outcome::Abort).unwrap();
        let ghost = id(4242, 1);
        assert_eq!(
            r.joined(20, &[s, ghost]).late,
            vec![
                Notice {
                    port: 20,
                    id: s,
                    outcome: Outcome::Abort
                },
                Notice {
                    port: 20,
                    id: ghost,
                    outcome: Outcome::Abort
                }
            ],
            "an id of a VM not connected counts as aborted"
        );
        assert_eq!(r.open_ids(), 0);
    }

    #[test]
    fn ids_per_port_are_bounded() {
        let mut r = reg();
        for seq in 1..=IDS_PER_PORT as u32 {
            r.started(20, id(B, seq)).unwrap();
        }
        let over = id(B, IDS_PER_PORT as u32 + 1);
        assert_eq!(
            r.started(20, over),
            Err(RegistryError::TooManyIds { port: 20, id: over })
        );
        assert_eq!(r.room(20), 0);
        r.started(10, id(A, 1)).unwrap();
        assert_eq!(r.unheld(20, &[id(A, 1), id(B, 1)]), vec![id(A, 1)]);
        r.port_gone(20);
        r.resolved(10, id(A, 1), Outcome::Commit).unwrap();
        assert_eq!((r.open_ids(), r.held(10)), (0, 0));
    }

    #[test]
    fn owner_death_aborts_member_death_does_not() {
        let mut r = reg();
        let a1 = id(A, 1);
        let b1 = id(B, 1);
        r.started(10, a1).unwrap();
        r.started(20, b1).unwrap();
        join(&mut r, 20, a1);
        join(&mut r, 10, b1);
        join(&mut r, 30, a1);
        join(&mut r, 30, b1);
        let (aborted, notices) = r.port_gone(30);
        assert!(aborted.is_empty(), "a member's death aborts nothing");
        assert!(notices.is_empty());
        let (aborted, notices) = r.port_gone(10);
        assert_eq!(aborted, vec![a1]);
        assert_eq!(
            notices,
            vec![Notice {
                port: 20,
                id: a1,
                outcome: Outcome::Abort
            }]
        );
        assert!(r.is_active(b1), "b1's owner lives");
        assert_eq!(r.snapshot(), vec![(b1, vec![])]);
        assert_eq!(r.held(20), 1);
    }
}
