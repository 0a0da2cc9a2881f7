//! Property tests of `specwire::codec`: no input panics, and on valid
//! IPv4/UDP frames (built by etherparse, with arbitrary options areas that
//! may hold forged tags) retag writes exactly the set, keeps every other
//! option and the payload, and leaves valid checksums.

use etherparse::checksum::Sum16BitWords;
use etherparse::{
    IpFragOffset, IpHeaders, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice, VlanId,
};
use proptest::prelude::*;
use specwire::codec::{
    parse_tags, retag, room_for_ids, strip, CodecError, SpecId, IPOPT_SPEC, MAX_IDS,
};

/// One item of a generated options area.
#[derive(Debug, Clone)]
enum Item {
    Nop,
    /// Any option other than End, NOP and option number 30.
    Other(u8, Vec<u8>),
    /// A forged IPOPT_SPEC (0x9E or 0x1E), well framed but with any content.
    Forged(u8, Vec<u8>),
}

impl Item {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Item::Nop => vec![1],
            Item::Other(t, d) | Item::Forged(t, d) => [&[*t, d.len() as u8 + 2][..], d].concat(),
        }
    }
}

fn item() -> impl Strategy<Value = Item> {
    let data = || prop::collection::vec(any::<u8>(), 0..=10);
    prop_oneof![
        Just(Item::Nop),
        (2u8..=255)
            .prop_filter("not option 30", |t| t & 0x7f != 0x1e)
            .prop_flat_map(move |t| data().prop_map(move |d| Item::Other(t, d))),
        (prop_oneof![Just(0x9Eu8), Just(0x1E)], data()).prop_map(|(t, d)| Item::Forged(t, d)),
    ]
}

/// A valid options area (at most 40 bytes, a multiple of 4, maybe with
/// garbage after an End-of-Option-List) and the non-tag option bytes in it.
#[derive(Debug, Clone)]
struct Area {
    bytes: Vec<u8>,
    kept: Vec<u8>,
}

fn area() -> impl Strategy<Value = Area> {
    let items = prop::collection::vec(item(), 0..8);
    let garbage = prop::option::of(prop::collection::vec(any::<u8>(), 0..8));
    (items, garbage).prop_map(|(items, garbage)| {
        let (mut bytes, mut kept) = (Vec::new(), Vec::new());
        for it in items {
            let b = it.bytes();
            if bytes.len() + b.len() > 40 {
                break;
            }
            if !matches!(it, Item::Forged(..)) {
                kept.extend_from_slice(&b);
            }
            bytes.extend_from_slice(&b);
        }
        if let Some(g) = garbage.filter(|_| bytes.len() < 40) {
            bytes.push(0);
            bytes.extend(g.into_iter().take(40 - bytes.len()));
        }
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        Area { bytes, kept }
    })
}

/// A valid Ethernet (maybe 802.1Q) / IPv4 / UDP frame with `area` as its
/// options, built by etherparse.
#[derive(Debug, Clone)]
struct Frame {
    bytes: Vec<u8>,
    kept: Vec<u8>,
}

fn frame() -> impl Strategy<Value = Frame> {
    let payload = prop::collection::vec(any::<u8>(), 0..64);
    let frag = (any::<bool>(), any::<bool>(), 0u16..8);
    let vlan = prop::option::of(0u16..4096);
    (area(), payload, frag, vlan, any::<u16>()).prop_map(|(area, payload, frag, vlan, id)| {
        let mut h = Ipv4Header::new(
            0,
            64,
            etherparse::ip_number::UDP,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
        )
        .unwrap();
        h.options = area.bytes.as_slice().try_into().unwrap();
        h.identification = id;
        (h.dont_fragment, h.more_fragments) = (frag.0, frag.1);
        h.fragment_offset = IpFragOffset::try_new(frag.2).unwrap();
        let ip = IpHeaders::Ipv4(h, Default::default());
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let mut bytes = Vec::new();
        match vlan {
            Some(v) => eth
                .single_vlan(VlanId::try_new(v).unwrap())
                .ip(ip)
                .udp(5, 6)
                .write(&mut bytes, &payload),
            None => eth.ip(ip).udp(5, 6).write(&mut bytes, &payload),
        }
        .unwrap();
        Frame {
            bytes,
            kept: area.kept,
        }
    })
}

fn spec_ids(max: usize) -> impl Strategy<Value = Vec<SpecId>> {
    prop::collection::vec(
        any::<(u32, u32)>().prop_map(|(vm, seq)| SpecId::new(vm, seq)),
        0..=max,
    )
}

/// Offset of the IPv4 header, and its length.
fn ip_header(f: &[u8]) -> (usize, usize) {
    let start = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
    (start, usize::from(f[start] & 0xf) * 4)
}

