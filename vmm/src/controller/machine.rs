//! The running machine as the speculation engine sees it: the VM, its
//! vCPUs, guest memory and devices, paused, saved and put back together.

use std::time::Instant;

use super::engine::Machine;
use super::snapshot::SnapshotSetup;
use super::vcpus::VcpuSet;
use super::{ControlError, Stats};
use crate::device_manager::DeviceManager;
use crate::event::VcpuCmd;
use crate::host_compat::HostCompat;
use crate::machine::{self, MachineState, RestoreMode};
use crate::persist::Persist;
use crate::spec::checkpoint::Checkpoint;
use crate::spec::memory::MemoryTracker;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

/// The VM and everything a checkpoint saves of it.
pub struct LiveMachine {
    /// The KVM VM.
    pub vm: Vm,
    /// The vCPU threads.
    pub vcpus: VcpuSet,
    /// Guest memory's checkpoints.
    pub memory: MemoryTracker,
    /// The devices.
    pub devices: DeviceManager,
    /// The host-compat layer, when active.
    pub compat: Option<HostCompat>,
    /// Where snapshots get guest memory from.
    pub snapshots: Option<SnapshotSetup>,
    /// Timings of served operations.
    pub stats: Stats,
}

impl LiveMachine {
    /// Parks every vCPU, and holds the devices that write guest memory on
    /// their own threads. With `save`, because a checkpoint or snapshot
    /// follows, the vCPUs save their state as they park.
    pub fn pause(&mut self, save: bool) -> Result<(), ControlError> {
        self.devices.hold_io();
        self.vcpus.pause_all(save)
    }

    /// [`LiveMachine::pause`] for a hypercall that changes the machine (a
    /// `speculate` or an `abort`): the calling vCPU is out of KVM_RUN, so
    /// the memory step starts without waiting for it to park (and, for a
    /// `speculate`, to save its state); the save, or the first command to
    /// it, waits ([`VcpuSet::pause_running`]).
    pub fn pause_for_call(&mut self, save: bool) -> Result<(), ControlError> {
        self.devices.hold_io();
        self.vcpus.pause_running(save)
    }

    /// Lets the devices and every parked vCPU run on (but a vCPU whose
    /// hypercall waits).
    pub fn resume(&mut self) {
        self.devices.release_io();
        self.vcpus.resume_all();
    }

    /// The machine's state now. Everything is paused.
    pub fn save(&mut self) -> Result<MachineState, ControlError> {
        Ok(MachineState {
            vcpus: self.vcpus.save_all()?,
            vm: self.vm.save()?,
            devices: self.devices.save().map_err(machine::MachineError::from)?,
        })
    }

    /// Checkpoints memory (the tracker flushes the pages written since
    /// the newest checkpoint `top` into its log, or copies memory whole
    /// for the naive peer), then saves the machine. (Saving the vCPUs
    /// while memory is checkpointed was measured: no faster here, see
    /// docs/benchmarks/checkpoint.md.) A speculation also opens the
    /// disks' levels ([`Machine::checkpoint`]); a snapshot takes
    /// [`LiveMachine::capture_for_snapshot`] instead.
    pub fn capture(
        &mut self,
        caller: Option<u8>,
        top: Option<&mut Checkpoint>,
    ) -> Result<Checkpoint, ControlError> {
        let t = Instant::now();
        let memory = self
            .memory
            .checkpoint(&self.vm.fd, top.map(|c| &mut c.memory))?;
        self.stats.record("checkpoint.memory", t);
        self.record_memory_times();
        let t = Instant::now();
        let machine = self.save()?;
        self.stats.record("checkpoint.state", t);
        let mut calls = self.vcpus.waiting_calls();
        // The caller's `speculate` is answered by this checkpoint: a
        // rollback here gives it its second return, not a second serving.
        if let Some(c) = caller.and_then(|c| calls.get_mut(usize::from(c))) {
            *c = None;
        }
        Ok(Checkpoint {
            machine,
            caller,
            calls,
            memory,
        })
    }

