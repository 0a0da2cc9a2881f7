//! A polling virtio-blk driver for bare guests: virtio-mmio version 2, one
//! request queue, one request in flight, no interrupts.
//!
//! Like [`crate::virtio_net`], whose [`Mmio`] and [`PhysMmio`] it shares,
//! the driver needs from its caller:
//! - the device's register window, through [`Mmio`]. specvm puts its
//!   virtio devices in slots of [`SLOT_SIZE`] bytes from [`FIRST_SLOT_BASE`]
//!   (`--net` cards first, then `--disk`s), so [`find_slot`] scans the
//!   [`SLOTS`] slots for device id 2;
//! - [`DMA_SIZE`] bytes of memory that the device can reach, through
//!   [`Dma`]: where the driver writes them and the guest-physical address
//!   the device sees (the same number in a bare guest).
//!
//! It accepts VIRTIO_F_VERSION_1 (required), and VIRTIO_BLK_F_FLUSH and
//! VIRTIO_BLK_F_RO when offered. The memory holds, from its start: the
//! descriptor table (at 0), the available ring (0x100) and the used ring
//! (0x200) of the [`QUEUE_SIZE`]-entry queue; on the second page the
//! request header (0x1000), the status byte (0x1010) and the GET_ID buffer
//! (0x1020); from the third page the data buffer, [`BUFFER_SIZE`] bytes.
//! Transfers longer than the buffer go as several requests.
//!
//! Every request is a chain of descriptors 0 (the 16-byte header), 1 (the
//! data, absent for FLUSH) and 2 (the status byte). The driver notifies
//! the queue and polls the used ring; specvm answers before the notifying
//! write returns, so the first poll normally finds the answer.
//!
//! A test driver: it does not refuse a write to a read-only device (the
//! device must answer it with IOERR, which [`Error::Status`] reports).

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::virtio_mmio::{
    self as transport, TransportError, AVAIL_OFFSET, DESC_F_NEXT, DESC_F_WRITE, DESC_OFFSET,
    REG_CONFIG, REG_QUEUE_NOTIFY, USED_OFFSET,
};
pub use crate::virtio_mmio::{Mmio, PhysMmio, FIRST_SLOT_BASE, F_VERSION_1};

/// Bytes between two virtio-mmio slots of specvm.
pub const SLOT_SIZE: u64 = 0x1000;
/// How many virtio-mmio slots specvm has.
pub const SLOTS: u32 = 8;
/// Bytes in a sector: the unit of `sector` numbers and transfer lengths.
pub const SECTOR_SIZE: usize = 512;
/// Entries in the request queue (a request uses three).
pub const QUEUE_SIZE: u16 = 8;
/// Bytes of the data buffer: the most one request moves.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Bytes of memory the driver needs.
pub const DMA_SIZE: usize = BUFFER_OFFSET + BUFFER_SIZE;
/// Length of the serial number GET_ID returns.
pub const ID_BYTES: usize = 20;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: the request failed.
pub const S_IOERR: u8 = 1;
/// Status: the request is not supported.
pub const S_UNSUPP: u8 = 2;

const HEADER_OFFSET: usize = 0x1000;
const STATUS_OFFSET: usize = 0x1010;
const ID_OFFSET: usize = 0x1020;
const BUFFER_OFFSET: usize = 0x2000;
const HEADER_LEN: u32 = 16;
/// What the driver puts in the status byte before a request: no status
/// the device sends.
const NO_STATUS: u8 = 0xff;

// Request types (virtio 1.x, 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// The virtio device id of a block device.
pub const BLOCK_DEVICE_ID: u32 = 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device takes FLUSH requests.
pub const F_FLUSH: u64 = 1 << 9;
/// How often a request polls the used ring before giving up.
const SPIN_LIMIT: u32 = 1 << 24;

