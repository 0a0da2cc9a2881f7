//! Virtio devices on the virtio-mmio transport (version 2, "modern").
//!
//! The pieces:
//! - [`VirtioDevice`]: what a device model provides (type, features, queue
//!   sizes, configuration space, queue processing).
//! - [`mmio::MmioTransport`]: the virtio-mmio register file around one
//!   device; it is the [`BusDevice`](crate::devices::BusDevice) that goes on the MMIO bus.
//! - [`net`]: the virtio-net device, its backends (a Unix `SOCK_SEQPACKET`
//!   socket carrying one frame per message, a TAP interface) and the
//!   [`net::FrameHook`] that the speculation work plugs into.
//!
//! # Integration (builder, CLI, checkpoints)
//!
//! Slot `i` (0, 1, …) of the virtio-mmio window lives at
//! [`mmio_slot_base`]`(i)` = [`VIRTIO_MMIO_BASE`] + `i` × [`VIRTIO_MMIO_SIZE`]
//! and interrupts on GSI [`virtio_gsi`]`(i)` = [`VIRTIO_GSI_BASE`] + `i`.
//! For one `--net` device in slot `i`:
//!
//! ```ignore
//! let mut net_cfg: NetConfig = "socket=/run/bridge.sock,mtu=1460".parse()?;
//! net_cfg.mac = Some(net_cfg.mac_or_default(vm_id, i as u8));
//! let irq = EventFd::new(libc::EFD_NONBLOCK)?;
//! vm.fd.register_irqfd(&irq, virtio_gsi(i))?;          // KVM_IRQFD
//! let (dev, handle) = new_net(net_cfg, ram.mem.clone(), irq)?;
//! mmio.insert(dev.clone(), mmio_slot_base(i), VIRTIO_MMIO_SIZE)?;
//! devices.push(dev);                                     // checkpointed
//! // keep `handle` alive as long as the VM: dropping it stops receiving
//! ```
//!
//! - [`net::new_net`]`(config: NetConfig, mem: GuestMemoryMmap, irq: EventFd)
//!   -> Result<(SharedDevice, NetHandle), VirtioError>`. The [`SharedDevice`]
//!   goes on the MMIO bus; [`net::NetHandle`] controls receive (pause/resume
//!   around checkpoints, the hook, statistics).
//! - `--net` values parse with `NetConfig::from_str`: `socket=PATH` or
//!   `tap=NAME`, then optional `mac=xx:xx:xx:xx:xx:xx` and `mtu=N` (default
//!   [`net::DEFAULT_MTU`], 1460, leaving room for the 40-byte IPv4 tag
//!   option). Without `mac=`, fill one in with
//!   [`net::NetConfig::default_mac`]`(vm_id, slot)` so that VMs on one bridge
//!   differ.
//! - Checkpoints and snapshots: each device's `persist.rs` implements
//!   [`crate::persist::Persist`] for its transport (the transport's own
//!   part is [`persist`]), and the device manager
//!   ([`crate::device_manager`]) saves and restores every device through it.
//! - While the vCPUs are paused for a checkpoint or a rollback, bracket the
//!   memory and device work with [`net::NetHandle::pause_rx`] /
//!   [`net::NetHandle::resume_rx`]: the receive thread writes guest memory,
//!   and must not do so between the memory snapshot and the device snapshot.
//! - The speculation hook ([`net::NetHandle::set_hook`]) must strip the
//!   IPv4 tag in `on_rx`: a tagged full-size packet is up to 40 bytes over
//!   the guest's MTU, and the device drops received frames longer than
//!   MTU + 18 (the spec forbids passing them once VIRTIO_NET_F_MTU is
//!   negotiated).
//! - Linux guests find the device with `virtio_mmio.device=4K@0xd0000000:5`
//!   on the kernel command line (one per slot) or an ACPI/DT entry.
//!
//! Note: [`VIRTIO_MMIO_BASE`] equals `guest_agent::abi::UNCLAIMED_MMIO`,
//! the address the `badinsn` test guest relies on having no device. That
//! only matters for a VM that has both a virtio device and that test.
//!
//! # Guest memory
//! Devices touch guest memory only through vm-memory (`Bytes` and
//! virtio-queue, which uses it), so every byte they write shows in the dirty
//! bitmap that speculation checkpoints rely on.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;

#[cfg(test)]
pub(crate) mod test_driver;

use std::io;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub use crate::devices::bus::SharedDevice;
pub use mmio::{MmioTransport, QueueRegs, SavedQueue, TransportState};
pub use net::{new_net, NetConfig, NetHandle, NetState};

/// Guest-physical base of the first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot (registers and configuration space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSI of the first virtio-mmio slot; slot `i` uses `VIRTIO_GSI_BASE + i`.
/// Above the 16 ISA interrupts, so no line is shared with a legacy device.
pub const VIRTIO_GSI_BASE: u32 = 16;
/// How many slots there are: the IOAPIC's pins 16..=23.
pub const VIRTIO_MAX_SLOTS: u32 = 8;

