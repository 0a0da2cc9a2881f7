//! The VMM's port on `netbridge`, and the frame hook that makes the
//! network carry speculations (SPECULATIONS.md, rules 2, 7 and 12).
//!
//! [`BridgeLink`] connects to the bridge's socket, says hello, and joins it
//! to the net device through a socket pair: frames flow between the device
//! and the bridge unchanged, control messages (`decided`) go to the
//! controller as [`VmEvent::Bridge`], and the controller sends its own
//! (`started`, `joined`, `resolved`, `ack`) with [`BridgeLink::send`],
//! which never blocks: the connection, its lease and reconnecting are
//! [`super::bridge_conn`]'s.
//!
//! [`SpecHook`] sits in the net device:
//! - on every frame the guest sends, it writes the VM's whole dependency
//!   set as IPOPT_SPEC, replacing whatever tag the guest forged (rules 7,
//!   12); a set too large for the IPv4 options is never sent untagged: the
//!   frame is dropped and counted;
//! - on every tagged frame for the guest, it checks the tag against the
//!   dependency set: ids the VM does not hold yet make it ask the
//!   controller to join them, and the frame waits until the checkpoint is
//!   taken (rule 2). The tag is stripped before the guest sees the frame.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use specwire::codec::{self, CodecError};
use specwire::protocol::{Control, Decision, MAX_MESSAGE};
use specwire::SpecId;

use super::bridge_conn::{self, enqueue, Out, Shared, Writer, QUEUE_MAX};
use crate::devices::virtio::net::{Backend, FrameHook, RxVerdict};
use crate::event::{EventSender, VmEvent};
use crate::sync::lock;

/// Errors connecting to the bridge.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The bridge's socket could not be reached.
    #[error("connecting to the bridge at {0}: {1}")]
    Connect(PathBuf, io::Error),
    /// The bridge did not accept the VM.
    #[error("the bridge at {0} did not accept this VM: {1}")]
    Refused(PathBuf, io::Error),
    /// The socket pair or a thread could not be set up.
    #[error("setting up the bridge link: {0}")]
    Setup(io::Error),
}

/// Something the bridge told the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEvent {
    /// A speculation the VM joined (or, after a reconnect, one it owns
    /// and the bridge aborted meanwhile) ended; acknowledge `seq` on
    /// connection `epoch` once acted on.
    Decided {
        /// The speculation.
        id: SpecId,
        /// Its outcome.
        outcome: specwire::protocol::Outcome,
        /// What to acknowledge.
        seq: u64,
        /// The connection it came on.
        epoch: u64,
        /// An abort of the VM's own speculation whose start the bridge
        /// refused: the guest sees [`reason::REFUSED`](guest_agent::abi::reason::REFUSED).
        refused: bool,
    },
}

/// The state of the link, for status and `--stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Whether the bridge is connected now.
    pub up: bool,
    /// Reconnections so far.
    pub reconnects: u64,
    /// Frames to the bridge dropped: the link's queue was full.
    pub tx_queue_full: u64,
}

/// The VMM's end of the bridge connection. Sending never blocks: a
/// writer thread owns the connection ([`bridge_conn`]).
pub struct BridgeLink {
    tx: SyncSender<Out>,
    shared: Arc<Shared>,
    first_seq: u32,
}

