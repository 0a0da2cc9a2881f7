//! KVM-free tests of the snapshot directory: one writer, deleting only
//! what specvm's manifest names, cleaning up after failures and crashes,
//! regular files only, and checksummed memory layers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use super::files::{self, STATE};
use super::layer::SUM_CHUNK;
use super::memory::restore_memory;
use super::source::MemorySource;
use super::writer::{DirWriter, LOCK};
use super::*;
use crate::vstate::memory::{create_guest_memory, GuestRam};

const MEM: u64 = 32 << 20;
const PAGE: u64 = 4096;

/// A private directory, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
    /// The names in it, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Guest memory of 32 MiB with `pages` written (page number, byte).
fn guest(pages: &[(u64, u8)]) -> GuestRam {
    let ram = create_guest_memory(MEM).unwrap();
    for &(p, b) in pages {
        ram.file
            .write_all_at(&[b; PAGE as usize], p * PAGE)
            .unwrap();
    }
    ram
}

/// A state for snapshot `id` of a 32 MiB VM with `layers`.
fn state(id: u64, layers: Vec<Layer>) -> VmSnapshot {
    let mut s = tests::sample();
    s.id = id;
    s.layers = layers;
    s.mem_size = MEM;
    s.ranges = RamLayout::new(MEM).gpa_ranges();
    s
}

/// Writes a full snapshot `id` of `src` into `dir`.
fn full(dir: &Path, src: &File, id: u64) -> VmSnapshot {
    let mut w = DirWriter::open(dir).unwrap();
    let l = w.write_full(&MemorySource::file(src), MEM, id).unwrap();
    let s = state(id, vec![l]);
    w.commit(&s).unwrap();
    s
}

/// Writes a diff snapshot `id` of `pages` of `src` on top of `prev`.
fn diff(dir: &Path, src: &File, prev: &VmSnapshot, pages: &[u64], id: u64) -> VmSnapshot {
    let mut w = DirWriter::open(dir).unwrap();
    let l = w
        .write_diff(&MemorySource::file(src), MEM, pages, id)
        .unwrap();
    let mut layers = prev.layers.clone();
    layers.push(l);
    let s = state(id, layers);
    w.commit(&s).unwrap();
    s
}

/// Restores `dir` into fresh guest memory and waits for the base layer's
/// check; returns the memory, or the first error.
fn restore(dir: &Path) -> Result<GuestRam, SnapshotError> {
    let snap = files::read_state(dir)?;
    let ram = create_guest_memory(MEM).unwrap();
    restore_memory(dir, &snap, &ram)?;
    snap.memory_check.wait()?;
    Ok(ram)
}

fn byte_at(ram: &GuestRam, page: u64) -> u8 {
    ram.mem.read_obj::<u8>(GuestAddress(page * PAGE)).unwrap()
}

#[test]
fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
    let d = Dir::new("lock");
    let ram = guest(&[(1, 1)]);
    let mut first = DirWriter::open(&d.0).unwrap();
    let e = DirWriter::open(&d.0).err().expect("a second writer");
    assert!(matches!(e, SnapshotError::Busy { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("another specvm is writing a snapshot"),
        "{e}"
    );
    let l = first
        .write_full(&MemorySource::file(&ram.file), MEM, 7)
        .unwrap();
    first.commit(&state(7, vec![l])).unwrap();
    // Committed: the lock is free, and the snapshot whole.
    DirWriter::open(&d.0).unwrap();
    assert_eq!(byte_at(&restore(&d.0).unwrap(), 1), 1);
}

#[test]
fn files_specvm_did_not_write_are_never_deleted() {
    let d = Dir::new("foreign");
    let mine = [
        ("memory-notes.txt", "a user's notes"),
        ("memory-0000000000000001", "looks like a layer, is not one"),
        ("state.new", "a user's file"),
        ("notes", "more"),
    ];
    for (n, text) in mine {
        std::fs::write(d.join(n), text).unwrap();
    }
    let ram = guest(&[(1, 1), (3, 3)]);
    let a = full(&d.0, &ram.file, 0xa);
    ram.file.write_all_at(&[4; 4096], 3 * PAGE).unwrap();
    let b = diff(&d.0, &ram.file, &a, &[3], 0xb);
    assert_eq!(b.layers.len(), 2);
    let blocks = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(d.join("memory-000000000000000b")).unwrap(),
    );
    assert!(
        blocks <= 16,
        "the diff layer holds one page: {blocks} blocks"
    );
    full(&d.0, &ram.file, 0xc);
    for (n, text) in mine {
        assert_eq!(std::fs::read_to_string(d.join(n)).unwrap(), text, "{n}");
    }
    assert_eq!(
        d.names(),
        [
            "lock",
            "memory-0000000000000001",
            "memory-000000000000000c",
            "memory-notes.txt",
            "notes",
            "state",
            "state.new"
        ],
        "the full snapshot replaced layers a and b, and nothing else"
    );
    let r = restore(&d.0).unwrap();
    assert_eq!((byte_at(&r, 1), byte_at(&r, 3)), (1, 4));
}

