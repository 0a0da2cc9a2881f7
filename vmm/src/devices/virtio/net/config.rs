//! The `--net` option: which backend, which MAC address, which MTU.
//!
//! Syntax: `bridge=PATH`, `socket=PATH` or `tap=NAME`, then optionally
//! `mac=MAC` and `mtu=N`, separated by commas, in any order. `bridge=` is a
//! port on `netbridge`, with speculation across VMs (`docs/netbridge.md`);
//! `socket=` is a plain `SOCK_SEQPACKET` peer, one frame per message:
//!
//! ```text
//! --net socket=/run/specvm/bridge.sock,mac=02:00:00:00:00:01,mtu=1460
//! --net tap=spectap0
//! ```
//!
//! A PATH cannot contain a comma. The MAC must be a unicast address other
//! than all zeros; the MTU defaults to [`DEFAULT_MTU`] and must lie in
//! [`MIN_MTU`]..=[`MAX_MTU`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The MTU offered by default: 1500 less the 40 bytes that the IPv4
/// speculation tag option may need, so that tagging a full-size packet
/// never makes it too large for the wire.
pub const DEFAULT_MTU: u16 = 1460;
/// The smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u16 = 68;
/// The largest MTU accepted.
pub const MAX_MTU: u16 = 9000;

/// Errors parsing a `--net` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// Neither `socket=` nor `tap=`.
    #[error("--net needs a backend: bridge=PATH, socket=PATH or tap=NAME")]
    NoBackend,
    /// Both, or one twice.
    #[error("--net takes one backend, got a second one in {0:?}")]
    TwoBackends(String),
    /// An item that is not `key=value`.
    #[error("--net item {0:?} is not key=value")]
    NotKeyValue(String),
    /// A key other than socket, tap, mac and mtu.
    #[error("unknown --net key {0:?} (expected bridge, socket, tap, mac or mtu)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("--net key {0:?} given twice")]
    Duplicate(String),
    /// `socket=` with nothing after it.
    #[error("--net bridge= and socket= need a path")]
    EmptyPath,
    /// A tap name the kernel would not take.
    #[error("invalid tap name {0:?} (1 to 15 printable ASCII characters, no '/', ':' or '%', not '.' or '..')")]
    TapName(String),
    /// A malformed, multicast or all-zero MAC address.
    #[error("invalid MAC address {0:?} (six hex bytes, unicast, not all zero)")]
    Mac(String),
    /// An MTU that is not a number in range.
    #[error("invalid MTU {0:?} (a number from {MIN_MTU} to {MAX_MTU})")]
    Mtu(String),
}

/// Where the device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// A Unix `SOCK_SEQPACKET` socket to connect to: one frame a message.
    Socket(PathBuf),
    /// A TAP interface.
    Tap(String),
    /// A port on `netbridge`'s socket, with the speculation protocol.
    Bridge(PathBuf),
}

/// A net device as configured on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend.
    pub backend: NetBackendSpec,
    /// The MAC address; `None` until the builder picks one (see
    /// [`NetConfig::default_mac`]).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered to the guest.
    pub mtu: u16,
}

impl NetConfig {
    /// A configuration with the default MTU and no MAC yet.
    pub fn new(backend: NetBackendSpec) -> Self {
        Self {
            backend,
            mac: None,
            mtu: DEFAULT_MTU,
        }
    }

    /// A locally administered unicast MAC that differs between VMs and
    /// between the slots of one VM: `02:<slot>:<vm_id, 4 bytes>`.
    pub fn default_mac(vm_id: u32, slot: u8) -> [u8; 6] {
        let id = vm_id.to_be_bytes();
        [0x02, slot, id[0], id[1], id[2], id[3]]
    }

    /// The MAC to use: the configured one, or [`NetConfig::default_mac`].
    pub fn mac_or_default(&self, vm_id: u32, slot: u8) -> [u8; 6] {
        self.mac.unwrap_or_else(|| Self::default_mac(vm_id, slot))
    }
}

/// Parses `xx:xx:xx:xx:xx:xx` (or with `-`), unicast and not all zero.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetConfigError> {
    let err = || NetConfigError::Mac(s.into());
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let p = parts.next().ok_or_else(err)?;
        if p.len() != 2 {
            return Err(err());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(err());
    }
    Ok(mac)
}

/// Formats a MAC as `xx:xx:xx:xx:xx:xx`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