impl BridgeLink {
    /// Connects to the bridge at `path` as VM `vm`, and returns the link
    /// and the backend to give the net device. Only this first connection
    /// must succeed; later ones are retried for as long as the VM runs.
    pub fn connect(
        path: &Path,
        vm: u32,
        events: EventSender,
    ) -> Result<(Self, Backend), LinkError> {
        let (stream, first_seq, lease) = bridge_conn::connect(path, vm).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::ConnectionRefused {
                LinkError::Connect(path.into(), e)
            } else {
                LinkError::Refused(path.into(), e)
            }
        })?;
        let (device_end, our_end) = seqpacket_pair().map_err(LinkError::Setup)?;
        let backend = Backend::from_socket(device_end, &format!("bridge={}", path.display()))
            .map_err(|e| LinkError::Setup(io::Error::other(e.to_string())))?;
        let ours = UnixDatagram::from(our_end);
        let shared = Arc::new(Shared::new(path, vm));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_MAX);
        bridge_conn::spawn_reader(
            stream.try_clone().map_err(LinkError::Setup)?,
            ours.try_clone().map_err(LinkError::Setup)?,
            events.clone(),
            tx.clone(),
            shared.clone(),
            1,
        )
        .map_err(LinkError::Setup)?;
        let writer = Writer {
            shared: shared.clone(),
            rx,
            tx: tx.clone(),
            device: ours.try_clone().map_err(LinkError::Setup)?,
            events,
        };
        std::thread::Builder::new()
            .name("bridge-link".into())
            .spawn(move || writer.run(stream, lease))
            .map_err(LinkError::Setup)?;
        let (frames, s) = (tx.clone(), shared.clone());
        std::thread::Builder::new()
            .name("bridge-tx".into())
            .spawn(move || forward_to_bridge(&ours, &frames, &s))
            .map_err(LinkError::Setup)?;
        let link = Self {
            tx,
            shared,
            first_seq,
        };
        Ok((link, backend))
    }

    /// The first sequence number the bridge lets this VM use.
    pub fn first_seq(&self) -> u32 {
        self.first_seq
    }

    /// The dependency set that a `resume` after a reconnect announces.
    pub fn watch_deps(&self, deps: Arc<Mutex<SharedDeps>>) {
        let _ = self.shared.deps.set(deps);
    }

    /// Hands a control message to the writer; never blocks. An owner's
    /// decision is also remembered for the next `resume`.
    pub fn send(&self, c: &Control) {
        if let Control::Resolved { id, outcome } = *c {
            self.shared.record(Decision { id, outcome });
        }
        enqueue(&self.tx, &self.shared, Out::Control(c.clone()));
    }

    /// Acknowledges `decided` `seq` of connection `epoch`.
    pub fn ack(&self, seq: u64, epoch: u64) {
        enqueue(&self.tx, &self.shared, Out::Ack { seq, epoch });
    }

    /// Whether the bridge is connected, reconnections, and frames lost.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.shared.up.load(Ordering::Relaxed),
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
            tx_queue_full: self.shared.dropped.load(Ordering::Relaxed),
        }
    }
}

/// A connected `SOCK_SEQPACKET` pair: one end for the device, one for us.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and belong to no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Frames the device sent, to the writer's queue (dropped when it is
/// full: loss, never a wait).
fn forward_to_bridge(ours: &UnixDatagram, tx: &SyncSender<Out>, shared: &Shared) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    while let Ok(n) = ours.recv(&mut buf) {
        enqueue(tx, shared, Out::Frame(buf[..n].to_vec()));
    }
}

/// The dependency set as the hook reads it, kept by the controller.
#[derive(Debug, Default)]
pub struct SharedDeps {
    /// Every id the VM's state depends on.
    pub ids: Vec<SpecId>,
    /// Ids the VM could not join (its checkpoint stack was full): frames
    /// tagged with them are dropped, never delivered unprotected.
    pub refused: Vec<SpecId>,
    /// Output held until the speculations it depends on commit.
    pub held: HeldOutput,
}

impl SharedDeps {
    /// Sets the dependency set to `ids` and releases the held frames that
    /// no longer depend on anything: every id that left the set without
    /// being dropped by [`HeldOutput::drop_aborted`] first was committed
    /// (rules 5, 6, 11). They go to the release thread, in order; without
    /// one (a VM with no card that holds output) they are returned, oldest
    /// first, with their card, for the caller to send.
    pub fn set_ids(&mut self, ids: Vec<SpecId>) -> Vec<(usize, Vec<u8>)> {
        self.ids = ids;
        let out = self.held.release(&self.ids);
        match &self.held.releaser {
            Some(_) => {
                for (card, frame) in out {
                    self.held.hand_to_releaser(card, frame);
                }
                Vec::new()
            }
            None => out,
        }
    }
}

/// Most frames held for output commit, over all the VM's cards.
pub const HELD_MAX_FRAMES: usize = 1024;
/// Most bytes held for output commit, over all the VM's cards.
pub const HELD_MAX_BYTES: usize = 2 << 20;

