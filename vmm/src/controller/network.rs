//! The controller's side of speculation across VMs: joining on a tagged
//! frame (rule 2), acting on the bridge's outcomes (rules 4, 6), telling
//! the bridge what this VM owns and decides (rules 3, 5, 8), and output
//! commit on the cards that leave the speculation domain (rule 11). While
//! the bridge is away the link reconnects on its own and the VM keeps
//! what it joined (rule 14: an outcome is never guessed).

use std::sync::{Arc, Mutex};

use guest_agent::abi::reason;
use specwire::protocol::{Control, Outcome as WireOutcome};

use super::{ControlError, Controller, Joined};
use crate::devices::virtio::net::NetHandle;
use crate::spec::link::{BridgeEvent, BridgeLink, HookStats, LinkStats, SharedDeps};
use crate::spec::stack::SpecId;
use crate::sync::lock;

/// The VM's port on the bridge, if it has one, and the dependency set the
/// net cards' hooks read.
#[derive(Default)]
pub struct NetSpec {
    link: Option<BridgeLink>,
    deps: Arc<Mutex<SharedDeps>>,
    hook_stats: Arc<Mutex<HookStats>>,
}

impl NetSpec {
    /// The bridge port `link` (if any), the cards' shared `deps`, and the
    /// counters of the bridge card's hook.
    pub fn new(
        link: Option<BridgeLink>,
        deps: Arc<Mutex<SharedDeps>>,
        hook_stats: Arc<Mutex<HookStats>>,
    ) -> Self {
        if let Some(l) = &link {
            l.watch_deps(deps.clone());
        }
        Self {
            link,
            deps,
            hook_stats,
        }
    }

    /// The bridge card's hook counters (frames dropped for tags, joins
    /// asked), for `--stats`.
    pub fn hook_stats(&self) -> HookStats {
        *lock(&self.hook_stats)
    }

    /// The bridge link's state (connected, reconnections, frames lost to
    /// a full queue), if the VM has one.
    pub fn link_stats(&self) -> Option<LinkStats> {
        self.link.as_ref().map(BridgeLink::stats)
    }

    /// Whether the VM has a port on the bridge.
    pub fn has_bridge(&self) -> bool {
        self.link.is_some()
    }

    /// Where this VM's speculation sequence numbers start: where the
    /// bridge said, or 1.
    pub fn first_seq(&self) -> u32 {
        self.link.as_ref().map_or(1, BridgeLink::first_seq)
    }

    fn deps(&self) -> std::sync::MutexGuard<'_, SharedDeps> {
        lock(&self.deps)
    }

    /// Sends a control message to the bridge, if the VM has one. Never
    /// blocks (the link queues it).
    fn tell(&self, c: Control) {
        if let Some(link) = &self.link {
            link.send(&c);
        }
    }

    /// This VM started `id` (it owns it).
    pub fn started(&self, id: SpecId) {
        self.tell(Control::Started { id });
    }

    /// This VM, the owner, decided `id` (rules 3, 5).
    pub fn resolved(&self, id: SpecId, committed: bool) {
        let outcome = if committed {
            WireOutcome::Commit
        } else {
            WireOutcome::Abort
        };
        self.tell(Control::Resolved { id, outcome });
    }

    /// Publishes the dependency set `ids` to the cards' hooks, which tag
    /// every frame the guest sends with it (rule 7), and sends the output
    /// that waited only for speculations that have now left the set: they
    /// committed (an abort drops its frames first; rule 11).
    pub fn sync_deps(&self, ids: &[SpecId], nets: &[NetHandle]) {
        let ids = ids.to_vec();
        let (released, held) = {
            let mut d = self.deps();
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
            if let Some(n) = nets.get(*card) {
                if let Err(e) = n.send_to_backend(frame) {
                    tracing::warn!(card, "output commit: sending a released frame: {e}");
                }
            }
        }
        // Transmit may have waited for room in the hold.
        nets.iter().for_each(NetHandle::resume_tx);
    }

    /// Drops the held output of the speculations a rollback took back.
    pub fn drop_held(&self, aborted: &[SpecId], nets: &[NetHandle]) {
        let n = self.deps().held.drop_aborted(aborted);
        if n > 0 {
            tracing::debug!(
                frames = n,
                "output commit: frames of aborted speculations dropped"
            );
            nets.iter().for_each(NetHandle::resume_tx);
        }
    }
}

impl Controller {
    /// Joins the speculations a tagged frame carries, before the guest sees
    /// the frame: one checkpoint for all of them (rule 2).
    pub(super) fn join(&mut self, ids: Vec<SpecId>) -> Result<(), ControlError> {
        self.pause(true)?;
        match self.engine.join(&mut self.machine, &ids)? {
            // Joined meanwhile (another frame with the same tag).
            Joined::AlreadyHeld => {}
            Joined::Refused(missing, budget) => {
                if let Some(o) = budget {
                    self.over_budget(o, "network");
                }
                // The frame must not reach the guest without a checkpoint;
                // the hook drops every frame tagged with these ids from now on.
                tracing::warn!(
                    ?missing,
                    "checkpoint stack full: frames of these speculations are dropped"
                );
                let mut d = self.net.deps();
                d.refused.extend(missing.iter().copied());
            }
            Joined::Joined(missing) => {
                for &id in &missing {
                    tracing::info!(%id, depth = self.engine.depth(), "joined");
                    self.emit_by("join", id, "network");
                }
                self.net.tell(Control::Joined {
                    ids: missing.clone(),
                });
                self.sync_deps();
            }
        }
        self.resume();
        Ok(())
    }

    /// Acts on a message from the bridge: an outcome of a speculation the
    /// VM joined (rules 4, 6), or of one it owns that the bridge aborted
    /// while the VM was away from it (its lease expired: rule 13). The
    /// owner rolls back too, so no VM keeps what the others undid.
    pub(super) fn bridge_event(&mut self, ev: BridgeEvent) -> Result<(), ControlError> {
        let BridgeEvent::Decided {
            id,
            outcome,
            seq,
            epoch,
            refused,
        } = ev;
        match outcome {
            WireOutcome::Commit => self.remote_commit(id)?,
            WireOutcome::Abort => self.remote_abort(id, refused)?,
        }
        if let Some(link) = &self.net.link {
            link.ack(seq, epoch);
        }
        Ok(())
    }

    /// Rule 6: every entry for `id` goes, folded down.
    fn remote_commit(&mut self, id: SpecId) -> Result<(), ControlError> {
        if self.engine.remote_commit(&mut self.machine, id)? {
            tracing::info!(%id, depth = self.engine.depth(), "committed by its owner");
            self.emit_by("commit", id, "network");
            self.sync_deps();
        }
        Ok(())
    }

    /// Rule 4: back to just before the first frame tagged `id` reached
    /// this VM. Nothing happens if the VM no longer holds `id`.
    /// `refused`: the bridge refused the start of the VM's own `id`.
    fn remote_abort(&mut self, id: SpecId, refused: bool) -> Result<(), ControlError> {
        if !self.engine.holds(id) {
            return Ok(());
        }
        self.pause(false)?;
        let why = match refused {
            true => reason::REFUSED,
            false => reason::ABORTED_BY_HOST,
        };
        if let Some(a) = self.engine.remote_abort(&mut self.machine, id, why)? {
            self.emit_by("rollback", id, "network");
            self.rolled_back(a, None);
        }
        self.resume();
        Ok(())
    }
}
