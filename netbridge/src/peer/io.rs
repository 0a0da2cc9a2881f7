//! The peering's I/O: one UDP socket (`--vxlan-listen`), a writer task per
//! peer, one reader, and a ticker for the `hold`/`find` repair and the
//! counters.
//!
//! Nothing here waits on a peer: every send is `try_send_to`, and a
//! datagram the socket cannot take now (its buffer is full, the peer is
//! unreachable) is dropped and counted in `send_dropped`, as a NIC drops
//! what its ring cannot hold. A frame lost so is loss, which the VMs'
//! protocols bear; an outcome lost so is asked for again by the peer
//! (`hold`), so none is lost for good while both bridges live.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};

use super::message::{self, PeerMessage};
use super::{
    control_vni, vxlan, Config, PeerCounters, PeerError, Stats, HOLD_INTERVAL, STATS_INTERVAL,
};
use crate::protocol::{Control, Decision, Id};
use crate::registry::PortId;
use crate::server::Shared;
use crate::vet::worth_logging;

/// The counters, shared by the tasks.
#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
    rx_control: AtomicU64,
    tx_control: AtomicU64,
    unconfigured: AtomicU64,
    short: AtomicU64,
    bad_flags: AtomicU64,
    wrong_vni: AtomicU64,
    bad_control: AtomicU64,
    send_dropped: AtomicU64,
}

/// Adds one to `c` and returns the new count.
fn bump(c: &AtomicU64) -> u64 {
    c.fetch_add(1, Ordering::Relaxed) + 1
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            rx_frames: g(&self.rx_frames),
            tx_frames: g(&self.tx_frames),
            rx_control: g(&self.rx_control),
            tx_control: g(&self.tx_control),
            unconfigured: g(&self.unconfigured),
            short: g(&self.short),
            bad_flags: g(&self.bad_flags),
            wrong_vni: g(&self.wrong_vni),
            bad_control: g(&self.bad_control),
            send_dropped: g(&self.send_dropped),
            peers: Vec::new(),
        }
    }
}

/// What every task of the peering shares.
struct Ctx {
    socket: UdpSocket,
    shared: Arc<Shared>,
    vni: u32,
    counters: Counters,
    /// Peer address → its port.
    ports: HashMap<SocketAddr, PortId>,
}

impl Ctx {
    /// Sends one datagram, never waiting; false (counted) if dropped.
    fn send(&self, datagram: &[u8], to: SocketAddr) -> bool {
        match self.socket.try_send_to(datagram, to) {
            Ok(_) => true,
            Err(e) => {
                let n = bump(&self.counters.send_dropped);
                if worth_logging(n) {
                    tracing::warn!("peering: a datagram to {to} dropped ({n} so far): {e}");
                }
                false
            }
        }
    }

    /// Sends a control message to `to` on the control VNI.
    fn send_control(&self, m: &PeerMessage, to: SocketAddr) {
        let d = vxlan::encode(control_vni(self.vni), &message::encode(m));
        if self.send(&d, to) {
            bump(&self.counters.tx_control);
        }
    }

    /// The port of the peer at `addr`, if configured. An IPv4 address
    /// may come back IPv4-mapped on a dual-stack socket.
    fn port_of(&self, addr: SocketAddr) -> Option<PortId> {
        let addr = match addr {
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), a.port()),
                None => addr,
            },
            a => a,
        };
        self.ports.get(&addr).copied()
    }
}

/// Binds the socket, adds every peer to the bridge as a port, and starts
/// the tasks. Needs a tokio runtime; the tasks run as long as it does.
pub async fn start(config: &Config, shared: Arc<Shared>) -> Result<(), PeerError> {
    let socket = UdpSocket::bind(config.listen)
        .await
        .map_err(|err| PeerError::Bind {
            addr: config.listen,
            err,
        })?;
    let mut ports = HashMap::new();
    let mut writers = Vec::new();
    for &addr in &config.peers {
        let (port, control, frames) = shared.add_peer(&addr.to_string());
        tracing::info!(port, "peering: peer {addr}");
        ports.insert(addr, port);
        writers.push((port, addr, control, frames));
    }
    let ctx = Arc::new(Ctx {
        socket,
        shared,
        vni: config.vni,
        counters: Counters::default(),
        ports,
    });
    for (port, addr, control, frames) in writers {
        tokio::spawn(write_peer(ctx.clone(), port, addr, control, frames));
    }
    tokio::spawn(read(ctx.clone()));
    tokio::spawn(tick(ctx));
    Ok(())
}

