//! The IPOPT_SPEC wire codec: reads, strips and writes the IPv4 option that
//! carries a packet's speculation tag set (`SPECULATIONS.md`, rules 7, 11
//! and 12). The byte layout and the contracts are in `docs/wire-format.md`.
//!
//! Everything works on whole Ethernet frames, as a virtio-net device or a
//! TAP sees them. Single or stacked 802.1Q / 802.1ad VLAN tags are looked
//! through. Frames that are not IPv4 (ARP, IPv6, anything else) carry no
//! tag: [`parse_tags`] returns `None` for them and [`retag`] copies them
//! unchanged, so a caller that needs a tag on every packet must check
//! [`room_for_ids`] first.
//!
//! No function here panics, whatever the bytes; every malformed input is a
//! [`CodecError`] that names the problem and its byte offset in the frame.

use std::ops::Range;

use etherparse::checksum::Sum16BitWords;
use etherparse::{EtherType, Ethernet2HeaderSlice, Ipv4Header, Ipv4Options, SingleVlanHeaderSlice};

/// The id a tag carries, and its size on the wire (here for the paths
/// `codec::SpecId` and `codec::ID_LEN`).
pub use crate::id::{SpecId, ID_LEN};

/// The option type byte: copied flag set, class 0, number 30 (the RFC 4727
/// experimental value).
pub const IPOPT_SPEC: u8 = 0x9E;
/// The same option number and class without the copied flag. Never written;
/// [`retag`] strips it too, so a guest cannot slip a look-alike past a
/// receiver that ignores the flag, and [`parse_tags`] rejects it.
pub const IPOPT_SPEC_NOT_COPIED: u8 = 0x1E;
/// The version byte this codec writes and accepts.
pub const SPEC_VERSION: u8 = 1;
/// Bytes before the ids: type, length, version, count.
pub const TAG_FIXED_LEN: usize = 4;
/// The largest tag set one packet can carry: (40 - 4) / 8.
pub const MAX_IDS: usize = (MAX_OPTIONS_LEN - TAG_FIXED_LEN) / ID_LEN;
/// The most a tag adds to a frame. The guest's MTU must be this much below
/// the link MTU (e.g. 1460 on a 1500-byte link), offered through
/// virtio-net's MTU feature, so a full-size packet still fits once tagged.
pub const TAG_HEADROOM: usize = MAX_OPTIONS_LEN;

/// The IPv4 options area holds at most 40 bytes (IHL 15).
const MAX_OPTIONS_LEN: usize = Ipv4Options::MAX_LEN as usize;
const IPV4_MIN_LEN: usize = Ipv4Header::MIN_LEN;
const IPOPT_END: u8 = 0;
const IPOPT_NOP: u8 = 1;
const ETH_HEADER_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;

