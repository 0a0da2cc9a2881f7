//! Putting a saved machine into a freshly built VM, through the same
//! restore code that rollbacks use.
//!
//! Everything that can refuse is checked first (vCPU count, the device
//! list and each device's kind), so a snapshot that does not fit is
//! refused before any state is written: the VM is never half restored.

use std::mem::discriminant;

use kvm_bindings::{kvm_clock_data, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{now_ns, SnapshotError, VmSnapshot};
use crate::devices::bus::{lock, DeviceState, SharedDevice};
use crate::vstate::vcpu_state::{self, MSR_IA32_TSC};
use crate::vstate::vm_state;

/// Restores `snap` into a VM whose memory already holds the snapshot's,
/// whose vCPUs have not run, and whose devices were built as the
/// snapshot's were (network backends may differ).
///
/// First it waits for the check of the base memory layer (unless that
/// runs in the background), so no vCPU runs on memory that was not checked.
/// Order: the in-kernel irqchips and PIT first, so the local APIC state
/// the vCPUs restore meets its interrupt controllers; then the KVM clock;
/// then each vCPU (whose own order is explained in `vcpu_state::restore`)
/// and its TSC; the device models last.
pub fn restore_machine(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    devices: &[SharedDevice],
    snap: &VmSnapshot,
) -> Result<(), SnapshotError> {
    snap.memory_check.wait()?;
    check_fits(vcpus.len(), devices, snap)?;
    let elapsed = now_ns().saturating_sub(snap.saved_at_ns);
    vm_state::restore(vm, &snap.vm)?;
    set_clock(vm, snap.vm.clock.clock.saturating_add(elapsed))?;
    for (fd, s) in vcpus.iter().zip(&snap.vcpus) {
        vcpu_state::restore(fd, s)?;
        restore_tsc(fd, s, elapsed)?;
    }
    for (d, s) in devices.iter().zip(&snap.devices) {
        lock(d)
            .restore_state(s)
            .map_err(|e| SnapshotError::Mismatch(format!("restoring a device: {e}")))?;
    }
    Ok(())
}

/// Refuses to restore a Linux guest into a VMM whose host-compat layer is
/// not in the state the guest was saved in. A guest saved with it has its
/// LSTAR at the system-call trampoline, which only the layer serves, and
/// was booted with the layer's CPUID and command line; a guest saved
/// without it would bypass the trampoline, since its kernel does not write
/// LSTAR again. Bare guests use no trampoline and may go either way.
pub fn check_host_compat(snap: &VmSnapshot, compat_active: bool) -> Result<(), SnapshotError> {
    if !snap.linux {
        return Ok(());
    }
    match (&snap.trampoline, compat_active) {
        (Some(t), false) if t.installed() => Err(SnapshotError::Mismatch(format!(
            "the guest's LSTAR points at the host-compat system-call trampoline \
             (kernel entry {:#x}), and host compat is off now, so its system calls \
             would fail; restore with --host-compat on",
            t.kernel_lstar
        ))),
        (Some(_), false) => Err(SnapshotError::Mismatch(
            "the Linux guest was saved with host compat on (its CPUID and command line \
             are the layer's), and host compat is off now; restore with --host-compat on"
                .into(),
        )),
        (None, true) => Err(SnapshotError::Mismatch(
            "the Linux guest was saved with host compat off, and host compat is on now: \
             its system calls would bypass the trampoline; restore with --host-compat off"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Refuses a snapshot whose vCPUs or devices differ from the VM's.
fn check_fits(
    vcpus: usize,
    devices: &[SharedDevice],
    snap: &VmSnapshot,
) -> Result<(), SnapshotError> {
    if vcpus != snap.vcpus.len() {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot has {} vCPUs, the VM {vcpus}",
            snap.vcpus.len()
        )));
    }
    let have: Vec<DeviceState> = devices.iter().map(|d| lock(d).save_state()).collect();
    let kinds = |v: &[DeviceState]| -> Vec<&'static str> { v.iter().map(kind).collect() };
    let same = have.len() == snap.devices.len()
        && have
            .iter()
            .zip(&snap.devices)
            .all(|(a, b)| discriminant(a) == discriminant(b));
    if !same {
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot's devices are {:?}, this VM's {:?} (give as many --net devices as the saved VM had)",
            kinds(&snap.devices),
            kinds(&have)
        )));
    }
    Ok(())
}

fn kind(d: &DeviceState) -> &'static str {
    match d {
        DeviceState::Stateless => "stateless",
        DeviceState::Serial(_) => "serial",
        DeviceState::Net(_) => "virtio-net",
    }
}

/// Sets the KVM clock to `ns`: the saved clock plus the time the VM spent
/// on disk, so the guest's clock reads the present and never runs back.
fn set_clock(vm: &VmFd, ns: u64) -> Result<(), SnapshotError> {
    let c = kvm_clock_data {
        clock: ns,
        ..Default::default()
    };
    vm.set_clock(&c)
        .map_err(|e| vcpu_state::StateError("KVM_SET_CLOCK", e).into())
}

/// Moves the vCPU's TSC to the saved value plus `elapsed` ns at the
/// vCPU's TSC rate. `vcpu_state::restore` leaves the TSC alone (a rollback
/// keeps it running); a new VM's TSC starts near zero, which would make
/// the guest's time run backwards.
fn restore_tsc(fd: &VcpuFd, s: &vcpu_state::VcpuState, elapsed: u64) -> Result<(), SnapshotError> {
    let Some(saved) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC) else {
        return Ok(());
    };
    let khz = u64::from(fd.get_tsc_khz().unwrap_or(0));
    let ticks = (u128::from(elapsed) * u128::from(khz) / 1_000_000) as u64;
    let entry = kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: saved.data.saturating_add(ticks),
        ..Default::default()
    };
    let m = Msrs::from_entries(&[entry])
        .map_err(|_| SnapshotError::Corrupt("building the TSC MSR list".into()))?;
    fd.set_msrs(&m)
        .map_err(|e| vcpu_state::StateError("KVM_SET_MSRS (TSC)", e))?;
    Ok(())
}
