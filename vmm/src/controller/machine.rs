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
use crate::spec::verify::VerifyMode;
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
    /// Checkpoint memory by copying all of it (the naive peer).
    pub full_copy: bool,
    /// Check dirty tracking after every flush and rollback
    /// (`SPECVM_VERIFY_MEMORY`, [`crate::spec::verify`]).
    pub verify: Option<VerifyMode>,
    /// Pages written since the last snapshot (for diff snapshots).
    pub dirty_since_snapshot: crate::snapshot::DirtyPages,
    /// Where snapshots get guest memory from.
    pub snapshots: Option<SnapshotSetup>,
    /// Timings of served operations.
    pub stats: Stats,
}

impl LiveMachine {
    /// Parks every vCPU, and holds the devices that write guest memory on
    /// their own threads.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        self.devices.hold_io();
        self.vcpus.pause_all()
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

    /// Flushes memory into the newest checkpoint's undo log (or copies it
    /// whole, for the naive peer), then saves the machine.
    fn take(
        &mut self,
        caller: Option<u8>,
        top: Option<&mut Checkpoint>,
    ) -> Result<Checkpoint, ControlError> {
        self.materialize()?;
        let full_copy = if self.full_copy {
            Some(self.memory.copy_all())
        } else {
            let dirty = self.memory.take_dirty(&self.vm.fd)?;
            self.dirty_since_snapshot.note(&dirty);
            let mut top = top;
            self.memory
                .flush(&dirty, top.as_mut().map(|c| &mut c.undo))?;
            self.verify_memory("checkpoint", top.map(|c| &mut c.undo))?;
            None
        };
        Ok(Checkpoint {
            machine: self.save()?,
            caller,
            undo: Default::default(),
            full_copy,
        })
    }

    /// Puts memory back to the last of `popped`, then the machine state
    /// through [`machine::restore`].
    fn put_back(&mut self, popped: Vec<Checkpoint>, why: u64) -> Result<(), ControlError> {
        match popped.last().and_then(|c| c.full_copy.as_ref()) {
            Some(copy) => self.memory.restore_all(copy)?,
            None => {
                let dirty = self.memory.take_dirty(&self.vm.fd)?;
                self.dirty_since_snapshot.note(&dirty);
                self.memory
                    .rollback(popped.iter().map(|c| &c.undo), &dirty)?;
                self.verify_memory("rollback", None)?;
            }
        }
        if let Some(c) = &self.compat {
            c.after_memory_rollback(&self.vm.fd)
                .map_err(|e| ControlError::Vcpu(format!("dropping shadow page tables: {e}")))?;
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
        machine::restore(
            &mut self.vm,
            &mut self.vcpus,
            &self.devices,
            target.machine,
            RestoreMode::Rollback,
        )?;
        Ok(())
    }

    /// Writes a hypercall's results into parked vCPU `i`'s registers.
    pub fn set_result(&mut self, i: usize, regs: [u64; 3]) -> Result<(), ControlError> {
        self.vcpus.command(i, VcpuCmd::SetResult(regs)).map(drop)
    }

    /// Gives a restored VM, whose memory still maps the snapshot, a memory
    /// file of its own before its first checkpoint: the speculation tracker
    /// writes into that file, and must never write into a snapshot.
    /// All vCPUs are paused.
    pub fn materialize(&mut self) -> Result<(), ControlError> {
        let Some(setup) = self.snapshots.as_mut() else {
            return Ok(());
        };
        let Some(base) = setup.lazy_base.take() else {
            return Ok(());
        };
        let t = Instant::now();
        let (memory, vm, since) = (&self.memory, &self.vm.fd, &mut self.dirty_since_snapshot);
        let flush = || {
            let dirty = memory.take_dirty(vm).map_err(|e| e.to_string())?;
            memory.flush(&dirty, None).map_err(|e| e.to_string())?;
            since.note(&dirty);
            Ok(())
        };
        crate::snapshot::memory::materialize(&setup.mem, &base, &setup.file, setup.mem_size, flush)
            .map_err(ControlError::Snapshot)?;
        tracing::info!(
            micros = t.elapsed().as_micros() as u64,
            "restored memory materialized"
        );
        self.stats.record("materialize", t);
        Ok(())
    }

    /// With `SPECVM_VERIFY_MEMORY`, looks for guest pages written without
    /// being reported dirty, right after a flush or a rollback (`when`),
    /// and logs them; in repair mode, makes them right: a checkpoint
    /// flushes them (into `undo`), a rollback drops them.
    fn verify_memory(
        &mut self,
        when: &str,
        undo: Option<&mut crate::spec::memory::UndoLog>,
    ) -> Result<(), ControlError> {
        let Some(mode) = self.verify else {
            return Ok(());
        };
        let missed = self
            .memory
            .unreported_pages()
            .map_err(|e| ControlError::Vcpu(format!("verifying guest memory: {e}")))?;
        if missed.is_empty() {
            tracing::info!(when, "verify: every written page was reported dirty");
            return Ok(());
        }
        let first: Vec<String> = missed
            .iter()
            .take(32)
            .map(|p| format!("{:#x}", self.memory.file_page_to_gpa(*p)))
            .collect();
        tracing::warn!(
            when,
            pages = missed.len(),
            gpas = ?first,
            "verify: pages written without being reported dirty"
        );
        if mode == VerifyMode::Repair {
            if when == "checkpoint" {
                self.memory.flush(&missed, undo)?;
            } else {
                self.memory.drop_pages(&missed)?;
            }
        }
        Ok(())
    }
}

impl Machine for LiveMachine {
    type Checkpoint = Checkpoint;

    fn checkpoint(
        &mut self,
        caller: Option<u8>,
        top: Option<&mut Checkpoint>,
    ) -> Result<Checkpoint, ControlError> {
        self.take(caller, top)
    }

    fn rollback(&mut self, popped: Vec<Checkpoint>, why: u64) -> Result<(), ControlError> {
        self.put_back(popped, why)
    }
}

/// Makes a restored `speculate` hypercall return `why`.
fn set_result(s: &mut VcpuState, why: u64) {
    s.regs.rax = why;
    s.regs.rdx = 0;
    s.regs.rsi = 0;
}
