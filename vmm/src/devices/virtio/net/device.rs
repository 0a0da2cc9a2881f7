//! The virtio-net device model: queue 0 receives, queue 1 transmits.
//!
//! It offers VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and VIRTIO_NET_F_MTU, and
//! no offloads: every buffer starts with a 12-byte `virtio_net_hdr_v1` that
//! is all zeros, except `num_buffers` = 1 on receive.
//!
//! Transmit runs on the vCPU thread that notified the queue: each chain's
//! bytes after the header become one frame, which goes through the
//! [`FrameHook`] and then to the backend. Receive: frames from the backend
//! wait in a bounded queue ([`RX_PENDING_LIMIT`] frames; when it is full the
//! oldest is dropped and counted) until the guest has posted a buffer; each
//! goes through the hook right before it is written.
//!
//! The device's configuration space (virtio 1.x, 5.1.4):
//! `mac[6]` at 0, `status` (u16) at 6, `max_virtqueue_pairs` (u16) at 8 and
//! `mtu` (u16) at 10, little-endian.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::backend::Backend;
use super::{FrameHook, PassThrough, RxVerdict};
use crate::devices::virtio::{QueueContext, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The largest size of either queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which starts every buffer.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Length of an Ethernet header; shorter frames are dropped.
pub const ETH_HLEN: usize = 14;
/// Room for one 802.1Q tag on top of the MTU.
const VLAN_HLEN: usize = 4;
/// The MTU a driver assumes when it did not accept VIRTIO_NET_F_MTU.
const STANDARD_MTU: usize = 1500;
/// Frames waiting for receive buffers; past this the oldest is dropped.
pub const RX_PENDING_LIMIT: usize = 256;
/// The longest chain read or written (it bounds the work on chains that
/// loop through an indirect table; direct chains stop at the queue size).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;
/// Length of the configuration space.
const CONFIG_LEN: usize = 12;

/// Feature bits the device offers.
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MTU;

/// Why a descriptor chain was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A transmit chain with a device-writable descriptor.
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTx,
    /// A receive chain with a device-readable descriptor.
    #[error("device-readable descriptor in a receive chain")]
    ReadableInRx,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A buffer outside guest memory.
    #[error("buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    Memory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// A transmit chain with more bytes than the largest frame.
    #[error("transmit chain longer than {max} bytes")]
    TooLong {
        /// Header plus the largest frame.
        max: usize,
    },
    /// A transmit chain too short for the header and an Ethernet header.
    #[error("transmit chain of {0} bytes is too short for a frame")]
    TooShort(usize),
    /// A receive chain too small for the header and the frame.
    #[error("receive buffer of {have} bytes, {need} needed")]
    TooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes the chain has.
        have: usize,
    },
}

/// Counters of what the device did with frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the backend.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmit chains that broke the rules (see [`ChainError`]).
    pub tx_invalid: u64,
    /// Frames the hook dropped (or kept) on transmit.
    pub tx_hook_dropped: u64,
    /// Times transmit stopped because the hook could take no more frames
    /// (back-pressure from output commit).
    pub tx_stalls: u64,
    /// Frames the backend did not take (full or gone).
    pub tx_backend_dropped: u64,
    /// Frames written into the guest's buffers.
    pub rx_frames: u64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: u64,
    /// Frames dropped because the pending queue was full (oldest first).
    pub rx_overflow_dropped: u64,
    /// Frames the hook dropped on receive.
    pub rx_hook_dropped: u64,
    /// Frames dropped for their size: runts, over the MTU, larger than the
    /// guest's buffer, or cut by the backend.
    pub rx_size_dropped: u64,
    /// Receive chains returned unused because they broke the rules.
    pub rx_bad_buffers: u64,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    acked: u64,
    active: bool,
    backend: Arc<Backend>,
    hook: Box<dyn FrameHook>,
    pending: VecDeque<Vec<u8>>,
    rx_held: bool,
    /// Transmit stopped on the hook's back-pressure: chains wait in the
    /// queue until the next backend event finds the hook ready.
    tx_stalled: bool,
    stats: NetStats,
    tx_error_logged: bool,
}