/// Why the driver could not set up the device or carry out a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No virtio-mmio device: the magic value read back.
    BadMagic(u32),
    /// Not virtio-mmio version 2.
    BadVersion(u32),
    /// A virtio device, but not a block device: its device id.
    NotBlock(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device refused the features (FEATURES_OK did not stick).
    FeaturesRefused,
    /// The queue is missing, already live, or smaller than [`QUEUE_SIZE`]:
    /// its maximum size.
    QueueTooSmall(u32),
    /// The device asks for a reset (status bit DEVICE_NEEDS_RESET).
    NeedsReset,
    /// A buffer whose length is not a whole number of sectors.
    NotSectors(usize),
    /// FLUSH without VIRTIO_BLK_F_FLUSH negotiated.
    NoFlush,
    /// The device answered with this status (not [`S_OK`]).
    Status(u8),
    /// The device returned the request without writing a status.
    NoStatus,
    /// The device returned another chain than the request's: its head.
    WrongHead(u32),
    /// The request did not come back in time.
    Timeout,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(v) => write!(f, "no virtio-mmio device (magic {v:#x})"),
            Self::BadVersion(v) => write!(f, "virtio-mmio version {v}, not 2"),
            Self::NotBlock(id) => write!(f, "virtio device type {id}, not a block device"),
            Self::NoVersion1 => f.write_str("device does not offer VIRTIO_F_VERSION_1"),
            Self::FeaturesRefused => f.write_str("device refused the features"),
            Self::QueueTooSmall(max) => {
                write!(f, "request queue holds {max} entries, {QUEUE_SIZE} needed")
            }
            Self::NeedsReset => f.write_str("device needs a reset"),
            Self::NotSectors(n) => write!(f, "{n} bytes is not a whole number of sectors"),
            Self::NoFlush => f.write_str("device does not offer VIRTIO_BLK_F_FLUSH"),
            Self::Status(S_IOERR) => f.write_str("device answered IOERR"),
            Self::Status(S_UNSUPP) => f.write_str("device answered UNSUPP"),
            Self::Status(s) => write!(f, "device answered status {s}"),
            Self::NoStatus => f.write_str("request returned without a status"),
            Self::WrongHead(h) => write!(f, "device returned chain {h}, not the request's"),
            Self::Timeout => f.write_str("request did not come back"),
        }
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::BadMagic(v) => Self::BadMagic(v),
            TransportError::BadVersion(v) => Self::BadVersion(v),
            TransportError::OtherDevice(id) => Self::NotBlock(id),
            TransportError::NoVersion1 => Self::NoVersion1,
            TransportError::FeaturesRefused => Self::FeaturesRefused,
            TransportError::QueueTooSmall { max, .. } => Self::QueueTooSmall(max),
            TransportError::NeedsReset => Self::NeedsReset,
        }
    }
}

/// The base of specvm's virtio-mmio slot `slot`.
pub const fn slot_base(slot: u32) -> u64 {
    FIRST_SLOT_BASE + slot as u64 * SLOT_SIZE
}

/// The `nth` (from 0) slot of `0..SLOTS` that holds a virtio-blk device,
/// reading each slot's identification registers through `window(slot)`.
/// Empty slots (unclaimed MMIO reads all ones in specvm) are skipped.
pub fn find_slot<M: Mmio>(mut window: impl FnMut(u32) -> M, nth: usize) -> Option<u32> {
    (0..SLOTS)
        .filter(|&slot| transport::probe(&window(slot), BLOCK_DEVICE_ID).is_ok())
        .nth(nth)
}

/// Memory shared with the device: where the driver sees it and where the
/// device does ([`crate::dma::Dma`] of [`DMA_SIZE`] bytes).
pub type Dma = crate::dma::Dma<DMA_SIZE>;

/// The data a request carries.
enum Data {
    /// None (FLUSH).
    None,
    /// `len` bytes of the buffer the device reads (OUT).
    ToDevice(u32),
    /// `len` bytes at `offset` the device writes (IN, GET_ID).
    FromDevice { offset: usize, len: u32 },
}

/// A virtio-blk device, set up and running.
pub struct VirtioBlk<M: Mmio> {
    mmio: M,
    dma: Dma,
    features: u64,
    capacity: u64,
    avail_idx: u16,
    used_idx: u16,
}

