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
//!   `fwait`).
//!
//! It is active when [`detect`] says so: `--host-compat on|off|auto`; auto
//! turns it on for `kvm_pvm`, or when the CPU shows neither VMX nor SVM.

pub mod cpuid;
pub mod emulate;

use std::path::Path;

use kvm_ioctls::VcpuFd;

use crate::config::HostCompatMode;

pub use emulate::describe;

/// The active compatibility layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCompat {
    _private: (),
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
        emulate::complete(vcpu, insn)
    }
}

/// Formats bytes as lower-case hex pairs separated by spaces.
pub fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
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