/// One frame held for output commit.
#[derive(Debug)]
struct Held {
    /// The card (slot) it was sent on.
    card: usize,
    /// The speculations it still waits for.
    pending: Vec<SpecId>,
    frame: Vec<u8>,
}

/// Frames sent through cards that leave the speculation domain (`socket=`,
/// `tap=`) while the VM depended on open speculations: the outside world
/// must never see output that a rollback would take back (output commit,
/// rule 11). Each frame waits for the ids the VM held when it was sent; it
/// goes out once all of them committed, and is dropped as soon as one
/// aborts. Bounded: when full, [`OutputCommitHook::tx_ready`] says no and
/// the guest's transmit queue waits.
#[derive(Debug, Default)]
pub struct HeldOutput {
    frames: std::collections::VecDeque<Held>,
    bytes: usize,
    /// The release thread's queue ([`spawn_releaser`]).
    releaser: Option<std::sync::mpsc::Sender<(usize, Vec<u8>)>>,
    /// Frames (and bytes) released and not yet sent by that thread: new
    /// output queues behind them, so nothing overtakes what a commit let
    /// go, and they count against the bound.
    in_flight: usize,
    in_flight_bytes: usize,
}

impl HeldOutput {
    /// Frames held.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether one more frame fits.
    pub fn has_room(&self) -> bool {
        self.frames.len() + self.in_flight < HELD_MAX_FRAMES
            && self.bytes + self.in_flight_bytes < HELD_MAX_BYTES
    }

    /// Frames released and not sent yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hands a frame to the release thread.
    fn hand_to_releaser(&mut self, card: usize, frame: Vec<u8>) {
        let len = frame.len();
        if let Some(tx) = &self.releaser {
            if tx.send((card, frame)).is_ok() {
                self.in_flight += 1;
                self.in_flight_bytes += len;
            }
        }
    }

    /// The release thread sent (or gave up on) a frame of `len` bytes.
    fn sent(&mut self, len: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(len);
    }

    fn push(&mut self, card: usize, pending: Vec<SpecId>, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_back(Held {
            card,
            pending,
            frame,
        });
    }

    /// Drops every frame that waits for one of `aborted`: the rollback took
    /// back the state that sent it (rule 4). Returns how many.
    pub fn drop_aborted(&mut self, aborted: &[SpecId]) -> usize {
        let before = self.frames.len();
        self.frames
            .retain(|h| !h.pending.iter().any(|p| aborted.contains(p)));
        self.bytes = self.frames.iter().map(|h| h.frame.len()).sum();
        before - self.frames.len()
    }

    /// Forgets the ids that are no longer in `ids` (committed), and takes
    /// out the frames left waiting for nothing, in the order they were sent.
    fn release(&mut self, ids: &[SpecId]) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut keep = std::collections::VecDeque::with_capacity(self.frames.len());
        for mut h in self.frames.drain(..) {
            h.pending.retain(|p| ids.contains(p));
            if h.pending.is_empty() {
                self.bytes -= h.frame.len();
                out.push((h.card, h.frame));
            } else {
                keep.push_back(h);
            }
        }
        self.frames = keep;
        out
    }
}

/// Counters of the hook, printed with `--stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HookStats {
    /// Frames dropped on send: the set did not fit in the IPv4 options.
    pub tx_too_many_ids: u64,
    /// Frames dropped on send: the guest's IPv4 header was malformed.
    pub tx_malformed: u64,
    /// Frames dropped on receive: malformed tag, or a refused id.
    pub rx_dropped: u64,
    /// Joins asked of the controller.
    pub joins: u64,
}

/// The frame hook of a speculating VM's net device.
pub struct SpecHook {
    deps: Arc<Mutex<SharedDeps>>,
    events: EventSender,
    /// The ids of the last join asked for, so a waiting frame asks once.
    asked: Vec<SpecId>,
    stats: Arc<Mutex<HookStats>>,
}

impl SpecHook {
    /// A hook reading the dependency set from `deps` and asking joins of
    /// the controller through `events`.
    pub fn new(
        deps: Arc<Mutex<SharedDeps>>,
        events: EventSender,
        stats: Arc<Mutex<HookStats>>,
    ) -> Self {
        Self {
            deps,
            events,
            asked: Vec::new(),
            stats,
        }
    }