fn assert_ipv4_ok(f: &[u8]) -> Result<(), TestCaseError> {
    let (start, len) = ip_header(f);
    let sum = Sum16BitWords::new()
        .add_slice(&f[start..start + len])
        .ones_complement();
    prop_assert_eq!(sum, 0, "bad IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([f[start + 2], f[start + 3]]));
    prop_assert_eq!(total, f.len() - start);
    let p = SlicedPacket::from_ethernet(f).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let (Some(TransportSlice::Udp(udp)), Some(etherparse::NetSlice::Ipv4(ip))) =
        (p.transport, p.net)
    {
        let h = ip.header();
        let want =
            udp.to_header()
                .calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload());
        prop_assert_eq!(want.unwrap(), udp.checksum(), "UDP checksum broken");
    }
    Ok(())
}

fn expected_options(ids: &[SpecId], kept: &[u8]) -> Vec<u8> {
    let mut o = Vec::new();
    if !ids.is_empty() {
        o.extend_from_slice(&[IPOPT_SPEC, 4 + 8 * ids.len() as u8, 1, ids.len() as u8]);
        for id in ids {
            o.extend_from_slice(&id.vm.to_be_bytes());
            o.extend_from_slice(&id.seq.to_be_bytes());
        }
    }
    o.extend_from_slice(kept);
    o.resize(o.len().div_ceil(4) * 4, 0);
    o
}

/// Runs every entry point; they may fail but must not panic, and what they
/// return for an IPv4 frame must be a consistent IPv4 frame.
fn exercise(bytes: &[u8], ids: &[SpecId]) -> Result<(), TestCaseError> {
    let _ = parse_tags(bytes);
    let room = room_for_ids(bytes);
    for out in [retag(bytes, ids), strip(bytes)].into_iter().flatten() {
        if let Ok(Some(_)) = room {
            let (start, len) = ip_header(&out);
            let sum = Sum16BitWords::new().add_slice(&out[start..start + len]);
            prop_assert_eq!(sum.ones_complement(), 0);
            prop_assert_eq!(parse_tags(&strip(&out).unwrap()), Ok(None));
        } else {
            prop_assert_eq!(&out[..], bytes);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128), ids in spec_ids(6)) {
        exercise(&bytes, &ids)?;
    }

    #[test]
    fn arbitrary_ipv4_headers_never_panic(
        vlan in any::<bool>(),
        rest in prop::collection::vec(any::<u8>(), 0..96),
        ids in spec_ids(6),
    ) {
        let mut bytes = vec![0u8; 12];
        if vlan {
            bytes.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        bytes.extend_from_slice(&[0x08, 0x00]);
        bytes.extend_from_slice(&rest);
        exercise(&bytes, &ids)?;
    }

    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ids in spec_ids(6),
    ) {
        let mut bytes = f.bytes.clone();
        let (start, len) = ip_header(&bytes);
        for (i, b) in edits {
            bytes[start + i.index(len)] = b;
        }
        exercise(&bytes, &ids)?;
    }

    #[test]
    fn retag_writes_exactly_the_set(f in frame(), ids in spec_ids(MAX_IDS + 1)) {
        assert_ipv4_ok(&f.bytes)?;
        let room = room_for_ids(&f.bytes).unwrap().unwrap();
        let res = retag(&f.bytes, &ids);
        if ids.len() > room {
            prop_assert_eq!(res, Err(CodecError::TooManyIds { have: ids.len(), room }));
            return Ok(());
        }
        let out = res.unwrap();
        assert_ipv4_ok(&out)?;
        let want = (!ids.is_empty()).then(|| ids.clone());
        prop_assert_eq!(parse_tags(&out).unwrap(), want);
        let ((s0, l0), (s1, l1)) = (ip_header(&f.bytes), ip_header(&out));
        prop_assert_eq!(&out[..s1 + 2], &f.bytes[..s0 + 2].iter().enumerate()
            .map(|(i, &b)| if i == s0 { 0x40 | (l1 / 4) as u8 } else { b }).collect::<Vec<_>>()[..]);
        prop_assert_eq!(&out[s1 + 4..s1 + 10], &f.bytes[s0 + 4..s0 + 10]);
        prop_assert_eq!(&out[s1 + 12..s1 + 20], &f.bytes[s0 + 12..s0 + 20]);
        prop_assert_eq!(&out[s1 + 20..s1 + l1], &expected_options(&ids, &f.kept)[..]);
        prop_assert_eq!(&out[s1 + l1..], &f.bytes[s0 + l0..]);
    }

    #[test]
    fn strip_forgets_the_tag(f in frame(), ids in spec_ids(MAX_IDS)) {
        let room = room_for_ids(&f.bytes).unwrap().unwrap();
        let ids = &ids[..ids.len().min(room)];
        let stripped = strip(&f.bytes).unwrap();
        assert_ipv4_ok(&stripped)?;
        prop_assert_eq!(parse_tags(&stripped).unwrap(), None);
        let tagged = retag(&f.bytes, ids).unwrap();
        prop_assert_eq!(strip(&tagged).unwrap(), stripped.clone());
        prop_assert_eq!(strip(&stripped).unwrap(), stripped);
        prop_assert_eq!(room_for_ids(&tagged).unwrap(), Some(room));
        let other: Vec<SpecId> = ids.iter().rev().map(|id| SpecId::new(id.seq, id.vm)).collect();
        prop_assert_eq!(retag(&tagged, &other).unwrap(), retag(&f.bytes, &other).unwrap());
    }
}
