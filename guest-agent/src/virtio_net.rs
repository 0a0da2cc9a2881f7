//! A polling virtio-net driver for bare guests: virtio-mmio version 2, one
//! receive and one transmit queue, no interrupts, no offloads.
//!
//! The driver needs two things from its caller:
//! - the device's register window, through [`Mmio`] ([`PhysMmio`] in a bare
//!   guest, which identity-maps the MMIO hole: the first virtio slot is at
//!   [`FIRST_SLOT_BASE`]);
//! - [`DMA_SIZE`] bytes of memory that the device can reach, through
//!   [`Dma`]: where the driver writes them and the guest-physical address
//!   the device sees (the same number in a bare guest).
//!
//! It accepts VIRTIO_F_VERSION_1, and VIRTIO_NET_F_MAC and VIRTIO_NET_F_MTU
//! when offered. Each queue has [`QUEUE_SIZE`] entries, each buffer is
//! [`BUFFER_SIZE`] bytes, so frames of up to [`MAX_FRAME`] bytes fit. The
//! memory holds, from its start: one page of rings per queue (descriptor
//! table at 0, available ring at 0x100, used ring at 0x200), then the
//! receive buffers, then the transmit buffers.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::virtio_mmio::{
    self as transport, TransportError, AVAIL_OFFSET, DESC_F_WRITE, DESC_OFFSET, REG_CONFIG,
    REG_QUEUE_NOTIFY, USED_OFFSET,
};
pub use crate::virtio_mmio::{Mmio, PhysMmio, FIRST_SLOT_BASE};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 16;
/// Bytes per buffer (header and frame).
pub const BUFFER_SIZE: usize = 4096;
/// The virtio-net header (`virtio_net_hdr_v1`) before every frame.
pub const NET_HDR_LEN: usize = 12;
/// The longest frame the buffers hold.
pub const MAX_FRAME: usize = BUFFER_SIZE - NET_HDR_LEN;
/// Bytes of rings for one queue.
const RING_AREA: usize = 4096;
const QSIZE: usize = QUEUE_SIZE as usize;
/// Bytes of memory the driver needs.
pub const DMA_SIZE: usize = 2 * RING_AREA + 2 * QSIZE * BUFFER_SIZE;

const RX: usize = 0;
const TX: usize = 1;
const NET_DEVICE_ID: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_MTU: u64 = 1 << 3;
/// How often `send` polls for a free transmit buffer before giving up.
const TX_SPIN_LIMIT: u32 = 1 << 20;

/// Why the driver could not set up the device or send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No virtio-mmio device: the magic value read back.
    BadMagic(u32),
    /// Not virtio-mmio version 2.
    BadVersion(u32),
    /// A virtio device, but not a network card: its device id.
    NotNet(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device refused the features (FEATURES_OK did not stick).
    FeaturesRefused,
    /// A queue is missing or smaller than [`QUEUE_SIZE`].
    QueueTooSmall {
        /// The queue.
        queue: u16,
        /// Its maximum size.
        max: u32,
    },
    /// The device asks for a reset (status bit DEVICE_NEEDS_RESET).
    NeedsReset,
    /// A frame longer than [`MAX_FRAME`].
    FrameTooLong(usize),
    /// No transmit buffer came back in time.
    TxFull,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(v) => write!(f, "no virtio-mmio device (magic {v:#x})"),
            Self::BadVersion(v) => write!(f, "virtio-mmio version {v}, not 2"),
            Self::NotNet(id) => write!(f, "virtio device type {id}, not a network card"),
            Self::NoVersion1 => f.write_str("device does not offer VIRTIO_F_VERSION_1"),
            Self::FeaturesRefused => f.write_str("device refused the features"),
            Self::QueueTooSmall { queue, max } => {
                write!(f, "queue {queue} holds {max} entries, {QUEUE_SIZE} needed")
            }
            Self::NeedsReset => f.write_str("device needs a reset"),
            Self::FrameTooLong(n) => write!(f, "frame of {n} bytes (max {MAX_FRAME})"),
            Self::TxFull => f.write_str("no transmit buffer came back"),
        }
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::BadMagic(v) => Self::BadMagic(v),
            TransportError::BadVersion(v) => Self::BadVersion(v),
            TransportError::OtherDevice(id) => Self::NotNet(id),
            TransportError::NoVersion1 => Self::NoVersion1,
            TransportError::FeaturesRefused => Self::FeaturesRefused,
            TransportError::QueueTooSmall { queue, max } => Self::QueueTooSmall { queue, max },
            TransportError::NeedsReset => Self::NeedsReset,
        }
    }
}