/// What became of one receive attempt.
enum RxStep {
    /// A chain went to the used ring.
    Used,
    /// The frame was dropped; no chain was used.
    Dropped,
    /// Nothing more can be delivered now.
    Stop,
}

impl Net {
    /// A device with address `mac` offering `mtu`, sending through
    /// `backend`, with the [`PassThrough`] hook.
    pub fn new(mac: [u8; 6], mtu: u16, backend: Arc<Backend>) -> Self {
        Self {
            mac,
            mtu,
            acked: 0,
            active: false,
            backend,
            hook: Box::new(PassThrough),
            pending: VecDeque::new(),
            rx_held: false,
            tx_stalled: false,
            stats: NetStats::default(),
            tx_error_logged: false,
        }
    }

    /// The MAC address the device reports.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU the device offers.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Sets the configuration (for restoring a checkpoint).
    pub(super) fn set_config(&mut self, mac: [u8; 6], mtu: u16) {
        self.mac = mac;
        self.mtu = mtu;
    }

    /// The counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Replaces the frame hook.
    pub fn set_hook(&mut self, hook: Box<dyn FrameHook>) {
        self.hook = hook;
    }

    /// The backend frames are sent to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Frames waiting for receive buffers.
    pub fn pending_rx(&self) -> usize {
        self.pending.len()
    }

    /// Whether receive is held (paused, or deferred by the hook).
    pub fn rx_held(&self) -> bool {
        self.rx_held
    }

    /// Holds or releases receive. While held, frames queue up (bounded) and
    /// none is written into guest memory.
    pub fn set_rx_held(&mut self, held: bool) {
        self.rx_held = held;
    }

    /// Queues a received frame for the guest; when the queue is full the
    /// oldest frame is dropped and counted.
    pub fn enqueue_rx(&mut self, frame: Vec<u8>) {
        if self.pending.len() >= RX_PENDING_LIMIT {
            self.pending.pop_front();
            self.stats.rx_overflow_dropped += 1;
        }
        self.pending.push_back(frame);
    }

    /// Counts a frame the backend cut because it was too large.
    pub fn count_truncated_rx(&mut self) {
        self.stats.rx_size_dropped += 1;
    }

    /// The largest frame (from the Ethernet header on) either way.
    fn max_frame(&self) -> usize {
        let mtu = if self.acked & 1 << VIRTIO_NET_F_MTU != 0 {
            usize::from(self.mtu)
        } else {
            STANDARD_MTU
        };
        mtu + ETH_HLEN + VLAN_HLEN
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(TX_QUEUE) else {
            return Ok(());
        };
        let max = NET_HDR_LEN + self.max_frame();
        let mut used = 0u32;
        self.tx_stalled = false;
        // Only the chains available now: later ones come with their own
        // notification, and a bound keeps a racing driver from holding the
        // device forever.
        while used < u32::from(q.size()) {
            if !self.hook.tx_ready() {
                // Back-pressure: the chains stay available, and the next
                // backend event (NetHandle::resume_tx) comes back for them.
                let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
                if avail.0 != q.next_avail() {
                    self.tx_stalled = true;
                    self.stats.tx_stalls += 1;
                }
                break;
            }
            let Some(chain) = q.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let bytes = read_tx_chain(chain, mem, max);
            q.add_used(mem, head, 0)?;
            used += 1;
            match bytes {
                Ok(mut frame) => {
                    frame.drain(..NET_HDR_LEN);
                    self.transmit(frame);
                }
                Err(e) => {
                    self.stats.tx_invalid += 1;
                    tracing::debug!("virtio-net: dropping a transmit chain: {e}");
                }
            }
        }
        if used > 0 && q.needs_notification(mem)? {
            ctx.interrupt.signal_used();
        }
        Ok(())
    }

