//! The block device driven through its MMIO registers by a driver written
//! into fake guest memory, over an image file in a temporary folder.

use std::path::PathBuf;
use std::sync::MutexGuard;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use xxhash_rust::xxh3::xxh3_64;

use super::request::{S_IOERR, S_OK, S_UNSUPP};
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::CONFIG_OFFSET;
use crate::devices::virtio::test_driver::*;
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::persist::{Decode, Encode, Persist, Reader, Writer};
use crate::sync::lock;
use crate::test_util::TempDir;

const RING: u64 = 0x1_0000;
const HDR: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DATA: u64 = 0x10_0000;
const INDIRECT: u64 = 0x4_0000;
const QSIZE: u16 = 16;
/// 64 KiB and one sector: the last granule is short.
const IMAGE: usize = (64 << 10) + 512;
const ALL: u64 = VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_DISCARD;

/// A descriptor: address, length, flags.
type Desc = (u64, u32, u16);

/// What goes after the header.
enum Data<'a> {
    None,
    Out(&'a [u8]),
    In(u32),
}

struct Harness {
    _dir: TempDir,
    path: PathBuf,
    blk: BlockHandle,
    mem: GuestMemoryMmap,
    ring: Ring,
}

fn image_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 512) as u8 ^ 0x5a).collect()
}

impl Harness {
    fn new(name: &str, read_only: bool, features: u64) -> Self {
        let dir = TempDir::new(&format!("blk-{name}"));
        let path = dir.join("disk.img");
        std::fs::write(&path, image_bytes(IMAGE)).unwrap();
        let mem = test_memory();
        let cfg = BlockConfig {
            path: path.clone(),
            read_only,
            private: false,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (_, blk) = new_block(&cfg, mem.clone(), irq).unwrap();
        let h = Self {
            _dir: dir,
            path,
            blk,
            mem,
            ring: Ring::new(RING, QSIZE),
        };
        h.init(features);
        h
    }

    fn bus(&self) -> MutexGuard<'_, MmioTransport<Block>> {
        lock(self.blk.transport())
    }

    fn w(&self, reg: u32, v: u32) {
        w32(&mut *self.bus(), reg, v);
    }

    fn r(&self, reg: u32) -> u32 {
        r32(&mut *self.bus(), reg)
    }

    fn init(&self, features: u64) {
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.ring.program(&mut *self.bus());
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        self.w(VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.status() & DRIVER_OK, DRIVER_OK);
    }

    fn status(&self) -> u32 {
        self.r(VIRTIO_MMIO_STATUS)
    }

    /// Offers descriptors `(addr, len, flags)` chained from index 0 and
    /// notifies; returns the used length, or None if nothing was used.
    fn submit(&self, descs: &[Desc]) -> Option<u32> {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
            let i = i as u16;
            self.ring
                .set_desc(&self.mem, i, addr, len, flags | next, i + 1);
        }
        let before = self.ring.used_idx(&self.mem);
        self.ring.push_avail(&self.mem, 0);
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let after = self.ring.used_idx(&self.mem);
        (after != before).then(|| self.ring.used_elem(&self.mem, before).1)
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A well-formed request: header, data, status. Returns the status
    /// byte and the used length.
    fn request(&self, kind: u32, sector: u64, data: Data<'_>) -> (u8, u32) {
        self.header(kind, sector);
        let mut descs = vec![(HDR, 16, 0)];
        match data {
            Data::None => {}
            Data::Out(b) => {
                self.mem.write_slice(b, GuestAddress(DATA)).unwrap();
                descs.push((DATA, b.len() as u32, 0));
            }
            Data::In(len) => descs.push((DATA, len, F_WRITE)),
        }
        descs.push((STATUS, 1, F_WRITE));
        let used = self.submit(&descs).expect("the chain was used");
        (self.status_byte(), used)
    }

    fn write(&self, sector: u64, bytes: &[u8]) -> u8 {
        self.request(VIRTIO_BLK_T_OUT, sector, Data::Out(bytes)).0
    }

