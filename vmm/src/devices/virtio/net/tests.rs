//! The net device driven through its MMIO registers by a driver written
//! into fake guest memory, with a socket pair as the network.

use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::backend::tests::recv_wait;
use super::device::{NET_FEATURES, NET_HDR_LEN};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::CONFIG_OFFSET;
use crate::devices::virtio::test_driver::*;
use crate::devices::virtio::{INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::sync::lock;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
const RX_RING: u64 = 0x1_0000;
const TX_RING: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const QSIZE: u16 = 16;
const WAIT: Duration = Duration::from_secs(5);

struct Harness {
    handle: NetHandle,
    peer: Backend,
    mem: GuestMemoryMmap,
    irq: EventFd,
    rx: Ring,
    tx: Ring,
}

impl Harness {
    /// A device set up by a well-behaved driver.
    fn new() -> Self {
        let h = Self::bare();
        h.init(NET_FEATURES, QSIZE.into());
        h
    }

    /// A device nobody has touched yet.
    fn bare() -> Self {
        let mem = test_memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (dev_end, peer) = Backend::pair().unwrap();
        let (_, handle) =
            new_net_with_backend(dev_end, MAC, 1460, mem.clone(), irq.try_clone().unwrap())
                .unwrap();
        Self {
            handle,
            peer,
            mem,
            irq,
            rx: Ring::new(RX_RING, QSIZE),
            tx: Ring::new(TX_RING, QSIZE),
        }
    }

    fn bus(&self) -> MutexGuard<'_, MmioTransport<Net>> {
        lock(self.handle.transport())
    }

    fn w(&self, reg: u32, v: u32) {
        w32(&mut *self.bus(), reg, v);
    }

    fn r(&self, reg: u32) -> u32 {
        r32(&mut *self.bus(), reg)
    }

    fn init(&self, features: u64, rx_num: u32) {
        self.w(VIRTIO_MMIO_STATUS, 0);
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        for (i, ring) in [self.rx.with_size(rx_num), self.tx].iter().enumerate() {
            self.w(VIRTIO_MMIO_QUEUE_SEL, i as u32);
            ring.program(&mut *self.bus());
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    fn post_rx(&self, desc: u16, len: u32, flags: u16) {
        let addr = RX_BUFS + u64::from(desc) * 0x1000;
        self.rx.set_desc(&self.mem, desc, addr, len, flags, 0);
        self.rx.push_avail(&self.mem, desc);
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    fn send(&self, desc: u16, frame: &[u8]) {
        let addr = TX_BUFS + u64::from(desc) * 0x1000;
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        self.tx
            .set_desc(&self.mem, desc, addr, bytes.len() as u32, 0, 0);
        self.tx.push_avail(&self.mem, desc);
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    }

    /// Waits until `ring`'s used index reaches `n`.
    fn wait_used(&self, ring: &Ring, n: u16) -> bool {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if ring.used_idx(&self.mem) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn rx_bytes(&self, desc: u16, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        let addr = RX_BUFS + u64::from(desc) * 0x1000;
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn stats(&self) -> NetStats {
        self.handle.stats()
    }

    fn status(&self) -> u32 {
        self.r(VIRTIO_MMIO_STATUS)
    }
}

/// An Ethernet frame of `len` bytes whose payload is `tag` repeated.
fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

#[test]
fn config_space_through_the_registers() {
    let h = Harness::bare();
    assert_eq!(h.r(VIRTIO_MMIO_DEVICE_ID), 1);
    let mut cfg = [0u8; 12];
    h.bus().read(CONFIG_OFFSET, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1460);
    h.bus().write(CONFIG_OFFSET, &[0xff; 6]);
    h.bus().read(CONFIG_OFFSET, &mut cfg);
    assert_eq!(&cfg[..6], &MAC, "the MAC is read-only");
}

#[test]
fn transmitted_frames_reach_the_backend() {
    let h = Harness::new();
    let f = frame(60, 0x11);
    h.send(0, &f);
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), f);
    assert_eq!(h.tx.used_idx(&h.mem), 1);
    assert_eq!(h.tx.used_elem(&h.mem, 0), (0, 0));
    assert_ne!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_USED_RING, 0);
    assert!(h.irq.read().unwrap() >= 1);
    // Any layout: the header split over two descriptors, the frame over two.
    let big = frame(1478, 0x22);
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend_from_slice(&big);
    h.mem.write_slice(&bytes, GuestAddress(TX_BUFS)).unwrap();
    for (i, (from, to)) in [(0, 5), (5, 700), (700, bytes.len())].iter().enumerate() {
        let flags = if i < 2 { F_NEXT } else { 0 };
        let len = (to - from) as u32;
        h.tx.set_desc(
            &h.mem,
            2 + i as u16,
            TX_BUFS + *from as u64,
            len,
            flags,
            3 + i as u16,
        );
    }
    h.tx.push_avail(&h.mem, 2);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), big);
    let s = h.stats();
    assert_eq!((s.tx_frames, s.tx_invalid), (2, 0));
}