#[test]
fn a_state_file_specvm_did_not_write_is_not_replaced() {
    let d = Dir::new("foreign-state");
    std::fs::write(d.join(STATE), "my state of mind").unwrap();
    let e = DirWriter::open(&d.0).err().expect("foreign state");
    assert!(
        e.to_string().contains("not a specvm snapshot state file"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join(STATE)).unwrap(),
        "my state of mind"
    );
    std::fs::remove_file(d.join(STATE)).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d.join(STATE)).unwrap();
    let e = DirWriter::open(&d.0).err().expect("a link");
    assert!(e.to_string().contains("a symbolic link"), "{e}");
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let d = Dir::new("failed");
    let ram = guest(&[(1, 1)]);
    let good = full(&d.0, &ram.file, 0xa);
    // Guest memory that cannot be read, as a stand-in for any I/O error
    // (the integration tests fill a real disk).
    let unreadable = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory-000000000000000a"))
        .unwrap();
    let before = d.names();
    for id in [0xb, 0xc, 0xd] {
        let mut w = DirWriter::open(&d.0).unwrap();
        assert!(w
            .write_full(&MemorySource::file(&unreadable), MEM, id)
            .is_err());
        drop(w);
        assert_eq!(d.names(), before, "attempt {id:x} left files");
    }
    // The previous snapshot is whole, and the next write succeeds.
    assert_eq!(files::read_state(&d.0).unwrap().id, good.id);
    assert_eq!(byte_at(&restore(&d.0).unwrap(), 1), 1);
    full(&d.0, &ram.file, 0xe);
    assert_eq!(byte_at(&restore(&d.0).unwrap(), 1), 1);
}

#[test]
fn a_crashed_writers_files_are_removed_by_the_next_writer() {
    let d = Dir::new("crash");
    let ram = guest(&[(1, 1)]);
    let a = full(&d.0, &ram.file, 0xa);
    // Crashes after writing a layer, and after writing the state too.
    let mut w = DirWriter::open(&d.0).unwrap();
    w.write_full(&MemorySource::file(&ram.file), MEM, 0xb)
        .unwrap();
    w.crash();
    assert!(d.join("memory-000000000000000b").exists());
    // The crashed writer's layer goes when the next writer starts, whether
    // it then succeeds or not; the committed layer stays.
    let mut w = DirWriter::open(&d.0).unwrap();
    assert!(!d.join("memory-000000000000000b").exists());
    assert!(d.join("memory-000000000000000a").exists());
    let l = w
        .write_diff(&MemorySource::file(&ram.file), MEM, &[1], 0xc)
        .unwrap();
    w.crash();
    // A journal naming a committed layer leaves it: here, `c` is
    // committed by hand as if the crash came after the rename.
    let mut layers = a.layers.clone();
    layers.push(l);
    std::fs::write(d.join(STATE), state(0xc, layers).encode()).unwrap();
    DirWriter::open(&d.0).unwrap();
    assert!(d.join("memory-000000000000000c").exists());
    assert_eq!(files::read_state(&d.0).unwrap().layers.len(), 2);
    restore(&d.0).unwrap();
}

#[test]
fn a_journal_specvm_did_not_write_deletes_nothing() {
    let d = Dir::new("journal");
    let ram = guest(&[(1, 1)]);
    full(&d.0, &ram.file, 0xa);
    std::fs::write(d.join("victim"), "keep").unwrap();
    std::fs::write(d.join("memory-00000000000000ff"), "keep").unwrap();
    // Names outside specvm's, and a checksum that does not match.
    std::fs::write(
        d.join(LOCK),
        "specvm snapshot journal 1\nvictim\nxxh3 0000000000000000\n",
    )
    .unwrap();
    DirWriter::open(&d.0).unwrap();
    std::fs::write(
        d.join(LOCK),
        "specvm snapshot journal 1\nmemory-00000000000000ff\nxxh3 0000000000000000\n",
    )
    .unwrap();
    DirWriter::open(&d.0).unwrap();
    assert!(d.join("victim").exists() && d.join("memory-00000000000000ff").exists());
}

/// Flips byte `at` of file `path`.
fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
}

