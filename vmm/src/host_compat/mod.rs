//! Host-KVM compatibility: everything specvm does only because the host's
//! KVM is not hardware virtualization.
//!
//! On the machines this project runs on, `/dev/kvm` is `kvm_pvm`, a
//! page-table-based KVM without VMX or SVM (see `shared/design/HOST-KVM.md`).
//! Guest kernel code is emulated instruction by instruction, and the
//! emulator cannot run some instructions at all. This module holds every
//! workaround for that, so the rest of the VMM stays a standard KVM VMM:
//! - [`cpuid`]: a reduced guest CPUID that hides what the emulator cannot
//!   run (the host's `KVM_GET_SUPPORTED_CPUID` advertises it anyway);
//! - [`emulate`]: completion, in the VMM, of instructions that end
//!   `KVM_RUN` with an emulation failure (`int3`, `int n`, `clac`/`stac`,
//!   `fwait`);
//! - [`cmdline`]: the Linux command-line options this host needs;
//! - [`trampoline`]: the system-call trampoline that lets guest user mode
//!   enter the kernel, which `syscall` alone does not do here.
//!
//! It is active when [`detect`] says so: `--host-compat on|off|auto`; auto
//! turns it on for `kvm_pvm`, or when the CPU shows neither VMX nor SVM.

pub mod cmdline;
pub mod cpuid;
pub mod dirty;
pub mod emulate;
pub mod shadow;
pub mod trampoline;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};

use crate::arch::x86_64::layout::COMPAT_DOORBELL_ADDR;
use crate::config::HostCompatMode;
use crate::devices::{Bus, BusError};
use crate::sync::lock;
use crate::vstate::memory::GuestMemoryMmap;
use trampoline::{Doorbell, Trampoline, TrampolineError, TrampolineState};

pub use emulate::describe;

