//! Fuzz target of the IPOPT_SPEC codec (`specwire::codec`), at about
//! 10^5 cases: Ethernet frames built field by field (VLAN tags, IPv4
//! header fields, options areas with forged, malformed and foreign
//! options, Ethernet padding), then maybe edited byte by byte, and raw
//! bytes. `specwire/tests/codec_props.rs` checks the same codec with
//! proptest on frames etherparse builds; this target reaches the malformed
//! ones. It stays here to share the fuzz loop of `support/`. How to run it
//! longer: `docs/fuzzing.md`.

#[path = "support/fuzz.rs"]
mod fuzz;

use arbitrary::Arbitrary;
use etherparse::checksum::Sum16BitWords;
use fuzz::{Bytes, Rare, Seq, Target};
use specwire::codec::{
    parse_tags, retag, retag_into, room_for_ids, strip, CodecError, SpecId, IPOPT_SPEC,
    IPOPT_SPEC_NOT_COPIED, MAX_IDS,
};

/// One item of an options area.
#[derive(Debug, Arbitrary)]
enum Opt {
    Nop,
    /// IPOPT_SPEC with 1 to 5 ids, now and then with the copied flag off,
    /// another version, or a count or a length that lies.
    Tag {
        not_copied: Rare<()>,
        version: Rare<u8>,
        first: u64,
        more: Seq<u64>,
        count_delta: Rare<i8>,
        len_delta: Rare<i8>,
    },
    /// Another option, well framed.
    Other(u8, Bytes),
    /// Another, with any length byte.
    Lying(u8, u8, Bytes),
}

impl Opt {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Opt::Nop => out.push(1),
            Opt::Tag {
                not_copied,
                version,
                first,
                more,
                count_delta,
                len_delta,
            } => {
                let ids: Vec<u64> = std::iter::once(*first)
                    .chain(more.0.iter().copied().take(4))
                    .collect();
                let t = match not_copied.0 {
                    Some(()) => IPOPT_SPEC_NOT_COPIED,
                    None => IPOPT_SPEC,
                };
                let count = (ids.len() as u8).wrapping_add(count_delta.0.unwrap_or(0) as u8);
                let len = (4 + 8 * ids.len() as u8).wrapping_add(len_delta.0.unwrap_or(0) as u8);
                out.extend_from_slice(&[t, len, version.0.unwrap_or(1), count]);
                for id in ids {
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
            Opt::Other(t, data) => {
                let t = if t & 0x7f == 0x1e || *t < 2 {
                    t ^ 0x44
                } else {
                    *t
                };
                let data = &data.0[..data.0.len().min(10)];
                out.extend_from_slice(&[t, data.len() as u8 + 2]);
                out.extend_from_slice(data);
            }
            Opt::Lying(t, len, data) => {
                out.extend_from_slice(&[*t, *len]);
                out.extend_from_slice(&data.0[..data.0.len().min(10)]);
            }
        }
    }
}

/// An Ethernet frame with an IPv4 packet, built field by field.
#[derive(Debug, Arbitrary)]
struct Ipv4Frame {
    /// 802.1Q, 802.1ad or QinQ tags before the EtherType (0 to 3).
    vlans: Seq<(u8, u16)>,
    /// The EtherType, when not IPv4.
    ether_type: Rare<u16>,
    /// The version nibble, when not 4.
    version: Rare<u8>,
    /// IHL, when not the length of the options area.
    ihl: Rare<u8>,
    /// The total length, when not the packet's.
    total_len: Rare<u16>,
    /// DSCP/ECN, identification, flags and fragment offset, TTL, protocol,
    /// checksum, addresses: bytes 1 and 4..20 of the header.
    fields: [u8; 17],
    /// Up to three options (more leave no room for a tag).
    options: Seq<Opt>,
    /// End-of-Option-List and bytes after it, ending the options area.
    end: Rare<Bytes>,
    payload: Bytes,
    /// Bytes after the packet (Ethernet padding).
    padding: Rare<Bytes>,
    /// A payload of zeros that takes the packet to 65535 bytes less this:
    /// a tag may not fit. One time in 256 (these cases are slow).
    big: Rare<Rare<u8>>,
}

