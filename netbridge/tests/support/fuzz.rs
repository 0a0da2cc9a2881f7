//! A bounded, seeded fuzz loop on stable Rust, shared by every fuzz target
//! of the workspace (`docs/fuzzing.md`). netbridge's tests use it as a
//! module; vmm's include this file with `#[path]`, since a test helper is
//! not worth a crate.
//!
//! Each case is a buffer of pseudo-random bytes from a seed (SplitMix64),
//! turned into the target's input by `arbitrary`. The same seed gives the
//! same cases, so CI is reproducible. A case that panics (an assertion or
//! a crash) is shrunk byte by byte, libFuzzer style, while it still
//! panics, and the loop fails with the shrunk input (in hex, and saved to
//! a file in the temporary directory), the input as `Debug` prints it,
//! and the command that replays it.
//!
//! Environment:
//! - `SPECVM_FUZZ_CASES=N`: cases per target (each target has a default);
//! - `SPECVM_FUZZ_SEED=S`: the seed (decimal or `0x` hex; default fixed);
//! - `SPECVM_FUZZ_INPUT=FILE` or `=HEX`: run this one input instead of
//!   the loop (with a test filter naming the target).

#![allow(dead_code)]

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};

/// The seed when `SPECVM_FUZZ_SEED` is not set.
pub const DEFAULT_SEED: u64 = 0x5bec_0f0c_2026_1203;

/// Upper bound on the attempts the shrinker makes.
const MAX_SHRINK_ATTEMPTS: usize = 20_000;

/// The number of cases: `SPECVM_FUZZ_CASES`, else `default`.
pub fn cases(default: u64) -> u64 {
    match std::env::var("SPECVM_FUZZ_CASES") {
        Ok(v) => parse_u64(&v).unwrap_or_else(|| panic!("SPECVM_FUZZ_CASES={v} is not a number")),
        Err(_) => default,
    }
}

/// The base seed: `SPECVM_FUZZ_SEED`, else [`DEFAULT_SEED`].
pub fn seed() -> u64 {
    match std::env::var("SPECVM_FUZZ_SEED") {
        Ok(v) => parse_u64(&v).unwrap_or_else(|| panic!("SPECVM_FUZZ_SEED={v} is not a number")),
        Err(_) => DEFAULT_SEED,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim().replace('_', "");
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// SplitMix64: a tiny, good enough generator for input bytes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }
}

/// One fuzz target: a name (for messages and the per-target seed), a
/// default case count and the largest input buffer.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The name, as the test is called.
    pub name: &'static str,
    /// Cases when `SPECVM_FUZZ_CASES` is not set.
    pub default_cases: u64,
    /// The largest input buffer, in bytes.
    pub max_len: usize,
}

impl Target {
    /// Runs `check` on `cases()` inputs (or on `SPECVM_FUZZ_INPUT`), and
    /// fails with a shrunk input on the first one that panics.
    pub fn run<T>(&self, check: impl Fn(T))
    where
        T: for<'a> Arbitrary<'a> + Debug,
    {
        let ran = std::cell::Cell::new(0u64);
        let check = |bytes: &[u8]| {
            if let Some(input) = decode::<T>(bytes) {
                ran.set(ran.get() + 1);
                check(input);
            }
        };
        if let Ok(input) = std::env::var("SPECVM_FUZZ_INPUT") {
            let bytes = match std::fs::read(&input) {
                Ok(b) => b,
                Err(_) => from_hex(&input).expect("SPECVM_FUZZ_INPUT is neither a file nor hex"),
            };
            eprintln!("{}: replaying {:#?}", self.name, decode::<T>(&bytes));
            check(&bytes);
            return;
        }
        let (n, base) = (cases(self.default_cases), seed() ^ name_hash(self.name));
        let start = Instant::now();
        let mut buf = Vec::with_capacity(self.max_len);
        for case in 0..n {
            let mut rng = Rng::new(base.wrapping_add(case));
            buf.resize(self.input_len(&mut rng), 0);
            rng.fill(&mut buf);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| check(&buf))) {
                self.fail::<T>(case, &buf, &panic_message(&*payload), &check);
            }
        }
        eprintln!(
            "{}: {n} cases ({} decoded) in {:.2?} (seed {:#x})",
            self.name,
            ran.get(),
            start.elapsed(),
            seed()
        );
    }

    /// Mostly short inputs, some long ones: most bugs need few bytes, and
    /// short cases are cheap. 60% are at most `max_len / 32` bytes, 30% at
    /// most `max_len / 4`, 10% up to `max_len`.
    fn input_len(&self, rng: &mut Rng) -> usize {
        let max = self.max_len as u64;
        let cap = match rng.below(100) {
            0..=59 => max / 32,
            60..=89 => max / 4,
            _ => max,
        };
        rng.below(cap + 1) as usize
    }

    fn fail<T>(&self, case: u64, bytes: &[u8], msg: &str, check: &dyn Fn(&[u8])) -> !
    where
        T: for<'a> Arbitrary<'a> + Debug,
    {
        let small = shrink(bytes, check);
        let hex = to_hex(&small);
        let file = std::env::temp_dir().join(format!("specvm-fuzz-{}-{case}.bin", self.name));
        let saved = match std::fs::write(&file, &small) {
            Ok(()) => format!("saved in {}", file.display()),
            Err(e) => format!("not saved: {e}"),
        };
        panic!(
            "fuzz target {} failed at case {case} (seed {:#x}): {msg}\n\
             shrunk input ({} bytes, {saved}): {hex}\n\
             as the target reads it: {:#?}\n\
             replay: SPECVM_FUZZ_INPUT=<the file or the hex> cargo test ... {}\n\
             then keep it as a named regression test (docs/fuzzing.md)",
            self.name,
            seed(),
            small.len(),
            decode::<T>(&small),
            self.name,
        );
    }
}