#[test]
fn received_frames_reach_the_guest_and_dirty_its_memory() {
    let h = Harness::new();
    let f = frame(100, 0x33);
    h.peer.send(&f).unwrap();
    // No buffer yet: the frame waits in the device.
    let end = Instant::now() + WAIT;
    while h.bus().device().pending_rx() == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    h.post_rx(0, 2048, F_WRITE);
    assert!(h.wait_used(&h.rx, 1));
    let (id, len) = h.rx.used_elem(&h.mem, 0);
    assert_eq!((id, len), (0, (NET_HDR_LEN + f.len()) as u32));
    let got = h.rx_bytes(0, len);
    assert_eq!(&got[..10], &[0; 10], "no offloads: an empty header");
    assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
    assert_eq!(&got[12..], &f[..]);
    let region = h.mem.find_region(GuestAddress(RX_BUFS)).unwrap();
    assert!(region.bitmap().dirty_at(RX_BUFS as usize), "rx buffer");
    assert!(region.bitmap().dirty_at(h.rx.used as usize), "used ring");
    // A frame that arrives while a buffer waits goes straight in.
    h.post_rx(1, 2048, F_WRITE);
    h.peer.send(&frame(64, 0x44)).unwrap();
    assert!(h.wait_used(&h.rx, 2));
    assert_eq!(h.stats().rx_frames, 2);
    assert_ne!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_USED_RING, 0);
}

#[test]
fn receive_drops_runts_oversize_frames_and_frames_larger_than_the_buffer() {
    let h = Harness::new();
    h.handle.inject_rx(vec![1; 10]);
    h.handle.inject_rx(frame(1460 + 18 + 1, 0x55));
    h.handle.inject_rx(frame(1000, 0x56));
    h.handle.inject_rx(frame(1460 + 18, 0x57));
    h.post_rx(0, 500, F_WRITE); // too small for the 1000-byte frame
    h.post_rx(1, 2048, F_WRITE);
    assert!(h.wait_used(&h.rx, 2));
    assert_eq!(
        h.rx.used_elem(&h.mem, 0),
        (0, 0),
        "the short buffer came back empty"
    );
    assert_eq!(h.rx.used_elem(&h.mem, 1), (1, (NET_HDR_LEN + 1478) as u32));
    let s = h.stats();
    assert_eq!((s.rx_size_dropped, s.rx_frames), (3, 1));
    assert_eq!(h.status() & NEEDS_RESET, 0);
}

#[test]
fn pending_frames_are_bounded() {
    let h = Harness::new();
    for i in 0..RX_PENDING_LIMIT + 10 {
        h.handle.inject_rx(frame(60, i as u8));
    }
    assert_eq!(h.bus().device().pending_rx(), RX_PENDING_LIMIT);
    assert_eq!(h.stats().rx_overflow_dropped, 10);
    h.post_rx(0, 2048, F_WRITE);
    assert!(h.wait_used(&h.rx, 1));
    assert_eq!(h.rx_bytes(0, 27)[26], 10, "the oldest frames went first");
}

/// Rewrites transmitted frames, drops some, defers one received frame.
struct TestHook {
    deferred_once: bool,
}

impl FrameHook for TestHook {
    fn on_tx(&mut self, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        if frame[14] == 0xdd {
            return None;
        }
        frame.push(0xee);
        Some(frame)
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        match frame[14] {
            0xd0 => RxVerdict::Drop,
            0xde if !self.deferred_once => {
                self.deferred_once = true;
                RxVerdict::DeferUntilCheckpoint
            }
            _ => {
                frame.truncate(frame.len() - 4);
                RxVerdict::Deliver
            }
        }
    }
}

#[test]
fn the_hook_sees_rewrites_drops_and_defers_frames() {
    let h = Harness::new();
    h.handle.set_hook(Box::new(TestHook {
        deferred_once: false,
    }));
    h.send(0, &frame(60, 0xdd));
    h.send(1, &frame(60, 0x01));
    let mut want = frame(60, 0x01);
    want.push(0xee);
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), want);
    assert_eq!(h.stats().tx_hook_dropped, 1);

    h.post_rx(0, 2048, F_WRITE);
    h.post_rx(1, 2048, F_WRITE);
    h.handle.inject_rx(frame(64, 0xd0));
    h.handle.inject_rx(frame(64, 0xde));
    h.handle.inject_rx(frame(64, 0x02));
    assert!(h.bus().device().rx_held(), "deferred until resumed");
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    assert_eq!(h.bus().device().pending_rx(), 2);
    h.handle.resume_rx();
    assert!(h.wait_used(&h.rx, 2));
    assert_eq!(
        h.rx.used_elem(&h.mem, 0).1,
        (NET_HDR_LEN + 60) as u32,
        "stripped"
    );
    assert_eq!(h.rx_bytes(0, 27)[26], 0xde);
    assert_eq!(h.stats().rx_hook_dropped, 1);
}

