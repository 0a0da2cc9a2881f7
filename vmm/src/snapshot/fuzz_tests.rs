//! Fuzz targets of every snapshot decoder that reads bytes from disk
//! (`docs/fuzzing.md`): the state file ([`VmSnapshot::decode`], which
//! `files::read_state` calls: the header, then the payload with the
//! layer records and their chunk checksum tables, [`Layer::get`]); the
//! manifest a writer reads from the state it replaces
//! ([`codec::manifest_layers`], formats 3 and 2); and the journal in the
//! lock file (`writer::read_journal`).
//!
//! Bounded, seeded loops on stable Rust: a SplitMix64 generator makes
//! each case from the seed and the case number. Inputs are random bytes,
//! and valid encodings from the real encoders, flipped, truncated,
//! extended, spliced or with a count or length field set to a huge value,
//! mostly with the header's length and checksum recomputed after the
//! mutation so that it reaches the payload parser. The decoders must not
//! panic, and what they accept must be well-formed and encode back to the
//! bytes it was read from. Allocation is not measured (that would take a
//! global allocator): the decoders bound it by the bytes left, and the
//! huge counts here would abort the test if one did not.
//!
//! `SPECVM_FUZZ_CASES=N` sets the cases per target, `SPECVM_FUZZ_SEED=S`
//! the seed, `SPECVM_FUZZ_INPUT=FILE` replays one input (with a filter
//! naming its target). A failing case is saved to a file; it becomes a
//! named regression test at the end of this file.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::codec::{self, Reader, Writer, FORMAT_VERSION, HEADER_LEN, MAX_PAYLOAD};
use super::layer::pieces;
use super::writer::{read_journal, DirWriter, LOCK};
use super::*;
use crate::config::{MAX_MEM_SIZE, MAX_VCPUS, MIN_MEM_SIZE};
use crate::device_manager::persist::MAX_DEVICES;

/// Cases per target when `SPECVM_FUZZ_CASES` is not set, for targets
/// whose cases cost a few microseconds in a debug build.
const DEFAULT_CASES: u64 = 100_000;
/// Cases of the state file target: each hashes a 4-15 KiB file twice
/// (the header's checksum, recomputed, then checked). XXH3 is optimised in
/// test builds too (the workspace's dev profile), so 10^5 cases take about
/// 2.4 s in a debug build.
const STATE_CASES: u64 = 100_000;
/// The seed when `SPECVM_FUZZ_SEED` is not set.
const DEFAULT_SEED: u64 = 0x5bec_0f0c_2026_1203;
const PAGE: u64 = 4096;
/// The first line of a journal, as `writer` writes it (checked against
/// the real writer by `journals_made_here_are_the_writers`).
const JOURNAL_HEAD: &str = "specvm snapshot journal 1";

// ---------------------------------------------------------------------
// The loop.

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// An index below `n` (`n` > 0).
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.index(from.len())]
    }
    /// Fewer than `max` random bytes.
    fn some_bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.index(max))
            .map(|_| self.next_u64() as u8)
            .collect()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let t = v.trim().replace('_', "");
    let n = match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    };
    Some(n.unwrap_or_else(|| panic!("{name}={v} is not a number")))
}