/// Errors setting up or running the layer's workarounds.
#[derive(Debug, thiserror::Error)]
pub enum HostCompatError {
    /// The system-call trampoline failed.
    #[error(transparent)]
    Trampoline(#[from] TrampolineError),
    /// The doorbell could not be placed on the MMIO bus.
    #[error("host compat: placing the trampoline doorbell: {0}")]
    Bus(#[from] BusError),
    /// A KVM call failed while completing an instruction.
    #[error("host compat: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
}

/// Counts of what the layer did, for progress reports.
#[derive(Debug, Default)]
pub struct CompatStats {
    /// Instructions completed for the emulator.
    pub completed: AtomicU64,
    /// Of those, `int3` and `int n` (each injects an event).
    pub int: AtomicU64,
    /// Of those, `clac` and `stac`.
    pub clac_stac: AtomicU64,
    /// System calls carried into the kernel by the trampoline.
    pub syscalls: AtomicU64,
    /// Filtered MSR writes performed.
    pub msr_writes: AtomicU64,
}

/// The active compatibility layer.
#[derive(Debug, Clone, Default)]
pub struct HostCompat {
    trampoline: Option<Arc<Trampoline>>,
    stats: Arc<CompatStats>,
    /// The memory slot whose deletion drops KVM's shadow page tables,
    /// made at the first rollback ([`shadow`]).
    shadow: Arc<Mutex<Option<shadow::ShadowReset>>>,
}

/// Why the layer is on or off, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// Whether the layer is active.
    pub active: bool,
    /// What decided it.
    pub reason: String,
}

/// Decides whether the layer is active for `mode` on this host.
pub fn detect(mode: HostCompatMode) -> Detection {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    decide(mode, Path::new("/sys/module/kvm_pvm").exists(), &cpuinfo)
}

/// The decision of [`detect`], from what it read off the host.
pub fn decide(mode: HostCompatMode, pvm_loaded: bool, cpuinfo: &str) -> Detection {
    let d = |active, reason: &str| Detection {
        active,
        reason: reason.into(),
    };
    match mode {
        HostCompatMode::On => d(true, "--host-compat on"),
        HostCompatMode::Off => d(false, "--host-compat off"),
        HostCompatMode::Auto if pvm_loaded => d(
            true,
            "the host's KVM is kvm_pvm (no hardware virtualization)",
        ),
        HostCompatMode::Auto => {
            let hw = cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
            if hw {
                d(false, "the CPU has VMX or SVM")
            } else {
                d(
                    true,
                    "the CPU has neither VMX nor SVM, so KVM is not hardware virtualization",
                )
            }
        }
    }
}

impl HostCompat {
    /// The layer, ready for use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Completes the instruction `insn` that the host's emulator could not
    /// run, on `vcpu`. Returns false if it is not one this layer completes.
    pub fn complete(&self, vcpu: &VcpuFd, insn: &[u8]) -> Result<bool, kvm_ioctls::Error> {
        let Some(done) = emulate::complete(vcpu, insn)? else {
            return Ok(false);
        };
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        let kind = match done {
            emulate::Insn::Int3 | emulate::Insn::IntN(_) => &self.stats.int,
            emulate::Insn::Clac | emulate::Insn::Stac => &self.stats.clac_stac,
            emulate::Insn::Fwait => return Ok(true),
        };
        kind.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// What the layer has done so far.
    pub fn stats(&self) -> &CompatStats {
        &self.stats
    }

    /// The Linux command line with the options this host needs added.
    pub fn linux_cmdline(&self, cmdline: &str) -> String {
        cmdline::apply(cmdline)
    }

    /// Prepares a Linux guest's system-call trampoline: its pages in guest
    /// memory, the MSR filter that tells when to install it, and the
    /// doorbell on the MMIO bus.
    pub fn prepare_linux(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
    ) -> Result<(), HostCompatError> {
        trampoline::write_pages(mem)?;
        trampoline::install_msr_filter(vm)?;
        mmio.insert_internal(Arc::new(Mutex::new(Doorbell)), COMPAT_DOORBELL_ADDR, 0x1000)?;
        self.trampoline = Some(Arc::new(Trampoline::new()));
        Ok(())
    }

    /// Called after guest memory was put back from the host side (a
    /// rollback): where KVM shadows the guest's page tables, as it does on
    /// the hosts this layer serves, the shadows of the rolled-back page
    /// tables must go ([`shadow`]).
    pub fn after_memory_rollback(&self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        let mut slot = lock(&self.shadow);
        if slot.is_none() {
            *slot = Some(shadow::ShadowReset::new(vm)?);
        }
        match slot.as_ref() {
            Some(r) => r.drop_shadow_pages(vm),
            None => Ok(()),
        }
    }

    /// The system-call trampoline's state, for a snapshot: None unless
    /// [`HostCompat::prepare_linux`] set the trampoline up.
    pub fn save_trampoline(&self) -> Option<TrampolineState> {
        self.trampoline.as_ref().map(|t| t.save())
    }

    /// Gives the trampoline, set up by [`HostCompat::prepare_linux`], the
    /// state a snapshot saved. Returns false if there is no trampoline.
    pub fn restore_trampoline(&self, s: &TrampolineState) -> bool {
        match &self.trampoline {
            Some(t) => {
                t.restore(s);
                true
            }
            None => false,
        }
    }

    /// The guest's write of a filtered MSR (a `KVM_EXIT_X86_WRMSR`).
    pub fn on_wrmsr(
        &self,
        vcpu: &VcpuFd,
        mem: &GuestMemoryMmap,
        index: u32,
        data: u64,
    ) -> Result<(), HostCompatError> {
        let Some(t) = &self.trampoline else {
            return Err(TrampolineError::Kvm(
                "unexpected KVM_EXIT_X86_WRMSR without a trampoline",
                kvm_ioctls::Error::new(libc::EINVAL),
            )
            .into());
        };
        self.stats.msr_writes.fetch_add(1, Ordering::Relaxed);
        if t.on_wrmsr(vcpu, mem, index, data)? {
            tracing::info!(
                kernel_entry = format_args!("{data:#x}"),
                "host compat: LSTAR points at the system-call trampoline"
            );
        }
        Ok(())
    }

    /// The trampoline's doorbell rang on `vcpu`: enter the kernel.
    pub fn enter_kernel(&self, vcpu: &VcpuFd) -> Result<(), HostCompatError> {
        let Some(t) = &self.trampoline else {
            return Ok(());
        };
        if self.stats.syscalls.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!("host compat: first system call from guest user mode");
        }
        Ok(t.enter_kernel(vcpu)?)
    }
}

/// Formats bytes as lower-case hex pairs separated by spaces.
pub fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl crate::persist::Persist for HostCompat {
    type State = Option<TrampolineState>;
    type Error = std::convert::Infallible;

    /// The system-call trampoline's state, if the layer set one up.
    fn save(&self) -> Result<Self::State, Self::Error> {
        Ok(self.save_trampoline())
    }

    /// Gives the trampoline (set up by [`HostCompat::prepare_linux`]) the
    /// kernel's MSR values a snapshot saved.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error> {
        if let Some(t) = state {
            self.restore_trampoline(t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_host() {
        assert!(decide(HostCompatMode::Auto, true, "flags : vmx").active);
        assert!(!decide(HostCompatMode::Auto, false, "flags\t: fpu vmx sse").active);
        assert!(!decide(HostCompatMode::Auto, false, "flags\t: fpu svm").active);
        assert!(decide(HostCompatMode::Auto, false, "flags\t: fpu sse hypervisor").active);
        assert!(decide(HostCompatMode::On, false, "flags : vmx").active);
        assert!(!decide(HostCompatMode::Off, true, "").active);
    }

    #[test]
    fn hex() {
        assert_eq!(hex_bytes(&[0xf3, 0x48, 0x0f]), "f3 48 0f");
    }
}