/// Why a frame could not be read or tagged. Every `offset` is a byte offset
/// from the start of the Ethernet frame: of the IPv4 header, of the field
/// named, or of the option's type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The Ethernet header or a VLAN tag is cut short: `need` bytes needed.
    #[error("frame of {len} bytes is too short: its link header needs {need}")]
    FrameTooShort { need: usize, len: usize },
    /// The IPv4 header (fixed part, or IHL * 4 bytes) runs past the frame's
    /// end: `have` bytes from `offset`.
    #[error("IPv4 header at offset {offset} needs {need} bytes, {have} present")]
    Ipv4Truncated {
        offset: usize,
        need: usize,
        have: usize,
    },
    /// The EtherType says IPv4 but the version nibble does not.
    #[error("IPv4 version nibble at offset {offset} is {version}, not 4")]
    BadIpVersion { offset: usize, version: u8 },
    /// IHL below 5 (a header shorter than 20 bytes).
    #[error("IPv4 IHL at offset {offset} is {ihl}, below 5")]
    BadIhl { offset: usize, ihl: u8 },
    /// The total length is below the header length (IHL * 4) or above the
    /// bytes `available` from the start of the IPv4 header.
    #[error(
        "IPv4 total length {total} at offset {offset} is outside \
         {header_len}..={available}"
    )]
    BadTotalLength {
        offset: usize,
        total: usize,
        header_len: usize,
        available: usize,
    },
    /// An option type byte is the last byte of the options area, with no
    /// room for its length byte.
    #[error("IPv4 option at offset {offset} has no length byte")]
    OptionTruncated { offset: usize },
    /// An option length of 0 or 1 (it must cover its own two bytes).
    #[error("IPv4 option at offset {offset} has length {len}, below 2")]
    BadOptionLength { offset: usize, len: u8 },
    /// An option runs past the end of the IPv4 header: `room` bytes left.
    #[error("IPv4 option at offset {offset} has length {len}, only {room} bytes left")]
    OptionOverrun { offset: usize, len: u8, room: usize },
    /// IPOPT_SPEC with a version byte this codec does not know.
    #[error("IPOPT_SPEC at offset {offset} has version {version}, expected 1")]
    BadTagVersion { offset: usize, version: u8 },
    /// IPOPT_SPEC whose length is not 4 + 8 * count, or whose count is 0
    /// (an empty set is written as no option at all). `count` is 0 when the
    /// option is too short to have a count byte.
    #[error("IPOPT_SPEC at offset {offset} has length {len} but count {count}")]
    BadTagLength { offset: usize, len: u8, count: u8 },
    /// Option number 30 without the copied flag (0x1E): never written.
    #[error("IPOPT_SPEC at offset {offset} lacks the copied flag (type 0x1E)")]
    TagNotCopied { offset: usize },
    /// Two IPOPT_SPEC options in one header: a valid tag has exactly one.
    #[error("second IPOPT_SPEC at offset {second} (first at {first})")]
    DuplicateTag { first: usize, second: usize },
    /// `have` ids do not fit in the `room` the frame's other options leave.
    /// The frame must not be sent untagged; `docs/wire-format.md` gives the
    /// VMM's contract.
    #[error("tag set of {have} ids does not fit: room for {room}")]
    TooManyIds { have: usize, room: usize },
    /// The tagged packet would exceed the IPv4 limit of 65535 bytes.
    #[error("tagged IPv4 packet would be {len} bytes, above 65535")]
    PacketTooLong { len: usize },
}

/// Where the IPv4 header sits in a frame, after its fixed fields checked out.
#[derive(Debug, Clone, Copy)]
struct Ipv4At {
    /// Offset of the IPv4 header.
    start: usize,
    /// IHL * 4.
    header_len: usize,
    /// The total length field.
    total_len: usize,
}

impl Ipv4At {
    fn options(&self) -> Range<usize> {
        self.start + IPV4_MIN_LEN..self.start + self.header_len
    }
}

/// One option of the options area: its range in the frame. A NOP is one
/// byte; End-of-Option-List and what follows it are not options.
type OptSpan = Range<usize>;

fn is_spec_type(t: u8) -> bool {
    t == IPOPT_SPEC || t == IPOPT_SPEC_NOT_COPIED
}

fn round_up4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// The EtherType after any VLAN tags, and where its payload starts.
fn link_payload(frame: &[u8]) -> Result<(EtherType, usize), CodecError> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| CodecError::FrameTooShort {
        need: ETH_HEADER_LEN,
        len: frame.len(),
    })?;
    let mut ether_type = eth.ether_type();
    let mut at = ETH_HEADER_LEN;
    while matches!(
        ether_type,
        EtherType::VLAN_TAGGED_FRAME
            | EtherType::PROVIDER_BRIDGING
            | EtherType::VLAN_DOUBLE_TAGGED_FRAME
    ) {
        let rest = frame.get(at..).unwrap_or_default();
        let vlan =
            SingleVlanHeaderSlice::from_slice(rest).map_err(|_| CodecError::FrameTooShort {
                need: at + VLAN_TAG_LEN,
                len: frame.len(),
            })?;
        ether_type = vlan.ether_type();
        at += VLAN_TAG_LEN;
    }
    Ok((ether_type, at))
}