/// Memory shared with the device: where the driver sees it and where the
/// device does ([`crate::dma::Dma`] of [`DMA_SIZE`] bytes).
pub type Dma = crate::dma::Dma<DMA_SIZE>;

/// Where things are in the DMA memory.
const fn ring(queue: usize) -> usize {
    queue * RING_AREA
}

const fn buffer(queue: usize, index: usize) -> usize {
    2 * RING_AREA + (queue * QSIZE + index) * BUFFER_SIZE
}

/// A virtio-net device, set up and running.
pub struct VirtioNet<M: Mmio> {
    mmio: M,
    dma: Dma,
    features: u64,
    mac: [u8; 6],
    mtu: Option<u16>,
    rx_used: u16,
    rx_avail: u16,
    tx_used: u16,
    tx_avail: u16,
    tx_busy: u32,
}

impl<M: Mmio> VirtioNet<M> {
    /// Resets the device behind `mmio`, negotiates, sets up both queues in
    /// `dma`, posts every receive buffer and starts the device.
    pub fn new(mmio: M, dma: Dma) -> Result<Self, Error> {
        let features = transport::begin(&mmio, NET_DEVICE_ID, F_MAC | F_MTU)?;
        for offset in (0..DMA_SIZE).step_by(8) {
            dma.write(offset, 0u64);
        }
        let mut dev = Self {
            mmio,
            dma,
            features,
            mac: [0; 6],
            mtu: None,
            rx_used: 0,
            rx_avail: 0,
            tx_used: 0,
            tx_avail: 0,
            tx_busy: 0,
        };
        dev.setup_queue(RX)?;
        dev.setup_queue(TX)?;
        for i in 0..QUEUE_SIZE {
            dev.post_rx(i);
        }
        transport::start(&dev.mmio)?;
        dev.mmio.write32(REG_QUEUE_NOTIFY, RX as u32);
        dev.read_config();
        Ok(dev)
    }

    /// The device's MAC address (zeros if it offers none).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU the device offers, if it does.
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// The features both sides agreed on.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the device asks for a reset.
    pub fn needs_reset(&self) -> bool {
        transport::needs_reset(&self.mmio)
    }

    fn setup_queue(&mut self, queue: usize) -> Result<(), Error> {
        let area = ring(queue);
        let dma = &self.dma;
        transport::setup_queue(
            &self.mmio,
            queue as u16,
            QUEUE_SIZE,
            dma.phys(area),
            |flags| dma.write(area + AVAIL_OFFSET, flags),
        )?;
        Ok(())
    }

    fn read_config(&mut self) {
        let features = self.features;
        (self.mac, self.mtu) = transport::read_config(&self.mmio, |m| {
            let mut mac = [0; 6];
            if features & F_MAC != 0 {
                for (i, b) in mac.iter_mut().enumerate() {
                    *b = m.read8(REG_CONFIG + i);
                }
            }
            let mtu = (features & F_MTU != 0)
                .then(|| u16::from_le_bytes([m.read8(REG_CONFIG + 10), m.read8(REG_CONFIG + 11)]));
            (mac, mtu)
        });
    }

    /// Writes descriptor `index` of `queue`.
    fn set_desc(&self, queue: usize, index: u16, len: u32, flags: u16) {
        let at = ring(queue) + DESC_OFFSET + 16 * usize::from(index);
        let addr = self.dma.phys(buffer(queue, usize::from(index)));
        self.dma.write(at, addr);
        self.dma.write(at + 8, len);
        self.dma.write(at + 12, flags);
        self.dma.write(at + 14, 0u16);
    }

