//! The controller: the VMM's main thread once the VM runs.
//!
//! It receives every event (guest exit, vCPU failure, hypercall), pauses
//! and resumes the vCPUs, and carries out speculation operations on the
//! whole VM: checkpoint, commit, rollback.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_agent::abi::{err, op, reason};
use kvm_ioctls::VmFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::api::SpecEvent;
use crate::devices::virtio::net::NetHandle;
use crate::spec::link::{BridgeLink, SharedDeps};

mod api;
mod network;
mod snapshot;
use crate::devices::bus::{lock, SharedDevice};
use crate::event::{EventReceiver, VcpuCmd, VcpuReply, VmEvent};
use crate::host_compat::shadow::ShadowReset;
use crate::spec::checkpoint::Checkpoint;
use crate::spec::memory::{CowError, MemoryTracker};
use crate::spec::stack::{Rollback, SpecId, SpecStack, StackError};
use crate::vstate::vcpu_state::{StateError, VcpuState};
use crate::vstate::vm_state;
pub use snapshot::SnapshotSetup;

/// How long to wait for a vCPU to park before kicking it again. A kick can
/// be lost if it lands just before the thread enters KVM_RUN.
const KICK_INTERVAL: Duration = Duration::from_millis(2);

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
    /// Restoring a device failed.
    #[error("restoring device state: {0}")]
    Device(String),
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

/// The controller's end of one vCPU thread.
pub struct VcpuHandle {
    /// Commands for the vCPU while parked.
    pub cmds: Sender<VcpuCmd>,
    /// Raised (then the thread is kicked) to make the vCPU park.
    pub attention: Arc<AtomicBool>,
    /// The thread.
    pub thread: JoinHandle<()>,
    parked: bool,
    /// It made a hypercall that has not been served yet: it must stay
    /// parked until it is.
    pending_call: bool,
}

impl VcpuHandle {
    /// A handle for a running vCPU thread.
    pub fn new(cmds: Sender<VcpuCmd>, attention: Arc<AtomicBool>, thread: JoinHandle<()>) -> Self {
        Self {
            cmds,
            attention,
            thread,
            parked: false,
            pending_call: false,
        }
    }
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
    fn record(&mut self, name: &'static str, t: Instant) {
        self.record_duration(name, t.elapsed());
    }