/// Sends a peer what the bridge queues for it: outcomes first (an abort
/// must not trail the frames it makes moot), then frames.
async fn write_peer(
    ctx: Arc<Ctx>,
    port: PortId,
    addr: SocketAddr,
    mut control: mpsc::Receiver<Control>,
    frames: Arc<Notify>,
) {
    let mut buf = Vec::with_capacity(2048);
    loop {
        tokio::select! {
            biased;
            c = control.recv() => {
                let Some(c) = c else { return };
                let mut outcomes = Vec::new();
                let mut next = Some(c);
                while let Some(c) = next {
                    if let Control::Decided { id, outcome, .. } = c {
                        outcomes.push(Decision { id, outcome });
                    }
                    next = control.try_recv().ok();
                }
                for m in message::chunk_decisions(&outcomes) {
                    ctx.send_control(&m, addr);
                }
            }
            () = frames.notified() => {
                let mut n = 0u32;
                while let Some(f) = ctx.shared.pop(port) {
                    vxlan::encode_into(&mut buf, ctx.vni, &f);
                    if ctx.send(&buf, addr) {
                        bump(&ctx.counters.tx_frames);
                    }
                    // Sends never wait: let the other tasks run now and
                    // then while the queue keeps filling.
                    n += 1;
                    if n & 63 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}

/// Reads datagrams: frames into the bridge from their peer's port,
/// control messages to [`control`]; anything else is dropped and counted.
async fn read(ctx: Arc<Ctx>) {
    // The largest UDP payload.
    let mut buf = vec![0u8; 65_536];
    let cvni = control_vni(ctx.vni);
    loop {
        let (n, src) = match ctx.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // An ICMP error of an earlier send, say: nothing to read.
                // A pause, so that an error that persists cannot spin.
                tracing::debug!("peering: receive: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
        };
        let Some(port) = ctx.port_of(src) else {
            let c = bump(&ctx.counters.unconfigured);
            if worth_logging(c) {
                tracing::warn!(
                    "peering: a datagram from {src}, not a configured peer, ignored ({c} so far)"
                );
            }
            continue;
        };
        let p = match vxlan::decode(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                let c = match e {
                    vxlan::VxlanError::Short(_) => &ctx.counters.short,
                    vxlan::VxlanError::Flags(_) => &ctx.counters.bad_flags,
                };
                if worth_logging(bump(c)) {
                    tracing::warn!("peering: a bad VXLAN packet from {src} dropped: {e}");
                }
                continue;
            }
        };
        if p.vni == ctx.vni {
            bump(&ctx.counters.rx_frames);
            ctx.shared.ingress(port, p.frame.to_vec());
        } else if p.vni == cvni {
            match message::decode(p.frame) {
                Ok(m) => {
                    bump(&ctx.counters.rx_control);
                    control(&ctx, port, src, m);
                }
                Err(e) => {
                    if worth_logging(bump(&ctx.counters.bad_control)) {
                        tracing::warn!("peering: a bad control message from {src} dropped: {e}");
                    }
                }
            }
        } else {
            let c = bump(&ctx.counters.wrong_vni);
            if worth_logging(c) {
                tracing::warn!(
                    "peering: a packet of VNI {} from {src} dropped (ours: {} and {cvni}; {c} so far)",
                    p.vni,
                    ctx.vni
                );
            }
        }
    }
}

/// Ids of one `hold`, `find` or `open` that are looked at: an honest
/// peer sends [`message::IDS_PER_MESSAGE`]; a datagram full of ids cannot
/// make the bridge answer with many more bytes than it got.
const IDS_TAKEN: usize = 4 * message::IDS_PER_MESSAGE;

/// A control message from the peer on `port`.
fn control(ctx: &Ctx, port: PortId, src: SocketAddr, mut m: PeerMessage) {
    if let PeerMessage::Hold { ids } | PeerMessage::Find { ids } | PeerMessage::Open { ids } =
        &mut m
    {
        ids.truncate(IDS_TAKEN);
    }
    match m {
        PeerMessage::Decided { outcomes } => {
            ctx.shared.with_bridge(|b| {
                let (sends, woke) = b.peer_decided(port, &outcomes);
                ((), sends, woke)
            });
        }
        PeerMessage::Hold { ids } => answer(ctx, port, src, &ids, true),
        PeerMessage::Find { ids } => answer(ctx, port, src, &ids, false),
        PeerMessage::Open { ids } => {
            ctx.shared.with_bridge(|b| {
                b.peer_open(port, &ids);
                ((), Vec::new(), Vec::new())
            });
        }
    }
}

/// Answers a `hold` (`strict`) or a `find`.
fn answer(ctx: &Ctx, port: PortId, src: SocketAddr, ids: &[Id], strict: bool) {
    let a = ctx
        .shared
        .with_bridge(|b| (b.peer_hold(port, ids, strict), Vec::new(), Vec::new()));
    for m in message::chunk_decisions(&a.decided) {
        ctx.send_control(&m, src);
    }
    for m in message::chunk_ids(&a.open, |ids| PeerMessage::Open { ids }) {
        ctx.send_control(&m, src);
    }
}

/// Every [`HOLD_INTERVAL`]: asks each peer for the outcomes of the open
/// ids that came from it (`hold`), and every peer for those whose peer is
/// not known (`find`); and announces the counters when they changed, at
/// most every [`STATS_INTERVAL`].
async fn tick(ctx: Arc<Ctx>) {
    let mut every = tokio::time::interval(HOLD_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Stats::default();
    let mut announced = Instant::now() - STATS_INTERVAL;
    let addrs: HashMap<PortId, SocketAddr> = ctx.ports.iter().map(|(&a, &p)| (p, a)).collect();
    loop {
        every.tick().await;
        let open = ctx
            .shared
            .with_bridge(|b| (b.remote_open(), Vec::new(), Vec::new()));
        let mut hold: HashMap<PortId, Vec<Id>> = HashMap::new();
        let mut find = Vec::new();
        for (id, home) in open {
            match home.and_then(|h| addrs.get(&h).map(|_| h)) {
                Some(h) => hold.entry(h).or_default().push(id),
                None => find.push(id),
            }
        }
        for (port, ids) in hold {
            let Some(&addr) = addrs.get(&port) else {
                continue;
            };
            for m in message::chunk_ids(&ids, |ids| PeerMessage::Hold { ids }) {
                ctx.send_control(&m, addr);
            }
        }
        for m in message::chunk_ids(&find, |ids| PeerMessage::Find { ids }) {
            for &addr in addrs.values() {
                ctx.send_control(&m, addr);
            }
        }
        if announced.elapsed() < STATS_INTERVAL {
            continue;
        }
        let mut now = ctx.counters.snapshot();
        now.peers = ctx.shared.with_bridge(|b| {
            let mut v: Vec<PeerCounters> = addrs
                .iter()
                .map(|(&port, addr)| PeerCounters {
                    port,
                    addr: addr.to_string(),
                    counters: b.counters(port).unwrap_or_default(),
                })
                .collect();
            v.sort_by_key(|p| p.port);
            (v, Vec::new(), Vec::new())
        });
        if now != last {
            last = now.clone();
            announced = Instant::now();
            ctx.shared.with_bridge(|b| {
                b.peer_stats(now);
                ((), Vec::new(), Vec::new())
            });
        }
    }
}
