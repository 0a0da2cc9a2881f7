//! The controller: the VMM's main thread once the VM runs.
//!
//! It receives every event (guest exit, vCPU failure, hypercall), pauses
//! and resumes the vCPUs, and carries out speculation operations on the
//! whole VM: checkpoint, commit, rollback.

use std::sync::Arc;
use std::time::Instant;

use guest_agent::abi::{err, op, reason};

use crate::api::SpecEvent;

mod api;
mod engine;
mod machine;
mod network;
mod snapshot;
mod vcpus;
use crate::event::{EventReceiver, VmEvent};
use crate::spec::checkpoint::Checkpoint;
use crate::spec::memory::CowError;
use crate::spec::stack::SpecId;
use crate::vstate::vcpu_state::StateError;
pub use engine::{Aborted, Held, Joined, Machine, OverBudget, SpecEngine};
pub use machine::LiveMachine;
pub use network::NetSpec;
pub use snapshot::SnapshotSetup;
pub use vcpus::{VcpuHandle, VcpuSet};

/// Errors that end the VM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A vCPU failed.
    #[error("{0}")]
    Vcpu(String),
    /// Saving or restoring machine state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Memory checkpointing failed.
    #[error(transparent)]
    Memory(#[from] CowError),
    /// Every vCPU thread ended without an exit event.
    #[error("every vCPU stopped without an exit event")]
    Gone,
    /// Saving or restoring the machine failed.
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    /// A restored VM's memory could not be given a file of its own.
    #[error("restored memory: {0}")]
    Snapshot(String),
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this status to the exit device.
    Exit(u8),
    /// The guest reset or powered off.
    Reset,
    /// The VMM was told to stop by this signal.
    Signal(i32),
}

/// Timings of speculation operations, for `--stats` and the benchmarks:
/// each operation's durations in microseconds, from the moment the
/// controller has the request to the moment every vCPU may run again.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    /// Durations by operation name.
    pub ops: std::collections::BTreeMap<&'static str, Vec<u64>>,
}

impl Stats {
    pub(crate) fn record(&mut self, name: &'static str, t: Instant) {
        self.record_duration(name, t.elapsed());
    }

    pub(crate) fn record_duration(&mut self, name: &'static str, d: std::time::Duration) {
        self.ops.entry(name).or_default().push(d.as_micros() as u64);
    }

    /// One JSON object: per operation, count, min, median and max in µs.
    pub fn summary(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (name, v) in &self.ops {
            let mut v = v.clone();
            v.sort_unstable();
            let med = v.get(v.len() / 2).copied().unwrap_or(0);
            m.insert(
                (*name).into(),
                serde_json::json!({"count": v.len(), "min_us": v.first(), "median_us": med, "max_us": v.last()}),
            );
        }
        serde_json::Value::Object(m)
    }
}

/// Most checkpoints one VM may hold at once.
pub const MAX_DEPTH: usize = 64;

/// Everything the builder hands the controller, in one value.
pub struct ControllerParts {
    /// The VM, its vCPU threads, memory and devices.
    pub machine: LiveMachine,
    /// The VM's event stream (exits, hypercalls, the API, the bridge).
    pub events: EventReceiver,
    /// This VM's id, the high half of its speculation ids.
    pub vm_id: u32,
    /// Most host memory the checkpoints may hold (`--checkpoint-budget`).
    pub budget: Option<u64>,
    /// Where speculation events go (the API's `events` stream).
    pub publish: Option<tokio::sync::broadcast::Sender<SpecEvent>>,
    /// The bridge port and the net cards' dependency set.
    pub net: NetSpec,
    /// Save the VM into the boot cache when the guest says it is ready.
    pub boot_cache: Option<(
        crate::boot_cache::PendingSave,
        Arc<crate::progress::Progress>,
    )>,
}

/// The controller and everything it owns while the VM runs.
pub struct Controller {
    machine: LiveMachine,
    engine: SpecEngine<Checkpoint>,
    events: EventReceiver,
    vm_id: u32,
    /// The host asked for the VM to stay paused.
    user_paused: bool,
    publish: Option<tokio::sync::broadcast::Sender<SpecEvent>>,
    net: NetSpec,
    boot_cache: Option<(
        crate::boot_cache::PendingSave,
        Arc<crate::progress::Progress>,
    )>,
}

impl Controller {
    /// A controller for a VM whose vCPU threads already run. A VM on a
    /// bridge numbers its speculations from where the bridge says, so they
    /// never repeat ids it has seen from an earlier VM with the same id.
    pub fn new(parts: ControllerParts) -> Self {
        let first_seq = parts.net.first_seq();
        Self {
            machine: parts.machine,
            engine: SpecEngine::new(parts.vm_id, MAX_DEPTH, first_seq, parts.budget),
            events: parts.events,
            vm_id: parts.vm_id,
            user_paused: false,
            publish: parts.publish,
            net: parts.net,
            boot_cache: parts.boot_cache,
        }
    }

