//! The VMM's connection to `netbridge`: one writer thread that owns the
//! connection, renews the lease and reconnects, so that the controller
//! never blocks on the bridge (docs/netbridge.md, "The VMM side").
//!
//! - **Never blocks.** The controller and the device's frame thread hand
//!   messages to a bounded queue ([`QUEUE_MAX`]) and return. When it is
//!   full a frame is dropped (loss, counted); a control message is not
//!   dropped silently: the connection is taken for lost and the writer
//!   reconnects, and the `resume` it sends then carries what the lost
//!   messages said (the open ids, read from the dependency set, and the
//!   VM's last [`RESUME_OUTCOMES_MAX`] decisions).
//! - **Lease.** The writer sends `renew` whenever it has written nothing
//!   for a third of the lease the bridge gave in its welcome. It is a
//!   thread of its own: neither the vCPUs nor a pause hold it up.
//! - **Reconnect.** When the connection ends (the bridge restarted, a
//!   write failed or timed out, the queue overflowed) the writer connects
//!   again, with a backoff of 10 ms doubling to [`BACKOFF_MAX`], for as
//!   long as the VM runs, and says `resume`. Joined speculations are kept
//!   meanwhile (rule 14: an outcome is never guessed).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use specwire::protocol::{
    decode, encode_control, encode_frame, read_message, write_message, Control, Decision, Message,
    MessageError, RESUME_OUTCOMES_MAX,
};
use specwire::SpecId;

use super::link::{BridgeEvent, SharedDeps};
use crate::event::{EventSender, VmEvent};
use crate::sync::lock;

/// Messages waiting for the writer: about a second of full-rate frames.
pub const QUEUE_MAX: usize = 4096;
/// The longest wait between two connection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// How long a welcome may take before the attempt counts as failed (a
/// stopped bridge still accepts connections into its backlog).
const WELCOME_TIMEOUT: Duration = Duration::from_secs(2);

/// One message for the writer.
pub(super) enum Out {
    /// A frame the guest sent.
    Frame(Vec<u8>),
    /// A control message.
    Control(Control),
    /// An `ack` of a `decided` received on connection `epoch`: moot on
    /// any later connection, whose numbers are its own.
    Ack { seq: u64, epoch: u64 },
    /// The reader of connection `epoch` saw it end.
    Lost(u64),
}

/// What the link's threads share.
pub(super) struct Shared {
    path: PathBuf,
    vm: u32,
    /// Which connection is current: 1 for the first.
    pub(super) epoch: AtomicU64,
    /// The current stream, to shut down when the queue overflows.
    current: Mutex<Option<UnixStream>>,
    /// The dependency set, read to build a `resume`.
    pub(super) deps: OnceLock<Arc<Mutex<SharedDeps>>>,
    /// The VM's last decisions on its own speculations.
    outcomes: Mutex<VecDeque<Decision>>,
    /// Whether the bridge is connected now.
    pub(super) up: AtomicBool,
    /// Frames dropped because the queue was full.
    pub(super) dropped: AtomicU64,
    /// Reconnections so far.
    pub(super) reconnects: AtomicU64,
}