    fn record_duration(&mut self, name: &'static str, d: Duration) {
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

/// The controller and everything it owns while the VM runs.
pub struct Controller {
    vm: VmFd,
    vcpus: Vec<VcpuHandle>,
    events: EventReceiver,
    deferred: VecDeque<VmEvent>,
    stop: Arc<AtomicBool>,
    stack: SpecStack<Checkpoint>,
    memory: MemoryTracker,
    devices: Vec<SharedDevice>,
    vm_id: u32,
    /// KVM shadows the guest's page tables (the host-compat layer is
    /// active): a rollback must drop its shadow pages.
    shadow_paging: bool,
    /// The memory slot through which it drops them, made at the first
    /// rollback.
    shadow_reset: Option<ShadowReset>,
    /// The host asked for the VM to stay paused.
    user_paused: bool,
    /// Where speculation events go (the API's `events` stream).
    publish: Option<tokio::sync::broadcast::Sender<SpecEvent>>,
    /// The port on netbridge, if the VM has one.
    link: Option<BridgeLink>,
    /// The dependency set as the net devices' hooks read it.
    deps: Arc<std::sync::Mutex<SharedDeps>>,
    /// The net devices, whose receive must hold while checkpoints are
    /// taken or restored.
    nets: Vec<NetHandle>,
    /// Timings of served operations.
    pub stats: Stats,
    /// Where snapshots get guest memory from, if the VM can be saved.
    snapshots: Option<SnapshotSetup>,
    /// Save the VM into the boot cache when the guest says it is ready.
    boot_cache: Option<(
        crate::boot_cache::PendingSave,
        Arc<crate::progress::Progress>,
    )>,
}

/// Most checkpoints one VM may hold at once.
pub const MAX_DEPTH: usize = 64;

impl Controller {
    /// A controller for a VM whose vCPU threads already run.
    pub fn new(
        vm: VmFd,
        vcpus: Vec<VcpuHandle>,
        events: EventReceiver,
        stop: Arc<AtomicBool>,
        memory: MemoryTracker,
        devices: Vec<SharedDevice>,
        vm_id: u32,
    ) -> Self {
        Self {
            vm,
            vcpus,
            events,
            deferred: VecDeque::new(),
            stop,
            stack: SpecStack::new(vm_id, MAX_DEPTH),
            memory,
            devices,
            vm_id,
            shadow_paging: false,
            shadow_reset: None,
            user_paused: false,
            publish: None,
            link: None,
            deps: Arc::default(),
            nets: Vec::new(),
            stats: Stats::default(),
            snapshots: None,
            boot_cache: None,
        }
    }

    /// Gives the controller the VM's net devices, its bridge port, and the
    /// dependency set their hooks read. The bridge says where this VM's
    /// speculation sequence numbers start, so they never repeat ids it has
    /// seen from an earlier VM with the same id.
    pub fn attach_network(
        &mut self,
        nets: Vec<NetHandle>,
        link: Option<BridgeLink>,
        deps: Arc<std::sync::Mutex<SharedDeps>>,
    ) {
        if let Some(l) = &link {
            self.stack = SpecStack::with_first_seq(self.vm_id, MAX_DEPTH, l.first_seq());
        }
        self.nets = nets;
        self.link = link;
        self.deps = deps;
    }

    /// Tells the controller that KVM shadows the guest's page tables, so
    /// rollbacks drop its shadow pages (`host_compat::shadow`).
    pub fn use_shadow_paging_reset(&mut self) {
        self.shadow_paging = true;
    }

    /// Sends speculation events to `tx` from now on.
    pub fn publish_to(&mut self, tx: tokio::sync::broadcast::Sender<SpecEvent>) {
        self.publish = Some(tx);
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
                depth: self.stack.depth(),
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
            self.pause_all().and_then(|()| {
                self.user_paused = true;
                self.serve()
            })
        } else {
            self.serve()
        };
        self.stop_all();
        r
    }

    fn next_event(&mut self) -> Result<VmEvent, ControlError> {
        if let Some(e) = self.deferred.pop_front() {
            return Ok(e);
        }
        self.events.recv().map_err(|_| ControlError::Gone)
    }

    fn serve(&mut self) -> Result<Outcome, ControlError> {
        loop {
            match self.next_event()? {
                VmEvent::GuestExit(code) => return Ok(Outcome::Exit(code)),
                VmEvent::GuestReset => return Ok(Outcome::Reset),
                VmEvent::Terminate(sig) => return Ok(Outcome::Signal(sig)),
                VmEvent::Fatal(m) => return Err(ControlError::Vcpu(m)),
                VmEvent::Hypercall { vcpu, op, arg } => {
                    self.mark_call(vcpu);
                    self.hypercall(vcpu, op, arg)?;
                }
                VmEvent::Parked(i) => {
                    // Parked with no operation under way (a late answer to
                    // an earlier pause): let it run on.
                    self.set_parked(i);
                    self.resume_all();
                }
                VmEvent::Reply(i, r) => tracing::warn!(vcpu = i, "unexpected reply {r:?}"),
                VmEvent::Join { ids } => self.join(ids)?,
                VmEvent::Bridge(ev) => self.bridge_event(ev)?,
                VmEvent::Api(call) => {
                    let resp = self.api(call.op, call.path)?;
                    let _ = call.reply.send(resp);
                }
            }
        }
    }

    fn mark_call(&mut self, vcpu: u8) {
        if let Some(h) = self.vcpus.get_mut(usize::from(vcpu)) {
            h.pending_call = true;
        }
    }

    fn set_parked(&mut self, vcpu: u8) {
        if let Some(h) = self.vcpus.get_mut(usize::from(vcpu)) {
            h.parked = true;
        }
    }

    /// Parks every vCPU at a clean instruction boundary, and holds the
    /// net devices' receive (their threads write guest memory).
    fn pause_all(&mut self) -> Result<(), ControlError> {
        for n in &self.nets {
            n.pause_rx();
        }
        for h in self.vcpus.iter().filter(|h| !h.parked && !h.pending_call) {
            h.attention.store(true, Ordering::Release);
            let _ = h.thread.kill(SIGRTMIN());
        }
        while self.vcpus.iter().any(|h| !h.parked) {
            match self.events.recv_timeout(KICK_INTERVAL) {
                Ok(VmEvent::Parked(i)) => self.set_parked(i),
                Ok(VmEvent::Fatal(m)) => return Err(ControlError::Vcpu(m)),
                Ok(e @ VmEvent::Hypercall { vcpu, .. }) => {
                    self.mark_call(vcpu);
                    self.deferred.push_back(e);
                }
                Ok(e) => self.deferred.push_back(e),
                Err(RecvTimeoutError::Timeout) => {
                    for h in self.vcpus.iter().filter(|h| !h.parked) {
                        let _ = h.thread.kill(SIGRTMIN());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ControlError::Gone),
            }
        }
        Ok(())
    }

    /// Waits until `vcpu`, which made a hypercall, has parked itself.
    fn wait_parked(&mut self, vcpu: u8) -> Result<(), ControlError> {
        let i = usize::from(vcpu);
        while !self.vcpus[i].parked {
            match self.events.recv().map_err(|_| ControlError::Gone)? {
                VmEvent::Parked(j) => self.set_parked(j),
                VmEvent::Fatal(m) => return Err(ControlError::Vcpu(m)),
                e @ VmEvent::Hypercall { vcpu, .. } => {
                    self.mark_call(vcpu);
                    self.deferred.push_back(e);
                }
                e => self.deferred.push_back(e),
            }
        }
        Ok(())
    }

    /// Lets every parked vCPU run on, except those whose hypercall waits;
    /// none while the host holds the VM paused.
    fn resume_all(&mut self) {
        if self.user_paused {
            return;
        }
        for n in &self.nets {
            n.resume_rx();
        }
        for h in self
            .vcpus
            .iter_mut()
            .filter(|h| h.parked && !h.pending_call)
        {
            let _ = h.cmds.send(VcpuCmd::Resume);
            h.parked = false;
        }
    }

    /// Sends `cmd` to parked vCPU `i` and waits for its answer.
    fn command(&mut self, i: usize, cmd: VcpuCmd) -> Result<VcpuReply, ControlError> {
        self.vcpus[i]
            .cmds
            .send(cmd)
            .map_err(|_| ControlError::Gone)?;
        loop {
            match self.events.recv().map_err(|_| ControlError::Gone)? {
                VmEvent::Reply(j, r) if usize::from(j) == i => {
                    return match r {
                        VcpuReply::Failed(m) => Err(ControlError::Vcpu(format!("vCPU {i}: {m}"))),
                        r => Ok(r),
                    }
                }
                VmEvent::Fatal(m) => return Err(ControlError::Vcpu(m)),
                e => self.deferred.push_back(e),
            }
        }
    }

    /// Serves a hypercall from `vcpu`, which is parked or parking.
    fn hypercall(&mut self, vcpu: u8, op: u32, arg: u64) -> Result<(), ControlError> {
        let t = Instant::now();
        // Only checkpoints and rollbacks need every vCPU stopped; the other
        // operations only read or rearrange the stack.
        let saving = op == op::READY && self.boot_cache.is_some();
        if matches!(op, op::SPECULATE | op::ABORT) || saving {
            self.pause_all()?;
        } else {
            self.wait_parked(vcpu)?;
        }
        let result = match op {
            op::SPECULATE => Some(match self.speculate(Some(vcpu))? {
                Ok(_) => [0, 0, 0],
                Err(e) => [e, 0, 0],
            }),
            op::COMMIT => Some(match self.commit(Some(vcpu)) {
                Ok(_) => [0, 0, 0],
                Err(e) => [e, 0, 0],
            }),
            op::ABORT => self
                .abort_own(reason::ABORTED_BY_GUEST, Some(vcpu))?
                .err()
                .map(|e| [e, 0, 0]),
            op::STATUS => {
                let entries = self.stack.entries();
                let own = entries.iter().filter(|e| e.explicit).count();
                Some([self.stack.depth() as u64, entries.len() as u64, own as u64])
            }
            op::ENTRY => Some(match self.stack.entries().get(arg as usize) {
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
        let i = usize::from(vcpu);
        // After a rollback the vCPU's registers are the checkpoint's, which
        // already hold the result; otherwise write it.
        if let Some(regs) = result {
            self.command(i, VcpuCmd::SetResult(regs))?;
        }
        self.vcpus[i].pending_call = false;
        self.resume_all();
        self.stats.record(op_name(op), t);
        Ok(())
    }

    /// Takes a checkpoint and pushes an explicit entry (rule 1). All vCPUs
    /// must be parked. The inner error is a hypercall error code.
    pub fn speculate(&mut self, caller: Option<u8>) -> Result<Result<SpecId, u64>, ControlError> {
        if let Err(StackError::TooDeep(_)) = self.stack.can_push() {
            return Ok(Err(err::TOO_DEEP));
        }
        let cp = self.checkpoint(caller)?;
        let id = self
            .stack
            .speculate(cp)
            .map_err(|e| ControlError::Vcpu(e.to_string()))?;
        tracing::info!(%id, depth = self.stack.depth(), "speculate");
        self.emit("speculate", id, caller);
        self.tell_bridge(netbridge::protocol::Control::Started { id: id.to_u64() });
        self.sync_deps();
        Ok(Ok(id))
    }

    /// Checkpoints memory (into the newest checkpoint's undo log), then
    /// saves the machine state for a new checkpoint.
    fn checkpoint(&mut self, caller: Option<u8>) -> Result<Checkpoint, ControlError> {
        let top = self.stack.top_mut().map(|c| &mut c.memory);
        let memory = self.memory.checkpoint(&self.vm, top)?;
        if let Some(d) = self.memory.take_materialize_time() {
            self.stats.record_duration("materialize", d);
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for i in 0..self.vcpus.len() {
            match self.command(i, VcpuCmd::Save)? {
                VcpuReply::Saved(s) => vcpus.push(s),
                r => {
                    return Err(ControlError::Vcpu(format!(
                        "vCPU {i}: expected its state, got {r:?}"
                    )))
                }
            }
        }
        let vm = vm_state::save(&self.vm)?;
        let devices = self.devices.iter().map(|d| lock(d).save_state()).collect();
        Ok(Checkpoint {
            vcpus,
            vm,
            devices,
            caller,
            memory,
        })
    }

    /// Commits the innermost own speculation (rule 5). The error is a
    /// hypercall error code.
    pub fn commit(&mut self, caller: Option<u8>) -> Result<SpecId, u64> {
        let id = self.stack.commit_own().map_err(|_| err::NO_SPECULATION)?;
        tracing::info!(%id, depth = self.stack.depth(), "commit");
        self.emit("commit", id, caller);
        self.resolved(id, netbridge::protocol::Outcome::Commit);
        Ok(id)
    }

    /// Aborts the innermost own speculation (rule 3): the VM rolls back, and
    /// the caller's registers become the checkpoint's. The inner error is a
    /// hypercall error code.
    pub fn abort_own(
        &mut self,
        why: u64,
        caller: Option<u8>,
    ) -> Result<Result<SpecId, u64>, ControlError> {
        let Some(id) = self.stack.top_explicit() else {
            return Ok(Err(err::NO_SPECULATION));
        };
        let rb = self
            .stack
            .abort_own()
            .map_err(|e| ControlError::Vcpu(e.to_string()))?;
        self.rollback(rb, why, caller)?;
        Ok(Ok(id))
    }

    /// Puts memory, devices and vCPUs back to the last checkpoint of `rb`.
    fn rollback(
        &mut self,
        rb: Rollback<Checkpoint>,
        why: u64,
        by: Option<u8>,
    ) -> Result<(), ControlError> {
        let popped = rb.checkpoints.iter().map(|c| &c.memory);
        self.memory.rollback(&self.vm, popped)?;
        if self.shadow_paging {
            let shadow_err = |e| ControlError::Vcpu(format!("dropping shadow page tables: {e}"));
            if self.shadow_reset.is_none() {
                self.shadow_reset = Some(ShadowReset::new(&self.vm).map_err(shadow_err)?);
            }
            if let Some(r) = &self.shadow_reset {
                r.drop_shadow_pages(&self.vm).map_err(shadow_err)?;
            }
        }
        let target = rb
            .checkpoints
            .into_iter()
            .last()
            .expect("a rollback has a target");
        vm_state::restore(&self.vm, &target.vm)?;
        for (d, s) in self.devices.iter().zip(&target.devices) {
            lock(d).restore_state(s).map_err(ControlError::Device)?;
        }
        for (i, mut s) in target.vcpus.into_iter().enumerate() {
            if target.caller == Some(i as u8) {
                set_result(&mut s, why);
            }
            self.command(i, VcpuCmd::Restore(s))?;
        }
        self.drop_held(&rb.aborted);
        let ids: Vec<String> = rb.aborted.iter().map(SpecId::to_string).collect();
        tracing::info!(aborted = ?ids, depth = self.stack.depth(), "rollback");
        for &id in &rb.aborted {
            self.emit("abort", id, by);
            self.resolved(id, netbridge::protocol::Outcome::Abort);
        }
        self.sync_deps();
        Ok(())
    }

    /// Stops every vCPU thread: raises the stop flag, lets parked ones go,
    /// and kicks the others out of KVM_RUN until each has ended.
    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Release);
        for h in self.vcpus.drain(..) {
            let _ = h.cmds.send(VcpuCmd::Resume);
            drop(h.cmds);
            while !h.thread.is_finished() {
                let _ = h.thread.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.thread.join();
        }
    }
}

/// Makes a restored `speculate` hypercall return `why`.
fn set_result(s: &mut VcpuState, why: u64) {
    s.regs.rax = why;
    s.regs.rdx = 0;
    s.regs.rsi = 0;
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