impl<M: Mmio> VirtioBlk<M> {
    /// Resets the device behind `mmio`, negotiates, sets up the request
    /// queue in `dma` and starts the device.
    pub fn new(mmio: M, dma: Dma) -> Result<Self, Error> {
        let features = transport::begin(&mmio, BLOCK_DEVICE_ID, F_FLUSH | F_RO)?;
        for offset in (0..BUFFER_OFFSET).step_by(8) {
            dma.write(offset, 0u64);
        }
        let mut dev = Self {
            mmio,
            dma,
            features,
            capacity: 0,
            avail_idx: 0,
            used_idx: 0,
        };
        let dma = &dev.dma;
        transport::setup_queue(&dev.mmio, 0, QUEUE_SIZE, dma.phys(0), |flags| {
            dma.write(AVAIL_OFFSET, flags)
        })?;
        transport::start(&dev.mmio)?;
        dev.capacity = dev.read_capacity();
        Ok(dev)
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device says it is read-only (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// The features both sides agreed on.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the device asks for a reset.
    pub fn needs_reset(&self) -> bool {
        transport::needs_reset(&self.mmio)
    }

    /// Reads `buf.len()` bytes (whole sectors) from sector `sector` on.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_sectors(buf.len())?;
        let mut sector = sector;
        for chunk in buf.chunks_mut(BUFFER_SIZE) {
            let len = chunk.len() as u32;
            let data = Data::FromDevice {
                offset: BUFFER_OFFSET,
                len,
            };
            self.request(T_IN, sector, data)?;
            self.dma.copy_out(BUFFER_OFFSET, chunk);
            sector = sector.wrapping_add(u64::from(len) / SECTOR_SIZE as u64);
        }
        Ok(())
    }

    /// Writes `data` (whole sectors) from sector `sector` on.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), Error> {
        check_sectors(data.len())?;
        let mut sector = sector;
        for chunk in data.chunks(BUFFER_SIZE) {
            self.dma.copy_in(BUFFER_OFFSET, chunk);
            let len = chunk.len() as u32;
            self.request(T_OUT, sector, Data::ToDevice(len))?;
            sector = sector.wrapping_add(u64::from(len) / SECTOR_SIZE as u64);
        }
        Ok(())
    }