    fn count(&self, f: impl FnOnce(&mut HookStats)) {
        f(&mut lock(&self.stats));
    }
}

impl FrameHook for SpecHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        let ids: Vec<SpecId> = {
            let d = lock(&self.deps);
            d.ids.clone()
        };
        match codec::retag(&frame, &ids) {
            Ok(f) => Some(f),
            Err(CodecError::TooManyIds { have, room }) => {
                tracing::warn!(
                    have,
                    room,
                    "frame dropped: its tag set does not fit in the IPv4 options"
                );
                self.count(|s| s.tx_too_many_ids += 1);
                None
            }
            Err(e) => {
                tracing::debug!("frame dropped: {e}");
                self.count(|s| s.tx_malformed += 1);
                None
            }
        }
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        let tags: Vec<SpecId> = match codec::parse_tags(frame) {
            Ok(None) => return RxVerdict::Deliver,
            Ok(Some(t)) => t,
            Err(_) => {
                self.count(|s| s.rx_dropped += 1);
                return RxVerdict::Drop;
            }
        };
        let missing: Vec<SpecId> = {
            let d = lock(&self.deps);
            if tags.iter().any(|t| d.refused.contains(t)) {
                drop(d);
                self.count(|s| s.rx_dropped += 1);
                return RxVerdict::Drop;
            }
            tags.iter()
                .copied()
                .filter(|t| !d.ids.contains(t))
                .collect()
        };
        if missing.is_empty() {
            self.asked.clear();
            return match codec::strip(frame) {
                Ok(f) => {
                    *frame = f;
                    RxVerdict::Deliver
                }
                Err(_) => RxVerdict::Drop,
            };
        }
        if missing != self.asked {
            self.count(|s| s.joins += 1);
            let _ = self.events.send(VmEvent::Join {
                ids: missing.clone(),
            });
            self.asked = missing;
        }
        RxVerdict::DeferUntilCheckpoint
    }
}

/// The frame hook of a net device that is not on the bridge (`socket=`,
/// `tap=`): such a card leaves the speculation domain, so what the guest
/// sends while it depends on open speculations is held until they commit
/// and dropped if one aborts ([`HeldOutput`], rule 11); what it sends with
/// no open speculation goes out at once. The VMM owns the tag (rule 12): it
/// strips any IPOPT_SPEC the guest wrote before a frame leaves, and, since
/// a tag is trusted only from the bridge, strips it from what arrives too.
/// Frames whose IPv4 header is malformed are dropped.
pub struct OutputCommitHook {
    card: usize,
    deps: Arc<Mutex<SharedDeps>>,
}

impl OutputCommitHook {
    /// The hook of card (slot) `card`, reading the dependency set and
    /// holding output in `deps`.
    pub fn new(card: usize, deps: Arc<Mutex<SharedDeps>>) -> Self {
        Self { card, deps }
    }
}

impl FrameHook for OutputCommitHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        let frame = codec::strip(&frame).ok()?;
        // One lock for the set and the hold: the controller changes both
        // under it, so a frame never waits for an id decided meanwhile.
        let mut d = lock(&self.deps);
        if d.ids.is_empty() {
            if d.held.in_flight == 0 || d.held.releaser.is_none() {
                return Some(frame);
            }
            // Behind the released frames still on their way.
            d.held.hand_to_releaser(self.card, frame);
            return None;
        }
        let pending = d.ids.clone();
        d.held.push(self.card, pending, frame);
        None
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        StripHook.on_rx(frame)
    }

    fn tx_ready(&mut self) -> bool {
        let d = lock(&self.deps);
        (d.ids.is_empty() && d.held.in_flight == 0) || d.held.has_room()
    }
}

