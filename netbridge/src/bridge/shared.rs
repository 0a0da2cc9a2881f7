//! The bridge with a shared registry (`netbridge --registry`, issue 15):
//! outcomes are the registry's. The bridge asks for them as
//! [`Op`]s ([`Bridge::take_ops`]), and applies what the registry says
//! ([`Bridge::outcome_shared`], [`Bridge::refuse_start`]); the switching,
//! the rights of ports, anti-messages and output commit are unchanged.
//! `registry/link.rs` carries the ops out; `docs/registry.md` says why each
//! step waits for the registry.

use super::{Bridge, Send};
use crate::protocol::{Control, Decision, Id, Outcome};
use crate::registry::link::Op;
use crate::registry::shared_rules::SharedDecision;
use crate::registry::{owner_vm, PortId};

impl Bridge {
    /// The bridge with its outcomes in a shared registry: see the module.
    pub fn with_shared_registry(mut self) -> Self {
        self.shared = true;
        self
    }

    /// Whether the outcomes are in a shared registry.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The ops for the shared registry since the last call.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// How `id` ended, if the bridge knows.
    pub fn outcome(&self, id: Id) -> Option<Outcome> {
        self.registry.outcome(id)
    }

    pub(super) fn op(&mut self, op: Op) {
        if self.shared {
            self.ops.push(op);
        }
    }

    /// Outcomes from the shared registry: each applied once (events,
    /// anti-messages, output commit, `decided` to members, and to a local
    /// owner for an abort); ones nobody here holds are remembered.
    pub fn outcome_shared(&mut self, ds: &[Decision]) -> (Vec<Send>, Vec<PortId>) {
        let mut sends = Vec::new();
        let mut woke = Vec::new();
        for d in ds {
            if let SharedDecision::Decided(notices) = self.registry.decide_shared(d.id, d.outcome) {
                let port = self.registry.port_of(owner_vm(d.id)).unwrap_or(0);
                woke.extend(self.apply(port, d.id, d.outcome));
                sends.extend(self.notify(notices));
            }
        }
        woke.sort_unstable();
        woke.dedup();
        (sends, woke)
    }

    /// The shared registry could not record the start of `id`: it is
    /// aborted here (the owner is told, so its guest's `speculate()`
    /// returns again; members, if any joined already, roll back), with a
    /// `refused` event.
    pub fn refuse_start(&mut self, id: Id) -> (Vec<Send>, Vec<PortId>) {
        let owner = self.registry.port_of(owner_vm(id));
        self.event("refused", Some(id), owner.unwrap_or(0));
        let (mut sends, woke) = self.outcome_shared(&[Decision {
            id,
            outcome: Outcome::Abort,
        }]);
        // The owner learns why: its guest's `speculate()` returns "refused",
        // not "aborted" (a VMM that resumes meanwhile gets a plain abort).
        for s in &mut sends {
            if let Send::Control(port, Control::Decided { id: d, refused, .. }) = s {
                if Some(*port) == owner && *d == id {
                    *refused = true;
                }
            }
        }
        (sends, woke)
    }

    /// `remove_port` with a shared registry: the port's open ids are
    /// aborted in the registry (members hear it from there), then its
    /// VM's lease revoked.
    pub(super) fn remove_port_shared(&mut self, port: PortId) -> Vec<Send> {
        self.ports.remove(&port);
        self.macs.retain(|_, p| *p != port);
        self.event("port-down", None, port);
        let (vm, owned) = self.registry.port_gone_shared(port);
        for id in owned {
            self.op(Op::Resolve {
                id,
                outcome: Outcome::Abort,
            });
        }
        if let Some(vm) = vm {
            self.op(Op::VmDown { vm });
        }
        Vec::new()
    }

    /// `joined` with a shared registry: each join is recorded there too;
    /// one it refuses with an outcome is applied when it answers.
    pub(super) fn joined_shared(&mut self, port: PortId, ids: &[Id]) -> Vec<Send> {
        let joins = self.registry.joined_shared(port, ids);
        for &id in &joins.joined {
            self.op(Op::Join { port, id });
        }
        self.joined(port, joins)
    }

    /// `resolved` with a shared registry: checked as ever, then written to
    /// the registry; applied when it is there (nobody, the local members
    /// included, hears an outcome that a bridge failure could still undo).
    pub(super) fn resolved_shared(
        &mut self,
        port: PortId,
        id: Id,
        outcome: Outcome,
    ) -> (Vec<Send>, Vec<PortId>) {
        match self.registry.check_resolve(port, id) {
            Ok(true) => {
                tracing::warn!(port, ?outcome, "{} was already decided; ignored", id);
            }
            Ok(false) => self.op(Op::Resolve { id, outcome }),
            Err(e) => self.refuse(port, &e),
        }
        (Vec::new(), Vec::new())
    }

    /// `resume` with a shared registry ([`Registry::resume_shared`](crate::registry::Registry::resume_shared)).
    pub(super) fn resume_shared(
        &mut self,
        port: PortId,
        started: &[Id],
        joined: &[Id],
        outcomes: &[Decision],
    ) -> (Vec<Send>, Vec<PortId>) {
        let r = self.registry.resume_shared(port, started, joined, outcomes);
        let vm = self.registry.vm_of(port);
        for &id in &r.resumed.started {
            self.event("started", Some(id), port);
        }
        for &id in &r.resumed.joined {
            self.event("joined", Some(id), port);
            self.op(Op::Join { port, id });
        }
        for e in &r.resumed.refused {
            self.refuse(port, e);
        }
        if let Some(vm) = vm {
            for d in &r.resolve {
                self.op(Op::Resolve {
                    id: d.id,
                    outcome: d.outcome,
                });
            }
            for &id in &r.restart {
                self.op(Op::Restart { vm, id });
            }
        }
        (self.notify(r.resumed.notices), Vec::new())
    }
}

#[cfg(test)]
mod tests;
