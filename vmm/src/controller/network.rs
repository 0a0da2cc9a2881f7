//! The controller's side of speculation across VMs: joining on a tagged
//! frame (rule 2), acting on the bridge's outcomes (rules 4, 6), telling
//! the bridge what this VM owns and decides (rules 3, 5, 8), and what to do
//! when the bridge is lost (rule 9).

use specwire::protocol::{Control, Outcome as WireOutcome};

use super::{ControlError, Controller};
use crate::spec::link::BridgeEvent;
use crate::spec::stack::SpecId;

impl Controller {
    /// Publishes the dependency set to the net devices' hooks, which tag
    /// every frame the guest sends with it (rule 7), and sends the output
    /// that waited only for speculations that have now left the set: they
    /// committed (an abort drops its frames first, in `rollback`; rule 11).
    pub(super) fn sync_deps(&self) {
        let ids = self.stack.deps();
        let (released, held) = {
            let mut d = self.deps.lock().unwrap_or_else(|e| e.into_inner());
            (d.set_ids(ids), d.held.len())
        };
        if released.is_empty() {
            return;
        }
        tracing::debug!(
            released = released.len(),
            held,
            "output commit: frames released"
        );
        for (card, frame) in &released {
            if let Some(n) = self.nets.get(*card) {
                if let Err(e) = n.send_to_backend(frame) {
                    tracing::warn!(card, "output commit: sending a released frame: {e}");
                }
            }
        }
        // Transmit may have waited for room in the hold.
        for n in &self.nets {
            n.resume_tx();
        }
    }

    /// Drops the held output of the speculations a rollback took back.
    pub(super) fn drop_held(&self, aborted: &[SpecId]) {
        let n = {
            let mut d = self.deps.lock().unwrap_or_else(|e| e.into_inner());
            d.held.drop_aborted(aborted)
        };
        if n > 0 {
            tracing::debug!(
                frames = n,
                "output commit: frames of aborted speculations dropped"
            );
            for n in &self.nets {
                n.resume_tx();
            }
        }
    }

    /// Sends a control message to the bridge, if the VM has one.
    pub(super) fn tell_bridge(&self, c: Control) {
        if let Some(link) = &self.link {
            if let Err(e) = link.send(&c) {
                tracing::warn!("telling the bridge {c:?}: {e}");
            }
        }
    }

    /// This VM, the owner, decided `id` (rules 3, 5).
    pub(super) fn resolved(&self, id: SpecId, outcome: WireOutcome) {
        self.tell_bridge(Control::Resolved { id, outcome });
        self.sync_deps();
    }

    /// Joins the speculations a tagged frame carries, before the guest sees
    /// the frame: one checkpoint for all of them (rule 2).
    pub(super) fn join(&mut self, ids: Vec<SpecId>) -> Result<(), ControlError> {
        self.pause_all()?;
        let missing = self.stack.missing(&ids);
        if missing.is_empty() {
            // Joined meanwhile (another frame with the same tag).
        } else if self.stack.can_push().is_err() {
            // The frame must not reach the guest without a checkpoint; the
            // hook drops every frame tagged with these ids from now on.
            tracing::warn!(
                ?missing,
                "checkpoint stack full: frames of these speculations are dropped"
            );
            let mut d = self.deps.lock().unwrap_or_else(|e| e.into_inner());
            d.refused.extend_from_slice(&missing);
        } else {
            let cp = self.checkpoint(None)?;
            self.stack
                .join(&missing, cp)
                .map_err(|e| ControlError::Vcpu(e.to_string()))?;
            for &id in &missing {
                tracing::info!(%id, depth = self.stack.depth(), "joined");
                self.emit_by("join", id, "network");
            }
            self.tell_bridge(Control::Joined { ids: missing });
            self.sync_deps();
        }
        self.resume_all();
        Ok(())
    }

    /// Acts on a message from the bridge.
    pub(super) fn bridge_event(&mut self, ev: BridgeEvent) -> Result<(), ControlError> {
        match ev {
            BridgeEvent::Decided { id, outcome, seq } => {
                match outcome {
                    WireOutcome::Commit => self.remote_commit(id),
                    WireOutcome::Abort => self.remote_abort(id)?,
                }
                self.tell_bridge(Control::Ack { seq });
            }
            BridgeEvent::Gone => {
                tracing::warn!("the bridge is gone: rolling back every speculation this VM joined");
                self.link = None;
                // Their outcomes can no longer be learnt (rule 9): roll back
                // to before the first frame of the oldest one.
                if let Some(e) = self.stack.entries().into_iter().find(|e| !e.explicit) {
                    self.remote_abort(e.id)?;
                }
            }
        }
        Ok(())
    }

    /// Rule 6: every entry for `id` goes, folded down.
    fn remote_commit(&mut self, id: SpecId) {
        if self.stack.remove(id) {
            tracing::info!(%id, depth = self.stack.depth(), "committed by its owner");
            self.emit_by("commit", id, "network");
            self.sync_deps();
        }
    }

    /// Rule 4: back to just before the first frame tagged `id` reached
    /// this VM. Nothing happens if the VM no longer holds `id`.
    fn remote_abort(&mut self, id: SpecId) -> Result<(), ControlError> {
        if !self.stack.holds(id) {
            return Ok(());
        }
        self.pause_all()?;
        if let Some(rb) = self.stack.rollback_to(id) {
            self.emit_by("rollback", id, "network");
            // The target is an implicit frame: no vCPU's hypercall result to
            // set, so the reason is unused.
            self.rollback(rb, 0, None)?;
        }
        self.resume_all();
        Ok(())
    }
}