#[test]
fn every_damage_to_a_memory_layer_is_found() {
    let d = Dir::new("damage");
    let pages = [(1, 1), (2, 2), (100, 9), (4000, 7)];
    let ram = guest(&pages);
    let a = full(&d.0, &ram.file, 0xa);
    ram.file.write_all_at(&[5; 4096], 2 * PAGE).unwrap();
    diff(&d.0, &ram.file, &a, &[2], 0xb);
    let r = restore(&d.0).unwrap();
    assert_eq!(
        (byte_at(&r, 1), byte_at(&r, 2), byte_at(&r, 4000)),
        (1, 5, 7)
    );
    let base = d.join("memory-000000000000000a");
    let layer_b = d.join("memory-000000000000000b");
    let pristine = [
        std::fs::read(&base).unwrap(),
        std::fs::read(&layer_b).unwrap(),
    ];
    let put_back = || {
        std::fs::write(&base, &pristine[0]).unwrap();
        std::fs::write(&layer_b, &pristine[1]).unwrap();
    };
    let other = Dir::new("damage-other");
    full(
        &other.0,
        &guest(&[(1, 1), (2, 2), (100, 9), (4000, 8)]).file,
        0xf,
    );
    let (b1, b2, b3, b4, l1) = (
        base.clone(),
        base.clone(),
        base.clone(),
        base.clone(),
        layer_b.clone(),
    );
    let (b5, o) = (base.clone(), other.join("memory-000000000000000f"));
    type Damage = Box<dyn Fn()>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "one rewritten word",
            Box::new(move || {
                base_file(&b1)
                    .write_all_at(&0xdead_beefu64.to_le_bytes(), 100 * PAGE + 64)
                    .unwrap()
            }),
            "have checksum",
        ),
        (
            "a flipped byte",
            Box::new(move || flip(&b2, 4000 * PAGE + 7)),
            "have checksum",
        ),
        (
            "a layer copied from another snapshot",
            Box::new(move || {
                std::fs::copy(&o, &b3).unwrap();
            }),
            "have checksum",
        ),
        (
            "a rewritten page in a diff layer",
            Box::new(move || flip(&l1, 2 * PAGE + 100)),
            "have checksum",
        ),
        (
            "data where the snapshot had a hole",
            Box::new(move || {
                base_file(&b4)
                    .write_all_at(&[1], 7 * SUM_CHUNK + 5)
                    .unwrap()
            }),
            "holds data at 0x70005",
        ),
        (
            "a truncated layer",
            Box::new(move || base_file(&b5).set_len(MEM - PAGE).unwrap()),
            "bytes, the state says",
        ),
    ];
    for (what, damage, needle) in cases {
        damage();
        let e = restore(&d.0)
            .err()
            .unwrap_or_else(|| panic!("{what}: restored"));
        assert!(e.to_string().contains(needle), "{what}: {e}");
        put_back();
        restore(&d.0).unwrap_or_else(|e| panic!("after {what}: {e}"));
    }
    // A zero page where the base had a hole changes nothing the guest
    // sees, and so is accepted.
    base_file(&base).write_all_at(&[0; 4096], 9 * PAGE).unwrap();
    restore(&d.0).unwrap();
}

fn base_file(p: &Path) -> File {
    std::fs::OpenOptions::new().write(true).open(p).unwrap()
}