    /// Asks the device to make the writes so far durable.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.features & F_FLUSH == 0 {
            return Err(Error::NoFlush);
        }
        self.request(T_FLUSH, 0, Data::None)
    }

    /// The device's serial number ([`ID_BYTES`] bytes, NUL-padded when
    /// shorter).
    pub fn get_id(&mut self) -> Result<[u8; ID_BYTES], Error> {
        let data = Data::FromDevice {
            offset: ID_OFFSET,
            len: ID_BYTES as u32,
        };
        // The device need not write all 20 bytes: clear them first.
        self.dma.copy_in(ID_OFFSET, &[0; ID_BYTES]);
        self.request(T_GET_ID, 0, data)?;
        let mut id = [0; ID_BYTES];
        self.dma.copy_out(ID_OFFSET, &mut id);
        Ok(id)
    }

    /// `capacity`, the first field of the configuration space, read as two
    /// 32-bit halves while the configuration generation holds still.
    fn read_capacity(&self) -> u64 {
        transport::read_config(&self.mmio, |m| {
            let lo = m.read32(REG_CONFIG);
            let hi = m.read32(REG_CONFIG + 4);
            u64::from(hi) << 32 | u64::from(lo)
        })
    }

    /// Writes descriptor `index`.
    fn set_desc(&self, index: u16, offset: usize, len: u32, flags: u16, next: u16) {
        let at = DESC_OFFSET + 16 * usize::from(index);
        self.dma.write(at, self.dma.phys(offset));
        self.dma.write(at + 8, len);
        self.dma.write(at + 12, flags);
        self.dma.write(at + 14, next);
    }

    /// Sends one request and waits for its answer.
    fn request(&mut self, kind: u32, sector: u64, data: Data) -> Result<(), Error> {
        self.dma.write(HEADER_OFFSET, kind);
        self.dma.write(HEADER_OFFSET + 4, 0u32);
        self.dma.write(HEADER_OFFSET + 8, sector);
        self.dma.write(STATUS_OFFSET, NO_STATUS);
        let after_header = if matches!(data, Data::None) { 2 } else { 1 };
        self.set_desc(0, HEADER_OFFSET, HEADER_LEN, DESC_F_NEXT, after_header);
        match data {
            Data::None => {}
            Data::ToDevice(len) => self.set_desc(1, BUFFER_OFFSET, len, DESC_F_NEXT, 2),
            Data::FromDevice { offset, len } => {
                self.set_desc(1, offset, len, DESC_F_NEXT | DESC_F_WRITE, 2);
            }
        }
        self.set_desc(2, STATUS_OFFSET, 1, DESC_F_WRITE, 0);
        let slot = AVAIL_OFFSET + 4 + 2 * usize::from(self.avail_idx % QUEUE_SIZE);
        self.dma.write(slot, 0u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The chain and its buffers must be visible before the index that
        // publishes them.
        fence(Ordering::SeqCst);
        self.dma.write(AVAIL_OFFSET + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.mmio.write32(REG_QUEUE_NOTIFY, 0);
        self.wait_used()?;
        match self.dma.read::<u8>(STATUS_OFFSET) {
            S_OK => Ok(()),
            NO_STATUS => Err(Error::NoStatus),
            s => Err(Error::Status(s)),
        }
    }

    /// Polls the used ring for the request's chain.
    fn wait_used(&mut self) -> Result<(), Error> {
        for _ in 0..SPIN_LIMIT {
            let idx: u16 = self.dma.read(USED_OFFSET + 2);
            // Read the index before the element and buffers it covers.
            fence(Ordering::SeqCst);
            if idx != self.used_idx {
                let at = USED_OFFSET + 4 + 8 * usize::from(self.used_idx % QUEUE_SIZE);
                let id: u32 = self.dma.read(at);
                self.used_idx = self.used_idx.wrapping_add(1);
                return match id {
                    0 => Ok(()),
                    h => Err(Error::WrongHead(h)),
                };
            }
            if self.needs_reset() {
                return Err(Error::NeedsReset);
            }
            core::hint::spin_loop();
        }
        Err(Error::Timeout)
    }
}

fn check_sectors(len: usize) -> Result<(), Error> {
    match len % SECTOR_SIZE {
        0 => Ok(()),
        _ => Err(Error::NotSectors(len)),
    }
}

#[cfg(test)]
mod tests {
    //! The driver against a model device written from the virtio spec: it
    //! serves the registers, walks the chains in the shared memory and
    //! keeps the disk in a vector.
    extern crate std;

    use super::*;
    // The model device serves the transport's registers by name.
    use crate::virtio_mmio::*;
    use core::cell::RefCell;
    use std::vec;
    use std::vec::Vec;

    /// Where the model device sees the DMA memory.
    const PHYS: u64 = 0x4000_0000;
    const SECTORS: u64 = 1024;

    struct Model {
        /// The driver's memory, seen by the device at PHYS.
        mem: *mut u8,
        disk: Vec<u8>,
        features: u64,
        device_id: u32,
        status: u32,
        features_sel: u32,
        driver_features_sel: u32,
        driver_features: u64,
        queue_num: u32,
        ready: u32,
        desc: u64,
        avail: u64,
        used: u64,
        next_avail: u16,
        /// Every request (type, sector, data length) in order.
        log: Vec<(u32, u64, u32)>,
        /// Drop the next chain without a status.
        drop_next: bool,
    }

    impl Model {
        fn at(&self, phys: u64) -> *mut u8 {
            let off = usize::try_from(phys - PHYS).unwrap();
            assert!(off < DMA_SIZE, "device access at {phys:#x}");
            // SAFETY: inside the test's DMA allocation (checked).
            unsafe { self.mem.add(off) }
        }

        fn rd<T: Copy>(&self, phys: u64) -> T {
            // SAFETY: `at` checked the address; the test memory is u64-aligned.
            unsafe { self.at(phys).cast::<T>().read_volatile() }
        }

        fn wr<T: Copy>(&self, phys: u64, v: T) {
            // SAFETY: as for `rd`.
            unsafe { self.at(phys).cast::<T>().write_volatile(v) }
        }

        fn process(&mut self) {
            let size = self.queue_num as u16;
            let avail_idx: u16 = self.rd(self.avail + 2);
            while self.next_avail != avail_idx {
                let head: u16 = self.rd(self.avail + 4 + 2 * u64::from(self.next_avail % size));
                self.next_avail = self.next_avail.wrapping_add(1);
                // (addr, len, writable)
                let mut descs = Vec::new();
                let mut i = head;
                loop {
                    let d = self.desc + 16 * u64::from(i);
                    let flags: u16 = self.rd(d + 12);
                    descs.push((
                        self.rd::<u64>(d),
                        self.rd::<u32>(d + 8),
                        flags & DESC_F_WRITE != 0,
                    ));
                    if flags & DESC_F_NEXT == 0 {
                        break;
                    }
                    i = self.rd(d + 14);
                    assert!(descs.len() <= usize::from(size), "chain loops");
                }
                let used_len = if core::mem::take(&mut self.drop_next) {
                    0
                } else {
                    self.execute(&descs)
                };
                let used_idx: u16 = self.rd(self.used + 2);
                let e = self.used + 4 + 8 * u64::from(used_idx % size);
                self.wr(e, u32::from(head));
                self.wr(e + 4, used_len);
                self.wr(self.used + 2, used_idx.wrapping_add(1));
            }
        }

        /// Runs one request laid out as header, optional data, status.
        fn execute(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
            let (hdr, hlen, hw) = descs[0];
            assert_eq!((hlen, hw), (16, false), "header descriptor");
            let (st, slen, sw) = *descs.last().unwrap();
            assert_eq!((slen, sw), (1, true), "status descriptor");
            let kind: u32 = self.rd(hdr);
            let sector: u64 = self.rd(hdr + 8);
            let data = &descs[1..descs.len() - 1];
            assert!(data.len() <= 1);
            let (addr, len, writable) = data.first().copied().unwrap_or((0, 0, false));
            self.log.push((kind, sector, len));
            let start = (sector * 512) as usize;
            let in_disk = start + len as usize <= self.disk.len();
            let status = match kind {
                T_IN if writable && in_disk && len % 512 == 0 => {
                    for k in 0..len as usize {
                        self.wr(addr + k as u64, self.disk[start + k]);
                    }
                    S_OK
                }
                T_OUT if self.features & F_RO != 0 => S_IOERR,
                T_OUT if !writable && in_disk && len % 512 == 0 => {
                    for k in 0..len as usize {
                        self.disk[start + k] = self.rd(addr + k as u64);
                    }
                    S_OK
                }
                T_FLUSH if data.is_empty() => S_OK,
                T_GET_ID if writable && len >= 20 => {
                    for (k, b) in b"model-disk".iter().enumerate() {
                        self.wr(addr + k as u64, *b);
                    }
                    S_OK
                }
                T_IN | T_OUT | T_FLUSH | T_GET_ID => S_IOERR,
                _ => S_UNSUPP,
            };
            self.wr(st, status);
            if writable {
                len + 1
            } else {
                1
            }
        }
    }

    struct Fake(RefCell<Model>);

    impl Mmio for &Fake {
        fn read32(&self, offset: usize) -> u32 {
            let m = self.0.borrow();
            match offset {
                REG_MAGIC => MAGIC,
                REG_VERSION => 2,
                REG_DEVICE_ID => m.device_id,
                REG_DEVICE_FEATURES => (m.features >> (32 * m.features_sel)) as u32,
                REG_QUEUE_NUM_MAX => 256,
                REG_QUEUE_READY => m.ready,
                REG_STATUS => m.status,
                REG_CONFIG_GENERATION => 0,
                REG_CONFIG => SECTORS as u32,
                o if o == REG_CONFIG + 4 => (SECTORS >> 32) as u32,
                o => panic!("read of register {o:#x}"),
            }
        }

        fn write32(&self, offset: usize, value: u32) {
            let mut m = self.0.borrow_mut();
            let v = u64::from(value);
            let lo = |r: &mut u64| *r = (*r & !0xffff_ffff) | v;
            let hi = |r: &mut u64| *r = (*r & 0xffff_ffff) | v << 32;
            match offset {
                REG_STATUS => {
                    if value == 0 {
                        m.ready = 0;
                        m.next_avail = 0;
                    }
                    let accepted = m.driver_features & !m.features == 0;
                    m.status = if accepted {
                        value
                    } else {
                        value & !S_FEATURES_OK
                    };
                }
                REG_DEVICE_FEATURES_SEL => m.features_sel = value,
                REG_DRIVER_FEATURES_SEL => m.driver_features_sel = value,
                REG_DRIVER_FEATURES => {
                    let sel = m.driver_features_sel;
                    let f = &mut m.driver_features;
                    if sel == 0 {
                        lo(f)
                    } else {
                        hi(f)
                    }
                }
                REG_QUEUE_SEL => assert_eq!(value, 0),
                REG_QUEUE_NUM => m.queue_num = value,
                REG_QUEUE_READY => m.ready = value,
                REG_QUEUE_DESC => lo(&mut m.desc),
                o if o == REG_QUEUE_DESC + 4 => hi(&mut m.desc),
                REG_QUEUE_AVAIL => lo(&mut m.avail),
                o if o == REG_QUEUE_AVAIL + 4 => hi(&mut m.avail),
                REG_QUEUE_USED => lo(&mut m.used),
                o if o == REG_QUEUE_USED + 4 => hi(&mut m.used),
                REG_QUEUE_NOTIFY => {
                    assert_eq!(value, 0);
                    assert_eq!(m.status & S_DRIVER_OK, S_DRIVER_OK);
                    m.process();
                }
                o => panic!("write of {value:#x} to register {o:#x}"),
            }
        }

        fn read8(&self, offset: usize) -> u8 {
            panic!("byte read at {offset:#x}")
        }
    }

    /// A model device with `features` over a zeroed disk, and the memory
    /// the driver gets (kept alive by the caller).
    fn model(features: u64) -> (Fake, Vec<u64>) {
        let mut mem = vec![0u64; DMA_SIZE / 8 + 512];
        // Page-align inside the allocation.
        let skew = (4096 - (mem.as_mut_ptr() as usize % 4096)) % 4096;
        // SAFETY: `skew` < 4096 bytes, inside the 4096 spare bytes.
        let base = unsafe { mem.as_mut_ptr().cast::<u8>().add(skew) };
        let m = Model {
            mem: base,
            disk: vec![0; SECTORS as usize * 512],
            features,
            device_id: BLOCK_DEVICE_ID,
            status: 0,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_num: 0,
            ready: 0,
            desc: 0,
            avail: 0,
            used: 0,
            next_avail: 0,
            log: Vec::new(),
            drop_next: false,
        };
        (Fake(RefCell::new(m)), mem)
    }

    fn driver(fake: &Fake) -> Result<VirtioBlk<&Fake>, Error> {
        let base = fake.0.borrow().mem;
        // SAFETY: `model` made DMA_SIZE page-aligned bytes at `base`,
        // which only the driver and the model use.
        let dma = unsafe { Dma::new(base, PHYS) };
        VirtioBlk::new(fake, dma)
    }

    const ALL: u64 = F_VERSION_1 | F_FLUSH | 1 << 6 | 1 << 13;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn negotiates_and_reads_the_capacity() {
        let (fake, _mem) = model(ALL);
        let blk = driver(&fake).unwrap();
        assert_eq!(blk.capacity(), SECTORS);
        assert_eq!(blk.features(), F_VERSION_1 | F_FLUSH);
        assert!(!blk.read_only());
        let m = fake.0.borrow();
        assert_eq!(m.driver_features, F_VERSION_1 | F_FLUSH);
        assert_eq!((m.queue_num, m.ready), (u32::from(QUEUE_SIZE), 1));
        assert_eq!(
            (m.desc, m.avail, m.used),
            (PHYS, PHYS + 0x100, PHYS + 0x200)
        );
        assert_eq!(
            m.status,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
    }

    #[test]
    fn writes_and_reads_back_across_chunks_and_ring_wraps() {
        let (fake, _mem) = model(ALL);
        let mut blk = driver(&fake).unwrap();
        // 2.5 buffers: three requests each way.
        let data = pattern(7, 2 * BUFFER_SIZE + BUFFER_SIZE / 2);
        blk.write(10, &data).unwrap();
        let at = 10 * 512;
        assert_eq!(&fake.0.borrow().disk[at..at + data.len()], &data[..]);
        let mut back = vec![0u8; data.len()];
        blk.read(10, &mut back).unwrap();
        assert_eq!(back, data);
        // More requests than the queue has entries: the indices wrap.
        for i in 0..3 * u64::from(QUEUE_SIZE) {
            let s = pattern(i as u8, 512);
            blk.write(i, &s).unwrap();
            let mut r = [0u8; 512];
            blk.read(i, &mut r).unwrap();
            assert_eq!(&r[..], &s[..]);
        }
        let log = &fake.0.borrow().log;
        let chunk = BUFFER_SIZE as u32;
        let sectors = (BUFFER_SIZE / 512) as u64;
        assert_eq!(
            &log[..3],
            &[
                (T_OUT, 10, chunk),
                (T_OUT, 10 + sectors, chunk),
                (T_OUT, 10 + 2 * sectors, chunk / 2)
            ]
        );
        assert_eq!(log[3], (T_IN, 10, chunk));
    }

    #[test]
    fn flush_get_id_and_errors() {
        let (fake, _mem) = model(ALL);
        let mut blk = driver(&fake).unwrap();
        blk.flush().unwrap();
        let id = blk.get_id().unwrap();
        assert_eq!(&id[..10], b"model-disk");
        assert!(id[10..].iter().all(|&b| b == 0));
        assert_eq!(blk.write(0, &[0; 100]), Err(Error::NotSectors(100)));
        let mut past = [0u8; 1024];
        assert_eq!(
            blk.read(SECTORS - 1, &mut past),
            Err(Error::Status(S_IOERR))
        );
        fake.0.borrow_mut().drop_next = true;
        assert_eq!(blk.read(0, &mut past), Err(Error::NoStatus));
        // Still in step with the device after the errors.
        blk.read(0, &mut past).unwrap();
        assert_eq!(fake.0.borrow().log.last(), Some(&(T_IN, 0, 1024)));
    }

    #[test]
    fn read_only_devices_answer_writes_with_ioerr() {
        let (fake, _mem) = model(F_VERSION_1 | F_RO);
        let mut blk = driver(&fake).unwrap();
        assert!(blk.read_only());
        assert_eq!(blk.write(0, &[1; 512]), Err(Error::Status(S_IOERR)));
        assert_eq!(blk.flush(), Err(Error::NoFlush));
        assert!(fake.0.borrow().disk.iter().all(|&b| b == 0));
    }

    #[test]
    fn refuses_devices_without_version_1_or_of_another_type() {
        let (fake, _mem) = model(F_FLUSH);
        assert_eq!(driver(&fake).err(), Some(Error::NoVersion1));
        let (fake, _mem) = model(ALL);
        fake.0.borrow_mut().device_id = 1;
        assert_eq!(driver(&fake).err(), Some(Error::NotBlock(1)));
    }

    /// A slot: nothing (all ones), or a device of a type.
    struct Slot(Option<u32>);

    impl Mmio for Slot {
        fn read32(&self, offset: usize) -> u32 {
            match (self.0, offset) {
                (None, _) => u32::MAX,
                (Some(_), REG_MAGIC) => MAGIC,
                (Some(_), REG_VERSION) => 2,
                (Some(id), REG_DEVICE_ID) => id,
                _ => 0,
            }
        }
        fn write32(&self, _: usize, _: u32) {}
        fn read8(&self, _: usize) -> u8 {
            u8::MAX
        }
    }

    #[test]
    fn finds_block_devices_after_the_net_cards() {
        let layout = [Some(1), Some(1), Some(2), Some(2), None, None, None, None];
        let window = |i: u32| Slot(layout[i as usize]);
        assert_eq!(find_slot(window, 0), Some(2));
        assert_eq!(find_slot(window, 1), Some(3));
        assert_eq!(find_slot(window, 2), None);
        assert_eq!(find_slot(|_| Slot(None), 0), None);
        assert_eq!(slot_base(3), 0xd000_3000);
    }
}