/// Finds and checks the IPv4 header's fixed fields; `None` if not IPv4.
fn locate(frame: &[u8]) -> Result<Option<Ipv4At>, CodecError> {
    let (ether_type, start) = link_payload(frame)?;
    if ether_type != EtherType::IPV4 {
        return Ok(None);
    }
    let have = frame.len() - start;
    let ip = &frame[start..];
    if have < IPV4_MIN_LEN {
        return Err(CodecError::Ipv4Truncated {
            offset: start,
            need: IPV4_MIN_LEN,
            have,
        });
    }
    let (version, ihl) = (ip[0] >> 4, ip[0] & 0xf);
    if version != 4 {
        return Err(CodecError::BadIpVersion {
            offset: start,
            version,
        });
    }
    if ihl < 5 {
        return Err(CodecError::BadIhl { offset: start, ihl });
    }
    let header_len = usize::from(ihl) * 4;
    if have < header_len {
        return Err(CodecError::Ipv4Truncated {
            offset: start,
            need: header_len,
            have,
        });
    }
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total_len < header_len || total_len > have {
        return Err(CodecError::BadTotalLength {
            offset: start + 2,
            total: total_len,
            header_len,
            available: have,
        });
    }
    Ok(Some(Ipv4At {
        start,
        header_len,
        total_len,
    }))
}

/// Splits the options area into options, stopping at End-of-Option-List.
fn walk_options(frame: &[u8], ip: &Ipv4At) -> Result<Vec<OptSpan>, CodecError> {
    let area = ip.options();
    let end = area.end;
    let mut spans = Vec::new();
    let mut at = area.start;
    while at < end {
        match frame[at] {
            IPOPT_END => break,
            IPOPT_NOP => {
                spans.push(at..at + 1);
                at += 1;
            }
            _ => {
                if at + 1 >= end {
                    return Err(CodecError::OptionTruncated { offset: at });
                }
                let len = frame[at + 1];
                if len < 2 {
                    return Err(CodecError::BadOptionLength { offset: at, len });
                }
                let room = end - at;
                if usize::from(len) > room {
                    return Err(CodecError::OptionOverrun {
                        offset: at,
                        len,
                        room,
                    });
                }
                spans.push(at..at + usize::from(len));
                at += usize::from(len);
            }
        }
    }
    Ok(spans)
}

/// Decodes one IPOPT_SPEC option starting at frame offset `offset`.
fn decode_tag(opt: &[u8], offset: usize) -> Result<Vec<SpecId>, CodecError> {
    if opt.first() == Some(&IPOPT_SPEC_NOT_COPIED) {
        return Err(CodecError::TagNotCopied { offset });
    }
    let len = opt.get(1).copied().unwrap_or(0);
    let bad_len = |count| CodecError::BadTagLength { offset, len, count };
    let (Some(&version), Some(&count)) = (opt.get(2), opt.get(3)) else {
        return Err(bad_len(0));
    };
    if version != SPEC_VERSION {
        return Err(CodecError::BadTagVersion { offset, version });
    }
    if count == 0 || opt.len() != TAG_FIXED_LEN + ID_LEN * usize::from(count) {
        return Err(bad_len(count));
    }
    let ids = opt[TAG_FIXED_LEN..]
        .chunks_exact(ID_LEN)
        .map(|c| {
            let mut b = [0u8; ID_LEN];
            b.copy_from_slice(c);
            SpecId::from_bytes(b)
        })
        .collect();
    Ok(ids)
}

/// Appends the IPOPT_SPEC option for `ids` (1..=MAX_IDS of them) to `out`.
fn encode_tag(ids: &[SpecId], out: &mut Vec<u8>) {
    let len = TAG_FIXED_LEN + ID_LEN * ids.len();
    // Both fit in a byte: the callers bound `ids.len()` by MAX_IDS (4).
    out.extend_from_slice(&[IPOPT_SPEC, len as u8, SPEC_VERSION, ids.len() as u8]);
    for id in ids {
        out.extend_from_slice(&id.to_bytes());
    }
}

/// The ids that fit beside `kept` bytes of other options.
fn room_beside(kept: usize) -> usize {
    let left = MAX_OPTIONS_LEN.saturating_sub(round_up4(kept));
    (left.saturating_sub(TAG_FIXED_LEN) / ID_LEN).min(MAX_IDS)
}