    /// Readies memory for a snapshot (harvesting the dirty pages, which
    /// the snapshot then reads where they are, see
    /// [`MemoryTracker::prepare_snapshot`]), then saves the machine.
    /// Everything is paused.
    pub fn capture_for_snapshot(&mut self) -> Result<MachineState, ControlError> {
        let t = Instant::now();
        self.memory.prepare_snapshot(&self.vm.fd)?;
        self.stats.record("snapshot.memory", t);
        self.record_memory_times();
        let t = Instant::now();
        let machine = self.save()?;
        self.stats.record("snapshot.state", t);
        Ok(machine)
    }

    /// Puts memory back to the last of `popped`, then the machine state
    /// through [`machine::restore`]. (This host's shadow reset stays before
    /// the vCPUs' restore: run at the same time as it, it took twice as
    /// long, since the memory-slot change waits for their ioctls.)
    fn put_back(
        &mut self,
        popped: Vec<Checkpoint>,
        level: usize,
        why: u64,
    ) -> Result<(), ControlError> {
        let t = Instant::now();
        self.memory
            .rollback(&self.vm.fd, popped.iter().map(|c| &c.memory))?;
        self.stats.record("rollback.memory", t);
        self.record_harvest();
        self.devices
            .rollback_levels(level)
            .map_err(crate::machine::MachineError::from)?;
        if let Some(c) = &self.compat {
            let t = Instant::now();
            c.after_memory_rollback(&self.vm.fd)
                .map_err(|e| ControlError::Vcpu(format!("dropping shadow page tables: {e}")))?;
            self.stats.record("rollback.shadow_reset", t);
        }
        let mut target = popped
            .into_iter()
            .last()
            .ok_or_else(|| ControlError::Vcpu("a rollback without a checkpoint".into()))?;
        if let Some(s) = target
            .caller
            .and_then(|c| target.machine.vcpus.get_mut(usize::from(c)))
        {
            set_result(s, why);
        }
        let t = Instant::now();
        machine::restore(
            &mut self.vm,
            &mut self.vcpus,
            &self.devices,
            target.machine,
            RestoreMode::Rollback,
        )?;
        self.vcpus.after_rollback(&target.calls);
        self.stats.record("rollback.state", t);
        Ok(())
    }

    /// Notes how long the tracker's last materialization (if any) and
    /// harvest of dirty pages took.
    fn record_memory_times(&mut self) {
        if let Some(d) = self.memory.take_materialize_time() {
            self.stats.record_duration("materialize", d);
        }
        self.record_harvest();
    }

    /// Notes how long the tracker's last harvest of dirty pages took.
    fn record_harvest(&mut self) {
        if let Some(d) = self.memory.take_harvest_time() {
            self.stats.record_duration("dirty.harvest", d);
        }
    }

    /// Writes a hypercall's results into parked vCPU `i`'s registers.
    pub fn set_result(&mut self, i: usize, regs: [u64; 3]) -> Result<(), ControlError> {
        self.vcpus.tell(i, VcpuCmd::SetResult(regs))
    }
}

impl Machine for LiveMachine {
    type Checkpoint = Checkpoint;

    fn checkpoint(
        &mut self,
        caller: Option<u8>,
        top: Option<&mut Checkpoint>,
    ) -> Result<Checkpoint, ControlError> {
        let cp = self.capture(caller, top)?;
        self.devices.push_levels();
        Ok(cp)
    }

    fn rollback(
        &mut self,
        popped: Vec<Checkpoint>,
        level: usize,
        why: u64,
    ) -> Result<(), ControlError> {
        self.put_back(popped, level, why)
    }

    fn fold(&mut self, level: usize) -> Result<(), ControlError> {
        self.devices
            .fold_levels(level)
            .map_err(crate::machine::MachineError::from)?;
        Ok(())
    }
}

/// Makes a restored `speculate` hypercall return `why`.
fn set_result(s: &mut VcpuState, why: u64) {
    s.regs.rax = why;
    s.regs.rdx = 0;
    s.regs.rsi = 0;
}