#[test]
fn fifos_devices_links_and_huge_files_are_refused_before_reading() {
    let d = Dir::new("special");
    let ram = guest(&[(1, 1)]);
    full(&d.0, &ram.file, 0xa);
    let state = d.join(STATE);
    let good = std::fs::read(&state).unwrap();
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    type Make<'a> = &'a dyn Fn(&Path);
    let cases: [(&str, Make, &str); 4] = [
        ("FIFO", &|p| mkfifo(p), "is a FIFO"),
        (
            "link to /dev/zero",
            &|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
            "is a symbolic link",
        ),
        (
            "link inside the directory",
            &|p| std::os::unix::fs::symlink("memory-000000000000000a", p).unwrap(),
            "is a symbolic link",
        ),
        (
            "huge",
            &|p| File::create(p).unwrap().set_len(1 << 40).unwrap(),
            "larger than any state file",
        ),
    ];
    for (what, make, needle) in cases {
        std::fs::remove_file(&state).unwrap();
        make(&state);
        let e = files::read_state(&d.0)
            .err()
            .unwrap_or_else(|| panic!("{what}"));
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    std::fs::remove_file(&state).unwrap();
    std::fs::write(&state, &good).unwrap();
    let layer = d.join("memory-000000000000000a");
    let copy = d.join("elsewhere");
    std::fs::rename(&layer, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &layer).unwrap();
    let e = restore(&d.0).err().expect("linked layer");
    assert!(e.to_string().contains("is a symbolic link"), "{e}");
    std::fs::remove_file(&layer).unwrap();
    mkfifo(&layer);
    let e = restore(&d.0).err().expect("FIFO layer");
    assert!(e.to_string().contains("is a FIFO"), "{e}");
}

#[test]
fn a_version_2_snapshot_is_replaced_with_its_layers() {
    let d = Dir::new("v2");
    // A version 2 state: the header with a CRC-32 of the payload, which
    // starts with the snapshot id and the layer ids.
    let mut payload = Vec::new();
    payload.extend_from_slice(&0x2bu64.to_le_bytes());
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(&0x2au64.to_le_bytes());
    payload.extend_from_slice(&0x2bu64.to_le_bytes());
    let mut file = codec::MAGIC.to_vec();
    file.extend_from_slice(&2u32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&codec::crc32(&payload).to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&payload);
    std::fs::write(d.join(STATE), &file).unwrap();
    for n in [
        "memory-000000000000002a",
        "memory-000000000000002b",
        "memory-00000000000000ff",
    ] {
        std::fs::write(d.join(n), "old").unwrap();
    }
    let e = files::read_state(&d.0).err().expect("version 2");
    assert!(
        e.to_string().contains("format version 2 is not supported"),
        "{e}"
    );
    full(&d.0, &guest(&[(1, 1)]).file, 0xa);
    assert_eq!(
        d.names(),
        [
            "lock",
            "memory-000000000000000a",
            "memory-00000000000000ff",
            "state"
        ],
        "the version 2 state's two layers went, the unnamed file stayed"
    );
}

#[test]
fn a_layer_written_from_mappings_holds_the_newer_pages() {
    let d = Dir::new("mapped");
    // The file: pages 0..2048 (8 MiB) each hold their number modulo 251,
    // so that a page out of place by any whole number of chunks shows.
    let pat = |p: u64| (p % 251) as u8;
    let ram = create_guest_memory(MEM).unwrap();
    let file: Vec<u8> = (0..2048u64)
        .flat_map(|p| vec![pat(p); PAGE as usize])
        .collect();
    ram.file.write_all_at(&file, 0).unwrap();
    // The guest's mapping: the file's bytes, and newer ones in pages
    // 100..110 (inside the first 1 MiB chunk), in 2 MiB from page 3000
    // (past the file's data, unaligned to chunks) and in 16 KiB from page
    // 5000. Page-aligned, as mappings are (O_DIRECT writes need it);
    // mapped in two parts split mid-chunk at page 300, so some chunks are
    // read into a buffer, the others joined into runs: the long ones
    // copied into huge-page buffers, the 16 KiB one written in place.
    let mut space = vec![0u8; (MEM + PAGE) as usize];
    let skip = space.as_ptr().align_offset(PAGE as usize);
    let mapping = &mut space[skip..skip + MEM as usize];
    ram.file.read_exact_at(mapping, 0).unwrap();
    mapping[100 * PAGE as usize..110 * PAGE as usize].fill(0xa0);
    mapping[3000 * PAGE as usize..3512 * PAGE as usize].fill(0xb0);
    mapping[5000 * PAGE as usize..5004 * PAGE as usize].fill(0xc0);
    let (low, high) = mapping.split_at(300 * PAGE as usize);
    let src = MemorySource::new(
        &ram.file,
        vec![(0, low), (300 * PAGE, high)],
        vec![
            (100 * PAGE, 10 * PAGE),
            (3000 * PAGE, 512 * PAGE),
            (5000 * PAGE, 4 * PAGE),
        ],
    );
    let mut w = DirWriter::open(&d.0).unwrap();
    let l = w.write_full(&src, MEM, 0x21).unwrap();
    w.commit(&state(0x21, vec![l])).unwrap();
    let back = restore(&d.0).unwrap();
    for p in [0, 99, 110, 255, 256, 700, 1000, 1500, 2047] {
        assert_eq!(byte_at(&back, p), pat(p), "page {p}");
    }
    for p in [100, 109] {
        assert_eq!(byte_at(&back, p), 0xa0, "page {p}");
    }
    for p in [2048, 2999, 3512, 4999, 5004, 8191] {
        assert_eq!(byte_at(&back, p), 0, "page {p}");
    }
    for p in [3000, 3511] {
        assert_eq!(byte_at(&back, p), 0xb0, "page {p}");
    }
    for p in [5000, 5003] {
        assert_eq!(byte_at(&back, p), 0xc0, "page {p}");
    }
}