/// The frame's options other than IPOPT_SPEC (either flag value), in order.
fn kept_options(frame: &[u8], ip: &Ipv4At) -> Result<Vec<u8>, CodecError> {
    let mut kept = Vec::with_capacity(MAX_OPTIONS_LEN);
    for span in walk_options(frame, ip)? {
        if !is_spec_type(frame[span.start]) {
            kept.extend_from_slice(&frame[span]);
        }
    }
    Ok(kept)
}

/// Reads the tag set of an Ethernet frame.
///
/// Returns `Ok(None)` for frames that are not IPv4 (they carry no tag) and
/// for IPv4 packets without IPOPT_SPEC, and the ids in wire order
/// otherwise. An IPv4 header or options area that is malformed, a malformed
/// IPOPT_SPEC, or two of them, is an error: the caller must not guess.
/// The IPv4 header checksum is not checked here.
pub fn parse_tags(frame: &[u8]) -> Result<Option<Vec<SpecId>>, CodecError> {
    let Some(ip) = locate(frame)? else {
        return Ok(None);
    };
    let mut found: Option<(usize, Vec<SpecId>)> = None;
    for span in walk_options(frame, &ip)? {
        let offset = span.start;
        if !is_spec_type(frame[offset]) {
            continue;
        }
        if let Some((first, _)) = found {
            return Err(CodecError::DuplicateTag {
                first,
                second: offset,
            });
        }
        found = Some((offset, decode_tag(&frame[span], offset)?));
    }
    Ok(found.map(|(_, ids)| ids))
}

/// How many ids [`retag`] can write into this frame, beside its other
/// options (any IPOPT_SPEC already there does not count: retag replaces it).
///
/// `Ok(None)` for frames that are not IPv4: they cannot carry a tag at all.
pub fn room_for_ids(frame: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(ip) = locate(frame)? else {
        return Ok(None);
    };
    Ok(Some(room_beside(kept_options(frame, &ip)?.len())))
}

/// The VMM's operation (rule 12): replaces whatever IPOPT_SPEC the frame
/// carries with exactly `ids`, and returns the new frame.
///
/// Every IPOPT_SPEC the guest wrote (0x9E or 0x1E, however many, valid or
/// not inside) is removed; every other option is kept, in order; the tag,
/// if `ids` is not empty, goes first; the area is padded with
/// End-of-Option-List to a multiple of 4 (bytes after an End-of-Option-List
/// the guest wrote are dropped). IHL, total length and the header checksum
/// are rewritten. Everything after the IPv4 header is copied unchanged, so
/// the frame grows or shrinks by `out.len() - frame.len()` bytes, all at
/// the options. Frames that are not IPv4 are copied unchanged.
///
/// `ids` is a set: it is written as given, in order. More ids than
/// [`room_for_ids`] is [`CodecError::TooManyIds`], never a partial tag.
pub fn retag(frame: &[u8], ids: &[SpecId]) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(frame.len() + TAG_HEADROOM);
    retag_into(frame, ids, &mut out)?;
    Ok(out)
}

/// [`retag`] into a caller's buffer, which is cleared first (so the VMM can
/// reuse one buffer per queue). On error `out` is left empty.
pub fn retag_into(frame: &[u8], ids: &[SpecId], out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.clear();
    let Some(ip) = locate(frame)? else {
        out.extend_from_slice(frame);
        return Ok(());
    };
    let kept = kept_options(frame, &ip)?;
    let room = room_beside(kept.len());
    if ids.len() > room {
        return Err(CodecError::TooManyIds {
            have: ids.len(),
            room,
        });
    }
    let mut options = Vec::with_capacity(MAX_OPTIONS_LEN);
    if !ids.is_empty() {
        encode_tag(ids, &mut options);
    }
    options.extend_from_slice(&kept);
    options.resize(round_up4(options.len()), IPOPT_END);
    rebuild(frame, &ip, &options, out)
}

/// [`retag`] with the empty set: removes every IPOPT_SPEC.
pub fn strip(frame: &[u8]) -> Result<Vec<u8>, CodecError> {
    retag(frame, &[])
}

