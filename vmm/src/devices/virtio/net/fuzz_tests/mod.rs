//! Fuzz target of the virtio-net device, driven through its MMIO
//! registers as a hostile guest would ([`input`]): descriptor tables and
//! indirect tables with any addresses (out of memory, in the hole between
//! the two memory regions, over the rings), any lengths (zero, huge),
//! flags the wrong way round, `next` past the queue, loops; avail indices
//! that jump; register writes at any time; received frames of any size; a
//! hook that drops, defers and stalls. `docs/fuzzing.md` says how to run
//! it longer.
//!
//! After every step that lets the device run, the whole of guest memory is
//! compared with its copy from before the step ([`model`]):
//! - every byte the device changed lies in a used ring of a live queue or
//!   in a device-writable buffer the receive queue's descriptors offer;
//! - every page it changed is marked in the dirty bitmap (speculation's
//!   checkpoints rely on it);
//! - a device that needs a reset changes nothing;
//! - the counters add up with the used rings and the frames the backend
//!   got.
//!
//! When no ring, table or transmit buffer was overwritten in the step, a
//! model walks the chains the device used, as virtio-queue does, and
//! checks what went out (exactly the valid transmit chains' frames, less
//! drops) and what came in (header and frame, the injected frames in
//! order).

#[path = "../../../../../../netbridge/tests/support/fuzz.rs"]
mod fuzz;
mod input;
mod model;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::vstate::dirty_bitmap::DirtyBitmap;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MTU;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::device::NET_FEATURES;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::test_driver::{r32, w32, Ring, F_NEXT, F_WRITE};
use fuzz::Target;
use input::{Input, Op, ScriptHook, Setup};
use model::{Live, Memory, Step, View};

/// Region A: [0, 64 KiB). Then a hole. Region B: [96 KiB, 112 KiB).
const A_END: u64 = 0x1_0000;
const B_START: u64 = 0x1_8000;
const B_END: u64 = 0x1_c000;
/// Where the rings go, unless the guest puts them elsewhere.
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x2000;
/// 16 indirect tables of 16 descriptors.
const INDIRECT: u64 = 0x4000;
/// Buffers from here to the end of region A, and in region B.
const BUFS: u64 = 0x5000;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
const MTU: u16 = 1460;
/// The dirty bitmap's page.
const PAGE_SIZE: u64 = crate::vstate::memory::PAGE_SIZE as u64;

/// The device behind its transport, with guest memory, the backend's
/// other end, and what the network sent.
struct Fuzzer {
    mem: GuestMemoryMmap,
    t: MmioTransport<Net>,
    peer: Backend,
    rings: [Ring; 2],
    /// Frames the network sent, in order, and how many the guest has seen.
    injected: Vec<Vec<u8>>,
    seen: usize,
    script: Arc<Mutex<VecDeque<u8>>>,
}