    fn transmit(&mut self, frame: Vec<u8>) {
        let Some(frame) = self.hook.on_tx(frame) else {
            self.stats.tx_hook_dropped += 1;
            return;
        };
        match self.backend.send(&frame) {
            Ok(()) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
            }
            Err(e) => {
                self.stats.tx_backend_dropped += 1;
                if e.kind() != std::io::ErrorKind::WouldBlock && !self.tx_error_logged {
                    self.tx_error_logged = true;
                    let name = self.backend.name();
                    tracing::warn!("virtio-net: sending to {name}: {e} (frames are dropped)");
                }
            }
        }
    }

    /// Writes waiting frames into the guest's receive buffers.
    fn deliver_pending(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(RX_QUEUE) else {
            return Ok(());
        };
        if !self.active || !q.ready() {
            return Ok(());
        }
        let mut used = 0u32;
        while used < u32::from(q.size()) {
            match self.deliver_one(q, mem)? {
                RxStep::Used => used += 1,
                RxStep::Dropped => {}
                RxStep::Stop => break,
            }
        }
        if used > 0 && q.needs_notification(mem)? {
            ctx.interrupt.signal_used();
        }
        Ok(())
    }

    fn deliver_one(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<RxStep, VirtioError> {
        if self.rx_held || self.pending.is_empty() {
            return Ok(RxStep::Stop);
        }
        let Some(chain) = q.iter(mem)?.next() else {
            return Ok(RxStep::Stop);
        };
        let max = self.max_frame();
        let Some(frame) = self.pending.front_mut() else {
            q.go_to_previous_position();
            return Ok(RxStep::Stop);
        };
        let verdict = if frame.len() < ETH_HLEN {
            None
        } else {
            Some(self.hook.on_rx(frame))
        };
        let too_big = frame.len() > max;
        match verdict {
            Some(RxVerdict::Deliver) if !too_big => {}
            Some(RxVerdict::DeferUntilCheckpoint) => {
                q.go_to_previous_position();
                self.rx_held = true;
                return Ok(RxStep::Stop);
            }
            Some(RxVerdict::Drop) => return Ok(self.drop_front(q, true)),
            _ => return Ok(self.drop_front(q, false)),
        }
        let head = chain.head_index();
        match write_rx_chain(chain, mem, frame) {
            Ok(len) => {
                q.add_used(mem, head, len)?;
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += (len as usize - NET_HDR_LEN) as u64;
                self.pending.pop_front();
            }
            Err(e @ ChainError::TooSmall { .. }) => {
                // Like a NIC whose buffer is too short: the frame is lost
                // and the buffer goes back empty, so the ring moves on.
                tracing::debug!("virtio-net: dropping a received frame: {e}");
                q.add_used(mem, head, 0)?;
                self.pending.pop_front();
                self.stats.rx_size_dropped += 1;
            }
            Err(e) => {
                // The buffer is broken, not the frame: return the buffer
                // empty and try the frame again in the next one.
                tracing::debug!("virtio-net: returning a receive chain unused: {e}");
                q.add_used(mem, head, 0)?;
                self.stats.rx_bad_buffers += 1;
            }
        }
        Ok(RxStep::Used)
    }

    /// Drops the frame at the head of the pending queue and gives back the
    /// chain that was taken for it.
    fn drop_front(&mut self, q: &mut Queue, by_hook: bool) -> RxStep {
        q.go_to_previous_position();
        self.pending.pop_front();
        if by_hook {
            self.stats.rx_hook_dropped += 1;
        } else {
            self.stats.rx_size_dropped += 1;
        }
        RxStep::Dropped
    }
}