    fn read(&self, sector: u64, len: u32) -> Vec<u8> {
        let (status, used) = self.request(VIRTIO_BLK_T_IN, sector, Data::In(len));
        assert_eq!((status, used), (S_OK, len + 1));
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        b
    }

    fn file_hash(&self) -> u64 {
        xxh3_64(&std::fs::read(&self.path).unwrap())
    }
}

#[test]
fn identity_features_and_config_space() {
    let h = Harness::new("config", false, ALL);
    assert_eq!(
        h.r(VIRTIO_MMIO_DEVICE_ID),
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    );
    h.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        u64::from(h.r(VIRTIO_MMIO_DEVICE_FEATURES)),
        ALL & 0xffff_ffff
    );
    let mut cfg = [0u8; 64];
    h.bus().read(CONFIG_OFFSET, &mut cfg);
    let le32 = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 129);
    assert_eq!(le32(12), 254, "seg_max");
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!((le32(36), le32(40), le32(44)), (32768, 16, 8), "discard");
    assert_eq!(&cfg[60..], &[0; 4], "past the end");
    h.bus().write(CONFIG_OFFSET, &[0xff; 8]);
    h.bus().read(CONFIG_OFFSET, &mut cfg);
    assert_eq!(cfg[0], 129, "read-only");

    let ro = Harness::new("config-ro", true, VIRTIO_F_VERSION_1);
    ro.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let f = ro.r(VIRTIO_MMIO_DEVICE_FEATURES);
    assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
}

#[test]
fn reads_writes_flush_and_get_id_at_depth_zero() {
    let h = Harness::new("rw", false, ALL);
    assert_eq!(h.read(2, 1024), image_bytes(IMAGE)[1024..2048]);
    assert_eq!(h.write(1, &[0xab; 1536]), S_OK);
    assert_eq!(h.read(0, 2560)[512..2048], [0xab; 1536]);
    let (status, used) = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!((status, used), (S_OK, 1));
    assert_eq!(std::fs::read(&h.path).unwrap()[512..2048], [0xab; 1536]);
    // The last sector, and a request split over descriptors anywhere.
    assert_eq!(h.write(128, &[0xcd; 512]), S_OK);
    h.header(VIRTIO_BLK_T_IN, 127);
    let used = h.submit(&[
        (HDR, 5, 0),
        (HDR + 5, 11, 0),
        (DATA, 700, F_WRITE),
        (DATA + 700, 324, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!((used, h.status_byte()), (Some(1025), S_OK));
    let mut b = vec![0u8; 1024];
    h.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b[512..], [0xcd; 512]);
    // GET_ID: the 20-byte serial.
    let (status, used) = h.request(VIRTIO_BLK_T_GET_ID, 0, Data::In(20));
    assert_eq!((status, used), (S_OK, 21));
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, h.bus().device().id());
    let (s, _) = h.blk.stats();
    assert_eq!((s.ok, s.ioerr, s.dropped), (7, 0, 0));
}

#[test]
fn speculative_writes_roll_back_and_commit_through_the_handle() {
    let h = Harness::new("spec", false, ALL);
    let pristine = h.file_hash();
    assert_eq!(h.blk.push_level(), 0);
    assert_eq!(h.write(3, &[1; 4096]), S_OK);
    let (status, _) = h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    assert_eq!(status, S_OK, "flush completes inside a speculation");
    assert_eq!(h.file_hash(), pristine, "nothing reached the base");
    assert_eq!(h.read(3, 4096), vec![1; 4096]);
    h.blk.rollback_to(0).unwrap();
    assert_eq!(h.read(3, 512), image_bytes(IMAGE)[1536..2048]);

    h.blk.push_level();
    h.blk.push_level();
    assert_eq!(h.write(0, &[2; 512]), S_OK);
    h.blk.fold(1).unwrap();
    assert_eq!(h.file_hash(), pristine);
    h.blk.fold(0).unwrap();
    assert_eq!(std::fs::read(&h.path).unwrap()[..512], [2; 512]);
    assert_eq!(h.blk.depth(), 0);
    assert!(h.blk.fold(0).is_err());
    assert!(h.blk.rollback_to(1).is_err());
}

#[test]
fn a_crash_under_speculation_leaves_the_image_unchanged() {
    let h = Harness::new("crash", false, ALL);
    let pristine = h.file_hash();
    h.blk.push_level();
    for s in 0..64 {
        assert_eq!(h.write(s * 2, &[s as u8; 1024]), S_OK);
    }
    h.request(VIRTIO_BLK_T_FLUSH, 0, Data::None);
    h.blk.push_level();
    let seg = discard_seg(0, 64, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(&seg)).0, S_OK);
    // The VMM dies: the device goes without a fold; the folder stays.
    let Harness {
        _dir, path, blk, ..
    } = h;
    drop(blk);
    assert_eq!(xxh3_64(&std::fs::read(&path).unwrap()), pristine);
}

