//! The VXLAN header (RFC 7348, section 5): 8 bytes before the inner
//! Ethernet frame, in a UDP datagram.
//!
//! ```text
//!  0               1               2               3
//! |R|R|R|R|I|R|R|R|            Reserved (24 bits)                 |
//! |        VXLAN Network Identifier (VNI, 24 bits)  | Reserved (8) |
//! ```
//!
//! Written by hand: etherparse (the crate the bridge uses for its frames)
//! has no VXLAN header, and the crates that have one (such as
//! `pnet_packet`) bring a whole packet framework for these eight bytes.
//! The rules kept, from the RFC: the I flag (0x08) must be set for the
//! VNI to be valid, so a header without it is refused; the reserved bits
//! are written as zero and, as the RFC says, ignored on receipt.

/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// The largest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// The IANA port of VXLAN.
pub const IANA_PORT: u16 = 4789;

/// Why a datagram is not a VXLAN packet the bridge takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    /// Shorter than the header and an Ethernet header.
    #[error("{0} bytes: shorter than a VXLAN header and an Ethernet header")]
    Short(usize),
    /// The I flag is not set: no valid VNI.
    #[error("flags {0:#04x}: the I flag (0x08) is not set")]
    Flags(u8),
}

/// A VXLAN packet read from a datagram: its VNI and inner frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The VXLAN Network Identifier.
    pub vni: u32,
    /// The inner Ethernet frame (at least 14 bytes).
    pub frame: &'a [u8],
}

/// The smallest inner frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Reads the VXLAN header of `datagram`. Never panics, whatever the bytes.
pub fn decode(datagram: &[u8]) -> Result<Packet<'_>, VxlanError> {
    if datagram.len() < HEADER_LEN + MIN_FRAME {
        return Err(VxlanError::Short(datagram.len()));
    }
    let (h, frame) = datagram.split_at(HEADER_LEN);
    if h[0] & FLAG_I == 0 {
        return Err(VxlanError::Flags(h[0]));
    }
    let vni = u32::from_be_bytes([0, h[4], h[5], h[6]]);
    Ok(Packet { vni, frame })
}

/// Writes the header for `vni` (masked to 24 bits) and then `frame` into
/// `out`, which is cleared first.
pub fn encode_into(out: &mut Vec<u8>, vni: u32, frame: &[u8]) {
    out.clear();
    out.reserve(HEADER_LEN + frame.len());
    let v = (vni & VNI_MAX).to_be_bytes();
    out.extend_from_slice(&[FLAG_I, 0, 0, 0, v[1], v[2], v[3], 0]);
    out.extend_from_slice(frame);
}

/// The header and `frame` as a new datagram.
pub fn encode(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, vni, frame);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_bytes_are_the_rfcs() {
        let frame = [0xaau8; 14];
        let d = encode(0x12_3456, &frame);
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        assert_eq!(&d[8..], &frame);
        // Reserved bits set by someone else are ignored (RFC 7348, 5).
        let mut odd = d.clone();
        odd[0] = 0xff;
        odd[1] = 0xff;
        odd[7] = 0xff;
        assert_eq!(decode(&odd).unwrap().vni, 0x12_3456);
    }

    #[test]
    fn bad_packets_are_refused() {
        assert_eq!(decode(&[]), Err(VxlanError::Short(0)));
        assert_eq!(decode(&[0x08; 21]), Err(VxlanError::Short(21)));
        let mut d = encode(42, &[0; 14]);
        d[0] = 0;
        assert_eq!(decode(&d), Err(VxlanError::Flags(0)));
        d[0] = 0xf7;
        assert_eq!(decode(&d), Err(VxlanError::Flags(0xf7)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(p) = decode(&bytes) {
                prop_assert!(p.vni <= VNI_MAX);
                prop_assert_eq!(p.frame.len() + HEADER_LEN, bytes.len());
                prop_assert!(bytes[0] & FLAG_I != 0);
            }
        }

        #[test]
        fn round_trip(vni in 0..=VNI_MAX, frame in proptest::collection::vec(any::<u8>(), 14..1600)) {
            let d = encode(vni, &frame);
            let p = decode(&d).unwrap();
            prop_assert_eq!(p.vni, vni);
            prop_assert_eq!(p.frame, &frame[..]);
        }

        #[test]
        fn vni_is_masked_to_24_bits(vni in any::<u32>()) {
            let d = encode(vni, &[0; 14]);
            prop_assert_eq!(decode(&d).unwrap().vni, vni & VNI_MAX);
        }
    }
}
