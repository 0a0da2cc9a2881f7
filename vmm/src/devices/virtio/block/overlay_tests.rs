//! The speculative disk against a reference model (a `Vec<u8>` disk and a
//! stack of full copies), and its rules one by one.

use std::io;

use proptest::prelude::*;

use super::overlay::*;

/// A base image in memory that counts what is done to it and can be told
/// to fail.
#[derive(Debug, Clone)]
struct MemBase {
    bytes: Vec<u8>,
    writes: u64,
    syncs: u64,
    fail_writes: bool,
}

impl MemBase {
    fn new(size: usize, fill: u8) -> Self {
        Self {
            bytes: vec![fill; size],
            writes: 0,
            syncs: 0,
            fail_writes: false,
        }
    }
}

fn range(buf_len: usize, offset: u64, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    match start.checked_add(buf_len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

impl BaseIo for MemBase {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = range(buf.len(), offset, self.bytes.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_writes {
            return Err(io::Error::other("injected"));
        }
        let r = range(buf.len(), offset, self.bytes.len())?;
        self.bytes[r].copy_from_slice(buf);
        self.writes += 1;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.syncs += 1;
        Ok(())
    }
}

/// 9 granules and a half: the last granule is short.
const SIZE: usize = 9 * GRANULE as usize + 2048;

fn disk() -> SpecDisk<MemBase> {
    SpecDisk::new(MemBase::new(SIZE, 0x11), SIZE as u64, false, u64::MAX)
}

fn read_all<B: BaseIo>(d: &SpecDisk<B>) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read(0, &mut v).unwrap();
    v
}

#[test]
fn depth_zero_writes_go_to_the_base() {
    let mut d = disk();
    d.write(100, &[7; 10]).unwrap();
    assert_eq!(&d.base().bytes[100..110], &[7; 10]);
    assert_eq!(d.base().writes, 1);
    d.flush().unwrap();
    assert_eq!(d.base().syncs, 1, "a flush at depth 0 syncs");
    d.discard(0, 512).unwrap();
    assert_eq!(&d.base().bytes[..512], &[0; 512][..]);
}

#[test]
fn speculative_writes_stay_off_the_base_until_the_outermost_fold() {
    let mut d = disk();
    let before = d.base().bytes.clone();
    assert_eq!(d.push_level(), 0);
    d.write(4000, &[1; 200]).unwrap(); // two granules, both partial
    d.flush().unwrap();
    assert_eq!(d.push_level(), 1);
    d.write(4096, &[2; 4096]).unwrap();
    d.discard(0, 512).unwrap();
    assert_eq!(d.base().bytes, before);
    assert_eq!((d.base().writes, d.base().syncs), (0, 0));
    assert_eq!(d.stats().flushes_absorbed, 1);

    let mut want = before.clone();
    want[4000..4200].fill(1);
    want[4096..8192].fill(2);
    want[..512].fill(0);
    assert_eq!(read_all(&d), want);

    // Commit the inner one: reads stay, the base too.
    d.fold(1).unwrap();
    assert_eq!(d.depth(), 1);
    assert_eq!(read_all(&d), want);
    assert_eq!(d.base().bytes, before);
    // Commit the outer one: the base gets it, and is synced.
    d.fold(0).unwrap();
    assert_eq!(d.depth(), 0);
    assert_eq!(d.base().bytes, want);
    assert_eq!(d.base().syncs, 1);
    assert_eq!(d.held_bytes(), 0);
}

#[test]
fn rollback_drops_levels_without_io() {
    let mut d = disk();
    d.push_level();
    d.write(0, &[3; 5000]).unwrap();
    let at1 = read_all(&d);
    d.push_level();
    d.write(SIZE as u64 - 512, &[4; 512]).unwrap();
    d.push_level();
    d.discard(0, SIZE as u64).unwrap();
    d.rollback_to(1).unwrap();
    assert_eq!(read_all(&d), at1);
    assert_eq!(d.depth(), 1);
    d.rollback_to(0).unwrap();
    assert_eq!(read_all(&d), vec![0x11; SIZE]);
    assert_eq!((d.base().writes, d.base().syncs, d.held_bytes()), (0, 0, 0));
    assert!(matches!(
        d.rollback_to(1),
        Err(OverlayError::NoLevel { .. })
    ));
    assert!(matches!(d.fold(0), Err(OverlayError::NoLevel { .. })));
}

#[test]
fn folding_a_lower_level_keeps_the_levels_above() {
    let mut d = disk();
    d.push_level();
    d.write(0, &[1; 8192]).unwrap();
    d.push_level();
    d.write(4096, &[2; 100]).unwrap();
    d.push_level();
    d.write(8192, &[3; 100]).unwrap();
    let now = read_all(&d);
    // The middle checkpoint commits: level 1 merges into level 0.
    d.fold(1).unwrap();
    assert_eq!((d.depth(), read_all(&d)), (2, now.clone()));
    // The outermost commits with a level above it still open.
    d.fold(0).unwrap();
    assert_eq!((d.depth(), read_all(&d)), (1, now));
    let mut base = vec![0x11; SIZE];
    base[..8192].fill(1);
    base[4096..4196].fill(2);
    assert_eq!(d.base().bytes, base);
    // Aborting the remaining one goes back to what was committed.
    d.rollback_to(0).unwrap();
    assert_eq!(read_all(&d), base);
}

#[test]
fn a_failed_outermost_fold_changes_no_level() {
    let mut d = disk();
    d.push_level();
    d.write(10, &[9; 10]).unwrap();
    let now = read_all(&d);
    // The same levels over a base that refuses writes.
    let mut base = MemBase::new(SIZE, 0x11);
    base.fail_writes = true;
    let mut failing = SpecDisk::new(base, SIZE as u64, false, u64::MAX);
    failing.set_levels(d.levels().to_vec()).unwrap();
    assert!(matches!(failing.fold(0), Err(OverlayError::Io { .. })));
    assert_eq!((failing.depth(), read_all(&failing)), (1, now));
}

#[test]
fn limits_and_ranges_are_enforced() {
    let mut d = SpecDisk::new(MemBase::new(SIZE, 0), SIZE as u64, false, 2 * 4200);
    d.push_level();
    d.write(0, &[1; 8192]).unwrap();
    let e = d.write(8192, &[1; 1]).unwrap_err();
    assert!(matches!(e, OverlayError::Full { limit: 8400 }), "{e}");
    d.write(100, &[5; 10]).unwrap(); // already held: no new cost
    d.rollback_to(0).unwrap();
    d.push_level();
    d.write(8192, &[1; 1]).unwrap();

    for (off, len) in [(SIZE as u64, 1u64), (SIZE as u64 - 1, 2), (u64::MAX, 2)] {
        let mut buf = vec![0u8; len as usize];
        assert!(matches!(
            d.read(off, &mut buf),
            Err(OverlayError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write(off, &buf),
            Err(OverlayError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.discard(off, len),
            Err(OverlayError::OutOfRange { .. })
        ));
    }
    let mut ro = SpecDisk::new(MemBase::new(SIZE, 0), SIZE as u64, true, u64::MAX);
    assert!(matches!(ro.write(0, &[1]), Err(OverlayError::ReadOnly)));
    ro.push_level();
    assert!(matches!(ro.discard(0, 512), Err(OverlayError::ReadOnly)));
}

#[test]
fn set_levels_checks_granules() {
    let mut d = disk();
    let mut bad = LevelMap::new();
    bad.insert(10, Granule::Zero); // granule 10 starts past the end
    assert!(d.set_levels(vec![bad]).is_err());
    let mut short = LevelMap::new();
    short.insert(0, Granule::Data(vec![0; 100].into()));
    assert!(d.set_levels(vec![short]).is_err());
    assert_eq!(d.depth(), 0);
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        len: usize,
        byte: u8,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    Push,
    /// Rollback to `level % (depth + 1)`.
    Rollback(usize),
    /// Fold `level % depth`.
    Fold(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let size = SIZE as u64;
    prop_oneof![
        4 => (0..size, 1usize..3 * GRANULE as usize, any::<u8>())
            .prop_map(|(offset, len, byte)| Op::Write { offset, len, byte }),
        1 => (0..size, 1u64..4 * GRANULE).prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => Just(Op::Flush),
        2 => Just(Op::Push),
        1 => any::<usize>().prop_map(Op::Rollback),
        2 => any::<usize>().prop_map(Op::Fold),
    ]
}

/// The reference: the disk as the guest sees it, the disk at each open
/// checkpoint, and what the base must hold.
struct Model {
    now: Vec<u8>,
    stack: Vec<Vec<u8>>,
}

impl Model {
    fn base(&self) -> &[u8] {
        self.stack.first().unwrap_or(&self.now)
    }
}

/// Applies `op` to both; returns whether the base may have changed.
fn apply(d: &mut SpecDisk<MemBase>, m: &mut Model, op: &Op) -> bool {
    let depth0 = m.stack.is_empty();
    match *op {
        Op::Write { offset, len, byte } => {
            let len = len.min(SIZE - offset as usize);
            d.write(offset, &vec![byte; len]).unwrap();
            m.now[offset as usize..offset as usize + len].fill(byte);
            depth0
        }
        Op::Discard { offset, len } => {
            let len = len.min(SIZE as u64 - offset);
            d.discard(offset, len).unwrap();
            m.now[offset as usize..(offset + len) as usize].fill(0);
            depth0
        }
        Op::Flush => {
            d.flush().unwrap();
            false
        }
        Op::Push => {
            assert_eq!(d.push_level(), m.stack.len());
            m.stack.push(m.now.clone());
            false
        }
        Op::Rollback(l) => {
            let l = l % (m.stack.len() + 1);
            d.rollback_to(l).unwrap();
            if l < m.stack.len() {
                m.now = m.stack[l].clone();
                m.stack.truncate(l);
            }
            false
        }
        Op::Fold(_) if depth0 => {
            assert!(d.fold(0).is_err());
            false
        }
        Op::Fold(l) => {
            let l = l % m.stack.len();
            d.fold(l).unwrap();
            m.stack.remove(l);
            l == 0
        }
    }
}

#[test]
fn a_private_disk_never_writes_its_base() {
    let mut d = SpecDisk::new_private(MemBase::new(SIZE, 0x11), SIZE as u64, false, u64::MAX);
    assert!(d.private());
    assert_eq!(d.depth(), 0);
    d.write(100, &[7; 10]).unwrap();
    d.flush().unwrap();
    assert_eq!(d.push_level(), 0, "the private level is not a checkpoint's");
    d.write(5000, &[8; 10]).unwrap();
    assert_eq!(d.push_level(), 1);
    d.write(9000, &[9; 10]).unwrap();
    d.rollback_to(1).unwrap();
    d.fold(0).unwrap();
    assert_eq!(d.depth(), 0);
    assert!(d.fold(0).is_err(), "no checkpoint is open");
    d.rollback_to(0).unwrap();
    let mut want = vec![0x11; SIZE];
    want[100..110].fill(7);
    want[5000..5010].fill(8);
    assert_eq!(read_all(&d), want);
    assert_eq!((d.base().writes, d.base().syncs), (0, 0));
    assert!(d.base().bytes.iter().all(|&b| b == 0x11));
    assert_eq!(d.levels().len(), 1);
    d.sync_shared_base().unwrap();
    assert_eq!(d.base().syncs, 0);

    // Restoring saved levels merges them into the private level, newest
    // granule first.
    let mut e = SpecDisk::new_private(MemBase::new(SIZE, 0x11), SIZE as u64, false, u64::MAX);
    let mut l0 = LevelMap::new();
    l0.insert(0, Granule::Data(vec![1; GRANULE as usize].into()));
    l0.insert(1, Granule::Data(vec![1; GRANULE as usize].into()));
    let mut l1 = LevelMap::new();
    l1.insert(1, Granule::Zero);
    e.set_levels(vec![l0, l1]).unwrap();
    assert_eq!((e.depth(), e.levels().len()), (0, 1));
    let got = read_all(&e);
    assert!(got[..4096].iter().all(|&b| b == 1));
    assert!(got[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(e.held_bytes(), DATA_COST + ZERO_COST);
}

/// What a data granule and a zero granule cost against the budget.
const DATA_COST: u64 = GRANULE + 64;
const ZERO_COST: u64 = 64;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Private mode: the same reads as the model, and the base is never
    /// written nor synced, whatever the operations.
    #[test]
    fn a_private_disk_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut d = SpecDisk::new_private(MemBase::new(SIZE, 0x11), SIZE as u64, false, u64::MAX);
        let mut m = Model { now: vec![0x11; SIZE], stack: Vec::new() };
        for op in &ops {
            apply(&mut d, &mut m, op);
            prop_assert_eq!(read_all(&d), m.now.clone(), "reads after {:?}", op);
            prop_assert_eq!(d.depth(), m.stack.len());
            prop_assert!(d.base().bytes.iter().all(|&b| b == 0x11), "base changed by {:?}", op);
            prop_assert_eq!((d.base().writes, d.base().syncs), (0, 0));
        }
    }

    #[test]
    fn matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut d = disk();
        let mut m = Model { now: vec![0x11; SIZE], stack: Vec::new() };
        for op in &ops {
            let (writes, syncs) = (d.base().writes, d.base().syncs);
            let before = d.base().bytes.clone();
            let may_change = apply(&mut d, &mut m, op);
            prop_assert_eq!(read_all(&d), m.now.clone(), "reads after {:?}", op);
            prop_assert_eq!(&d.base().bytes[..], m.base(), "base after {:?}", op);
            if !may_change {
                prop_assert_eq!(&d.base().bytes, &before, "base changed by {:?}", op);
                prop_assert_eq!(d.base().writes, writes, "base written by {:?}", op);
                let sync_ok = matches!(op, Op::Flush) && m.stack.is_empty();
                prop_assert!(sync_ok || d.base().syncs == syncs, "base synced by {:?}", op);
            }
            prop_assert_eq!(d.depth(), m.stack.len());
            if d.depth() == 0 {
                prop_assert_eq!(d.held_bytes(), 0);
            }
        }
        // A random read window, across granules and levels.
        let mut buf = vec![0u8; 5000];
        d.read(3000, &mut buf).unwrap();
        prop_assert_eq!(&buf[..], &m.now[3000..8000]);
    }
}