/// Writes `frame` with its IPv4 options area replaced by `options` (a
/// multiple of 4 bytes, at most 40) into `out`.
fn rebuild(frame: &[u8], ip: &Ipv4At, options: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let header_len = IPV4_MIN_LEN + options.len();
    let total_len = ip.total_len - ip.header_len + header_len;
    let total =
        u16::try_from(total_len).map_err(|_| CodecError::PacketTooLong { len: total_len })?;
    let fixed = ip.start..ip.start + IPV4_MIN_LEN;
    out.reserve(frame.len() + header_len - ip.header_len);
    out.extend_from_slice(&frame[..fixed.start]);
    let h = out.len();
    out.extend_from_slice(&frame[fixed]);
    out.extend_from_slice(options);
    // IHL is at most 15: `options` holds at most 40 bytes.
    out[h] = 0x40 | (header_len / 4) as u8;
    out[h + 2..h + 4].copy_from_slice(&total.to_be_bytes());
    out[h + 10..h + 12].copy_from_slice(&[0, 0]);
    let sum = Sum16BitWords::new().add_slice(&out[h..h + header_len]);
    out[h + 10..h + 12].copy_from_slice(&sum.ones_complement().to_ne_bytes());
    out.extend_from_slice(&frame[ip.start + ip.header_len..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{ip_number, Ipv4HeaderSlice};

    const IP: usize = ETH_HEADER_LEN;
    const OPTS: usize = IP + IPV4_MIN_LEN;
    const PAYLOAD: &[u8] = b"udp header and payload, untouched";
    /// A Record Route option (type 7, length 11, pointer 4).
    const RR: [u8; 11] = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0];

    fn eth(ether_type: u16, rest: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(rest);
        f
    }

    /// An IPv4 packet with `options` (padded with zeros to a multiple of 4),
    /// its header built and checksummed by etherparse.
    fn ipv4(options: &[u8]) -> Vec<u8> {
        let mut h = Ipv4Header::new(0, 64, ip_number::UDP, [10, 0, 0, 1], [10, 0, 0, 2]).unwrap();
        let mut o = options.to_vec();
        o.resize(round_up4(o.len()), 0);
        h.options = o.as_slice().try_into().unwrap();
        h.set_payload_len(PAYLOAD.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut p = h.to_bytes().to_vec();
        p.extend_from_slice(PAYLOAD);
        p
    }

    fn frame(options: &[u8]) -> Vec<u8> {
        eth(0x0800, &ipv4(options))
    }

    fn ids(n: u32) -> Vec<SpecId> {
        (0..n)
            .map(|i| SpecId::new(0x0102_0304 + i, 0xa0b0_c0d0 + i))
            .collect()
    }

    fn tag(set: &[SpecId]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_tag(set, &mut v);
        v
    }

    /// The checksum verifies, and agrees with etherparse's own computation;
    /// the total length covers exactly the packet.
    fn check_header(f: &[u8]) {
        let ip = locate(f).unwrap().unwrap();
        let hdr = &f[ip.start..ip.start + ip.header_len];
        assert_eq!(Sum16BitWords::new().add_slice(hdr).ones_complement(), 0);
        let s = Ipv4HeaderSlice::from_slice(hdr).unwrap();
        // etherparse's header type drops the reserved ("evil") flag bit.
        if hdr[6] & 0x80 == 0 {
            assert_eq!(s.header_checksum(), s.to_header().calc_header_checksum());
        }
        assert_eq!(ip.total_len, f.len() - ip.start);
    }

    fn options_of(f: &[u8]) -> &[u8] {
        let ip = locate(f).unwrap().unwrap();
        &f[ip.options()]
    }

    fn payload_of(f: &[u8]) -> &[u8] {
        let ip = locate(f).unwrap().unwrap();
        &f[ip.start + ip.header_len..]
    }

    #[test]
    fn four_ids_fit() {
        assert_eq!(MAX_IDS, 4);
        assert_eq!(SpecId::new(7, 9).to_bytes(), [0, 0, 0, 7, 0, 0, 0, 9]);
    }

    #[test]
    fn round_trip_every_size() {
        for n in 0..=MAX_IDS as u32 {
            let out = retag(&frame(&[]), &ids(n)).unwrap();
            check_header(&out);
            assert_eq!(payload_of(&out), PAYLOAD);
            let want = (n > 0).then(|| ids(n));
            assert_eq!(parse_tags(&out).unwrap(), want);
            assert_eq!(
                out.len(),
                frame(&[]).len() + if n > 0 { 4 + 8 * n as usize } else { 0 }
            );
        }
        let out = retag(&frame(&[]), &ids(1)).unwrap();
        let mut want = vec![0x9E, 12, 1, 1];
        want.extend_from_slice(&ids(1)[0].to_bytes());
        assert_eq!(options_of(&out), want);
    }

    #[test]
    fn empty_set_is_untagged() {
        let f = frame(&[]);
        assert_eq!(retag(&f, &[]).unwrap(), f);
        assert_eq!(strip(&f).unwrap(), f);
        assert_eq!(parse_tags(&f).unwrap(), None);
        let tagged = retag(&f, &ids(3)).unwrap();
        assert_eq!(strip(&tagged).unwrap(), f);
    }

    #[test]
    fn forged_tags_are_replaced() {
        let forged = tag(&[SpecId::new(66, 6)]);
        let out = retag(&frame(&forged), &ids(2)).unwrap();
        assert_eq!(parse_tags(&out).unwrap(), Some(ids(2)));
        check_header(&out);
        // Two forged options, one without the copied flag.
        let mut two = forged.clone();
        two.extend_from_slice(&[0x1E, 4, 1, 0]);
        let out = retag(&frame(&two), &ids(1)).unwrap();
        assert_eq!(parse_tags(&out).unwrap(), Some(ids(1)));
        assert_eq!(strip(&frame(&two)).unwrap(), frame(&[]));
    }

    #[test]
    fn forged_tag_among_other_options() {
        // NOP, Record Route, forged tag (bad version inside), NOP.
        let mut opts = vec![IPOPT_NOP];
        opts.extend_from_slice(&RR);
        opts.extend_from_slice(&[0x9E, 12, 9, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        opts.push(IPOPT_NOP);
        let f = frame(&opts);
        assert_eq!(
            parse_tags(&f),
            Err(CodecError::BadTagVersion {
                offset: OPTS + 12,
                version: 9
            })
        );
        let out = retag(&f, &ids(1)).unwrap();
        let mut want = tag(&ids(1));
        want.push(IPOPT_NOP);
        want.extend_from_slice(&RR);
        want.extend_from_slice(&[IPOPT_NOP, 0, 0, 0]);
        assert_eq!(options_of(&out), want);
        assert_eq!(payload_of(&out), PAYLOAD);
        check_header(&out);
        let stripped = strip(&f).unwrap();
        assert_eq!(options_of(&stripped), &want[12..]);
        check_header(&stripped);
    }

    #[test]
    fn keeps_header_fields_and_fragments() {
        let mut f = frame(&RR);
        f[IP + 1] = 0xb8; // DSCP/ECN
        f[IP + 4..IP + 8].copy_from_slice(&[0x12, 0x34, 0xa0, 0x10]); // id; evil bit, MF, offset
        let out = retag(&f, &ids(2)).unwrap();
        assert_eq!(out[IP + 1], 0xb8);
        assert_eq!(out[IP + 4..IP + 10], f[IP + 4..IP + 10]);
        assert_eq!(out[IP + 12..IP + 20], f[IP + 12..IP + 20]);
        assert_eq!(out[IP] & 0xf, (20 + 20 + 12) / 4);
        check_header(&out);
    }

    #[test]
    fn bytes_after_end_of_list_are_dropped() {
        let f = frame(&[IPOPT_NOP, IPOPT_END, 0x9E, 12, 1, 1, 0, 0]);
        assert_eq!(parse_tags(&f).unwrap(), None);
        let out = strip(&f).unwrap();
        assert_eq!(options_of(&out), [IPOPT_NOP, 0, 0, 0]);
    }

    #[test]
    fn non_ipv4_passes_through() {
        let arp = eth(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1, 0x9E, 12, 1, 1]);
        let ipv6 = eth(0x86DD, &[0x60; 60]);
        let vlan_v6 = eth(0x8100, &[0, 5, 0x86, 0xDD, 0x60, 0]);
        for f in [arp, ipv6, vlan_v6] {
            assert_eq!(parse_tags(&f).unwrap(), None);
            assert_eq!(room_for_ids(&f).unwrap(), None);
            assert_eq!(retag(&f, &ids(2)).unwrap(), f);
            assert_eq!(strip(&f).unwrap(), f);
        }
    }

    #[test]
    fn vlan_tagged_frames() {
        let single = eth(0x8100, &[[0, 5, 8, 0].as_slice(), &ipv4(&[])].concat());
        let double = eth(
            0x88A8,
            &[[0, 1, 0x81, 0, 0, 5, 8, 0].as_slice(), &ipv4(&[])].concat(),
        );
        for f in [single, double] {
            let out = retag(&f, &ids(3)).unwrap();
            assert_eq!(parse_tags(&out).unwrap(), Some(ids(3)));
            check_header(&out);
            assert_eq!(strip(&out).unwrap(), f);
        }
    }

    #[test]
    fn too_many_ids() {
        assert_eq!(room_for_ids(&frame(&[])).unwrap(), Some(4));
        assert_eq!(
            retag(&frame(&[]), &ids(5)),
            Err(CodecError::TooManyIds { have: 5, room: 4 })
        );
        // 11 bytes of Record Route round up to 12: 40 - 12 - 4 = 24 = 3 ids.
        let f = frame(&RR);
        assert_eq!(room_for_ids(&f).unwrap(), Some(3));
        assert_eq!(
            retag(&f, &ids(4)),
            Err(CodecError::TooManyIds { have: 4, room: 3 })
        );
        // A forged tag takes no room: it is replaced. The NOP pads to 4.
        let forged = frame(&[tag(&ids(4)).as_slice(), &[IPOPT_NOP]].concat());
        assert_eq!(room_for_ids(&forged).unwrap(), Some(4));
        let out = retag(&forged, &ids(4)).unwrap();
        assert_eq!(options_of(&out).len(), 40);
        assert_eq!(parse_tags(&out).unwrap(), Some(ids(4)));
    }

    #[test]
    fn full_options_area_has_no_room() {
        let full = [[7u8, 39, 4].as_slice(), &[0; 36], &[IPOPT_NOP]].concat();
        let f = frame(&full);
        assert_eq!(room_for_ids(&f).unwrap(), Some(0));
        assert_eq!(
            retag(&f, &ids(1)),
            Err(CodecError::TooManyIds { have: 1, room: 0 })
        );
        assert_eq!(strip(&f).unwrap(), f);
        // Other options of 37 or 32 bytes leave no room; 28 leave one id.
        assert_eq!(room_for_ids(&frame(&[IPOPT_NOP; 37])).unwrap(), Some(0));
        assert_eq!(room_for_ids(&frame(&[IPOPT_NOP; 32])).unwrap(), Some(0));
        assert_eq!(room_for_ids(&frame(&[IPOPT_NOP; 28])).unwrap(), Some(1));
    }

    #[test]
    fn packet_too_long() {
        let mut f = frame(&[]);
        f.resize(IP + 65535, 0);
        f[IP + 2..IP + 4].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(
            retag(&f, &ids(1)),
            Err(CodecError::PacketTooLong { len: 65535 + 12 })
        );
        assert!(strip(&f).is_ok());
    }

    /// A frame with `edit` applied to the untagged IPv4 frame with `opts`.
    fn bad(opts: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut f = frame(opts);
        edit(&mut f);
        f
    }

    #[test]
    fn malformed_headers() {
        use CodecError::*;
        let set_total = |t: u8| move |f: &mut Vec<u8>| f[IP + 2..IP + 4].copy_from_slice(&[0, t]);
        #[rustfmt::skip]
        let cases = [
            (eth(0x0800, &[])[..10].to_vec(), FrameTooShort { need: 14, len: 10 }),
            (eth(0x8100, &[0, 5]), FrameTooShort { need: 18, len: 16 }),
            (eth(0x0800, &[0x45; 19]), Ipv4Truncated { offset: IP, need: 20, have: 19 }),
            (bad(&[], |f| f.truncate(IP + 10)), Ipv4Truncated { offset: IP, need: 20, have: 10 }),
            (bad(&[], |f| f[IP] = 0x65), BadIpVersion { offset: IP, version: 6 }),
            (bad(&[], |f| f[IP] = 0x44), BadIhl { offset: IP, ihl: 4 }),
            (bad(&[], |f| f[IP] = 0x4f), Ipv4Truncated { offset: IP, need: 60, have: 53 }),
            (bad(&[], set_total(19)),
             BadTotalLength { offset: IP + 2, total: 19, header_len: 20, available: 53 }),
            (bad(&[], set_total(54)),
             BadTotalLength { offset: IP + 2, total: 54, header_len: 20, available: 53 }),
        ];
        for (f, err) in cases {
            assert_eq!(parse_tags(&f), Err(err), "{err}");
            assert_eq!(retag(&f, &ids(1)), Err(err));
            assert_eq!(strip(&f), Err(err));
            assert_eq!(room_for_ids(&f), Err(err));
        }
    }

    #[test]
    fn malformed_options() {
        use CodecError::*;
        #[rustfmt::skip]
        let cases: [(&[u8], CodecError); 5] = [
            (&[IPOPT_NOP, IPOPT_NOP, IPOPT_NOP, 7], OptionTruncated { offset: OPTS + 3 }),
            (&[7, 0, 0, 0], BadOptionLength { offset: OPTS, len: 0 }),
            (&[IPOPT_NOP, 7, 1, 0], BadOptionLength { offset: OPTS + 1, len: 1 }),
            (&[IPOPT_NOP, 0x9E, 8, 1], OptionOverrun { offset: OPTS + 1, len: 8, room: 3 }),
            (&[0x9E, 12, 1, 1, 0, 0, 0, 0], OptionOverrun { offset: OPTS, len: 12, room: 8 }),
        ];
        for (opts, err) in cases {
            let f = frame(opts);
            assert_eq!(parse_tags(&f), Err(err), "{err}");
            assert_eq!(retag(&f, &ids(1)), Err(err));
            assert_eq!(strip(&f), Err(err));
        }
    }

    #[test]
    fn malformed_tags_are_errors_but_strippable() {
        use CodecError::*;
        let two = [tag(&ids(1)), tag(&ids(1))].concat();
        let z8 = [0u8; 8];
        #[rustfmt::skip]
        let cases: [(Vec<u8>, CodecError); 6] = [
            (vec![0x9E, 2, IPOPT_NOP, IPOPT_NOP], BadTagLength { offset: OPTS, len: 2, count: 0 }),
            (vec![0x9E, 4, 1, 0], BadTagLength { offset: OPTS, len: 4, count: 0 }),
            ([&[0x9E, 12, 1, 2][..], &z8].concat(), BadTagLength { offset: OPTS, len: 12, count: 2 }),
            ([&[0x9E, 12, 2, 1][..], &z8].concat(), BadTagVersion { offset: OPTS, version: 2 }),
            ([&[0x1E, 12, 1, 1][..], &z8].concat(), TagNotCopied { offset: OPTS }),
            (two, DuplicateTag { first: OPTS, second: OPTS + 12 }),
        ];
        for (opts, err) in cases {
            let f = frame(&opts);
            assert_eq!(parse_tags(&f), Err(err), "{err}");
            let out = retag(&f, &ids(2)).unwrap();
            assert_eq!(parse_tags(&out).unwrap(), Some(ids(2)));
            let stripped = strip(&f).unwrap();
            assert_eq!(parse_tags(&stripped).unwrap(), None);
            assert_eq!(payload_of(&stripped), PAYLOAD);
            check_header(&stripped);
        }
    }

    #[test]
    fn retag_into_reuses_and_clears() {
        let mut buf = vec![1, 2, 3];
        retag_into(&frame(&[]), &ids(1), &mut buf).unwrap();
        assert_eq!(parse_tags(&buf).unwrap(), Some(ids(1)));
        assert!(retag_into(&frame(&[]), &ids(5), &mut buf).is_err());
        assert!(buf.is_empty());
    }
}