/// Runs `check` on the inputs `make` builds, one per case, and fails
/// with the input of the first case that panics, saved to a file.
fn fuzz(name: &str, default_cases: u64, make: impl Fn(&mut Rng) -> Vec<u8>, check: impl Fn(&[u8])) {
    if let Ok(path) = std::env::var("SPECVM_FUZZ_INPUT") {
        return check(&std::fs::read(&path).expect("reading SPECVM_FUZZ_INPUT"));
    }
    let n = env_u64("SPECVM_FUZZ_CASES").unwrap_or(default_cases);
    let seed = env_u64("SPECVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    // FNV-1a of the name: a stream of cases of its own per target.
    let base = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let start = Instant::now();
    for case in 0..n {
        let input = make(&mut Rng(base ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let file = std::env::temp_dir().join(format!("specvm-fuzz-{name}-{case}"));
            let _ = std::fs::write(&file, &input);
            let hex: String = input
                .iter()
                .take(1024)
                .map(|x| format!("{x:02x}"))
                .collect();
            panic!(
                "fuzz target {name} failed at case {case} (seed {seed:#x}; the panic is above)\n\
                 input ({} bytes; the first 1 KiB): {hex}\n\
                 replay: SPECVM_FUZZ_INPUT={} cargo test -p vmm --lib {name}",
                input.len(),
                file.display(),
            );
        }
    }
    let took = start.elapsed();
    eprintln!("{name}: {n} cases in {took:.2?} (seed {seed:#x})");
}

// ---------------------------------------------------------------------
// Valid state files, from random snapshots and the real encoder.

fn random_extents(rng: &mut Rng, mem_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for _ in 0..rng.below(5) {
        let gap = match rng.below(4) {
            0 => 0,
            1 => rng.below(mem_size / PAGE / 4) * PAGE,
            _ => rng.below(40) * PAGE,
        };
        let most = if rng.below(8) == 0 { 100 } else { 20 };
        let len = (1 + rng.below(most)) * PAGE;
        let off = pos + gap;
        if off + len > mem_size {
            break;
        }
        out.push((off, len));
        pos = off + len;
    }
    out
}

fn random_layer(rng: &mut Rng, id: u64, mem_size: u64) -> Layer {
    let extents = random_extents(rng, mem_size);
    let sums = pieces(&extents).map(|_| rng.next_u64()).collect();
    Layer { id, extents, sums }
}

/// A snapshot that [`VmSnapshot::decode`] accepts, of random shape: the
/// unit tests' sample with its layers, memory size, boot kind, vCPUs and
/// devices changed.
fn random_snapshot(rng: &mut Rng) -> VmSnapshot {
    let mut s = tests::sample();
    s.id = rng.next_u64();
    s.mem_size = rng.pick(&[MIN_MEM_SIZE, 64 << 20, 1 << 30, 5 << 30, MAX_MEM_SIZE]);
    s.ranges = RamLayout::new(s.mem_size).gpa_ranges();
    let most = if rng.below(8) == 0 { MAX_LAYERS } else { 3 };
    let n = 1 + rng.below(most as u64);
    // Unique ids: the older layers' are `id ^ 1..n`, the last is `id`.
    s.layers = (1..=n)
        .map(|i| random_layer(rng, s.id ^ (i % n), s.mem_size))
        .collect();
    s.linux = rng.below(2) == 0;
    s.trampoline = (s.linux && rng.below(2) == 0).then(|| TrampolineState {
        kernel_lstar: rng.next_u64(),
        star: rng.next_u64(),
        sfmask: rng.next_u64(),
    });
    s.saved_at_ns = rng.next_u64();
    // One vCPU in 3 cases of 4 (each costs hashing time in every case).
    match rng.below(4) {
        0 => {}
        1 => s.machine.vcpus.truncate(1),
        _ => drop(s.machine.vcpus.remove(0)),
    }
    for v in &mut s.machine.vcpus {
        v.regs.rip = rng.next_u64();
        let m = v.msrs[0];
        v.msrs.resize(rng.index(5), m);
        v.msrs.iter_mut().for_each(|m| m.data = rng.next_u64());
    }
    s.machine.vm.clock.clock = rng.next_u64();
    let d = &mut s.machine.devices;
    d.serial.in_buffer = rng.some_bytes(24);
    let all = std::mem::take(&mut d.nets);
    d.nets = (0..rng.below(4))
        .map(|_| all[rng.index(all.len())].clone())
        .collect();
    for x in &mut d.nets {
        x.transport.queues.truncate(rng.index(3));
        x.mtu = rng.next_u64() as u16;
    }
    s
}

// ---------------------------------------------------------------------
// Mutations.

/// Recomputes the header's checksum as `codec::seal` does (XXH3-64 over
/// the version, reserved word and length, then the payload), whatever
/// they now hold: a mutation then passes the header check.
fn fix_checksum(file: &mut [u8]) {
    let mut h = Xxh3::new();
    h.update(&file[8..24]);
    h.update(&file[HEADER_LEN..]);
    file[24..32].copy_from_slice(&h.digest().to_le_bytes());
}

/// Sets the header's length to the payload's, and fixes the checksum.
fn reseal(file: &mut [u8]) {
    let len = (file.len() - HEADER_LEN) as u64;
    file[16..24].copy_from_slice(&len.to_le_bytes());
    fix_checksum(file);
}

/// A valid file and where its count and length fields may be: every
/// 4-byte window holding 1..=0x2000 (counts, and the length prefixes of
/// the KVM structures), and every 8-byte window holding a page-aligned
/// address or size (extents, memory size, ranges).
struct Seed {
    file: Vec<u8>,
    counts: Vec<usize>,
    addrs: Vec<usize>,
}

impl Seed {
    /// Fields at these payload offsets of files made elsewhere.
    fn fields(counts: Vec<usize>, addrs: Vec<usize>) -> Self {
        let at = |v: Vec<usize>| v.into_iter().map(|o| HEADER_LEN + o).collect();
        Self {
            file: Vec::new(),
            counts: at(counts),
            addrs: at(addrs),
        }
    }

    fn new(file: Vec<u8>) -> Self {
        let offsets =
            |ok: &dyn Fn(usize) -> bool| (HEADER_LEN..file.len()).filter(|&o| ok(o)).collect();
        let counts = offsets(&|o| le(&file, o, 4).is_some_and(|v| (1..=0x2000).contains(&v)));
        let addrs = offsets(&|o| {
            le(&file, o, 8).is_some_and(|v| v != 0 && v % PAGE == 0 && v <= MAX_MEM_SIZE)
        });
        Self {
            file,
            counts,
            addrs,
        }
    }
}

/// The little-endian number of `n` bytes at `o`, if `f` holds them.
fn le(f: &[u8], o: usize, n: usize) -> Option<u64> {
    let b = f.get(o..o.checked_add(n)?)?;
    Some(b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x)))
}

