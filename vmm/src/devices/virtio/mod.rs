//! Virtio devices: a device model behind the generic virtio-mmio transport
//! ([`mmio::MmioTransport`]), with queues from the `virtio-queue` crate.
//!
//! A device sees only its queues, its configuration space and its
//! interrupt; the transport owns the register protocol (feature
//! negotiation, queue setup, status, reset).

pub mod mmio;
pub mod net;
pub mod setup;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// Errors of virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver set up a queue that is not valid in guest memory.
    #[error("virtio queue {0} is not valid (size, alignment, or addresses outside guest memory)")]
    BadQueue(usize),
    /// The device could not start its worker.
    #[error("activating the virtio device: {0}")]
    Activate(String),
    /// An eventfd could not be created.
    #[error("creating a virtio interrupt eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A device's interrupt: the transport's interrupt-status register and the
/// eventfd that KVM turns into the device's GSI (an irqfd).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt that raises `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in the interrupt status and raises the interrupt.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: raising the interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 for a network card).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads its configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up and the features
    /// it accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
        features: u64,
    ) -> Result<(), VirtioError>;
    /// The driver notified queue `index`.
    fn notify(&mut self, index: u16);
    /// The driver reset the device: stop using the queues.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of `config` at `offset`; bytes past its end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let mut d = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], 9, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        i.signal(INT_VRING);
        assert_eq!(i.status(), INT_VRING);
        assert_eq!(i.evt.read().unwrap(), 1);
        i.ack(INT_VRING);
        assert_eq!(i.status(), 0);
    }
}
