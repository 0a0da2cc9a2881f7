//! The frame of the state file: a fixed header (magic, format version,
//! reserved word, payload length, XXH3-64 checksum), then the payload,
//! encoded by [`crate::persist::codec`].

use xxhash_rust::xxh3::Xxh3;

use super::SnapshotError;
pub use crate::persist::codec::{Reader, Writer};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SPECVMSS";
/// The payload format this build writes and reads. Bump it on any change to
/// the payload's layout: an older or newer file is then refused.
/// Version 2 added the host-compat system-call trampoline's state; version
/// 3 the memory layers' extents and chunk checksums, and an XXH3-64 over
/// the header and payload in place of version 2's CRC-32 of the payload;
/// version 4 the disks (`super::disks`) at the payload's end.
pub const FORMAT_VERSION: u32 = 4;
/// The versions before [`FORMAT_VERSION`] whose files specvm still reads
/// far enough to learn which memory layers they own
/// ([`manifest_layers`]), so that a new snapshot that replaces one can
/// delete them: version 3 (checked as this version is: its header and
/// payload prefix are the same) and version 2 (CRC-32, no extents).
const PREVIOUS_VERSION: u32 = 3;
/// See [`PREVIOUS_VERSION`].
const CRC_VERSION: u32 = 2;
/// Bytes before the payload: magic, version, reserved, length, checksum.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8;
/// The largest payload accepted: far above any real state (a few hundred
/// KiB for 32 vCPUs, plus 8 bytes per 64 KiB of memory written by the
/// guest), low enough that a corrupt length cannot make the reader
/// allocate without bound.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes
/// it: the checksum of version 2 files, which [`manifest_layers`] still
/// reads.
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

/// The checksum of a version 3 file: XXH3-64 over the header's version,
/// reserved word and length, then the payload. The magic is left out (a
/// file without it is refused before), and so is the checksum field.
fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[8..24]);
    h.update(payload);
    h.digest()
}

/// Wraps `payload` in the header.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let sum = checksum(&out, payload);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn u32_at(file: &[u8], o: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&file[o..o + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(file: &[u8], o: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&file[o..o + 8]);
    u64::from_le_bytes(b)
}

/// Checks the magic and the payload length against the file's size, for
/// any version; returns the version.
fn check_frame(file: &[u8]) -> Result<u32, SnapshotError> {
    if file.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            found: file.len() as u64,
        });
    }
    if file[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let len = u64_at(file, 16);
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
    Ok(u32_at(file, 8))
}

/// Checks the header of a whole state file of this format version and
/// returns its payload.
pub fn open(file: &[u8]) -> Result<&[u8], SnapshotError> {
    if file.len() >= 12 && file[..8] == MAGIC && u32_at(file, 8) != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: u32_at(file, 8),
            supported: FORMAT_VERSION,
        });
    }
    check_frame(file)?;
    let reserved = u32_at(file, 12);
    if reserved != 0 {
        return Err(SnapshotError::Corrupt(format!(
            "the reserved header word is {reserved:#x}, not 0"
        )));
    }
    let payload = &file[HEADER_LEN..];
    let (want, got) = (u64_at(file, 24), checksum(file, payload));
    if want != got {
        return Err(SnapshotError::Checksum { want, got });
    }
    Ok(payload)
}

/// The ids of the memory layers that a state file of this or the previous
/// format version names (their payloads both start with the snapshot id
/// and the layer ids), or None if it is not such a file, whole and
/// unchanged. A new snapshot deletes the layers that the state it replaces
/// owned, and no others.
pub fn manifest_layers(file: &[u8]) -> Option<Vec<u64>> {
    let version = check_frame(file).ok()?;
    let payload = &file[HEADER_LEN..];
    let ok = match version {
        FORMAT_VERSION => open(file).is_ok(),
        PREVIOUS_VERSION => u32_at(file, 12) == 0 && u64_at(file, 24) == checksum(file, payload),
        CRC_VERSION => u32_at(file, 24) == crc32(payload),
        _ => false,
    };
    if !ok {
        return None;
    }
    let mut r = Reader::new(payload);
    r.u64("snapshot id").ok()?;
    let n = r.count(8, "memory layer count").ok()?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(r.u64("memory layer").ok()?);
        if version != CRC_VERSION {
            // Extents and checksums follow each id; skip them.
            let extents = r.count(16, "extents").ok()?;
            r.take(extents * 16, "extents").ok()?;
            let sums = r.count(8, "checksums").ok()?;
            r.take(sums * 8, "checksums").ok()?;
        }
    }
    Some(ids)
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
    fn every_header_byte_is_checked() {
        let file = seal(b"payload");
        open(&file).unwrap();
        for at in 8..HEADER_LEN {
            let mut b = file.clone();
            b[at] ^= 0x01;
            assert!(open(&b).is_err(), "a change at header byte {at} passed");
        }
        let mut b = file;
        b[12] = 1;
        let e = open(&b).unwrap_err();
        assert!(e.to_string().contains("reserved header word is 0x1"), "{e}");
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
        assert!(r.u8("past").is_err());
    }

    #[test]
    fn huge_counts_are_refused() {
        let mut w = Writer::default();
        w.u32(u32::MAX);
        let mut r = Reader::new(&w.buf);
        assert!(r.count(8, "items").is_err());
    }
}