/// The valid files the mutations start from: the unit tests' sample, and
/// snapshots of random shape (made once per run: mutating is cheaper
/// than encoding).
fn seeds() -> Vec<Seed> {
    let mut rng = Rng(env_u64("SPECVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED));
    let mut out = vec![Seed::new(tests::sample().encode())];
    out.extend((0..63).map(|_| Seed::new(random_snapshot(&mut rng).encode())));
    out
}

/// Huge counts and lengths: past what any file holds, at the sign bit,
/// the largest.
const HUGE32: [u32; 5] = [1 << 28, !0 >> 1, 1 << 31, !1, !0];
/// Huge addresses and sizes, past the largest guest memory.
const HUGE64: [u64; 5] = [MAX_MEM_SIZE + PAGE, 1 << 63, !(PAGE - 1), !1, !0];

/// A new value for the count or length field `old`, with `left` bytes
/// after it.
fn interesting_u32(rng: &mut Rng, old: u32, left: usize) -> u32 {
    match rng.below(4) {
        0 => rng.pick(&HUGE32),
        1 => rng.pick(&[0, 1, 33, MAX_LAYERS as u32 + 1, MAX_DEVICES as u32 + 1]),
        2 => old.wrapping_add(rng.pick(&[1, !0, old])),
        _ => left as u32 / rng.pick(&[8, 16, 64]) + rng.below(2) as u32,
    }
}

/// A new value for the address or size `old`.
fn interesting_u64(rng: &mut Rng, old: u64) -> u64 {
    match rng.below(4) {
        0 => rng.pick(&HUGE64),
        1 => rng.pick(&[0, 1, MIN_MEM_SIZE - PAGE, MAX_MEM_SIZE - PAGE, MAX_MEM_SIZE]),
        2 => old.wrapping_add(rng.pick(&[PAGE, PAGE.wrapping_neg()])),
        _ => rng.below(1 << 24) * PAGE,
    }
}

/// One mutation of the payload (the bytes from `HEADER_LEN`).
fn mutate_once(rng: &mut Rng, seed: &Seed, f: &mut Vec<u8>) {
    let payload = f.len() - HEADER_LEN;
    let at = |rng: &mut Rng| HEADER_LEN + rng.index(payload.max(1));
    match rng.below(8) {
        0 | 1 => {
            for _ in 0..1 + rng.below(4) {
                // Half of the flips near a count or length field.
                let o = match seed.counts.is_empty() || rng.below(2) == 0 {
                    true => at(rng),
                    false => rng.pick(&seed.counts) + rng.index(8),
                };
                if o < f.len() {
                    f[o] ^= 1 + rng.below(255) as u8;
                }
            }
        }
        2 => f.truncate(at(rng)),
        3 => f.extend(rng.some_bytes(64)),
        4 if !seed.counts.is_empty() => {
            let o = rng.pick(&seed.counts);
            if let Some(old) = le(f, o, 4) {
                let v = interesting_u32(rng, old as u32, f.len() - o - 4);
                f[o..o + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        5 if !seed.addrs.is_empty() => {
            let o = rng.pick(&seed.addrs);
            if let Some(old) = le(f, o, 8) {
                let v = interesting_u64(rng, old);
                f[o..o + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        6 => {
            let (a, b) = (at(rng).min(f.len()), at(rng).min(f.len()));
            f.drain(a.min(b)..a.max(b).min(a.min(b) + 256));
        }
        _ => {
            let (a, n) = (at(rng).min(f.len()), 1 + rng.index(64));
            let chunk = f[a..(a + n).min(f.len())].to_vec();
            let to = at(rng).min(f.len());
            f.splice(to..to, chunk);
        }
    }
}

/// A mutation of the header itself: its length (up to u64::MAX), version
/// or reserved word, with or without a checksum that matches.
fn mutate_header(rng: &mut Rng, f: &mut [u8]) {
    let len = (f.len() - HEADER_LEN) as u64;
    match rng.below(3) {
        0 => {
            let near = [MAX_PAYLOAD, MAX_PAYLOAD + 1, len + 1, len.saturating_sub(1)];
            let v = if rng.below(2) == 0 {
                rng.pick(&HUGE64)
            } else {
                rng.pick(&near)
            };
            f[16..24].copy_from_slice(&v.to_le_bytes());
        }
        1 => {
            let v = rng.pick(&[0, 1, 2, FORMAT_VERSION + 1, u32::MAX]);
            f[8..12].copy_from_slice(&v.to_le_bytes());
        }
        _ => f[12 + rng.index(4)] ^= 1 << rng.below(8),
    }
    if rng.below(4) != 0 {
        fix_checksum(f);
    }
}

/// A state file input: random bytes, a random payload behind a valid
/// header, a valid file of a random snapshot, its header changed, or its
/// payload mutated (and mostly resealed).
fn state_input(rng: &mut Rng, seeds: &[Seed]) -> Vec<u8> {
    let seed = &seeds[rng.index(seeds.len())];
    let mut f = seed.file.clone();
    match rng.below(32) {
        0 => return rng.some_bytes(64),
        1 => return rng.some_bytes(2048),
        2 | 3 => return codec::seal(&rng.some_bytes(512)),
        4 => return random_snapshot(rng).encode(),
        5..=7 => mutate_header(rng, &mut f),
        k => {
            for _ in 0..1 + rng.below(3) {
                mutate_once(rng, seed, &mut f);
            }
            if k > 9 {
                reseal(&mut f);
            }
        }
    }
    f
}

// ---------------------------------------------------------------------
// What every decoder must do.

/// The extents are page-aligned, in order, inside `mem_size`, with one
/// checksum per piece.
fn check_layer_record(l: &Layer, mem_size: u64) {
    let mut prev_end = 0;
    for &(off, len) in &l.extents {
        assert!(off % PAGE == 0 && len % PAGE == 0 && len > 0, "{l:x?}");
        assert!(off >= prev_end && off + len <= mem_size, "{l:x?}");
        prev_end = off + len;
    }
    assert_eq!(l.sums.len(), pieces(&l.extents).count(), "{l:x?}");
}

/// What a decoded state holds is what a restore may rely on.
fn check_snapshot(s: &VmSnapshot) {
    let ids: Vec<u64> = s.layers.iter().map(|l| l.id).collect();
    assert!((1..=MAX_LAYERS).contains(&ids.len()), "{ids:x?}");
    assert_eq!(ids.last(), Some(&s.id));
    assert!(ids.iter().enumerate().all(|(i, a)| !ids[..i].contains(a)));
    crate::config::check_mem_size(s.mem_size).expect("memory size");
    s.layers
        .iter()
        .for_each(|l| check_layer_record(l, s.mem_size));
    assert_eq!(s.ranges, RamLayout::new(s.mem_size).gpa_ranges());
    assert!((1..=usize::from(MAX_VCPUS)).contains(&s.machine.vcpus.len()));
    assert!(
        s.machine.devices.nets.len() < MAX_DEVICES,
        "the console is one more"
    );
    assert!(s.linux || s.trampoline.is_none());
}

/// The state file decoders on `file`: no panic; what decodes is
/// well-formed, encodes back to `file`, and the manifest names its layers.
fn check_state(file: &[u8]) {
    let manifest = codec::manifest_layers(file);
    match VmSnapshot::decode(file) {
        Ok(s) => {
            check_snapshot(&s);
            let again = s.encode();
            if again != file {
                let at = again.iter().zip(file).position(|(a, b)| a != b);
                panic!(
                    "decoded {} bytes, re-encoded {}, first difference at {at:?}",
                    file.len(),
                    again.len()
                );
            }
            let ids: Vec<u64> = s.layers.iter().map(|l| l.id).collect();
            assert_eq!(manifest, Some(ids), "the manifest disagrees with the state");
        }
        // The message is built too: it quotes values from the file.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

// ---------------------------------------------------------------------
// The targets.

#[test]
fn the_fuzz_helpers_agree_with_the_encoder() {
    let file = tests::sample().encode();
    let mut b = file.clone();
    b[16..32].fill(0xa5);
    reseal(&mut b);
    assert_eq!(b, file, "reseal recomputes what codec::seal wrote");
    let mut rng = Rng(1);
    for _ in 0..200 {
        let s = random_snapshot(&mut rng);
        let f = s.encode();
        let back = VmSnapshot::decode(&f).expect("a random snapshot decodes");
        check_snapshot(&back);
        assert_eq!(back.encode(), f);
    }
    let seeds = seeds();
    assert!(seeds
        .iter()
        .all(|s| !s.counts.is_empty() && !s.addrs.is_empty()));
    // The layer count, the first field after the snapshot id.
    assert!(seeds[0].counts.contains(&(HEADER_LEN + 8)));
}

#[test]
fn fuzz_state_file_decode() {
    let seeds = seeds();
    fuzz(
        "fuzz_state_file_decode",
        STATE_CASES,
        |rng| state_input(rng, &seeds),
        check_state,
    );
}

/// Every count and length field of the sample (every section of the
/// file) set to every huge value, resealed: nothing panics or allocates
/// what the file cannot hold; a header length past the largest payload
/// is refused. The fuzz target does the same at random on all seeds.
#[test]
fn count_and_length_fields_set_to_huge_values() {
    let huge32 = HUGE32.map(|v| v.to_le_bytes().to_vec());
    let huge64 = HUGE64.map(|v| v.to_le_bytes().to_vec());
    for seed in seeds().iter().take(1) {
        for (fields, values) in [(&seed.counts, &huge32[..]), (&seed.addrs, &huge64[..])] {
            for (&o, v) in fields
                .iter()
                .flat_map(|o| values.iter().map(move |v| (o, v)))
            {
                let mut f = seed.file.clone();
                f[o..o + v.len()].copy_from_slice(v);
                reseal(&mut f);
                check_state(&f);
            }
        }
        for v in [u64::MAX, MAX_PAYLOAD + 1, MAX_PAYLOAD] {
            let mut f = seed.file.clone();
            f[16..24].copy_from_slice(&v.to_le_bytes());
            fix_checksum(&mut f);
            assert!(VmSnapshot::decode(&f).is_err());
            assert!(codec::manifest_layers(&f).is_none());
        }
    }
}

/// A layer record fed to [`Layer::get`] alone: the first 8 input bytes
/// choose the memory size (up to `MAX_MEM_SIZE`, as [`VmSnapshot::decode`]
/// passes), the rest is the record.
fn check_layer(input: &[u8]) {
    let Some((head, rec)) = input.split_first_chunk::<8>() else {
        return;
    };
    let sizes = [0, PAGE, 64 << 10, MIN_MEM_SIZE, 1 << 30, MAX_MEM_SIZE];
    let v = u64::from_le_bytes(*head);
    let mem_size = match v % 8 {
        k @ 0..=5 => sizes[k as usize],
        _ => v % (MAX_MEM_SIZE + 1),
    };
    let mut r = Reader::new(rec);
    let Ok(l) = Layer::get(&mut r, mem_size) else {
        return;
    };
    check_layer_record(&l, mem_size);
    let mut w = Writer::default();
    l.put(&mut w);
    assert!(
        rec.starts_with(&w.buf),
        "the record re-encodes to its bytes"
    );
    // And it read exactly those bytes.
    r.take(rec.len() - w.buf.len(), "rest").expect("rest");
    r.finish().expect("the record's end");
}

/// A layer record: valid (extents and checksums of a random layer), then
/// mutated as a payload, or random bytes; behind the 8 bytes that choose
/// the memory size.
fn layer_input(rng: &mut Rng) -> Vec<u8> {
    let mut out = rng.next_u64().to_le_bytes().to_vec();
    if rng.below(8) == 0 {
        out.extend(rng.some_bytes(128));
        return out;
    }
    let mem = rng.pick(&[MIN_MEM_SIZE, 1 << 30, MAX_MEM_SIZE]);
    let id = rng.next_u64();
    let l = random_layer(rng, id, mem);
    let n = l.extents.len();
    // The extent and checksum counts, and the extents' offsets and sizes.
    let seed = Seed::fields(
        vec![8, 12 + 16 * n],
        (0..2 * n).map(|i| 12 + 8 * i).collect(),
    );
    // Mutated as a payload, behind room for a header.
    let mut w = Writer {
        buf: vec![0; HEADER_LEN],
    };
    l.put(&mut w);
    let mut f = w.buf;
    for _ in 0..rng.below(3) {
        mutate_once(rng, &seed, &mut f);
    }
    out.extend(&f[HEADER_LEN..]);
    out
}

#[test]
fn fuzz_layer_record_and_checksum_table() {
    fuzz(
        "fuzz_layer_record_and_checksum_table",
        DEFAULT_CASES,
        layer_input,
        check_layer,
    );
}

/// A format 2 file as specvm wrote them: the payload starts with the
/// snapshot id, the layer count and the layer ids; the header holds the
/// CRC-32 of the payload where format 3 has its checksum.
fn seal_v2(payload: &[u8]) -> Vec<u8> {
    let mut f = codec::MAGIC.to_vec();
    f.extend(2u32.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend((payload.len() as u64).to_le_bytes());
    f.extend(u64::from(codec::crc32(payload)).to_le_bytes());
    f.extend(payload);
    f
}

/// A format 2 file whose layer list is valid, or mutated (a quarter are
/// left as they are), sealed after the mutation.
fn manifest_v2_input(rng: &mut Rng) -> Vec<u8> {
    let mut w = Writer {
        buf: vec![0; HEADER_LEN],
    };
    w.u64(rng.next_u64());
    let n = rng.below(5);
    w.u32(n as u32);
    (0..n).for_each(|_| w.u64(rng.next_u64()));
    w.buf.extend(rng.some_bytes(64));
    let seed = Seed::fields(vec![8], Vec::new());
    for _ in 0..rng.below(4) {
        mutate_once(rng, &seed, &mut w.buf);
    }
    seal_v2(&w.buf[HEADER_LEN..])
}

/// The manifest of a format 2 file is its layer ids, if its payload holds
/// them all, else nothing; the state decoder refuses the file.
fn check_manifest_v2(file: &[u8]) {
    let got = codec::manifest_layers(file);
    assert!(VmSnapshot::decode(file).is_err(), "a format 2 file decodes");
    let p = file.get(HEADER_LEN..).unwrap_or_default();
    if seal_v2(p) == file {
        let want =
            le(p, 8, 4).and_then(|n| (0..n as usize).map(|i| le(p, 12 + 8 * i, 8)).collect());
        assert_eq!(got, want);
    }
}

#[test]
fn fuzz_manifest_of_format_2_files() {
    fuzz(
        "fuzz_manifest_of_format_2_files",
        DEFAULT_CASES,
        manifest_v2_input,
        check_manifest_v2,
    );
}

// ---------------------------------------------------------------------
// The journal in the lock file.

/// Whether `n` is a name a journal may hold: `memory-<16 hex>` or
/// `state-<16 hex>.new`, so never a path.
fn own_name(n: &str) -> bool {
    let hex16 = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    n.strip_prefix("memory-").is_some_and(hex16)
        || n.strip_prefix("state-")
            .and_then(|s| s.strip_suffix(".new"))
            .is_some_and(hex16)
}

/// A journal as `writer` writes it.
fn journal_text(names: &[String]) -> Vec<u8> {
    let mut body = format!("{JOURNAL_HEAD}\n");
    names.iter().for_each(|n| body.push_str(&format!("{n}\n")));
    format!("{body}xxh3 {:016x}\n", xxh3_64(body.as_bytes())).into_bytes()
}

/// The names of `text` if it is exactly a journal specvm writes.
fn canonical_journal(text: &[u8]) -> Option<Vec<String>> {
    let t = std::str::from_utf8(text).ok()?;
    let lines: Vec<&str> = t.strip_suffix('\n')?.split('\n').collect();
    let names: Vec<String> = lines
        .get(1..lines.len() - 1)?
        .iter()
        .map(|s| s.to_string())
        .collect();
    (lines[0] == JOURNAL_HEAD && names.iter().all(|n| own_name(n)) && journal_text(&names) == text)
        .then_some(names)
}

fn read_journal_bytes(lock: &File, text: &[u8]) -> Vec<String> {
    lock.set_len(0).expect("truncating the lock file");
    lock.write_all_at(text, 0).expect("writing the lock file");
    read_journal(lock)
}

/// `read_journal` on `text`: no panic; only names specvm gives its files;
/// a journal as specvm writes it reads whole, and what is read reads the
/// same when written again.
fn check_journal(lock: &File, text: &[u8]) {
    let names = read_journal_bytes(lock, text);
    if let Some(want) = canonical_journal(text) {
        assert_eq!(names, want, "a valid journal reads whole");
    }
    for n in &names {
        assert!(own_name(n) && !n.contains('/'), "the journal gave {n:?}");
    }
    let canonical = journal_text(&names);
    if canonical != text {
        let again = read_journal_bytes(lock, &canonical);
        assert_eq!(again, names, "what was read round-trips");
    }
}

fn random_name(rng: &mut Rng) -> String {
    let id = rng.next_u64();
    match rng.below(8) {
        0 => format!("memory-{id:016X}"),
        1 => format!("memory-{id:015x}"),
        2 => format!("state-{id:016x}"),
        3 => format!("memory-../../{id:08x}"),
        4 | 5 => format!("state-{id:016x}.new"),
        _ => format!("memory-{id:016x}"),
    }
}

/// The body lines of a journal, then one mutation, then (mostly) the
/// checksum line recomputed, so the names parser sees it.
fn journal_input(rng: &mut Rng) -> Vec<u8> {
    if rng.below(16) == 0 {
        return rng.some_bytes(256);
    }
    let names: Vec<String> = (0..rng.below(6)).map(|_| random_name(rng)).collect();
    let mut body = format!("{JOURNAL_HEAD}\n").into_bytes();
    names
        .iter()
        .for_each(|n| body.extend(format!("{n}\n").bytes()));
    let at = rng.index(body.len() + 1);
    match rng.below(6) {
        0 => body.truncate(at),
        1 => body.splice(at..at, rng.some_bytes(8)).for_each(drop),
        2 => {
            let s: &[u8] = rng.pick(&[&b"\r"[..], b"\n", b"\n\n", b"\xff", b" "]);
            body.splice(at..at, s.iter().copied()).for_each(drop)
        }
        3 if at < body.len() => body[at] ^= 1 << rng.below(8),
        _ => {}
    }
    let sum = format!("xxh3 {:016x}\n", xxh3_64(&body));
    let mut text = body;
    match rng.below(8) {
        0 => text.extend(format!("xxh3 {:016x}\n", rng.next_u64()).bytes()),
        1 => text.extend(sum.trim_end().bytes()),
        2 => text.extend(format!("{sum}\n\n").bytes()),
        _ => text.extend(sum.bytes()),
    }
    text
}

/// A lock file in memory (a memfd): the loop writes it once or twice per
/// case.
fn lock_file() -> File {
    // SAFETY: the name is a NUL-terminated string; the call has no other
    // memory effect.
    let fd = unsafe { libc::memfd_create(c"specvm-fuzz-lock".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create, and nothing else
    // owns it.
    unsafe { File::from_raw_fd(fd) }
}

#[test]
fn fuzz_lock_file_journal() {
    let lock = lock_file();
    fuzz(
        "fuzz_lock_file_journal",
        DEFAULT_CASES,
        journal_input,
        |t| check_journal(&lock, t),
    );
}

/// The journal this file builds is the one `DirWriter` writes.
#[test]
fn journals_made_here_are_the_writers() {
    let dir = temp_dir("journal");
    let mut w = DirWriter::open(&dir).expect("locking");
    w.begin(0x1234).expect("journal");
    let text = std::fs::read(dir.join(LOCK)).expect("reading the lock file");
    let names = [memory_name(0x1234), "state-0000000000001234.new".into()];
    assert_eq!(text, journal_text(&names));
    assert_eq!(canonical_journal(&text).as_deref(), Some(&names[..]));
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state file past the largest payload and a lock file past the
/// journal's 1 MiB are refused before they are read (sparse 1 TiB ones).
#[test]
fn files_past_their_limits_are_not_read() {
    let dir = temp_dir("state");
    let f = File::create(dir.join(files::STATE)).expect("creating the state file");
    f.set_len(1 << 40).expect("a sparse 1 TiB state file");
    let e = files::read_state(&dir).err().expect("a huge state file");
    assert!(e.to_string().contains("larger than any state file"), "{e}");
    let lock = lock_file();
    lock.set_len(1 << 40).expect("a sparse 1 TiB lock file");
    assert!(read_journal(&lock).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("specvm-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a directory");
    dir
}

// ---------------------------------------------------------------------
// Regressions: each bug found, with its smallest input.

/// The sample's payload up to its device count, then `n` zero bytes
/// where `n` devices would be, sealed.
fn with_device_count(n: u32) -> Vec<u8> {
    let mut s = tests::sample();
    s.machine.devices.nets.clear();
    let mut payload = s.encode().split_off(HEADER_LEN);
    // What follows the vCPUs and the VM: the device count, the console's
    // kind byte and its state (nine registers, the FIFO's length and bytes),
    // then the disks' count (no disk).
    let serial = 4 + 1 + 9 + 4 + s.machine.devices.serial.in_buffer.len() + 4;
    let at = payload.len() - serial;
    payload.truncate(at);
    payload.extend_from_slice(&n.to_le_bytes());
    payload.resize(payload.len() + n as usize, 0);
    codec::seal(&payload)
}

/// Found while writing these targets (their inputs are too small to hold
/// it): a state file with a million devices of a one-byte kind decoded to
/// 40 MB of device states (a 64 MiB one, the largest file read, to
/// 2.7 GB); no VM has more than a few dozen devices. The count is
/// refused before any device is read.
#[test]
fn a_million_devices_are_refused_at_their_count() {
    let e = VmSnapshot::decode(&with_device_count(1 << 20))
        .err()
        .expect("a million devices");
    assert!(e.to_string().contains("1048576 devices"), "{e}");
    let n = MAX_DEVICES as u32;
    let refusal = |n| {
        VmSnapshot::decode(&with_device_count(n))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(refusal(n + 1).contains(&format!("{} devices", n + 1)));
    assert!(
        refusal(n).contains("unknown device kind 0"),
        "{n} devices pass the count, and the first zero byte is refused"
    );
}

/// Found while writing these targets: a state file with 50,000 distinct
/// empty memory layers was read whole before its layer count was
/// checked, and the check that their ids are unique is quadratic: 13 s
/// of a debug build here (a 64 MiB file of 4 million layers: hours), and
/// an error message that listed every id.
#[test]
fn fifty_thousand_layers_are_refused_at_their_count() {
    let n = 50_000u32;
    let mut w = Writer::default();
    w.u64(u64::from(n));
    w.u32(n);
    for id in 1..=u64::from(n) {
        w.u64(id);
        w.u64(0); // No extents, no checksums.
    }
    let e = VmSnapshot::decode(&codec::seal(&w.buf))
        .err()
        .expect("50,000 layers")
        .to_string();
    let head = &e[..e.len().min(200)];
    assert!(e.contains("50000 memory layers") && e.len() < 200, "{head}");
}