    /// Timings of served operations.
    pub fn stats(&self) -> &Stats {
        &self.machine.stats
    }

    /// The `--stats` line: each operation's timings, and under `"net"`
    /// and `"link"` the bridge card's hook counters and the bridge link's
    /// state (reconnections, frames lost to a full queue) when the VM has
    /// one.
    pub fn stats_summary(&self) -> serde_json::Value {
        let mut v = self.machine.stats.summary();
        if let (Some(m), true) = (v.as_object_mut(), self.net.has_bridge()) {
            m.insert("net".into(), serde_json::json!(self.net.hook_stats()));
            m.insert("link".into(), serde_json::json!(self.net.link_stats()));
        }
        v
    }

    fn emit(&self, event: &str, id: SpecId, caller: Option<u8>) {
        self.emit_by(event, id, if caller.is_some() { "guest" } else { "host" });
    }

    fn emit_by(&self, event: &str, id: SpecId, by: &str) {
        if let Some(tx) = &self.publish {
            // No subscriber is not an error.
            let _ = tx.send(SpecEvent {
                event: event.into(),
                id: id.to_string(),
                depth: self.engine.depth(),
                by: by.into(),
            });
        }
    }

    /// Serves events until the VM ends, then stops every vCPU thread. With
    /// `paused`, the vCPUs are parked first and wait for the API's `resume`.
    pub fn run(&mut self, paused: bool) -> Result<Outcome, ControlError> {
        let r = self.run_inner(paused);
        if let Some((save, _)) = &self.boot_cache {
            eprintln!(
                "specvm: boot cache: the guest never said it was ready (`spec ready`), \
                 so nothing was saved to {}",
                save.entry_dir().display()
            );
        }
        r
    }

    fn run_inner(&mut self, paused: bool) -> Result<Outcome, ControlError> {
        let r = if paused {
            self.pause(false).and_then(|()| {
                self.user_paused = true;
                self.serve()
            })
        } else {
            self.serve()
        };
        self.machine.vcpus.stop_all();
        r
    }

    fn serve(&mut self) -> Result<Outcome, ControlError> {
        loop {
            // Calls a rollback put back go first: their vCPUs wait on them.
            if let Some((vcpu, op, arg)) = self.machine.vcpus.take_reissued() {
                self.hypercall(vcpu, op, arg)?;
                continue;
            }
            match self.events.recv().map_err(|_| ControlError::Gone)? {
                VmEvent::GuestExit(code) => return Ok(Outcome::Exit(code)),
                VmEvent::GuestReset => return Ok(Outcome::Reset),
                VmEvent::Terminate(sig) => return Ok(Outcome::Signal(sig)),
                VmEvent::Fatal(m) => return Err(ControlError::Vcpu(m)),
                VmEvent::Hypercall { vcpu, op, arg } => {
                    // A call a rollback dropped since is not served.
                    if self.machine.vcpus.receive(usize::from(vcpu)) {
                        self.hypercall(vcpu, op, arg)?;
                    }
                }
                VmEvent::Join { ids } => self.join(ids)?,
                // `_acted` goes at the end of the arm, error or not.
                VmEvent::Bridge(ev, _acted) => self.bridge_event(ev)?,
                VmEvent::Api(call) if call.op == crate::api::Op::DiskExport => {
                    self.disk_export(call)
                }
                VmEvent::Api(call) => {
                    let resp = self.api(call.op, call.path)?;
                    let _ = call.reply.send(resp);
                }
            }
        }
    }

    /// Parks every vCPU and holds device I/O; with `save`, because the
    /// machine's state is saved next, each vCPU saves its own as it parks.
    fn pause(&mut self, save: bool) -> Result<(), ControlError> {
        self.machine.pause(save)
    }

    /// Lets the VM run on, unless the host holds it paused.
    fn resume(&mut self) {
        if !self.user_paused {
            self.machine.resume();
        }
    }