/// Reads a transmit chain, header included, refusing more than `max` bytes.
fn read_tx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max: usize,
) -> Result<Vec<u8>, ChainError> {
    let mut bytes = Vec::new();
    for (n, desc) in chain.enumerate() {
        if n >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let len = desc.len() as usize;
        let start = bytes.len();
        if start + len > max {
            return Err(ChainError::TooLong { max });
        }
        bytes.resize(start + len, 0);
        mem.read_slice(&mut bytes[start..], desc.addr())
            .map_err(|_| ChainError::Memory {
                addr: desc.addr().0,
                len,
            })?;
    }
    if bytes.len() < NET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(bytes.len()));
    }
    Ok(bytes)
}

/// Writes the header and `frame` into a receive chain; returns the bytes
/// written.
fn write_rx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let mut buffers: Vec<(GuestAddress, usize)> = Vec::new();
    let mut have = 0usize;
    for (n, desc) in chain.enumerate() {
        if n >= MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(ChainError::ReadableInRx);
        }
        have = have.saturating_add(desc.len() as usize);
        buffers.push((desc.addr(), desc.len() as usize));
    }
    let need = NET_HDR_LEN + frame.len();
    if have < need {
        return Err(ChainError::TooSmall { need, have });
    }
    let mut data = vec![0u8; NET_HDR_LEN];
    data[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
    data.extend_from_slice(frame);
    let mut done = 0;
    for (addr, len) in buffers {
        let n = len.min(need - done);
        if n == 0 {
            continue;
        }
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| ChainError::Memory { addr: addr.0, len })?;
        done += n;
    }
    // `need` is at most 12 bytes more than a frame the backend could
    // receive (64 KiB), so it fits.
    Ok(u32::try_from(need).unwrap_or(u32::MAX))
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        NET_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only for a virtio 1.x driver.
        tracing::debug!(
            "virtio-net: ignored a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.acked = acked_features;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        // Pending frames stay: the guest has not seen them, and a driver
        // that comes back receives them like new ones.
        self.acked = 0;
        self.active = false;
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), VirtioError> {
        match index {
            RX_QUEUE => self.deliver_pending(ctx),
            TX_QUEUE => self.process_tx(ctx),
            _ => Ok(()),
        }
    }

    fn process_backend(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), VirtioError> {
        self.deliver_pending(ctx)?;
        // Not while receive is held: that is how the controller keeps the
        // device out of guest memory while it takes or restores a
        // checkpoint; resume_rx comes back here.
        if self.tx_stalled && !self.rx_held {
            self.process_tx(ctx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Net {
        let (a, _b) = Backend::pair().unwrap();
        Net::new([2, 0, 0, 0, 0, 7], 1460, Arc::new(a))
    }

    #[test]
    fn config_space_layout() {
        let n = net();
        let mut all = [0xffu8; 16];
        n.read_config(0, &mut all);
        assert_eq!(&all[..6], &[2, 0, 0, 0, 0, 7]);
        assert_eq!(
            u16::from_le_bytes([all[8], all[9]]),
            1,
            "max_virtqueue_pairs"
        );
        assert_eq!(u16::from_le_bytes([all[10], all[11]]), 1460);
        assert_eq!(&all[12..], &[0; 4], "past the end reads as zero");
        let mut mtu = [0u8; 2];
        n.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1460);
        let mut far = [0xffu8; 4];
        n.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn features_and_frame_limits() {
        let mut n = net();
        assert_eq!(n.device_features(), 1 << 32 | 1 << 5 | 1 << 3);
        n.activate(VIRTIO_F_VERSION_1).unwrap();
        assert_eq!(n.max_frame(), 1500 + 18, "MTU not negotiated");
        n.activate(NET_FEATURES).unwrap();
        assert_eq!(n.max_frame(), 1460 + 18);
    }

    #[test]
    fn pending_queue_drops_the_oldest() {
        let mut n = net();
        for i in 0..RX_PENDING_LIMIT + 3 {
            n.enqueue_rx(vec![i as u8; 60]);
        }
        assert_eq!(n.pending_rx(), RX_PENDING_LIMIT);
        assert_eq!(n.stats().rx_overflow_dropped, 3);
        assert_eq!(n.pending.front().unwrap()[0], 3);
    }
}
