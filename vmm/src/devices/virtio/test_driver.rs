//! Test helpers that play the driver: guest memory, register accesses and
//! split virtqueues laid out by hand, so tests can write any descriptor a
//! hostile guest could.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
};

/// Size of the test guest memory, mapped at address 0.
pub const TEST_MEM_SIZE: usize = 16 << 20;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// 16 MiB of guest memory at 0, with a dirty bitmap like the VMM's.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).expect("test memory")
}

/// Reads a 32-bit register.
pub fn r32(dev: &mut (impl BusDevice + ?Sized), reg: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read(reg.into(), &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register.
pub fn w32(dev: &mut (impl BusDevice + ?Sized), reg: u32, v: u32) {
    dev.write(reg.into(), &v.to_le_bytes());
}

/// A split virtqueue in guest memory: descriptor table, then the available
/// ring, then the used ring.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// The descriptor table.
    pub desc: u64,
    /// The available (driver) ring.
    pub avail: u64,
    /// The used (device) ring.
    pub used: u64,
    /// Entries in the rings.
    pub size: u16,
    /// The value written to QueueNum (normally `size`).
    pub num: u32,
}

impl Ring {
    /// A ring of `size` entries from `base` (wrapping, for hostile tests).
    pub fn new(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base.wrapping_add(16 * n);
        let used = avail.wrapping_add(6 + 2 * n).wrapping_add(3) & !3;
        Self {
            desc: base,
            avail,
            used,
            size,
            num: size.into(),
        }
    }

    /// The same rings, announced with another QueueNum.
    pub fn with_size(mut self, num: u32) -> Self {
        self.num = num;
        self
    }

    /// Writes QueueNum and the ring addresses for the selected queue.
    pub fn program(&self, dev: &mut (impl BusDevice + ?Sized)) {
        w32(dev, VIRTIO_MMIO_QUEUE_NUM, self.num);
        for (lo, hi, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                self.desc,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                self.avail,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                self.used,
            ),
        ] {
            w32(dev, lo, addr as u32);
            w32(dev, hi, (addr >> 32) as u32);
        }
    }

    /// Writes descriptor `index`.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at)
            .expect("descriptor in test memory");
    }

    /// The available ring's index.
    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2))
            .expect("avail idx")
    }

    /// Sets the available ring's index (any value, for hostile tests).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Offers the chain starting at `head`.
    pub fn push_avail(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// Used element `i` (modulo the size): (descriptor id, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj(GuestAddress(at)).expect("used id");
        let len = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id, len)
    }
}