impl Fuzzer {
    fn new(setup: &Setup) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), A_END as usize),
            (GuestAddress(B_START), (B_END - B_START) as usize),
        ])
        .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (dev_end, peer) = Backend::pair().unwrap();
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let mut net = Net::new(MAC, MTU, Arc::new(dev_end));
        net.set_hook(Box::new(ScriptHook(script.clone())));
        let t = MmioTransport::new(net, mem.clone(), irq).unwrap();
        let mut f = Self {
            mem,
            t,
            peer,
            rings: [Ring::new(RX_RING, 1), Ring::new(TX_RING, 1)],
            injected: Vec::new(),
            seen: 0,
            script,
        };
        f.init(setup);
        f
    }

    /// The driver's set-up, from a reset to DRIVER_OK.
    fn init(&mut self, setup: &Setup) {
        self.rings = [setup.rx.ring(RX_RING), setup.tx.ring(TX_RING)];
        self.step(|f| f.w(VIRTIO_MMIO_STATUS, 0));
        if setup.stale_rings.0.is_none() {
            for r in self.rings {
                let len = r.used + 6 + 8 * u64::from(r.size) - r.desc;
                let _ = self
                    .mem
                    .write_slice(&vec![0; len as usize], GuestAddress(r.desc));
            }
        }
        let features = setup.features.0.unwrap_or(match setup.no_mtu {
            true => NET_FEATURES & !(1 << VIRTIO_NET_F_MTU),
            false => NET_FEATURES,
        });
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        for (sel, word) in [(0, features as u32), (1, (features >> 32) as u32)] {
            self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.w(VIRTIO_MMIO_DRIVER_FEATURES, word);
        }
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        for (i, ring) in self.rings.iter().enumerate() {
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
            ring.program(&mut self.t);
            w32(&mut self.t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        if setup.no_driver_ok.0.is_none() {
            self.step(|f| f.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK));
        }
    }

    fn w(&mut self, reg: u32, v: u32) {
        w32(&mut self.t, reg, v);
    }

    fn view(&self) -> View {
        let live = |i: usize| {
            self.t.queue(i).filter(|q| q.ready()).map(|q| Live {
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                size: q.size(),
                next_used: q.next_used(),
            })
        };
        View {
            status: self.t.status(),
            queues: [live(0), live(1)],
            stats: self.t.device().stats(),
            features: self.t.save_transport().driver_features,
        }
    }

    /// Whether the dirty bitmap has the page of `addr`.
    fn dirty(&self, addr: u64) -> bool {
        self.mem.iter().any(|r| {
            let start = r.start_addr().0;
            let b: &DirtyBitmap = vm_memory::MmapRegion::bitmap(r);
            (start..start + r.len()).contains(&addr) && b.dirty_at((addr - start) as usize)
        })
    }

    /// Lets the device run in `f`, and checks what it did.
    fn step(&mut self, f: impl FnOnce(&mut Self)) {
        let (before, pre) = (Memory::of(&self.mem), self.view());
        for r in self.mem.iter() {
            let b: &DirtyBitmap = vm_memory::MmapRegion::bitmap(r);
            b.reset();
        }
        f(self);
        let (after, post) = (Memory::of(&self.mem), self.view());
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Some(n) = self.peer.recv(&mut buf).unwrap() {
            sent.push(buf[..n.min(buf.len())].to_vec());
        }
        let changes = before.changes(&after);
        self.check(&Step {
            before,
            after,
            pre,
            post,
            changes,
            sent,
        });
    }

    /// One operation: the device's turn (a step, checked), or the guest's
    /// (memory it writes).
    fn run(&mut self, op: &Op) {
        match op {
            Op::Notify { tx, wild } => {
                let q = wild.0.unwrap_or(u32::from(*tx));
                self.step(|f| f.w(VIRTIO_MMIO_QUEUE_NOTIFY, q));
            }
            Op::Receive { len, fill } => {
                let mut frame = vec![*fill; usize::from(*len) % 2000];
                let serial = (self.injected.len() as u32).to_be_bytes();
                for (b, s) in frame.iter_mut().skip(14).zip(serial) {
                    *b = s;
                }
                self.injected.push(frame.clone());
                self.step(|f| {
                    f.t.device_mut().enqueue_rx(frame);
                    f.t.process_backend_event();
                });
            }
            Op::Backend => self.step(|f| f.t.process_backend_event()),
            Op::ResumeRx => self.step(|f| {
                f.t.device_mut().set_rx_held(false);
                f.t.process_backend_event();
            }),
            Op::Reg { offset, value } => {
                let offset = u64::from(offset % 0x120);
                self.step(|f| f.t.write(offset, &value.to_le_bytes()));
            }
            Op::Read { offset, len } => {
                let mut data = vec![0u8; usize::from(*len % 9)];
                self.t.read(u64::from(*offset), &mut data);
                let _ = r32(&mut self.t, VIRTIO_MMIO_INTERRUPT_STATUS);
            }
            Op::Hook(script) => *self.script.lock().unwrap() = script.0.iter().copied().collect(),
            Op::Reinit(setup) => self.init(setup),
            op => self.guest_writes(op),
        }
    }

    /// The guest's writes to memory: descriptors, offers, anything.
    fn guest_writes(&mut self, op: &Op) {
        let ring = |tx: bool| usize::from(tx);
        let _ = match op {
            Op::Desc {
                tx,
                index,
                addr,
                len,
                flags,
                odd_flags,
                next,
            } => {
                let r = self.rings[ring(*tx)];
                let flags = u16::from(flags & 7) | odd_flags.0.unwrap_or(0);
                let at = r.desc + 16 * u64::from(index % r.size);
                self.write_desc(at, addr.get(), len.get(), flags, *next)
            }
            Op::IndirectDesc {
                slot,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let at = INDIRECT + u64::from(slot % 16) * 0x100 + u64::from(index % 16) * 16;
                let flags = u16::from(flags & 7);
                self.write_desc(at, addr.get(), len.get(), flags, u16::from(*next % 17))
            }
            Op::Chain { tx, head, bufs } => {
                let r = self.rings[ring(*tx)];
                let n = bufs.0.len().min(usize::from(r.size));
                for (k, (addr, len)) in bufs.0.iter().take(n).enumerate() {
                    let i = head.wrapping_add(k as u16) % r.size;
                    let flags = match (*tx, k + 1 < n) {
                        (true, more) => F_NEXT * u16::from(more),
                        (false, more) => F_WRITE | (F_NEXT * u16::from(more)),
                    };
                    let at = r.desc + 16 * u64::from(i);
                    let _ = self.write_desc(at, addr.get(), len.get(), flags, (i + 1) % r.size);
                }
                self.offer(ring(*tx), head % r.size, false)
            }
            Op::Offer { tx, head, wild } => {
                let r = self.rings[ring(*tx)];
                let head = wild.0.unwrap_or(head % r.size);
                self.offer(ring(*tx), head, wild.0.is_some())
            }
            Op::AvailIdx { tx, idx } => {
                let r = self.rings[ring(*tx)];
                self.mem.write_obj(*idx, GuestAddress(r.avail + 2)).ok()
            }
            Op::Fill { addr, data } => self.mem.write_slice(&data.0, GuestAddress(addr.get())).ok(),
            _ => unreachable!("{op:?} is the device's turn"),
        };
    }

    fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) -> Option<()> {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).ok()
    }

    /// `Ring::push_avail`, for rings that may lie outside memory. Unless
    /// `wild`, as a driver that keeps count: never more than the queue's
    /// size outstanding (a device that sees more asks for a reset, which
    /// `AvailIdx` and wild offers test).
    fn offer(&self, queue: usize, head: u16, wild: bool) -> Option<()> {
        let r = self.rings[queue];
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(r.avail.checked_add(2)?))
            .ok()?;
        let seen = self.t.queue(queue).map_or(0, |q| q.next_avail());
        if !wild && idx.wrapping_sub(seen) >= r.size {
            return None;
        }
        let slot = r.avail + 4 + 2 * u64::from(idx % r.size);
        self.mem.write_obj(head, GuestAddress(slot)).ok()?;
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(r.avail + 2))
            .ok()
    }
}

#[test]
fn virtio_net_hostile_guest() {
    Target {
        name: "virtio_net_hostile_guest",
        default_cases: 3_000,
        max_len: 32768,
    }
    .run(|input: Input| {
        let mut f = Fuzzer::new(&input.setup);
        for op in &input.ops.0 {
            f.run(op);
        }
    });
}