/// How long the release thread waits for a peer to take one frame before
/// it drops it (and says so): a peer that stops reading does not hold the
/// VM's output forever.
const RELEASE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the thread that sends released output (frames a commit let go)
/// through the cards' backends, in order. Unlike the device's own
/// transmit, which drops a frame when the peer's buffer is full, it waits
/// for the peer (up to [`RELEASE_PATIENCE`] a frame): a commit can release
/// a thousand frames at once, and none of them may be lost. `backends` and
/// `wakers` are indexed by card (slot).
pub fn spawn_releaser(
    deps: Arc<Mutex<SharedDeps>>,
    backends: Vec<Arc<Backend>>,
    wakers: Vec<crate::devices::virtio::net::TxWaker>,
) -> io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<u8>)>();
    lock(&deps).held.releaser = Some(tx);
    std::thread::Builder::new()
        .name("net-release".into())
        .spawn(move || {
            let mut since_wake = 0;
            while let Ok(first) = rx.recv() {
                let mut next = Some(first);
                while let Some((card, frame)) = next {
                    if let Some(b) = backends.get(card) {
                        send_patiently(b, &frame);
                    }
                    lock(&deps).held.sent(frame.len());
                    since_wake += 1;
                    // Room in the hold: a stalled transmit may go on.
                    if since_wake >= 32 {
                        since_wake = 0;
                        wakers.iter().for_each(|w| w.wake());
                    }
                    next = rx.try_recv().ok();
                }
                since_wake = 0;
                wakers.iter().for_each(|w| w.wake());
            }
        })?;
    Ok(())
}

/// Sends `frame`, waiting while the peer's buffer is full.
fn send_patiently(b: &Backend, frame: &[u8]) {
    let deadline = std::time::Instant::now() + RELEASE_PATIENCE;
    loop {
        match b.send(frame) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() || !matches!(b.wait_writable(left), Ok(true)) {
                    tracing::warn!(
                        "output commit: {} took no frame for {RELEASE_PATIENCE:?}; a released frame is dropped",
                        b.name()
                    );
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(
                    "output commit: sending a released frame to {}: {e}",
                    b.name()
                );
                return;
            }
        }
    }
}

/// Strips IPOPT_SPEC both ways, holding nothing: the receive side of
/// [`OutputCommitHook`], and a hook for tests.
#[derive(Debug, Default)]
pub struct StripHook;