/// Bytes of a length from [`pick_len`], or all that is left as the last
/// field. (`arbitrary` gives a plain `Vec` a geometric length: half of
/// them are empty.) Printed as hex.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes: {})", self.0.len(), to_hex(&self.0))
    }
}

impl<'a> Arbitrary<'a> for Bytes {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = pick_len::<u8>(u)?;
        Ok(Self(u.bytes(n)?.to_vec()))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(u.take_rest().to_vec()))
    }
}

/// The length of a [`Bytes`] or [`Seq`] that is not the input's last
/// field: half the time at most 16, 3/8 at most 128, 1/8 any share of
/// what is left (`arbitrary_len` alone would eat half the input on
/// average, leaving little for the fields after it). Never more than the
/// bytes left, so a used-up input does not make runs of zeros.
fn pick_len<'a, T: Arbitrary<'a>>(u: &mut Unstructured<'a>) -> arbitrary::Result<usize> {
    let n = match u8::arbitrary(u)? {
        0..=127 => u.int_in_range(0..=16)?,
        128..=223 => u.int_in_range(0..=128)?,
        _ => return u.arbitrary_len::<T>(),
    };
    Ok(n.min(u.len()))
}

/// A sequence of a length from [`pick_len`]; as the last field or the
/// whole input it takes every remaining byte.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Seq<T>(pub Vec<T>);

impl<T: Debug> Debug for Seq<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Seq<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = pick_len::<T>(u)?;
        (0..n)
            .map(|_| T::arbitrary(u))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut v = Vec::new();
        while !u.is_empty() {
            let before = u.len();
            v.push(T::arbitrary(&mut u)?);
            if u.len() == before {
                break;
            }
        }
        Ok(Self(v))
    }
}

/// An `Option` that is `Some` one time in 16 (`arbitrary` makes half of
/// them `Some`), and `None` once the input is used up: for the odd field
/// that breaks an otherwise valid input.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Rare<T>(pub Option<T>);

impl<T: Debug> Debug for Rare<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Rare<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        // An exhausted input reads as zeros: that must not mean `Some`.
        if u.is_empty() {
            return Ok(Self(None));
        }
        Ok(Self(match u8::arbitrary(u)? % 16 {
            0 => Some(T::arbitrary(u)?),
            _ => None,
        }))
    }
}

/// The input `bytes` stand for, or `None` when `arbitrary` refuses them.
pub fn decode<T: for<'a> Arbitrary<'a>>(bytes: &[u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(bytes)).ok()
}

/// Runs `check` on the input that `hex` (a failing case's shrunk bytes)
/// stands for: the body of a regression test.
pub fn replay<T>(hex: &str, check: impl Fn(T))
where
    T: for<'a> Arbitrary<'a> + Debug,
{
    let bytes = from_hex(hex).expect("regression input is hex");
    let input = decode::<T>(&bytes).expect("regression input decodes");
    check(input);
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: a different stream per target from one base seed.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".into()
    }
}

/// Shrinks a failing input while it still fails: cuts the tail, removes
/// chunks from large to single bytes, then lowers bytes. The panic hook is
/// silenced meanwhile (it is global, so another test's panic message in
/// that window is lost; its failure is not).
fn shrink(bytes: &[u8], check: &dyn Fn(&[u8])) -> Vec<u8> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let tries = std::cell::Cell::new(0usize);
    let more = || tries.get() < MAX_SHRINK_ATTEMPTS;
    let fails = |b: &[u8]| {
        tries.set(tries.get() + 1);
        catch_unwind(AssertUnwindSafe(|| check(b))).is_err()
    };
    let mut cur = bytes.to_vec();
    let mut progress = true;
    while progress && more() {
        progress = false;
        let mut chunk = cur.len().next_power_of_two();
        while chunk > 0 && more() {
            let mut at = 0;
            while at < cur.len() && more() {
                let end = (at + chunk).min(cur.len());
                let mut cand = cur[..at].to_vec();
                cand.extend_from_slice(&cur[end..]);
                if fails(&cand) {
                    cur = cand;
                    progress = true;
                } else {
                    at += chunk;
                }
            }
            chunk /= 2;
        }
        for i in 0..cur.len() {
            for v in [0, cur[i] / 2, cur[i].saturating_sub(1)] {
                if v < cur[i] && more() {
                    let mut cand = cur.clone();
                    cand[i] = v;
                    if fails(&cand) {
                        cur = cand;
                        progress = true;
                        break;
                    }
                }
            }
        }
    }
    std::panic::set_hook(hook);
    cur
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (whitespace ignored).
pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 == 1 {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(from_hex("0"), None);
    }

    #[test]
    fn shrinking_keeps_the_failure_and_gets_small() {
        let check = |b: &[u8]| assert!(!b.contains(&0x7f), "found it");
        let mut input = vec![3u8; 300];
        input[200] = 0x7f;
        assert_eq!(shrink(&input, &check), vec![0x7f]);
    }
}