impl Shared {
    pub(super) fn new(path: &Path, vm: u32) -> Self {
        Self {
            path: path.into(),
            vm,
            epoch: AtomicU64::new(1),
            current: Mutex::new(None),
            deps: OnceLock::new(),
            outcomes: Mutex::new(VecDeque::new()),
            up: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Remembers a decision of the VM's own (for the next `resume`).
    pub(super) fn record(&self, d: Decision) {
        let mut o = lock(&self.outcomes);
        if o.len() >= RESUME_OUTCOMES_MAX {
            o.pop_front();
        }
        o.push_back(d);
    }

    /// Takes the connection for lost: a blocked write or read on it ends.
    pub(super) fn break_connection(&self) {
        let cur = lock(&self.current);
        if let Some(s) = cur.as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The `resume` for a new connection, and the ids it announces.
    fn resume(&self) -> (Control, HashSet<SpecId>) {
        let ids = self
            .deps
            .get()
            .map_or_else(Vec::new, |d| lock(d).ids.clone());
        let (started, joined): (Vec<SpecId>, Vec<SpecId>) =
            ids.into_iter().partition(|id| id.vm == self.vm);
        let outcomes: Vec<Decision> = lock(&self.outcomes).iter().copied().collect();
        let said = started
            .iter()
            .copied()
            .chain(outcomes.iter().map(|d| d.id))
            .collect();
        let c = Control::Resume {
            started,
            joined,
            outcomes,
        };
        (c, said)
    }
}

/// Queues `out` without waiting. A full queue drops a frame (counted);
/// for anything else it breaks the connection, so the writer reconnects
/// and resumes (which says what the lost message said).
pub(super) fn enqueue(tx: &SyncSender<Out>, shared: &Shared, out: Out) {
    match tx.try_send(out) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(Out::Frame(_))) => {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Full(_)) => {
            tracing::warn!("bridge link: its queue is full; reconnecting");
            shared.break_connection();
        }
    }
}

/// Connects to the bridge, says hello, and waits for the welcome:
/// the stream, the first sequence number and the lease.
pub(super) fn connect(path: &Path, vm: u32) -> io::Result<(UnixStream, u32, Duration)> {
    let mut s = UnixStream::connect(path)?;
    s.set_write_timeout(Some(WELCOME_TIMEOUT))?;
    let hello = Control::Hello {
        vm,
        speculative: true,
    };
    write_message(&mut s, &encode_control(&hello))?;
    s.set_read_timeout(Some(WELCOME_TIMEOUT))?;
    let msg = read_message(&mut s).map_err(|e| {
        let e = io::Error::from(e);
        io::Error::new(
            e.kind(),
            format!("no answer to hello ({e}); is this VM id already connected?"),
        )
    })?;
    s.set_read_timeout(None)?;
    match decode(&msg) {
        Ok(Message::Control(Control::Welcome { next_seq, lease_ms })) => {
            let lease = Duration::from_millis(lease_ms.max(3).into());
            // A write that waits a whole lease is a stopped bridge.
            s.set_write_timeout(Some(lease))?;
            Ok((s, next_seq, lease))
        }
        other => Err(io::Error::other(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

/// The writer thread: owns the connection, writes what is queued, renews
/// the lease, and reconnects. Ends when every sender is gone.
pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) rx: Receiver<Out>,
    pub(super) tx: SyncSender<Out>,
    pub(super) device: UnixDatagram,
    pub(super) events: EventSender,
}

impl Writer {
    /// Runs on `stream` (the first connection, with its `lease`), then on
    /// each new one.
    pub(super) fn run(self, mut stream: UnixStream, mut lease: Duration) {
        let mut said = HashSet::new();
        loop {
            if self.serve(&mut stream, lease, &said).is_none() {
                return;
            }
            self.shared.up.store(false, Ordering::Relaxed);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            tracing::warn!("bridge link lost; reconnecting (joined speculations are kept)");
            match self.reconnect() {
                Some((s, l, announced)) => (stream, lease, said) = (s, l, announced),
                None => return,
            }
        }
    }

    /// Writes what comes until the connection fails (`Some`) or the queue
    /// is closed (`None`).
    fn serve(
        &self,
        stream: &mut UnixStream,
        lease: Duration,
        said: &HashSet<SpecId>,
    ) -> Option<()> {
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        loop {
            let msg = match self.rx.recv_timeout(lease / 3) {
                Ok(Out::Frame(f)) => encode_frame(&f),
                Ok(Out::Control(c)) if skip(&c, said) => continue,
                Ok(Out::Control(c)) => encode_control(&c),
                Ok(Out::Ack { seq, epoch: e }) if e == epoch => {
                    encode_control(&Control::Ack { seq })
                }
                Ok(Out::Ack { .. }) => continue,
                Ok(Out::Lost(e)) if e == epoch => return Some(()),
                Ok(Out::Lost(_)) => continue,
                Err(RecvTimeoutError::Timeout) => encode_control(&Control::Renew),
                Err(RecvTimeoutError::Disconnected) => return None,
            };
            match write_message(stream, &msg) {
                Ok(()) => {}
                // Nothing was written: the link lives on without it.
                Err(e @ MessageError::TooLong { .. }) => tracing::warn!("frame dropped: {e}"),
                Err(e) => {
                    tracing::warn!("writing to the bridge: {e}");
                    return Some(());
                }
            }
        }
    }

    /// Connects again until it works, then resumes. `None` once the VM
    /// is ending (the queue is closed).
    fn reconnect(&self) -> Option<(UnixStream, Duration, HashSet<SpecId>)> {
        let mut backoff = Duration::from_millis(10);
        let mut logged = false;
        loop {
            match connect(&self.shared.path, self.shared.vm) {
                Ok((mut s, _, lease)) => {
                    let (resume, said) = self.shared.resume();
                    if write_message(&mut s, &encode_control(&resume)).is_ok() {
                        self.start_reader(&s).ok()?;
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.shared.up.store(true, Ordering::Relaxed);
                        tracing::warn!("bridge link back: resumed");
                        return Some((s, lease, said));
                    }
                }
                Err(e) if !logged => {
                    tracing::warn!("reconnecting to the bridge: {e}; retrying");
                    logged = true;
                }
                Err(_) => {}
            }
            // Meanwhile the queue fills; frames past it are dropped.
            match self.rx.recv_timeout(backoff) {
                Err(RecvTimeoutError::Disconnected) => return None,
                Ok(Out::Frame(_)) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A new epoch, and its reader thread on `s`.
    fn start_reader(&self, s: &UnixStream) -> io::Result<()> {
        let epoch = self.shared.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        *lock(&self.shared.current) = Some(s.try_clone()?);
        spawn_reader(
            s.try_clone()?,
            self.device.try_clone()?,
            self.events.clone(),
            self.tx.clone(),
            self.shared.clone(),
            epoch,
        )
    }
}

/// Whether a queued control message was said already by the `resume`
/// of this connection (the ids in `said`): a `started` or `resolved`
/// again would be refused as a repeat.
fn skip(c: &Control, said: &HashSet<SpecId>) -> bool {
    match c {
        Control::Started { id } => said.contains(id),
        Control::Resolved { id, .. } => said.contains(id),
        _ => false,
    }
}

/// Starts the reader of connection `epoch`.
pub(super) fn spawn_reader(
    stream: UnixStream,
    device: UnixDatagram,
    events: EventSender,
    tx: SyncSender<Out>,
    shared: Arc<Shared>,
    epoch: u64,
) -> io::Result<()> {
    if epoch == 1 {
        *lock(&shared.current) = Some(stream.try_clone()?);
    }
    std::thread::Builder::new()
        .name("bridge-rx".into())
        .spawn(move || {
            read_loop(stream, &device, &events, epoch);
            // The writer learns at once, not at its next renewal.
            if shared.epoch.load(Ordering::Relaxed) == epoch {
                let _ = tx.try_send(Out::Lost(epoch));
            }
        })
        .map(drop)
}

/// Frames from the bridge, to the device; `decided`, to the controller,
/// which carries it out before the next frame goes to the device.
/// Returns when the connection ends.
fn read_loop(mut stream: UnixStream, device: &UnixDatagram, events: &EventSender, epoch: u64) {
    loop {
        let msg = match read_message(&mut stream) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!("bridge connection {epoch} closed: {e}");
                return;
            }
        };
        match decode(&msg) {
            Ok(Message::Frame(f)) => {
                // A blocking send: when the guest does not take frames, the
                // bridge's queue for this port fills instead of this one.
                if device.send(&f).is_err() {
                    return;
                }
            }
            Ok(Message::Control(Control::Decided {
                id,
                outcome,
                seq,
                refused,
            })) => {
                let ev = BridgeEvent::Decided {
                    id,
                    outcome,
                    seq,
                    epoch,
                    refused,
                };
                // The frames after it wait until it is carried out (see
                // `Acted`).
                let (acted, done) = crate::event::Acted::new();
                if events.send(VmEvent::Bridge(ev, acted)).is_err() {
                    return;
                }
                let _ = done.recv();
            }
            Ok(Message::Control(c)) => tracing::warn!("unexpected message from the bridge: {c:?}"),
            Err(e) => {
                tracing::warn!("bad message from the bridge, connection closed: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use specwire::protocol::Outcome;
    use std::time::Duration;

    /// The bridge sends an abort, then a frame that its owner sent after
    /// the abort. The frame must reach the device only once the controller
    /// has acted on the abort: delivered before the rollback, the rollback
    /// would undo it and it would be lost (the demo's cross-host step once
    /// waited for ever on such a frame).
    #[test]
    fn a_frame_after_an_outcome_waits_until_the_controller_has_acted() {
        let (mut bridge, vmm) = UnixStream::pair().unwrap();
        let (device, guest) = UnixDatagram::pair().unwrap();
        let (events, controller) = crate::event::channel();
        let reader = std::thread::spawn(move || read_loop(vmm, &device, &events, 1));
        let decided = Control::Decided {
            id: SpecId::new(1, 1),
            outcome: Outcome::Abort,
            seq: 7,
            refused: false,
        };
        write_message(&mut bridge, &encode_control(&decided)).unwrap();
        write_message(&mut bridge, &encode_frame(b"final-3")).unwrap();
        let acted = match controller.recv_timeout(Duration::from_secs(10)) {
            Ok(VmEvent::Bridge(BridgeEvent::Decided { seq: 7, .. }, acted)) => acted,
            other => panic!("expected the outcome first, got {other:?}"),
        };
        guest
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            guest.recv(&mut buf).is_err(),
            "the frame reached the device before the outcome was carried out"
        );
        drop(acted);
        guest
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = guest.recv(&mut buf).expect("the frame, once acted on");
        assert_eq!(&buf[..n], b"final-3");
        drop(bridge);
        reader.join().unwrap();
    }
}