fn parse_mtu(s: &str) -> Result<u16, NetConfigError> {
    s.parse::<u16>()
        .ok()
        .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
        .ok_or_else(|| NetConfigError::Mtu(s.into()))
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut backend, mut mac, mut mtu) = (None, None, None);
        for item in s.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(item.into()))?;
            let dup = || NetConfigError::Duplicate(key.into());
            match key {
                "socket" | "tap" | "bridge" if backend.is_some() => {
                    return Err(NetConfigError::TwoBackends(item.into()))
                }
                "socket" | "bridge" if value.is_empty() => return Err(NetConfigError::EmptyPath),
                "bridge" => backend = Some(NetBackendSpec::Bridge(value.into())),
                "socket" => backend = Some(NetBackendSpec::Socket(value.into())),
                "tap" if !specwire::tap::valid_name(value) => {
                    return Err(NetConfigError::TapName(value.into()))
                }
                "tap" => backend = Some(NetBackendSpec::Tap(value.into())),
                "mac" if mac.is_some() => return Err(dup()),
                "mac" => mac = Some(parse_mac(value)?),
                "mtu" if mtu.is_some() => return Err(dup()),
                "mtu" => mtu = Some(parse_mtu(value)?),
                _ => return Err(NetConfigError::UnknownKey(key.into())),
            }
        }
        Ok(Self {
            backend: backend.ok_or(NetConfigError::NoBackend)?,
            mac,
            mtu: mtu.unwrap_or(DEFAULT_MTU),
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            NetBackendSpec::Socket(p) => write!(f, "socket={}", p.display())?,
            NetBackendSpec::Tap(n) => write!(f, "tap={n}")?,
            NetBackendSpec::Bridge(p) => write!(f, "bridge={}", p.display())?,
        }
        if let Some(mac) = &self.mac {
            write!(f, ",mac={}", format_mac(mac))?;
        }
        write!(f, ",mtu={}", self.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConfig, NetConfigError> {
        s.parse()
    }

    #[test]
    fn parses_socket_and_tap() {
        let c = parse("socket=/run/b.sock,mac=02:00:00:00:00:01,mtu=1400").unwrap();
        assert_eq!(c.backend, NetBackendSpec::Socket("/run/b.sock".into()));
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(c.mtu, 1400);
        let c = parse("mtu=9000,tap=spectap0").unwrap();
        assert_eq!(c.backend, NetBackendSpec::Tap("spectap0".into()));
        assert_eq!((c.mac, c.mtu), (None, 9000));
        assert_eq!(parse("socket=x").unwrap().mtu, DEFAULT_MTU);
        assert_eq!(
            parse("tap=t,mac=0A-1b-2C-3d-4E-5f").unwrap().mac,
            Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "socket=/tmp/x.sock,mac=02:aa:bb:cc:dd:ee,mtu=1460",
            "tap=t0,mtu=68",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_values_with_clear_errors() {
        use NetConfigError::*;
        let cases: &[(&str, NetConfigError)] = &[
            ("", NotKeyValue("".into())),
            ("mtu=1500", NoBackend),
            ("socket=/a,tap=t", TwoBackends("tap=t".into())),
            ("socket=/a,socket=/b", TwoBackends("socket=/b".into())),
            ("socket=", EmptyPath),
            ("tap=", TapName("".into())),
            ("tap=a/b", TapName("a/b".into())),
            ("tap=0123456789abcdef", TapName("0123456789abcdef".into())),
            ("tap=t%d", TapName("t%d".into())),
            ("tap=..", TapName("..".into())),
            ("socket=/a,speed=10", UnknownKey("speed".into())),
            ("socket=/a,mac", NotKeyValue("mac".into())),
            (
                "socket=/a,mac=01:00:00:00:00:01",
                Mac("01:00:00:00:00:01".into()),
            ),
            (
                "socket=/a,mac=00:00:00:00:00:00",
                Mac("00:00:00:00:00:00".into()),
            ),
            ("socket=/a,mac=02:00:00:00:00", Mac("02:00:00:00:00".into())),
            (
                "socket=/a,mac=02:00:00:00:00:00:00",
                Mac("02:00:00:00:00:00:00".into()),
            ),
            (
                "socket=/a,mac=02:0:00:00:00:01",
                Mac("02:0:00:00:00:01".into()),
            ),
            (
                "socket=/a,mac=02:zz:00:00:00:01",
                Mac("02:zz:00:00:00:01".into()),
            ),
            ("socket=/a,mtu=67", Mtu("67".into())),
            ("socket=/a,mtu=9001", Mtu("9001".into())),
            ("socket=/a,mtu=-1", Mtu("-1".into())),
            ("socket=/a,mtu=1400,mtu=1400", Duplicate("mtu".into())),
            (
                "socket=/a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:01",
                Duplicate("mac".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input).as_ref(), Err(want), "{input:?}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn default_macs_are_unicast_local_and_distinct() {
        let a = NetConfig::default_mac(1, 0);
        let b = NetConfig::default_mac(2, 0);
        let c = NetConfig::default_mac(1, 1);
        assert!(a != b && a != c);
        assert_eq!(a[0] & 3, 2, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&a)), Ok(a));
        let cfg = parse("tap=t").unwrap();
        assert_eq!(cfg.mac_or_default(7, 0), NetConfig::default_mac(7, 0));
    }
}
