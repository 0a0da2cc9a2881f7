//! Puts virtio-mmio devices into a VM: each gets a register window in the
//! MMIO gap, an interrupt line (an irqfd on its own GSI), and an entry in
//! the list the ACPI DSDT is built from.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, WINDOW_SIZE};
use super::net::backend::{connect_socket, open_tap, Backend, BackendError};
use super::net::Net;
use super::{Interrupt, VirtioDevice, VirtioError};
use crate::arch::x86_64::acpi::VirtioMmioDesc;
use crate::arch::x86_64::layout::VIRTIO_MMIO_BASE;
use crate::config::{NetBackendConfig, NetConfig};
use crate::devices::{Bus, BusError};
use crate::vstate::memory::GuestMemoryMmap;

/// The first GSI given to virtio devices: above the 16 ISA interrupts, so
/// none is shared.
pub const FIRST_GSI: u32 = 16;
/// How many virtio devices fit: the I/O APIC has 24 pins.
pub const MAX_DEVICES: usize = 8;

/// Errors attaching virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// More devices than interrupt lines.
    #[error("{0} virtio devices: at most {MAX_DEVICES}")]
    TooMany(usize),
    /// A backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The device's interrupt could not be set up.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// KVM refused the irqfd.
    #[error("registering the irqfd of virtio device {0} on GSI {1}: {2}")]
    Irqfd(usize, u32, kvm_ioctls::Error),
    /// The register window could not be placed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A MAC address for card `index` of VM `vm_id`: locally administered,
/// unicast.
pub fn default_mac(vm_id: u32, index: usize) -> [u8; 6] {
    let id = vm_id.to_be_bytes();
    [0x52, 0x54, id[2], id[3], 0x00, index as u8 + 1]
}

fn open_backend(b: &NetBackendConfig) -> Result<Arc<dyn Backend>, SetupError> {
    Ok(match b {
        NetBackendConfig::Socket(p) => Arc::new(connect_socket(p)?),
        NetBackendConfig::Tap(n) => Arc::new(open_tap(n)?),
    })
}

/// Attaches one virtio-net card per entry of `nets`; returns what the
/// DSDT must describe.
pub fn attach_net(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    nets: &[NetConfig],
    vm_id: u32,
) -> Result<Vec<VirtioMmioDesc>, SetupError> {
    if nets.len() > MAX_DEVICES {
        return Err(SetupError::TooMany(nets.len()));
    }
    let mut descs = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        let mac = n.mac.unwrap_or_else(|| default_mac(vm_id, i));
        let dev = Net::new(mac, open_backend(&n.backend)?);
        let desc = attach(vm, mem, mmio, i, Box::new(dev))?;
        tracing::info!(
            base = format_args!("{:#x}", desc.base),
            gsi = desc.gsi,
            mac = format_args!("{}", mac.map(|b| format!("{b:02x}")).join(":")),
            "virtio-net on {:?}",
            n.backend
        );
        descs.push(desc);
    }
    Ok(descs)
}

/// Places `device` as virtio device number `index`.
fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<VirtioMmioDesc, SetupError> {
    let gsi = FIRST_GSI + index as u32;
    let base = VIRTIO_MMIO_BASE + index as u64 * WINDOW_SIZE;
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| SetupError::Irqfd(index, gsi, e))?;
    let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(evt)));
    mmio.insert(Arc::new(Mutex::new(transport)), base, WINDOW_SIZE)?;
    Ok(VirtioMmioDesc {
        base: base as u32,
        size: WINDOW_SIZE as u32,
        gsi,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_macs_are_local_unicast_and_distinct() {
        let a = default_mac(0x1234, 0);
        let b = default_mac(0x1234, 1);
        assert_ne!(a, b);
        assert_eq!(a[0] & 1, 0, "unicast");
        assert_ne!(a[0] & 2, 0, "locally administered");
    }
}
