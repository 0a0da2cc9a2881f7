//! UDP/IPv4 broadcast frames for the network test guests: built by hand,
//! since a no_std guest has no network stack.

/// Writes a UDP/IPv4 broadcast from `mac` to `port` into `f`, with the
/// IPv4 `options` (a multiple of 4 bytes, at most 40); returns its length,
/// or None if it does not fit or the options are malformed.
pub fn build_frame(
    f: &mut [u8],
    mac: [u8; 6],
    port: u16,
    options: &[u8],
    payload: &[u8],
) -> Option<usize> {
    if !options.len().is_multiple_of(4) || options.len() > 40 {
        return None;
    }
    let ip_len = 20 + options.len();
    let udp_at = 14 + ip_len;
    let total = udp_at + 8 + payload.len();
    if total > f.len() {
        return None;
    }
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..udp_at];
    ip[0] = 0x40 | (ip_len / 4) as u8;
    ip[2..4].copy_from_slice(&((total - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, mac[5]]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 255]);
    ip[20..].copy_from_slice(options);
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut f[udp_at..udp_at + 8];
    udp[0..2].copy_from_slice(&port.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f[udp_at + 8..total].copy_from_slice(payload);
    Some(total)
}

/// The Internet checksum of `h` (an even number of bytes).
pub fn checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// The payload of a UDP/IPv4 frame to `port`, IPv4 options allowed.
pub fn udp_payload(f: &[u8], port: u16) -> Option<&[u8]> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 || f[23] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    if ihl < 20 {
        return None;
    }
    let udp = f.get(14 + ihl..)?;
    if udp.len() < 8 || udp[2..4] != port.to_be_bytes() {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    udp.get(8..len.max(8))
}