    /// Makes descriptor `head` available on `queue` (without notifying).
    fn publish(&mut self, queue: usize, head: u16) {
        let idx = if queue == RX {
            &mut self.rx_avail
        } else {
            &mut self.tx_avail
        };
        let slot = ring(queue) + AVAIL_OFFSET + 4 + 2 * usize::from(*idx % QUEUE_SIZE);
        self.dma.write(slot, head);
        *idx = idx.wrapping_add(1);
        let new_idx = *idx;
        // The ring entry (and the buffer before it) must be visible before
        // the index that publishes them.
        fence(Ordering::SeqCst);
        self.dma.write(ring(queue) + AVAIL_OFFSET + 2, new_idx);
        fence(Ordering::SeqCst);
    }

    fn post_rx(&mut self, index: u16) {
        self.set_desc(RX, index, BUFFER_SIZE as u32, DESC_F_WRITE);
        self.publish(RX, index);
    }

    fn used_idx(&self, queue: usize) -> u16 {
        let idx = self.dma.read(ring(queue) + USED_OFFSET + 2);
        // Read the index before the element and buffer it covers.
        fence(Ordering::SeqCst);
        idx
    }

    /// The used element at position `pos`: (descriptor id, length).
    fn used_elem(&self, queue: usize, pos: u16) -> (u32, u32) {
        let at = ring(queue) + USED_OFFSET + 4 + 8 * usize::from(pos % QUEUE_SIZE);
        (self.dma.read(at), self.dma.read(at + 4))
    }

    fn reclaim_tx(&mut self) {
        let used = self.used_idx(TX);
        while self.tx_used != used {
            let (id, _) = self.used_elem(TX, self.tx_used);
            if id < u32::from(QUEUE_SIZE) {
                self.tx_busy &= !(1 << id);
            }
            self.tx_used = self.tx_used.wrapping_add(1);
        }
    }

    fn free_tx_slot(&mut self) -> Result<u16, Error> {
        for _ in 0..TX_SPIN_LIMIT {
            self.reclaim_tx();
            if let Some(i) = (0..QUEUE_SIZE).find(|i| self.tx_busy & (1 << i) == 0) {
                return Ok(i);
            }
            if self.needs_reset() {
                return Err(Error::NeedsReset);
            }
            core::hint::spin_loop();
        }
        Err(Error::TxFull)
    }

    /// Sends one frame (from the Ethernet header on).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        if frame.len() > MAX_FRAME {
            return Err(Error::FrameTooLong(frame.len()));
        }
        let slot = self.free_tx_slot()?;
        let buf = buffer(TX, usize::from(slot));
        for i in 0..NET_HDR_LEN {
            self.dma.write(buf + i, 0u8);
        }
        for (i, b) in frame.iter().enumerate() {
            self.dma.write(buf + NET_HDR_LEN + i, *b);
        }
        self.set_desc(TX, slot, (NET_HDR_LEN + frame.len()) as u32, 0);
        self.tx_busy |= 1 << slot;
        self.publish(TX, slot);
        self.mmio.write32(REG_QUEUE_NOTIFY, TX as u32);
        Ok(())
    }

    /// Takes the next received frame, if one is waiting: copies it into
    /// `buf` (cut to its length) and returns the bytes copied. The buffer
    /// goes back to the device at once.
    pub fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        while self.rx_used != self.used_idx(RX) {
            let (id, len) = self.used_elem(RX, self.rx_used);
            self.rx_used = self.rx_used.wrapping_add(1);
            let Ok(id) = u16::try_from(id) else { continue };
            if id >= QUEUE_SIZE {
                continue;
            }
            let data = (len as usize).min(BUFFER_SIZE).saturating_sub(NET_HDR_LEN);
            let n = data.min(buf.len());
            let from = buffer(RX, usize::from(id)) + NET_HDR_LEN;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.dma.read(from + i);
            }
            self.post_rx(id);
            self.mmio.write32(REG_QUEUE_NOTIFY, RX as u32);
            if data > 0 {
                return Some(n);
            }
        }
        None
    }
}