#[test]
fn pause_holds_receive_until_resume() {
    let h = Harness::new();
    h.post_rx(0, 2048, F_WRITE);
    h.handle.pause_rx();
    h.peer.send(&frame(60, 0x66)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(
        h.rx.used_idx(&h.mem),
        0,
        "a notify does not bypass the pause"
    );
    h.handle.resume_rx();
    assert!(h.wait_used(&h.rx, 1));
}

#[test]
fn hostile_transmit_chains_are_returned_and_counted() {
    let h = Harness::new();
    let outside = 0xd000_0000;
    // Outside guest memory; a writable buffer; a loop of 100-byte
    // descriptors; a loop of empty ones; an indirect table outside memory;
    // nothing but a header.
    let chains: [(u64, u32, u16, u16); 6] = [
        (outside, 100, 0, 0),
        (TX_BUFS, 100, F_WRITE, 0),
        (TX_BUFS, 100, F_NEXT, 2),
        (TX_BUFS, 0, F_NEXT, 3),
        (outside, 32, F_INDIRECT, 0),
        (TX_BUFS, NET_HDR_LEN as u32, 0, 0),
    ];
    for (i, (addr, len, flags, next)) in chains.iter().enumerate() {
        h.tx.set_desc(&h.mem, i as u16, *addr, *len, *flags, *next);
        h.tx.push_avail(&h.mem, i as u16);
    }
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(h.tx.used_idx(&h.mem), chains.len() as u16);
    assert_eq!(h.stats().tx_invalid, chains.len() as u64);
    assert_eq!(h.status() & NEEDS_RESET, 0);
    assert!(recv_wait(&h.peer, Duration::from_millis(50)).is_none());
    // The device still works.
    h.send(7, &frame(60, 0x77));
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), frame(60, 0x77));
}

#[test]
fn hostile_receive_chains_are_returned_and_the_frame_kept() {
    let h = Harness::new();
    h.handle.inject_rx(frame(60, 0x88));
    h.post_rx(0, 2048, 0); // device-readable
    let outside = 0xd000_0000;
    h.rx.set_desc(&h.mem, 1, outside, 2048, F_WRITE, 0);
    h.rx.push_avail(&h.mem, 1);
    h.post_rx(2, 2048, F_WRITE);
    assert!(h.wait_used(&h.rx, 3));
    assert_eq!(h.rx.used_elem(&h.mem, 0), (0, 0));
    assert_eq!(h.rx.used_elem(&h.mem, 1), (1, 0));
    assert_eq!(h.rx.used_elem(&h.mem, 2), (2, 72));
    assert_eq!(h.stats().rx_bad_buffers, 2);
}

#[test]
fn broken_rings_ask_for_a_reset_and_a_reset_recovers() {
    for breakage in ["index jump", "head out of range"] {
        let h = Harness::new();
        match breakage {
            "index jump" => h.tx.set_avail_idx(&h.mem, QSIZE + 1),
            _ => h.tx.push_avail(&h.mem, 200),
        }
        h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_ne!(h.status() & NEEDS_RESET, 0, "{breakage}");
        assert_ne!(h.r(VIRTIO_MMIO_INTERRUPT_STATUS) & INT_CONFIG, 0);
        h.send(0, &frame(60, 1));
        assert!(recv_wait(&h.peer, Duration::from_millis(50)).is_none());
        // The driver resets and starts over with clean rings.
        h.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(TX_RING))
            .unwrap();
        h.init(NET_FEATURES, QSIZE.into());
        assert_eq!(h.status() & NEEDS_RESET, 0);
        h.send(0, &frame(60, 2));
        assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), frame(60, 2));
    }
}

#[test]
fn notify_before_ready_and_bad_queue_sizes_do_nothing() {
    let h = Harness::bare();
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    h.handle.inject_rx(frame(60, 1));
    for num in [0, 3, 512] {
        h.init(NET_FEATURES, num);
        h.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(h.r(VIRTIO_MMIO_QUEUE_READY), 0, "size {num}");
        h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(h.rx.used_idx(&h.mem), 0);
    }
    assert_eq!(
        h.bus().device().pending_rx(),
        1,
        "kept for a working driver"
    );
    // Transmit still works on the queue that is ready.
    h.send(0, &frame(60, 2));
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap(), frame(60, 2));
}