/// The guest-physical base of virtio-mmio slot `slot`.
pub const fn mmio_slot_base(slot: u32) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE
}

/// The GSI that virtio-mmio slot `slot` interrupts on.
pub const fn virtio_gsi(slot: u32) -> u32 {
    VIRTIO_GSI_BASE + slot
}

/// Copies the configuration space bytes at `offset` into `data`; bytes
/// past its end (or an offset that does not fit) read as zero, as the
/// [`VirtioDevice::read_config`] contract says.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
    }
}

/// Feature bit: the device follows virtio 1.x (required here; no legacy).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors of the virtio devices and transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A virtqueue operation failed: the driver's rings are inconsistent.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// A saved state does not fit this device.
    #[error("invalid virtio state: {0}")]
    InvalidState(String),
    /// The net device could not be set up.
    #[error("virtio-net: {0}")]
    Net(#[from] net::NetError),
    /// An eventfd could not be created or cloned.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    /// A device thread could not be started.
    #[error("starting a device thread: {0}")]
    Thread(io::Error),
}

/// The device's interrupt line: the interrupt status register and the
/// eventfd that KVM turns into an interrupt on the device's GSI (irqfd).
#[derive(Debug)]
pub struct Interrupt {
    status: u32,
    evt: EventFd,
}

/// Interrupt status bit 0: a used ring was updated.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit 1: the configuration (or NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = 2;

impl Interrupt {
    /// An interrupt line that signals through `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self { status: 0, evt }
    }

    /// Sets `bits` in the interrupt status and pulses the line. The pulse
    /// is sent even when a bit was already set: a spurious interrupt costs
    /// the driver one status read, a missed one can stall it.
    pub fn raise(&mut self, bits: u32) {
        self.status |= bits;
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: signalling the interrupt eventfd: {e}");
        }
    }

    /// Signals that a used ring was updated.
    pub fn signal_used(&mut self) {
        self.raise(INT_USED_RING);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&mut self, bits: u32) {
        self.status &= !bits;
    }

    /// Sets the status register (for restoring a checkpoint); no pulse.
    pub fn set_status(&mut self, status: u32) {
        self.status = status & (INT_USED_RING | INT_CONFIG);
    }

    /// The eventfd behind the line.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets to process its queues: guest memory, the queues (by
/// index, ready or not) and the interrupt line.
pub struct QueueContext<'a> {
    /// Guest memory; every access goes through vm-memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, in order. A queue whose `ready()` is false was
    /// not set up by the driver and must be left alone.
    pub queues: &'a mut [Queue],
    /// The interrupt line.
    pub interrupt: &'a mut Interrupt,
}

/// A virtio device model, as the transport drives it.
///
/// Every method runs with the transport's lock held, on a vCPU thread (for
/// register accesses) or a device thread (for backend events). Whatever the
/// guest wrote is untrusted: methods return errors, they never panic on it.
pub trait VirtioDevice: Send {
    /// The virtio device type (1 for a network card).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn device_features(&self) -> u64;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The driver reads `data.len()` bytes at `offset` in the configuration
    /// space. Bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with `acked_features`, or a checkpoint with
    /// DRIVER_OK set was restored. Must not touch guest memory (on restore,
    /// memory may not be restored yet).
    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError>;
    /// The driver reset the device (or a checkpoint without DRIVER_OK was
    /// restored): forget the negotiation and stop using the queues.
    fn reset(&mut self);
    /// The driver notified queue `index` (a ready queue of an active device).
    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), VirtioError>;
    /// Host-side work is waiting (for example received frames); called by
    /// the device's own threads through the transport, only when active.
    fn process_backend(&mut self, _ctx: &mut QueueContext<'_>) -> Result<(), VirtioError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_gsis() {
        assert_eq!(mmio_slot_base(0), 0xd000_0000);
        assert_eq!(mmio_slot_base(2), 0xd000_2000);
        assert_eq!(virtio_gsi(0), 16);
        assert_eq!(virtio_gsi(VIRTIO_MAX_SLOTS - 1), 23);
        assert_eq!(
            mmio_slot_base(0),
            guest_agent::virtio_net::FIRST_SLOT_BASE,
            "the bare-guest driver looks for the first slot here"
        );
    }

    #[test]
    fn interrupt_status_and_pulse() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut irq = Interrupt::new(evt.try_clone().unwrap());
        irq.signal_used();
        irq.raise(INT_CONFIG);
        assert_eq!(irq.status(), 3);
        assert_eq!(evt.read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.set_status(0xff);
        assert_eq!(irq.status(), 3, "only defined bits survive a restore");
    }
}