    /// Serves a hypercall from `vcpu`, which is parked or parking.
    fn hypercall(&mut self, vcpu: u8, op: u32, arg: u64) -> Result<(), ControlError> {
        let t = Instant::now();
        let i = usize::from(vcpu);
        self.machine.vcpus.take_rolled(i);
        // Only checkpoints and rollbacks need every vCPU stopped; the other
        // operations only read or rearrange the stack.
        let saving = op == op::READY && self.boot_cache.is_some();
        if matches!(op, op::SPECULATE | op::ABORT) {
            self.machine.pause_for_call(op == op::SPECULATE)?;
        } else if saving {
            self.pause(true)?;
        } else {
            self.machine.vcpus.wait_parked(i)?;
        }
        let result = match op {
            op::SPECULATE => Some(match self.speculate(Some(vcpu))? {
                Ok(_) => [0, 0, 0],
                Err(e) => [e, 0, 0],
            }),
            op::COMMIT => Some(match self.commit(Some(vcpu))? {
                Ok(_) => [0, 0, 0],
                Err(e) => [e, 0, 0],
            }),
            op::ABORT => self
                .abort_own(reason::ABORTED_BY_GUEST, Some(vcpu))?
                .err()
                .map(|e| [e, 0, 0]),
            op::STATUS => {
                let entries = self.engine.entries();
                let own = entries.iter().filter(|e| e.explicit).count();
                Some([self.engine.depth() as u64, entries.len() as u64, own as u64])
            }
            op::ENTRY => Some(match self.engine.entries().get(arg as usize) {
                Some(e) => [e.id.to_u64(), u64::from(e.explicit), 0],
                None => [err::BAD_ARG, 0, 0],
            }),
            op::READY => {
                self.ready(vcpu)?;
                Some([0, 0, 0])
            }
            _ => {
                tracing::debug!(vcpu, op, "unknown hypercall");
                Some([err::BAD_OP, 0, 0])
            }
        };
        // After a rollback (this call's own `abort`) the vCPU's registers
        // are the checkpoint's: there it ran on, and `speculate` holds its
        // second return already, or it waited on a call that is served
        // again, this one or an earlier one (`VcpuSet::after_rollback`).
        if !self.machine.vcpus.take_rolled(i) {
            if let Some(regs) = result {
                self.machine.set_result(i, regs)?;
            }
            self.machine.vcpus.call_served(i);
        }
        self.resume();
        self.machine.stats.record(op_name(op), t);
        Ok(())
    }

    /// Takes a checkpoint and starts a speculation (rule 1). All vCPUs
    /// must be parked. The inner error is a hypercall error code.
    pub fn speculate(&mut self, caller: Option<u8>) -> Result<Result<SpecId, u64>, ControlError> {
        let id = match self.engine.speculate(&mut self.machine, caller)? {
            Ok(id) => id,
            Err(e) => {
                if let Some(o) = self.engine.take_refusal() {
                    self.over_budget(o, if caller.is_some() { "guest" } else { "host" });
                }
                return Ok(Err(e));
            }
        };
        tracing::info!(%id, depth = self.engine.depth(), "speculate");
        self.emit("speculate", id, caller);
        self.net.started(id);
        self.sync_deps();
        Ok(Ok(id))
    }

    /// Commits the innermost own speculation (rule 5). The inner error is a
    /// hypercall error code.
    pub fn commit(&mut self, caller: Option<u8>) -> Result<Result<SpecId, u64>, ControlError> {
        let id = match self.engine.commit_own(&mut self.machine)? {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        tracing::info!(%id, depth = self.engine.depth(), "commit");
        self.emit("commit", id, caller);
        self.net.resolved(id, true);
        self.sync_deps();
        Ok(Ok(id))
    }

    /// Aborts the innermost own speculation (rule 3): the VM rolls back, and
    /// the caller's registers become the checkpoint's. The inner error is a
    /// hypercall error code.
    pub fn abort_own(
        &mut self,
        why: u64,
        caller: Option<u8>,
    ) -> Result<Result<SpecId, u64>, ControlError> {
        match self.engine.abort_own(&mut self.machine, why)? {
            Ok(a) => {
                let id = a.id;
                self.rolled_back(a, caller);
                Ok(Ok(id))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Tells everyone what a rollback ended: the held output of the aborted
    /// speculations goes, and their owners' decision goes out (rules 3, 4).
    fn rolled_back(&mut self, a: Aborted, by: Option<u8>) {
        self.net.drop_held(&a.own, self.machine.devices.nets());
        let ids: Vec<String> = a.own.iter().map(SpecId::to_string).collect();
        tracing::info!(aborted = ?ids, depth = self.engine.depth(), "rollback");
        for &id in &a.own {
            self.emit("abort", id, by);
            self.net.resolved(id, false);
        }
        self.sync_deps();
    }

    /// A checkpoint was refused for memory: the log says so, and the API's
    /// event stream gets a `budget` event (no id; `by` says who asked).
    fn over_budget(&self, o: OverBudget, by: &str) {
        tracing::warn!(
            held = o.held,
            budget = o.budget,
            by,
            "checkpoint refused: the checkpoints hold their memory budget"
        );
        if let Some(tx) = &self.publish {
            let _ = tx.send(SpecEvent {
                event: "budget".into(),
                id: String::new(),
                depth: self.engine.depth(),
                by: by.into(),
            });
        }
    }

    /// Publishes the dependency set to the net cards, and sends the output
    /// that waited only for speculations that have left it (rule 11).
    fn sync_deps(&self) {
        self.net
            .sync_deps(&self.engine.deps(), self.machine.devices.nets());
    }
}

fn op_name(op: u32) -> &'static str {
    match op {
        op::SPECULATE => "speculate",
        op::COMMIT => "commit",
        op::ABORT => "abort",
        op::STATUS => "status",
        op::ENTRY => "entry",
        op::READY => "ready",
        _ => "bad-op",
    }
}
