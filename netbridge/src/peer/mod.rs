//! Bridge peering (`netbridge --peer HOST:PORT --vxlan-listen ADDR:PORT
//! --vni N`, docs/netbridge.md "Peering"): bridges on different hosts
//! exchange their VMs' Ethernet frames over UDP in VXLAN framing (RFC
//! 7348), tags untouched inside, and tell each other the outcomes of the
//! speculations those frames carried.
//!
//! - [`vxlan`]: the 8-byte VXLAN header;
//! - [`message`]: the control messages (`decided`, `hold`, `find`,
//!   `open`) on the control VNI;
//! - [`io`]: the UDP socket and the tasks around it;
//! - the switching side (a peer is a port of the bridge; tags from it are
//!   taken as sent; outcomes go to it as to a member) is
//!   `bridge/peering.rs`, and the remote ids in the registry are
//!   `Registry::open_remote` and its neighbours.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Serialize;

pub mod io;
pub mod message;
pub mod vxlan;

/// The VNI when `--vni` is not given.
pub const DEFAULT_VNI: u32 = 42;
/// How often a bridge asks its peers for the outcomes it still waits for
/// (`hold`, `find`): the repair path when a `decided` was lost, or a
/// bridge restarted. Outcomes themselves are sent at once.
pub const HOLD_INTERVAL: Duration = Duration::from_millis(100);
/// The peering's counters are announced at most this often, when they
/// changed.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The VNI of the control messages: the frames' VNI plus one (wrapping at
/// 24 bits), so that no frame of a VM can be read as one.
pub fn control_vni(vni: u32) -> u32 {
    (vni + 1) & vxlan::VNI_MAX
}

/// Errors of the peering's set-up.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A `--peer` or `--vxlan-listen` that is not HOST:PORT, or does not
    /// resolve.
    #[error("{flag} {value:?}: {why}")]
    Address {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// The UDP socket could not be bound.
    #[error("binding the VXLAN socket {addr}: {err}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the kernel said.
        err: std::io::Error,
    },
}

/// What the flags configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The UDP address the bridge receives on, and sends from.
    pub listen: SocketAddr,
    /// The peers: only datagrams from these addresses are taken.
    pub peers: Vec<SocketAddr>,
    /// The VNI of the frames.
    pub vni: u32,
}

impl Config {
    /// Resolves the flags' values: each address to its first one, peers
    /// without repeats. A peer that is the bridge's own address is refused
    /// (its frames would come back to it).
    pub fn resolve(listen: &str, peers: &[String], vni: u32) -> Result<Self, PeerError> {
        let listen = resolve("--vxlan-listen", listen)?;
        let mut out: Vec<SocketAddr> = Vec::new();
        for p in peers {
            let a = resolve("--peer", p)?;
            if a == listen {
                return Err(PeerError::Address {
                    flag: "--peer",
                    value: p.clone(),
                    why: "it is this bridge's own --vxlan-listen".into(),
                });
            }
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(Self {
            listen,
            peers: out,
            vni,
        })
    }
}

fn resolve(flag: &'static str, value: &str) -> Result<SocketAddr, PeerError> {
    let err = |why: String| PeerError::Address {
        flag,
        value: value.into(),
        why,
    };
    let mut addrs = value
        .to_socket_addrs()
        .map_err(|e| err(format!("not HOST:PORT, or it does not resolve: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| err("it resolves to no address".into()))
}

/// The peering's counters (the `peer-stats` event): the socket's, and
/// each peer port's.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Frames received from peers (the frames' VNI).
    pub rx_frames: u64,
    /// Frames sent to peers.
    pub tx_frames: u64,
    /// Control messages received.
    pub rx_control: u64,
    /// Control messages sent.
    pub tx_control: u64,
    /// Datagrams from an address that is not a configured peer: ignored.
    pub unconfigured: u64,
    /// Datagrams shorter than a VXLAN and an Ethernet header: dropped.
    pub short: u64,
    /// Datagrams without the VXLAN I flag: dropped.
    pub bad_flags: u64,
    /// Datagrams of a VNI that is neither the frames' nor the control's:
    /// dropped.
    pub wrong_vni: u64,
    /// Control messages that do not parse: dropped.
    pub bad_control: u64,
    /// Datagrams not sent because the socket's buffer was full or the
    /// kernel refused them (a slow or unreachable peer): dropped, never
    /// waited for.
    pub send_dropped: u64,
    /// Each peer's port and its counters, as any port's: frames from it
    /// (`rx`) and queued to it (`tx`), dropped on a full queue
    /// (`dropped_full`), tags stripped (`forged`), frames naming more new
    /// ids than it may open (`dropped_ids`)...
    pub peers: Vec<PeerCounters>,
}

/// One peer's port in [`Stats`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    /// Its port number on the bridge.
    pub port: crate::registry::PortId,
    /// Its address.
    pub addr: String,
    /// The port's counters.
    pub counters: crate::bridge::Counters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_resolve_and_refuse_clearly() {
        let c = Config::resolve(
            "127.0.0.1:4789",
            &["127.0.0.1:4790".into(), "127.0.0.1:4790".into()],
            7,
        )
        .unwrap();
        assert_eq!(c.peers, vec!["127.0.0.1:4790".parse().unwrap()]);
        let e = Config::resolve("127.0.0.1:4789", &["127.0.0.1:4789".into()], 7).unwrap_err();
        assert!(e.to_string().contains("own --vxlan-listen"), "{e}");
        let e = Config::resolve("127.0.0.1", &[], 7).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--vxlan-listen \"127.0.0.1\": not HOST:PORT"),
            "{e}"
        );
        assert_eq!(control_vni(42), 43);
        assert_eq!(control_vni(vxlan::VNI_MAX), 0);
    }
}
