//! virtio-net: an Ethernet card whose frames go to a [`backend::Backend`].
//!
//! Two queues: receive (0) and transmit (1). Every buffer starts with the
//! 12-byte `virtio_net_hdr_v1`, which this device neither needs nor fills
//! beyond `num_buffers` = 1: it offers no offloads. Transmit runs on the
//! vCPU thread that notifies; receive runs on a thread of its own that
//! waits on the backend and, when the guest has no buffer posted, keeps
//! the frame until the guest posts one.
//!
//! The device offers `VIRTIO_NET_F_MTU` with [`GUEST_MTU`]: 40 bytes below
//! Ethernet's 1500, so a router can add the speculation IP option
//! (`SPECULATIONS.md`) without fragmenting.

pub mod backend;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};

use super::{read_config_bytes, Interrupt, VirtioDevice, VirtioError, INT_VRING};
use crate::vstate::memory::GuestMemoryMmap;
use backend::Backend;

/// The MTU the guest is told to use.
pub const GUEST_MTU: u16 = 1500 - 40;
/// Size of `virtio_net_hdr_v1`.
const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const HDR_NUM_BUFFERS: usize = 10;
/// Largest frame we carry: Ethernet header, the MTU, and a VLAN tag.
const MAX_FRAME: usize = 1518 + 4;
/// Queue size offered for both queues.
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;
const S_LINK_UP: u16 = 1;
/// The virtio device ID of a network card.
const DEVICE_ID_NET: u32 = 1;

/// Queues and memory, once the driver has set them up.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<Interrupt>,
}

/// State shared with the receive thread.
struct Shared {
    active: Mutex<Option<Active>>,
    /// Signalled when the guest posts receive buffers or the device stops.
    posted: Condvar,
    /// Bumped at every activation and reset: a receive thread whose
    /// generation is no longer current ends.
    generation: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Option<Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The device.
pub struct Net {
    config: Vec<u8>,
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
}

impl Net {
    /// A network card with address `mac` on `backend`.
    pub fn new(mac: [u8; 6], backend: Arc<dyn Backend>) -> Self {
        // mac, status, max_virtqueue_pairs, mtu.
        let mut config = mac.to_vec();
        config.extend_from_slice(&S_LINK_UP.to_le_bytes());
        config.extend_from_slice(&1u16.to_le_bytes());
        config.extend_from_slice(&GUEST_MTU.to_le_bytes());
        Self {
            config,
            backend,
            shared: Arc::new(Shared {
                active: Mutex::new(None),
                posted: Condvar::new(),
                generation: AtomicU64::new(0),
            }),
        }
    }
}

/// Sends every frame the guest queued for transmission.
fn transmit(a: &mut Active, backend: &dyn Backend) {
    let mut used = false;
    while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
        let head = chain.head_index();
        let mut frame = Vec::new();
        match chain.reader(&a.mem) {
            Ok(mut r) => {
                if let Err(e) = r.read_to_end(&mut frame) {
                    tracing::warn!("virtio-net: reading a transmit buffer: {e}");
                }
            }
            Err(e) => tracing::warn!("virtio-net: bad transmit chain: {e}"),
        }
        if frame.len() > HDR_LEN {
            if let Err(e) = backend.send(&frame[HDR_LEN..]) {
                tracing::debug!("virtio-net: frame dropped: {e}");
            }
        }
        if let Err(e) = a.tx.add_used(&a.mem, head, 0) {
            tracing::warn!("virtio-net: returning a transmit buffer: {e}");
        }
        used = true;
    }
    if used && a.tx.needs_notification(&a.mem).unwrap_or(true) {
        a.irq.signal(INT_VRING);
    }
}

/// Puts `frame` into the guest's next receive buffer. Returns false when
/// the guest has none posted.
fn deliver(a: &mut Active, frame: &[u8]) -> bool {
    let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
        return false;
    };
    let head = chain.head_index();
    let mut hdr = [0u8; HDR_LEN];
    hdr[HDR_NUM_BUFFERS] = 1;
    let written = chain
        .writer(&a.mem)
        .map_err(|e| e.to_string())
        .and_then(|mut w| {
            w.write_all(&hdr).map_err(|e| e.to_string())?;
            // A buffer too small for the frame gets what fits.
            let n = w.available_bytes().min(frame.len());
            w.write_all(&frame[..n]).map_err(|e| e.to_string())?;
            Ok(HDR_LEN + n)
        });
    let len = written.unwrap_or_else(|e| {
        tracing::warn!("virtio-net: writing a receive buffer: {e}");
        0
    });
    if let Err(e) = a.rx.add_used(&a.mem, head, len as u32) {
        tracing::warn!("virtio-net: returning a receive buffer: {e}");
    }
    if a.rx.needs_notification(&a.mem).unwrap_or(true) {
        a.irq.signal(INT_VRING);
    }
    true
}

/// The receive thread: frames from the backend into the guest.
fn receive_loop(shared: Arc<Shared>, backend: Arc<dyn Backend>, generation: u64) {
    let mut buf = vec![0u8; MAX_FRAME];
    let stopped = || shared.generation.load(Ordering::Acquire) != generation;
    while !stopped() {
        let n = match backend.recv(&mut buf, Duration::from_millis(200)) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("virtio-net: backend receive failed, receive stops: {e}");
                return;
            }
        };
        let mut guard = shared.lock();
        loop {
            if stopped() {
                return;
            }
            if guard.as_mut().is_some_and(|a| deliver(a, &buf[..n])) {
                break;
            }
            // No buffer posted (or not active): wait for the guest.
            guard = shared
                .posted
                .wait_timeout(guard, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC | F_MTU | F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-net: configuration is read-only");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: Arc<Interrupt>,
        _features: u64,
    ) -> Result<(), VirtioError> {
        if queues.len() != 2 {
            return Err(VirtioError::Activate(format!(
                "{} queues, expected 2",
                queues.len()
            )));
        }
        let tx = queues.remove(TX);
        let rx = queues.remove(RX);
        *self.shared.lock() = Some(Active { mem, rx, tx, irq });
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let (shared, backend) = (self.shared.clone(), self.backend.clone());
        std::thread::Builder::new()
            .name("virtio-net-rx".into())
            .spawn(move || receive_loop(shared, backend, generation))
            .map(|_| ())
            .map_err(|e| VirtioError::Activate(e.to_string()))
    }

    fn notify(&mut self, index: u16) {
        match usize::from(index) {
            TX => {
                if let Some(a) = self.shared.lock().as_mut() {
                    transmit(a, self.backend.as_ref());
                }
            }
            RX => self.shared.posted.notify_all(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        *self.shared.lock() = None;
        self.shared.posted.notify_all();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
