//! The speculation id, one type for the VMM, the switch and the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Bytes of an id on the wire (IPOPT_SPEC): VM id then sequence number,
/// each a big-endian `u32`.
pub const ID_LEN: usize = 8;

/// A speculation id, unique across every VM sharing a bridge fabric: the
/// owner VM's id and that VM's sequence number.
///
/// Its 64-bit form ([`SpecId::to_u64`]) puts the VM id in the high half;
/// that number is what the port protocol's JSON carries (serde reads and
/// writes a `SpecId` as it), and its big-endian bytes are what IPOPT_SPEC
/// carries ([`SpecId::to_bytes`]). It prints as `vm:seq`, and orders as its
/// 64-bit form does (by VM, then sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u64", from = "u64")]
pub struct SpecId {
    /// The owner VM.
    pub vm: u32,
    /// The owner's sequence number.
    pub seq: u32,
}

impl SpecId {
    /// An id from its two halves.
    pub const fn new(vm: u32, seq: u32) -> Self {
        Self { vm, seq }
    }

    /// The id as one 64-bit number: VM id in the high half.
    pub const fn to_u64(self) -> u64 {
        ((self.vm as u64) << 32) | self.seq as u64
    }

    /// The id from its 64-bit form.
    pub const fn from_u64(v: u64) -> Self {
        Self {
            vm: (v >> 32) as u32,
            seq: v as u32,
        }
    }

    /// The 8 wire bytes: the 64-bit form, big-endian.
    pub const fn to_bytes(self) -> [u8; ID_LEN] {
        self.to_u64().to_be_bytes()
    }

    /// The id from its 8 wire bytes.
    pub const fn from_bytes(b: [u8; ID_LEN]) -> Self {
        Self::from_u64(u64::from_be_bytes(b))
    }
}

impl From<u64> for SpecId {
    fn from(v: u64) -> Self {
        Self::from_u64(v)
    }
}

impl From<SpecId> for u64 {
    fn from(id: SpecId) -> Self {
        id.to_u64()
    }
}

impl fmt::Display for SpecId {
    /// `vm:seq`, both in decimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.vm, self.seq)
    }
}

impl fmt::LowerHex for SpecId {
    /// The 64-bit form in hexadecimal (`{:#x}` gives `0x100000002`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.to_u64(), f)
    }
}

/// A text that is not `vm:seq` with two decimal `u32`s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("speculation id {0:?} is not of the form VM:SEQ (two decimal u32)")]
pub struct ParseSpecIdError(String);

impl FromStr for SpecId {
    type Err = ParseSpecIdError;

    /// Parses `vm:seq`, the form [`fmt::Display`] prints.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseSpecIdError(s.chars().take(64).collect());
        let (vm, seq) = s.split_once(':').ok_or_else(bad)?;
        let vm = vm.parse().map_err(|_| bad())?;
        let seq = seq.parse().map_err(|_| bad())?;
        Ok(Self { vm, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_agree() {
        let id = SpecId::new(7, 9);
        assert_eq!(id.to_u64(), (7 << 32) | 9);
        assert_eq!(SpecId::from_u64(id.to_u64()), id);
        assert_eq!(SpecId::from(u64::from(id)), id);
        assert_eq!(id.to_bytes(), [0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(SpecId::from_bytes(id.to_bytes()), id);
        assert_eq!(id.to_string(), "7:9");
        assert_eq!(format!("{id:#x}"), "0x700000009");
        let top = SpecId::new(u32::MAX, u32::MAX);
        assert_eq!(SpecId::from_u64(u64::MAX), top);
    }

    #[test]
    fn orders_as_its_u64() {
        let ids = [
            SpecId::new(1, u32::MAX),
            SpecId::new(2, 0),
            SpecId::new(0, 5),
        ];
        for a in ids {
            for b in ids {
                assert_eq!(a.cmp(&b), a.to_u64().cmp(&b.to_u64()), "{a} {b}");
            }
        }
    }

    #[test]
    fn json_is_the_u64() {
        let id = SpecId::new(1, 2);
        assert_eq!(serde_json::to_string(&id).unwrap(), "4294967298");
        assert_eq!(serde_json::from_str::<SpecId>("4294967298").unwrap(), id);
        assert!(serde_json::from_str::<SpecId>("-1").is_err());
        assert!(serde_json::from_str::<SpecId>("\"1:2\"").is_err());
    }

    #[test]
    fn parses_what_it_prints() {
        let id = SpecId::new(u32::MAX, 0);
        assert_eq!(id.to_string().parse(), Ok(id));
        for bad in ["", "1", "1:", ":2", "1:2:3", "-1:2", "4294967296:0", "a:b"] {
            assert!(bad.parse::<SpecId>().is_err(), "{bad:?}");
        }
    }
}