impl Ipv4Frame {
    fn bytes(&self) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        for (kind, tci) in self.vlans.0.iter().take(3) {
            let tpid: u16 = [0x8100, 0x88a8, 0x9100][usize::from(*kind) % 3];
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&self.ether_type.0.unwrap_or(0x0800).to_be_bytes());
        let mut opts = Vec::new();
        for o in self.options.0.iter().take(3) {
            let mut one = Vec::new();
            o.write(&mut one);
            if opts.len() + one.len() > 40 {
                break;
            }
            opts.extend(one);
        }
        if let Some(rest) = &self.end.0 {
            opts.push(0);
            opts.extend_from_slice(&rest.0);
        }
        opts.truncate(40);
        opts.resize(opts.len().div_ceil(4) * 4, 0);
        let header_len = 20 + opts.len();
        let payload = match self.big.0.as_ref().and_then(|b| b.0) {
            Some(n) => vec![0; 0xffff - header_len - usize::from(n % 48)],
            None => self.payload.0.clone(),
        };
        let ihl = self.ihl.0.unwrap_or((header_len / 4) as u8) & 0xf;
        let total = self
            .total_len
            .0
            .unwrap_or((header_len + payload.len()).min(0xffff) as u16);
        let start = f.len();
        f.push((self.version.0.unwrap_or(4) << 4) | ihl);
        f.push(self.fields[0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&self.fields[1..]);
        f.extend_from_slice(&opts);
        f.extend_from_slice(&payload);
        let padding = self.padding.0.as_ref().map_or(&[][..], |p| &p.0[..]);
        f.extend_from_slice(padding);
        debug_assert_eq!(f.len(), start + header_len + payload.len() + padding.len());
        f
    }
}

#[derive(Debug, Arbitrary)]
enum Edit {
    Set(u16, u8),
    Cut(u16),
}

#[derive(Debug)]
enum AnyFrame {
    Raw(Bytes),
    Ipv4(Ipv4Frame),
    Edited(Ipv4Frame, Seq<Edit>),
    /// Tagged by the codec itself with 1 to 4 of these ids (as many as
    /// fit), now and then edited.
    Retagged(u8, [u16; 4], Ipv4Frame, Rare<Seq<Edit>>),
}

impl<'a> Arbitrary<'a> for AnyFrame {
    /// 50% built IPv4 frames, 20% edited ones, 20% retagged ones, 10% raw
    /// bytes.
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=9u8)? {
            0 => AnyFrame::Raw(u.arbitrary()?),
            1 | 2 => AnyFrame::Edited(u.arbitrary()?, u.arbitrary()?),
            3 | 4 => AnyFrame::Retagged(
                u.arbitrary()?,
                u.arbitrary()?,
                u.arbitrary()?,
                u.arbitrary()?,
            ),
            _ => AnyFrame::Ipv4(u.arbitrary()?),
        })
    }
}

fn edit(b: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        match *e {
            // Edits land in the headers: 14 + 12 VLAN + 60 IPv4.
            Edit::Set(i, v) if !b.is_empty() => {
                let i = usize::from(i) % b.len().min(86);
                b[i] = v;
            }
            Edit::Cut(i) => b.truncate(usize::from(i) % (b.len() + 1)),
            _ => {}
        }
    }
}

