//! The byte encoding of the state file: a fixed header (magic, format
//! version, payload length, CRC-32 of the payload), then the payload as
//! little-endian integers, length-prefixed byte strings, and the KVM
//! structures as their raw bytes.
//!
//! The KVM structures are plain C structures without padding: kvm-bindings'
//! `serde` feature derives zerocopy's `IntoBytes`/`FromBytes` for them, which
//! checks that at compile time, so no `unsafe` byte view is needed here.

use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::SnapshotError;

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SPECVMSS";
/// The payload format this build writes and reads. Bump it on any change to
/// the payload's layout: an older or newer file is then refused.
/// Version 2 added the host-compat system-call trampoline's state.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes before the payload: magic, version, reserved, length, CRC, pad.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;
/// The largest payload accepted: far above any real state (a few hundred
/// KiB for 32 vCPUs), low enough that a corrupt length cannot make the
/// reader allocate without bound.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes
/// it. Written here because no CRC crate is among the project's
/// dependencies; a byte-wise table is fast enough for a state file of a few
/// hundred KiB.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Wraps `payload` in the header.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header of a whole state file and returns its payload.
pub fn open(file: &[u8]) -> Result<&[u8], SnapshotError> {
    if file.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found: file.len() as u64,
        });
    }
    if file[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes([file[o], file[o + 1], file[o + 2], file[o + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&file[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::Corrupt(format!(
            "payload length {len} exceeds {MAX_PAYLOAD}"
        )));
    }
    let have = (file.len() - HEADER_LEN) as u64;
    if have < len {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64 + len,
            found: file.len() as u64,
        });
    }
    if have > len {
        return Err(SnapshotError::Corrupt(format!(
            "{} bytes after the payload",
            have - len
        )));
    }
    let payload = &file[HEADER_LEN..];
    let (want, got) = (u32_at(24), crc32(payload));
    if want != got {
        return Err(SnapshotError::Checksum { want, got });
    }
    Ok(payload)
}

/// Appends values to a payload.
#[derive(Default)]
pub struct Writer {
    /// The bytes so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a bool as one byte.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// Appends a KVM structure as its raw bytes, length-prefixed, so a
    /// reader built against a different layout notices.
    pub fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

/// Reads values back from a payload, refusing to read past its end.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                SnapshotError::Corrupt(format!(
                    "{what}: {n} bytes wanted at offset {}, payload is {} bytes",
                    self.pos,
                    self.data.len()
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>(what)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self, what: &str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A bool, which must be 0 or 1.
    pub fn bool(&mut self, what: &str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(SnapshotError::Corrupt(format!("{what}: {v} is not a bool"))),
        }
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], SnapshotError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    /// A count of items that follow, each at least `min_size` bytes: a
    /// count the rest of the payload cannot hold is refused before anything
    /// is allocated for it.
    pub fn count(&mut self, min_size: usize, what: &str) -> Result<usize, SnapshotError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size.max(1)) > self.data.len() - self.pos {
            return Err(SnapshotError::Corrupt(format!(
                "{what}: count {n} does not fit in the payload"
            )));
        }
        Ok(n)
    }
    /// A KVM structure written by [`Writer::pod`]; its size must match.
    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T, SnapshotError> {
        let b = self.bytes(what)?;
        T::read_from_bytes(b).map_err(|_| {
            SnapshotError::Corrupt(format!(
                "{what}: {} bytes, this build's structure has {}",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
    /// Fails unless the whole payload was read.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(SnapshotError::Corrupt(format!(
                "{} unread bytes at the end of the payload",
                self.data.len() - self.pos
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn values_round_trip_and_reads_stop_at_the_end() {
        let mut w = Writer::default();
        w.u8(7);
        w.u16(0x1234);
        w.u64(u64::MAX);
        w.bool(true);
        w.bytes(b"abc");
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0x1234);
        assert_eq!(r.u64("c").unwrap(), u64::MAX);
        assert!(r.bool("d").unwrap());
        assert_eq!(r.bytes("e").unwrap(), b"abc");
        r.finish().unwrap();
        assert!(matches!(r.u8("past"), Err(SnapshotError::Corrupt(_))));
    }

    #[test]
    fn huge_counts_are_refused() {
        let mut w = Writer::default();
        w.u32(u32::MAX);
        let mut r = Reader::new(&w.buf);
        assert!(r.count(8, "items").is_err());
    }
}