#[test]
fn discard_reads_as_zero_and_rolls_back() {
    let h = Harness::new("discard", false, ALL);
    h.blk.push_level();
    let mut seg = [0u8; 32];
    seg[..8].copy_from_slice(&1u64.to_le_bytes());
    seg[8..12].copy_from_slice(&9u32.to_le_bytes());
    seg[16..24].copy_from_slice(&128u64.to_le_bytes());
    seg[24..28].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(&seg)).0, S_OK);
    let b = h.read(0, 512 * 129);
    assert_eq!(b[..512], image_bytes(IMAGE)[..512]);
    assert!(b[512..5120].iter().all(|&x| x == 0));
    assert_eq!(b[5120..5632], image_bytes(IMAGE)[5120..5632]);
    assert!(b[128 * 512..].iter().all(|&x| x == 0));
    h.blk.rollback_to(0).unwrap();
    assert_eq!(h.read(0, 512 * 129), image_bytes(IMAGE));
    // At depth 0 it reaches the file.
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(&seg)).0, S_OK);
    assert!(std::fs::read(&h.path).unwrap()[512..5120]
        .iter()
        .all(|&x| x == 0));
}

/// A discard request with one segment.
fn discard_seg(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn bad_requests_get_an_error_status() {
    let h = Harness::new("bad", false, ALL);
    let pristine = h.file_hash();
    let (unmap, long, past) = (
        discard_seg(0, 1, 1),
        discard_seg(0, 1 << 16, 0),
        discard_seg(100, 30, 0),
    );
    let cases: Vec<(&str, u32, u64, Data<'_>, u8)> = vec![
        ("past the end", VIRTIO_BLK_T_IN, 129, Data::In(512), S_IOERR),
        (
            "across the end",
            VIRTIO_BLK_T_OUT,
            128,
            Data::Out(&[1; 1024]),
            S_IOERR,
        ),
        (
            "sector*512 overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX / 256,
            Data::In(512),
            S_IOERR,
        ),
        (
            "not whole sectors",
            VIRTIO_BLK_T_OUT,
            0,
            Data::Out(&[1; 100]),
            S_IOERR,
        ),
        ("huge", VIRTIO_BLK_T_IN, 0, Data::In(0x800_0000), S_IOERR),
        ("unknown type", 99, 0, Data::None, S_UNSUPP),
        (
            "short GET_ID buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            Data::In(8),
            S_IOERR,
        ),
        (
            "discard: unmap flag",
            VIRTIO_BLK_T_DISCARD,
            0,
            Data::Out(&unmap),
            S_UNSUPP,
        ),
        (
            "discard: too long",
            VIRTIO_BLK_T_DISCARD,
            0,
            Data::Out(&long),
            S_IOERR,
        ),
        (
            "discard: past the end",
            VIRTIO_BLK_T_DISCARD,
            0,
            Data::Out(&past),
            S_IOERR,
        ),
        (
            "discard: no segment",
            VIRTIO_BLK_T_DISCARD,
            0,
            Data::None,
            S_IOERR,
        ),
        (
            "discard: odd length",
            VIRTIO_BLK_T_DISCARD,
            0,
            Data::Out(&[0; 20]),
            S_IOERR,
        ),
    ];
    for (what, kind, sector, data, want) in cases {
        let (status, used) = h.request(kind, sector, data);
        assert_eq!((status, used), (want, 1), "{what}");
    }
    // Malformed chains that still end with a writable status byte.
    h.header(VIRTIO_BLK_T_OUT, 0);
    let cases: [(&str, Vec<Desc>); 4] = [
        ("short header", vec![(HDR, 8, 0), (STATUS, 1, F_WRITE)]),
        (
            "data outside memory",
            vec![(HDR, 16, 0), (0xff0_0000, 512, 0), (STATUS, 1, F_WRITE)],
        ),
        (
            "readable after writable",
            vec![
                (HDR, 16, 0),
                (DATA, 512, F_WRITE),
                (DATA, 512, 0),
                (STATUS, 1, F_WRITE),
            ],
        ),
        (
            "write as IN buffer",
            vec![(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        ),
    ];
    for (what, chain) in cases {
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        h.submit(&chain).expect(what);
        let want = if what == "write as IN buffer" {
            S_OK
        } else {
            S_IOERR
        };
        assert_eq!(h.status_byte(), want, "{what}");
    }
    assert_eq!(h.file_hash(), pristine, "no bad request wrote");
    assert_eq!(h.status() & NEEDS_RESET, 0);
    assert_eq!(h.read(0, 512), image_bytes(IMAGE)[..512], "still serving");
}

#[test]
fn chains_without_a_status_byte_are_dropped() {
    let h = Harness::new("drop", false, ALL);
    h.header(VIRTIO_BLK_T_IN, 0);
    let cases: [(&str, Vec<Desc>); 4] = [
        ("readable status", vec![(HDR, 16, 0), (STATUS, 1, 0)]),
        ("empty status", vec![(HDR, 16, 0), (STATUS, 0, F_WRITE)]),
        (
            "status outside memory",
            vec![(HDR, 16, 0), (0x2000_0000, 1, F_WRITE)],
        ),
        (
            "status at the top of the address space",
            vec![(HDR, 16, 0), (u64::MAX, 1, F_WRITE)],
        ),
    ];
    for (what, chain) in cases {
        assert_eq!(h.submit(&chain), Some(0), "{what}");
        assert_eq!(h.status_byte(), 0xff, "{what}");
    }
    // A loop: descriptor 0 names itself; virtio-queue stops after the
    // queue's size of descriptors, none of them writable.
    h.ring.set_desc(&h.mem, 0, HDR, 16, F_NEXT, 0);
    h.ring.push_avail(&h.mem, 0);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    // An indirect table of 2048 descriptors, each naming the next.
    for i in 0..2048u64 {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&HDR.to_le_bytes());
        raw[8..12].copy_from_slice(&16u32.to_le_bytes());
        raw[12..14].copy_from_slice(&(F_NEXT | F_WRITE).to_le_bytes());
        raw[14..].copy_from_slice(&((i + 1) as u16).to_le_bytes());
        h.mem
            .write_slice(&raw, GuestAddress(INDIRECT + 16 * i))
            .unwrap();
    }
    h.ring
        .set_desc(&h.mem, 0, INDIRECT, 2048 * 16, F_INDIRECT, 0);
    h.ring.push_avail(&h.mem, 0);
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(h.ring.used_idx(&h.mem), 6);
    assert_eq!(h.ring.used_elem(&h.mem, 5).1, 0);
    let (s, _) = h.blk.stats();
    assert_eq!(s.dropped, 6);
    assert_eq!(h.status() & NEEDS_RESET, 0);
    assert_eq!(
        h.read(1, 512),
        image_bytes(IMAGE)[512..1024],
        "still serving"
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let h = Harness::new("ro", true, VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_RO);
    let pristine = h.file_hash();
    assert_eq!(h.write(0, &[1; 512]), S_IOERR);
    let seg = discard_seg(0, 1, 0);
    let (status, _) = h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(&seg));
    assert_eq!(status, S_UNSUPP, "DISCARD was not negotiated");
    assert_eq!(h.read(0, 512), image_bytes(IMAGE)[..512]);
    assert_eq!(h.file_hash(), pristine);
}

#[test]
fn a_runaway_avail_index_needs_a_reset_and_work_is_bounded() {
    let h = Harness::new("avail", false, ALL);
    // A full queue of valid reads: one notification serves all 16.
    h.header(VIRTIO_BLK_T_IN, 0);
    h.ring.set_desc(&h.mem, 0, HDR, 16, F_NEXT, 1);
    h.ring.set_desc(&h.mem, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    h.ring.set_desc(&h.mem, 2, STATUS, 1, F_WRITE, 0);
    for _ in 0..QSIZE {
        h.ring.push_avail(&h.mem, 0);
    }
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(h.ring.used_idx(&h.mem), QSIZE);
    // An index more than a queue ahead is a broken driver.
    h.ring
        .set_avail_idx(&h.mem, h.ring.avail_idx(&h.mem).wrapping_add(1000));
    h.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(h.status() & NEEDS_RESET, 0);
}

#[test]
fn checkpoint_state_round_trips_and_is_checked() {
    let h = Harness::new("state", false, ALL);
    h.write(0, &[1; 512]);
    let saved = h.blk.save();
    assert_eq!(saved.capacity, 129);
    let mut w = Writer::default();
    saved.encode(&mut w);
    let mut r = Reader::new(&w.buf);
    assert_eq!(BlockState::decode(&mut r).unwrap(), saved);
    r.finish().unwrap();
    for cut in 0..w.buf.len() {
        assert!(BlockState::decode(&mut Reader::new(&w.buf[..cut])).is_err());
    }

    h.read(0, 512);
    h.blk.restore(&saved).unwrap();
    assert_eq!(h.blk.save(), saved, "the used index went back");
    let mut bad = saved.clone();
    bad.capacity = 130;
    let e = h.blk.restore(&bad).unwrap_err();
    assert!(e.to_string().contains("130 sectors"), "{e}");
    // The Persist path is the same state, and refuses the same misfit.
    assert_eq!(Persist::save(&*h.bus()).unwrap(), saved);
    assert!(Persist::restore(&mut *h.bus(), &bad).is_err());
    Persist::restore(&mut *h.bus(), &saved).unwrap();
}

#[test]
fn overlays_snapshot_round_trips_over_the_same_base_only() {
    let h = Harness::new("snap", false, ALL);
    h.blk.push_level();
    h.write(0, &[1; 512]);
    h.blk.push_level();
    h.write(8, &[2; 4096]);
    let seg = discard_seg(100, 8, 0);
    assert_eq!(h.request(VIRTIO_BLK_T_DISCARD, 0, Data::Out(&seg)).0, S_OK);
    let view = h.read(0, 129 * 512);

    let snap = h.blk.overlay_snapshot().unwrap();
    let mut w = Writer::default();
    snap.encode(&mut w);
    let mut direct = Writer::default();
    h.blk.encode_overlays(&mut direct).unwrap();
    assert_eq!(w.buf, direct.buf);
    let mut r = Reader::new(&w.buf);
    let back = OverlaySnapshot::decode(&mut r).unwrap();
    r.finish().unwrap();
    assert_eq!(back, snap);
    for cut in [0, 10, 44, 60, w.buf.len() - 1] {
        assert!(OverlaySnapshot::decode(&mut Reader::new(&w.buf[..cut])).is_err());
    }

    // A new VM over the same image gets the overlays back.
    h.blk.rollback_to(0).unwrap();
    h.blk.restore_overlays(back.clone()).unwrap();
    assert_eq!(h.blk.depth(), 2);
    assert_eq!(h.read(0, 129 * 512), view);

    // The image changed meanwhile: refused, named.
    let mut bytes = std::fs::read(&h.path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&h.path, bytes).unwrap();
    let e = h.blk.check_base_identity(&back.base).unwrap_err();
    assert!(e.to_string().contains("disk.img"), "{e}");
    assert!(h.blk.restore_overlays(back).is_err());
}
