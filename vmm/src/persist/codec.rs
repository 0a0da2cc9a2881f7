//! The byte encoding of saved state: little-endian integers,
//! length-prefixed byte strings, and the KVM structures as their raw bytes.
//! Snapshot state files ([`crate::snapshot::codec`] frames them with a
//! header and a checksum) and every [`super::Encode`] implementation write
//! through [`Writer`] and read through [`Reader`].
//!
//! The KVM structures are plain C structures without padding: kvm-bindings'
//! `serde` feature derives zerocopy's `IntoBytes`/`FromBytes` for them, which
//! checks that at compile time, so no `unsafe` byte view is needed here.

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A payload that does not decode: what was being read, and why not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

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
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "{what}: {n} bytes wanted at offset {}, payload is {} bytes",
                    self.pos,
                    self.data.len()
                ))
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u32.
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// A little-endian u64.
    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A bool, which must be 0 or 1.
    pub fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError(format!("{what}: {v} is not a bool"))),
        }
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    /// A count of items that follow, each at least `min_size` bytes: a
    /// count the rest of the payload cannot hold is refused before anything
    /// is allocated for it.
    pub fn count(&mut self, min_size: usize, what: &str) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size.max(1)) > self.data.len() - self.pos {
            return Err(DecodeError(format!(
                "{what}: count {n} does not fit in the payload"
            )));
        }
        Ok(n)
    }
    /// A KVM structure written by [`Writer::pod`]; its size must match.
    pub fn pod<T: FromBytes>(&mut self, what: &str) -> Result<T, DecodeError> {
        let b = self.bytes(what)?;
        T::read_from_bytes(b).map_err(|_| {
            DecodeError(format!(
                "{what}: {} bytes, this build's structure has {}",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
    /// Fails unless the whole payload was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} unread bytes at the end of the payload",
                self.data.len() - self.pos
            )))
        }
    }
}
