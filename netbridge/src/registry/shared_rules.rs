//! The port rules of [`Registry`] when a shared registry
//! ([`RegistryBackend`](super::backend::RegistryBackend), e.g. etcd) holds
//! the outcomes (`netbridge --registry`). The rights of ports stay those of
//! `registry.rs`; what changes is who decides:
//! - an outcome is the shared registry's: a local `resolved`, an owner that
//!   goes away, a refused start are written there first, and applied here
//!   when it answers ([`Registry::decide_shared`]);
//! - an owner VM that is not connected here may live behind another
//!   bridge: its ids are not aborted for its absence (rule 9 is the
//!   shared registry's lease expiry), and a member that resumes one is
//!   trusted until the shared registry says otherwise.

use crate::protocol::{Decision, Id, Outcome};

use super::{owner_vm, Joins, Notice, PortId, Registry, RegistryError, Resumed};

/// What [`Registry::decide_shared`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum SharedDecision {
    /// The outcome was known already: nothing to do (each is applied once).
    Known,
    /// Nobody here holds the id: the outcome is only remembered, for a late
    /// join or tagged frame.
    Remembered,
    /// The id was open here and is decided now: tell these ports.
    Decided(Vec<Notice>),
}

/// What a `resume` asks of the shared registry.
#[derive(Debug, Default)]
pub struct SharedResume {
    /// What the port gets now, as [`Registry::resume`] says.
    pub resumed: Resumed,
    /// The VM's own decisions the registry here did not know: to write.
    pub resolve: Vec<Decision>,
    /// The VM's open ids: to attach to its new lease.
    pub restart: Vec<Id>,
}

impl Registry {
    /// The VM on `port`, if it is a connected VM port.
    pub fn vm_of(&self, port: PortId) -> Option<u32> {
        self.ports.get(&port).map(|p| p.vm)
    }

    /// The port of VM `vm`, if it is connected here.
    pub fn port_of(&self, vm: u32) -> Option<PortId> {
        self.vms.get(&vm).copied()
    }

    /// `id` ended as `outcome`, as the shared registry says. A local owner
    /// is told an abort too: it may be one it never asked for (its start
    /// refused, its lease lapsed), and it rolls back like its members.
    pub fn decide_shared(&mut self, id: Id, outcome: Outcome) -> SharedDecision {
        if self.decided.contains_key(&id) {
            return SharedDecision::Known;
        }
        if !self.active.contains_key(&id) {
            self.remember(id, outcome);
            return SharedDecision::Remembered;
        }
        let owner = self.vms.get(&owner_vm(id)).copied();
        let mut notices = self.decide(id, outcome);
        if let (Some(port), Outcome::Abort) = (owner, outcome) {
            notices.push(Notice { port, id, outcome });
        }
        SharedDecision::Decided(notices)
    }

    /// Keeps the outcome of an id nobody here holds (in the bounded
    /// history), so that a late join or tagged frame learns it.
    pub fn remember(&mut self, id: Id, outcome: Outcome) {
        if self.active.contains_key(&id) || self.decided.contains_key(&id) {
            return;
        }
        self.decided.insert(id, outcome);
        self.order.push_back(id);
        if self.order.len() > super::HISTORY {
            if let Some(old) = self.order.pop_front() {
                self.decided.remove(&old);
            }
        }
    }

    /// `port` went away: it is no longer a member of, or offered, anything.
    /// Its VM's open ids stay open until the shared registry decides them
    /// (the bridge writes their abort). Returns the VM and those ids.
    pub fn port_gone_shared(&mut self, port: PortId) -> (Option<u32>, Vec<Id>) {
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
        // What nobody here holds any more is forgotten (as `port_gone`
        // does), except the departed VM's own ids: their abort is on its
        // way to the registry, and their frames are purged when it lands.
        let vms = &self.vms;
        self.active.retain(|id, s| {
            vms.contains_key(&owner_vm(*id))
                || !s.members.is_empty()
                || !s.offered.is_empty()
                || owned.binary_search(id).is_ok()
        });
        let active = &self.active;
        self.homes.retain(|id, _| active.contains_key(id));
        (vm, owned)
    }

    /// Checks a `resolved` as [`Registry::resolved`] does, without deciding:
    /// `Ok(true)` if the id is decided already (nothing to write).
    pub fn check_resolve(&self, port: PortId, id: Id) -> Result<bool, RegistryError> {
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
            return Ok(true);
        }
        // An id that came from a peer is its owner's there.
        if !self.active.contains_key(&id) || self.homes.contains_key(&id) {
            return Err(RegistryError::NotOpen { port, id });
        }
        Ok(false)
    }

    /// [`Registry::joined`] without the rule for absent owners: an open id
    /// whose owner is on another bridge is joined like any other (the
    /// bridge then records the join in the shared registry).
    pub fn joined_shared(&mut self, port: PortId, ids: &[Id]) -> Joins {
        self.join_ids(port, ids, false)
    }

    /// [`Registry::resume`] with the outcomes left to the shared registry:
    /// the VM's decisions are to be written there, its open ids attached to
    /// its new lease, and the ids it joined are trusted (their owner may be
    /// on another bridge) until the shared registry says how they ended.
    pub fn resume_shared(
        &mut self,
        port: PortId,
        started: &[Id],
        joined: &[Id],
        outcomes: &[Decision],
    ) -> SharedResume {
        let mut out = SharedResume::default();
        let vm = match self.ports.get_mut(&port) {
            Some(p) if p.resumed => {
                out.resumed
                    .refused
                    .push(RegistryError::ResumedTwice { port });
                return out;
            }
            Some(p) => {
                p.resumed = true;
                p.vm
            }
            None => {
                out.resumed.refused.push(RegistryError::NoVm { port });
                return out;
            }
        };
        for d in outcomes {
            if let Err(e) = self.own(port, vm, d.id) {
                out.resumed.refused.push(e);
            } else if !self.decided.contains_key(&d.id) {
                if !self.active.contains_key(&d.id) {
                    self.reopen(port, d.id);
                }
                out.resolve.push(*d);
            }
        }
        for &id in started {
            match (self.own(port, vm, id), self.outcome(id)) {
                (Err(e), _) => out.resumed.refused.push(e),
                (Ok(()), Some(outcome)) => out.resumed.notices.push(Notice { port, id, outcome }),
                (Ok(()), None) if out.resolve.iter().any(|d| d.id == id) => {}
                (Ok(()), None) if self.room(port) == 0 => {
                    out.resumed
                        .refused
                        .push(RegistryError::TooManyIds { port, id });
                }
                (Ok(()), None) => {
                    self.reopen(port, id);
                    out.resumed.started.push(id);
                    out.restart.push(id);
                }
            }
        }
        for &id in joined {
            if owner_vm(id) == vm {
                continue;
            }
            if let Some(outcome) = self.outcome(id) {
                out.resumed.notices.push(Notice { port, id, outcome });
                continue;
            }
            if self.room(port) == 0 {
                out.resumed
                    .refused
                    .push(RegistryError::TooManyIds { port, id });
                continue;
            }
            let s = self.active.entry(id).or_default();
            let was_offered = s.offered.remove(&port);
            if s.members.insert(port) && !was_offered {
                self.add_held(port, 1);
            }
            out.resumed.joined.push(id);
        }
        out
    }
}