#[test]
fn without_negotiated_mtu_the_standard_size_applies() {
    let h = Harness::bare();
    h.init(VIRTIO_F_VERSION_1, QSIZE.into());
    h.send(0, &frame(1500 + 14, 3));
    assert_eq!(recv_wait(&h.peer, WAIT).unwrap().len(), 1514);
    h.send(1, &frame(1500 + 19, 3));
    assert!(recv_wait(&h.peer, Duration::from_millis(50)).is_none());
    assert_eq!(h.stats().tx_invalid, 1);
}

#[test]
fn state_round_trips_through_the_handle_and_as_bytes() {
    let h = Harness::new();
    h.post_rx(0, 2048, F_WRITE);
    h.handle.inject_rx(frame(60, 1));
    assert!(h.wait_used(&h.rx, 1));
    let saved = h.handle.save();
    assert_eq!(saved.mac, MAC);
    assert_eq!(saved.transport.queues[0].queue.next_used, 1);
    h.post_rx(1, 2048, F_WRITE);
    h.handle.inject_rx(frame(60, 2));
    assert!(h.wait_used(&h.rx, 2));
    assert_ne!(h.handle.save(), saved);
    h.handle.restore(&saved).unwrap();
    assert_eq!(h.handle.save(), saved);
    let mut bad = saved.clone();
    bad.transport.queues[1].queue.desc_table = 0xd000_0000;
    assert!(h.handle.restore(&bad).is_err());
    assert_eq!(h.handle.save(), saved);

    // As a snapshot stores it.
    let bytes = crate::persist::to_bytes(&saved);
    assert_eq!(
        crate::persist::from_bytes::<NetState>(&bytes).unwrap(),
        saved
    );
    assert!(crate::persist::from_bytes::<NetState>(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn a_closed_backend_drops_transmits_and_stops_receive() {
    let h = Harness::new();
    use std::os::fd::{AsFd, AsRawFd};
    // SAFETY: shutdown takes no memory; the descriptor stays valid.
    let r = unsafe { libc::shutdown(h.peer.as_fd().as_raw_fd(), libc::SHUT_RDWR) };
    assert_eq!(r, 0);
    h.send(0, &frame(60, 1));
    assert_eq!(h.tx.used_idx(&h.mem), 1, "the chain still comes back");
    assert_eq!(h.stats().tx_backend_dropped, 1);
    // The receive thread saw the hangup and ended; dropping the handle
    // (at the end of the test) must not hang.
}

/// The guest-agent driver, talking to the device through the bus.
struct BusMmio(NetTransport);

impl guest_agent::virtio_net::Mmio for BusMmio {
    fn read32(&self, offset: usize) -> u32 {
        r32(&mut *lock(&self.0), offset as u32)
    }
    fn write32(&self, offset: usize, value: u32) {
        w32(&mut *lock(&self.0), offset as u32, value);
    }
    fn read8(&self, offset: usize) -> u8 {
        let mut b = [0u8];
        lock(&self.0).read(offset as u64, &mut b);
        b[0]
    }
}

#[test]
fn the_bare_guest_driver_echoes_frames() {
    use guest_agent::virtio_net::{Dma, VirtioNet, DMA_SIZE};
    let h = Harness::bare();
    let base = 0x40_0000u64;
    let virt = h.mem.get_host_address(GuestAddress(base)).unwrap();
    assert!(h.mem.check_range(GuestAddress(base), DMA_SIZE));
    // SAFETY: DMA_SIZE bytes of the test memory's single mapping from
    // `base`, page-aligned, which nothing else in this test touches.
    let dma = unsafe { Dma::new(virt, base) };
    let mut drv = VirtioNet::new(BusMmio(h.handle.transport().clone()), dma).unwrap();
    assert_eq!((drv.mac(), drv.mtu()), (MAC, Some(1460)));
    let n = 3 * usize::from(guest_agent::virtio_net::QUEUE_SIZE);
    for i in 0..n {
        h.peer.send(&frame(60 + i, i as u8)).unwrap();
    }
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let end = Instant::now() + WAIT;
        let len = loop {
            if let Some(len) = drv.recv(&mut buf) {
                break len;
            }
            assert!(Instant::now() < end, "frame {i} never arrived");
            std::thread::yield_now();
        };
        let f = &mut buf[..len];
        let (dst, src) = f.split_at_mut(6);
        dst.swap_with_slice(&mut src[..6]);
        drv.send(f).unwrap();
        let echoed = recv_wait(&h.peer, WAIT).unwrap();
        assert_eq!(&echoed[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&echoed[6..12], &MAC);
        assert_eq!(echoed.len(), 60 + i);
    }
    assert!(!drv.needs_reset());
    let s = h.stats();
    assert_eq!((s.rx_frames, s.tx_frames), (n as u64, n as u64));
}
