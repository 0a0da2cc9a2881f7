//! Who owns and who joined every speculation the bridge has seen, and how
//! each ended. Pure logic, free of I/O.
//!
//! Rules (SPECULATIONS.md): only the owner decides (8); every member hears
//! the outcome (4, 6); an owner that goes away aborts what it owned, a
//! member that goes away aborts nothing (9).

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::protocol::{Id, Outcome};

/// A port of the bridge.
pub type PortId = u64;

/// How many decided speculations are remembered, so that a late tagged
/// frame or a late join still learns the outcome.
const HISTORY: usize = 65_536;

/// Errors of registry operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// A port tried to decide a speculation it does not own (rule 8).
    #[error("port {port} (VM {vm}) may not decide speculation {id:#x}, owned by VM {owner}")]
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
}

/// The owner VM of a speculation id.
pub fn owner_vm(id: Id) -> u32 {
    id.vm
}

#[derive(Debug, Default)]
struct Spec {
    members: BTreeSet<PortId>,
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

/// The registry.
#[derive(Debug, Default)]
pub struct Registry {
    /// Port → its VM id.
    ports: HashMap<PortId, u32>,
    active: HashMap<Id, Spec>,
    decided: HashMap<Id, Outcome>,
    order: VecDeque<Id>,
    /// The highest sequence number seen per VM id.
    max_seq: HashMap<u32, u32>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A port said hello as VM `vm`.
    pub fn add_port(&mut self, port: PortId, vm: u32) {
        self.ports.insert(port, vm);
    }

    /// Whether a port of VM `vm` is connected.
    pub fn vm_connected(&self, vm: u32) -> bool {
        self.ports.values().any(|&v| v == vm)
    }

    /// The first sequence number VM `vm` may use: past every one seen.
    pub fn next_seq(&self, vm: u32) -> u32 {
        self.max_seq.get(&vm).map_or(1, |s| s.saturating_add(1))
    }

    /// Notes that `id` exists, for [`Registry::next_seq`].
    pub fn seen(&mut self, id: Id) {
        let (vm, seq) = (owner_vm(id), id.seq);
        let m = self.max_seq.entry(vm).or_insert(0);
        *m = (*m).max(seq);
    }

    /// How `id` ended, if it has.
    pub fn outcome(&self, id: Id) -> Option<Outcome> {
        self.decided.get(&id).copied()
    }

    /// Whether `id` is known and still open.
    pub fn is_active(&self, id: Id) -> bool {
        self.active.contains_key(&id)
    }

    /// The owner started `id`.
    pub fn started(&mut self, id: Id) {
        self.seen(id);
        if !self.decided.contains_key(&id) {
            self.active.entry(id).or_default();
        }
    }

    /// `port` joined `ids`. Returns notices for ids already decided: the
    /// port joined late and must act on the outcome at once.
    pub fn joined(&mut self, port: PortId, ids: &[Id]) -> Vec<Notice> {
        let mut late = Vec::new();
        for &id in ids {
            self.seen(id);
            match self.decided.get(&id) {
                Some(&outcome) => late.push(Notice { port, id, outcome }),
                None => {
                    self.active.entry(id).or_default().members.insert(port);
                }
            }
        }
        late
    }

    /// The owner on `port` decided `id`. Returns the members to tell.
    /// Deciding twice, or deciding an unknown id, tells nobody again.
    pub fn resolved(
        &mut self,
        port: PortId,
        id: Id,
        outcome: Outcome,
    ) -> Result<Vec<Notice>, RegistryError> {
        let vm = self.ports.get(&port).copied().unwrap_or(u32::MAX);
        if owner_vm(id) != vm {
            return Err(RegistryError::NotOwner {
                port,
                vm,
                id,
                owner: owner_vm(id),
            });
        }
        self.seen(id);
        Ok(self.decide(id, outcome))
    }

    fn decide(&mut self, id: Id, outcome: Outcome) -> Vec<Notice> {
        if self.decided.contains_key(&id) {
            return Vec::new();
        }
        let spec = self.active.remove(&id).unwrap_or_default();
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
    /// aborted, and it stops being a member of the others. Returns the
    /// aborted ids and the members to tell.
    pub fn port_gone(&mut self, port: PortId) -> (Vec<Id>, Vec<Notice>) {
        let vm = self.ports.remove(&port);
        for spec in self.active.values_mut() {
            spec.members.remove(&port);
        }
        // The same VM may have another port still connected: its
        // speculations live on then.
        let still_there = vm.is_some_and(|vm| self.ports.values().any(|&v| v == vm));
        let owned: Vec<Id> = match vm {
            Some(vm) if !still_there => {
                let mut v: Vec<Id> = self
                    .active
                    .keys()
                    .copied()
                    .filter(|&id| owner_vm(id) == vm)
                    .collect();
                v.sort_unstable();
                v
            }
            _ => Vec::new(),
        };
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
        r.add_port(10, A);
        r.add_port(20, B);
        r.add_port(30, C);
        r
    }

    #[test]
    fn the_owner_decides_and_members_hear_it() {
        let mut r = reg();
        let s = id(A, 1);
        r.started(s);
        assert!(r.joined(20, &[s]).is_empty());
        assert!(r.joined(30, &[s]).is_empty());
        let n = r.resolved(10, s, Outcome::Commit).unwrap();
        assert_eq!(n.len(), 2);
        assert!(n.iter().all(|x| x.outcome == Outcome::Commit && x.id == s));
        assert_eq!(r.outcome(s), Some(Outcome::Commit));
        assert!(
            r.resolved(10, s, Outcome::Abort).unwrap().is_empty(),
            "decided once"
        );
        assert_eq!(r.outcome(s), Some(Outcome::Commit));
    }

    #[test]
    fn sequence_numbers_continue_past_what_was_seen() {
        let mut r = reg();
        assert_eq!(r.next_seq(A), 1);
        r.started(id(A, 1));
        r.joined(20, &[id(A, 7)]);
        assert_eq!(r.next_seq(A), 8);
        assert_eq!(r.next_seq(B), 1);
        assert!(r.vm_connected(A));
        r.port_gone(10);
        assert!(!r.vm_connected(A));
        assert_eq!(r.next_seq(A), 8, "remembered after the VM left");
    }

    #[test]
    fn only_the_owner_decides() {
        let mut r = reg();
        let s = id(A, 1);
        r.joined(20, &[s]);
        assert!(matches!(
            r.resolved(20, s, Outcome::Abort),
            Err(RegistryError::NotOwner { .. })
        ));
        assert!(r.is_active(s));
    }

    #[test]
    fn a_late_joiner_learns_the_outcome() {
        let mut r = reg();
        let s = id(A, 1);
        r.resolved(10, s, Outcome::Abort).unwrap();
        assert_eq!(
            r.joined(20, &[s]),
            vec![Notice {
                port: 20,
                id: s,
                outcome: Outcome::Abort
            }]
        );
    }

    #[test]
    fn owner_death_aborts_member_death_does_not() {
        let mut r = reg();
        let a1 = id(A, 1);
        let b1 = id(B, 1);
        r.joined(20, &[a1]);
        r.joined(10, &[b1]);
        r.joined(30, &[a1, b1]);
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
    }
}