impl AnyFrame {
    fn bytes(&self) -> Vec<u8> {
        match self {
            AnyFrame::Raw(b) => b.0.clone(),
            AnyFrame::Ipv4(f) => f.bytes(),
            AnyFrame::Edited(f, edits) => {
                let mut b = f.bytes();
                edit(&mut b, &edits.0);
                b
            }
            AnyFrame::Retagged(count, ids, f, edits) => {
                let b = f.bytes();
                let room = room_for_ids(&b).ok().flatten().unwrap_or(0);
                let n = (1 + usize::from(count % 4)).min(room.max(1));
                let ids: Vec<SpecId> = ids[..n].iter().map(|&v| spec_id(v)).collect();
                let mut b = retag(&b, &ids).unwrap_or(b);
                if let Some(edits) = &edits.0 {
                    edit(&mut b, &edits.0);
                }
                b
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// The set to write: the first `count % 7` of `ids` (0 to 6, one or
    /// two more than fit), duplicates removed.
    count: u8,
    ids: [u16; 6],
    frame: AnyFrame,
}

/// An id from 16 bits: VM and sequence both vary, in every byte.
fn spec_id(v: u16) -> SpecId {
    let v = u32::from(v);
    SpecId::new(v.wrapping_mul(0x9e37_79b9), v ^ 0xa5a5_0000)
}

/// The IPv4 header's offset, after the Ethernet header and VLAN tags.
fn ip_start(f: &[u8]) -> usize {
    let mut at = 12;
    while matches!(f[at..at + 2], [0x81, 0x00] | [0x88, 0xa8] | [0x91, 0x00]) {
        at += 4;
    }
    at + 2
}

fn check(input: Input) {
    let f = input.frame.bytes();
    let mut ids: Vec<SpecId> = Vec::new();
    for &v in &input.ids[..usize::from(input.count % 7)] {
        let id = spec_id(v);
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    let tags = parse_tags(&f);
    let room = room_for_ids(&f);
    let stripped = strip(&f);
    let out = retag(&f, &ids);
    // retag_into agrees, into a dirty buffer, and leaves it empty on error.
    let mut buf = vec![0xaa; 7];
    let into = retag_into(&f, &ids, &mut buf);
    match &out {
        Ok(o) => assert_eq!((&into, &buf), (&Ok(()), o)),
        Err(e) => assert_eq!((&into, buf.len()), (&Err(*e), 0)),
    }

    let room = match room {
        // Not IPv4: nothing to read, and every frame comes back as it was.
        Ok(None) => {
            assert_eq!(tags, Ok(None));
            assert_eq!(stripped.as_ref(), Ok(&f));
            assert_eq!(out.as_ref(), Ok(&f));
            return;
        }
        // A header or options area the codec cannot vouch for: every entry
        // point refuses it, and says the same.
        Err(e) => {
            assert_eq!(stripped, Err(e));
            assert_eq!(out, Err(e));
            assert!(
                tags.is_err(),
                "parse_tags read {tags:?} where room_for_ids said {e}"
            );
            return;
        }
        Ok(Some(room)) => room,
    };
    let stripped = stripped.expect("a frame with room strips");
    check_rewrite(&f, &stripped, &[]);
    assert_eq!(parse_tags(&stripped), Ok(None), "strip left a tag");
    assert_eq!(
        strip(&stripped).as_ref(),
        Ok(&stripped),
        "strip is idempotent"
    );
    assert_eq!(room_for_ids(&stripped), Ok(Some(room)));

    match out {
        Err(CodecError::TooManyIds { have, room: r }) => {
            assert_eq!((have, r), (ids.len(), room));
            assert!(ids.len() > room);
        }
        Err(CodecError::PacketTooLong { len }) => assert!(len > 0xffff),
        Err(e) => panic!("retag failed with {e} on a frame with room {room}"),
        Ok(out) => {
            assert!(
                ids.len() <= room,
                "{} ids written into room for {room}",
                ids.len()
            );
            check_rewrite(&f, &out, &ids);
            let want = (!ids.is_empty()).then(|| ids.clone());
            assert_eq!(parse_tags(&out), Ok(want), "retag then parse_tags");
            assert_eq!(room_for_ids(&out), Ok(Some(room)));
            assert_eq!(strip(&out).as_ref(), Ok(&stripped), "strip forgets the tag");
            assert_eq!(retag(&out, &ids).as_ref(), Ok(&out), "retag is idempotent");
            assert_eq!(retag(&stripped, &ids).as_ref(), Ok(&out));
        }
    }
    // parse_tags then retag round-trips a valid tag.
    if let Ok(Some(t)) = tags {
        assert!(!t.is_empty() && t.len() <= MAX_IDS);
        let again = retag(&f, &t).expect("a frame's own tag fits it again");
        assert_eq!(parse_tags(&again), Ok(Some(t)));
    }
}

/// `out` is `f` retagged with `ids`: same bytes around the options area,
/// a consistent header with a valid checksum, the tag first, padding last.
fn check_rewrite(f: &[u8], out: &[u8], ids: &[SpecId]) {
    let s = ip_start(f);
    assert_eq!(&out[..s], &f[..s], "link header kept");
    let (old_hl, new_hl) = (usize::from(f[s] & 0xf) * 4, usize::from(out[s] & 0xf) * 4);
    assert_eq!(out[s] >> 4, 4);
    assert_eq!(
        out.len() - new_hl,
        f.len() - old_hl,
        "only the header changed size"
    );
    assert_eq!(
        &out[s + new_hl..],
        &f[s + old_hl..],
        "payload and padding kept"
    );
    let total = |b: &[u8]| usize::from(u16::from_be_bytes([b[s + 2], b[s + 3]]));
    assert_eq!(
        total(out) + old_hl,
        total(f) + new_hl,
        "total length moved with IHL"
    );
    assert_eq!(out[s + 1], f[s + 1], "DSCP/ECN kept");
    assert_eq!(
        &out[s + 4..s + 10],
        &f[s + 4..s + 10],
        "id, flags, offset, TTL, protocol kept"
    );
    assert_eq!(&out[s + 12..s + 20], &f[s + 12..s + 20], "addresses kept");
    let sum = Sum16BitWords::new().add_slice(&out[s..s + new_hl]);
    assert_eq!(sum.ones_complement(), 0, "IPv4 header checksum");
    let opts = &out[s + 20..s + new_hl];
    if !ids.is_empty() {
        assert_eq!(
            opts[..2],
            [IPOPT_SPEC, 4 + 8 * ids.len() as u8],
            "the tag goes first"
        );
    }
}

#[test]
fn codec_any_frame() {
    Target {
        name: "codec_any_frame",
        default_cases: 100_000,
        max_len: 4096,
    }
    .run(check);
}