impl FrameHook for StripHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        codec::strip(&frame).ok()
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        match codec::strip(frame) {
            Ok(f) => {
                *frame = f;
                RxVerdict::Deliver
            }
            Err(_) => RxVerdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(tags: &[SpecId]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
        codec::retag(&f, tags).unwrap()
    }

    #[test]
    fn strip_hook_removes_forged_tags_both_ways() {
        let forged = udp(&[SpecId { vm: 99, seq: 7 }]);
        let mut h = StripHook;
        let out = h.on_tx(forged.clone()).unwrap();
        assert_eq!(codec::parse_tags(&out).unwrap(), None);
        let mut inbound = forged;
        assert_eq!(h.on_rx(&mut inbound), RxVerdict::Deliver);
        assert_eq!(codec::parse_tags(&inbound).unwrap(), None);
    }

    #[test]
    fn spec_hook_tags_with_the_whole_set_and_asks_to_join() {
        let deps = Arc::new(Mutex::new(SharedDeps {
            ids: vec![SpecId::new(1, 5)],
            ..Default::default()
        }));
        let (tx, rx) = crate::event::channel();
        let mut h = SpecHook::new(deps.clone(), tx, Arc::default());
        // A forged tag is replaced by the true set.
        let out = h.on_tx(udp(&[SpecId { vm: 99, seq: 7 }])).unwrap();
        assert_eq!(
            codec::parse_tags(&out).unwrap(),
            Some(vec![SpecId { vm: 1, seq: 5 }])
        );
        // A frame tagged with an id the VM does not hold waits for a join.
        let mut f = udp(&[SpecId { vm: 3, seq: 1 }]);
        assert_eq!(h.on_rx(&mut f), RxVerdict::DeferUntilCheckpoint);
        assert!(
            matches!(rx.try_recv(), Ok(VmEvent::Join { ids }) if ids == vec![SpecId::new(3, 1)])
        );
        assert_eq!(h.on_rx(&mut f), RxVerdict::DeferUntilCheckpoint);
        assert!(rx.try_recv().is_err(), "asks once per set");
        deps.lock().unwrap().ids.push(SpecId::new(3, 1));
        assert_eq!(h.on_rx(&mut f), RxVerdict::Deliver);
        assert_eq!(
            codec::parse_tags(&f).unwrap(),
            None,
            "delivered without its tag"
        );
        // Too many ids: dropped, never sent untagged.
        deps.lock().unwrap().ids = (1..=5).map(|s| SpecId::new(1, s)).collect();
        assert_eq!(h.on_tx(udp(&[])), None);
    }

    fn payload(f: &[u8]) -> u8 {
        *f.last().unwrap()
    }

    fn udp_with(byte: u8) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, &[byte]).unwrap();
        f
    }

    /// Rule 11 on a card that leaves the speculation domain: output with
    /// no open speculation goes at once; output under speculations waits
    /// for all of them, goes in order at their commit, and dies with an
    /// abort of any of them.
    #[test]
    fn output_commit_holds_releases_and_drops() {
        let deps = Arc::new(Mutex::new(SharedDeps::default()));
        let mut h = OutputCommitHook::new(0, deps.clone());
        let forged = codec::retag(&udp_with(1), &[SpecId { vm: 99, seq: 7 }]).unwrap();
        let out = h.on_tx(forged).expect("no speculation: sent at once");
        assert_eq!(
            codec::parse_tags(&out).unwrap(),
            None,
            "the tag is the VMM's"
        );

        let (a, b) = (SpecId::new(1, 1), SpecId::new(1, 2));
        assert!(deps.lock().unwrap().set_ids(vec![a]).is_empty());
        assert_eq!(h.on_tx(udp_with(2)), None);
        assert!(deps.lock().unwrap().set_ids(vec![a, b]).is_empty());
        assert_eq!(h.on_tx(udp_with(3)), None);
        assert_eq!(h.on_tx(udp_with(4)), None);
        assert_eq!(deps.lock().unwrap().held.len(), 3);
        // b aborts: the frames sent under it go; a's stays.
        assert_eq!(deps.lock().unwrap().held.drop_aborted(&[b]), 2);
        assert!(deps.lock().unwrap().set_ids(vec![a]).is_empty());
        assert_eq!(h.on_tx(udp_with(5)), None);
        // a commits: both of its frames, in order (no release thread here,
        // so they come back to the caller).
        let out = deps.lock().unwrap().set_ids(vec![]);
        let got: Vec<(usize, u8)> = out.iter().map(|(c, f)| (*c, payload(f))).collect();
        assert_eq!(got, vec![(0, 2), (0, 5)]);
        assert!(deps.lock().unwrap().held.is_empty());
        assert_eq!(deps.lock().unwrap().held.bytes(), 0);
    }

    /// A frame sent under a joined id that its owner commits, while the
    /// VM's own speculation stays open, still waits for the own one.
    #[test]
    fn output_waits_for_every_id_it_depends_on() {
        let deps = Arc::new(Mutex::new(SharedDeps::default()));
        let mut h = OutputCommitHook::new(1, deps.clone());
        let (own, joined) = (SpecId::new(1, 1), SpecId::new(7, 3));
        deps.lock().unwrap().set_ids(vec![own, joined]);
        assert_eq!(h.on_tx(udp_with(9)), None);
        assert!(deps.lock().unwrap().set_ids(vec![own]).is_empty());
        let out = deps.lock().unwrap().set_ids(vec![]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1);
    }

    /// The hold is bounded: when it is full the hook asks the device to
    /// stop taking frames (back-pressure), never drops them.
    #[test]
    fn a_full_hold_pushes_back() {
        let deps = Arc::new(Mutex::new(SharedDeps::default()));
        let mut h = OutputCommitHook::new(0, deps.clone());
        deps.lock().unwrap().set_ids(vec![SpecId::new(0, 1)]);
        let mut sent = 0;
        while h.tx_ready() {
            assert_eq!(h.on_tx(udp_with(0)), None);
            sent += 1;
            assert!(sent <= HELD_MAX_FRAMES, "no bound");
        }
        assert_eq!(sent, HELD_MAX_FRAMES);
        let out = deps.lock().unwrap().set_ids(vec![]);
        assert_eq!(out.len(), HELD_MAX_FRAMES, "nothing lost");
        assert!(h.tx_ready());
    }
}
