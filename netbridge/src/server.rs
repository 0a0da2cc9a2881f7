//! The bridge's I/O: a tokio server on a Unix socket, one reader and one
//! writer task per port, around the shared [`Bridge`] state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::bridge::{Bridge, Counters, Event, Send, UNACKED_MAX};
use crate::protocol::{
    decode, encode_control, encode_frame, read_message_async, write_message_async, Control,
    Message, MessageError,
};
use crate::registry::{PortId, IDS_PER_PORT};
use crate::sock::{self, Access, SockError, SocketFile};

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("binding {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// The socket's path is taken, or cannot be used.
    #[error(transparent)]
    Sock(#[from] SockError),
}

/// How long a new port has to say hello before it is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an event line may wait for a client that does not read before
/// the client is dropped.
pub const EVENT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default lease (`--lease-ms`): a VMM port that sends nothing for
/// this long is taken for a hung VMM and closed, which aborts the
/// speculations its VM owns (rules 9, 13). VMMs renew at a third of it.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(1000);
/// The recovery after the bridge starts lasts this many leases: owners
/// that live reconnect within it (docs/netbridge.md, "Restart").
pub const RECOVERY_LEASES: u32 = 2;

/// Control messages waiting for one port's writer. The bridge sends a
/// port at most [`UNACKED_MAX`] late outcomes and [`IDS_PER_PORT`] more for
/// the ids it holds, and a welcome: an honest port that reads slowly never
/// fills it. A port that acknowledges outcomes without reading them does,
/// and is closed.
pub const CONTROL_QUEUE_MAX: usize = UNACKED_MAX + IDS_PER_PORT + 1;

/// What the writer task of a port waits on, and how to close the port.
struct PortLink {
    control: mpsc::Sender<Control>,
    frames: Arc<Notify>,
    close: Arc<Notify>,
}

/// The shared server state.
pub struct Shared {
    bridge: Mutex<Bridge>,
    links: Mutex<HashMap<PortId, PortLink>>,
    events: broadcast::Sender<Event>,
    next_port: Mutex<PortId>,
    lease: Duration,
    /// Where the bridge's ops for a shared registry go
    /// ([`crate::registry::link`]), once it is linked.
    registry: std::sync::OnceLock<mpsc::UnboundedSender<crate::registry::link::Op>>,
}

impl Shared {
    /// Server state around `bridge`, with the [`DEFAULT_LEASE`].
    pub fn new(bridge: Bridge) -> Arc<Self> {
        Self::with_lease(bridge, DEFAULT_LEASE)
    }

    /// Server state around `bridge`, giving VMM ports `lease`.
    pub fn with_lease(bridge: Bridge, lease: Duration) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Self {
            bridge: Mutex::new(bridge),
            links: Mutex::new(HashMap::new()),
            events,
            next_port: Mutex::new(1),
            lease,
            registry: std::sync::OnceLock::new(),
        })
    }

    /// The lease of VMM ports.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Ends the recovery after the start ([`Bridge::end_recovery`]).
    pub fn end_recovery(&self) {
        let sends = self.bridge().end_recovery();
        self.dispatch(sends, Vec::new());
    }

    /// Links the bridge to a shared registry: its ops go to `tx`
    /// ([`crate::registry::link::start`]). Once; later calls are ignored.
    pub fn set_registry(&self, tx: mpsc::UnboundedSender<crate::registry::link::Op>) {
        let _ = self.registry.set(tx);
    }

    /// Where ops for the shared registry go, if linked.
    pub fn registry_ops(&self) -> Option<mpsc::UnboundedSender<crate::registry::link::Op>> {
        self.registry.get().cloned()
    }

    /// Applies what the shared registry said to the bridge, and sends what
    /// that asks for.
    pub fn apply_registry(&self, f: impl FnOnce(&mut Bridge) -> (Vec<Send>, Vec<PortId>)) {
        let (sends, woke) = f(&mut self.bridge());
        self.dispatch(sends, woke);
    }

    /// Whether the bridge knows how `id` ended.
    pub fn knows_outcome(&self, id: crate::protocol::Id) -> bool {
        self.bridge().outcome(id).is_some()
    }

    /// Subscribes to the bridge's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn bridge(&self) -> std::sync::MutexGuard<'_, Bridge> {
        self.bridge.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<PortId, PortLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh port number.
    fn next_port(&self) -> PortId {
        let mut n = self.next_port.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        *n - 1
    }

    /// Adds the TAP uplink as a port with no VM behind it (see
    /// [`Bridge::add_uplink`]). Returns its port number and what its
    /// writer waits on: a notification whenever frames are queued for it.
    pub fn add_uplink(&self) -> (PortId, Arc<Notify>) {
        let port = self.next_port();
        self.bridge().add_uplink(port);
        // The uplink joins nothing, so no control message is ever meant for
        // it; the receiver is dropped and anything sent is discarded.
        let (control, _) = mpsc::channel(1);
        let frames = Arc::new(Notify::new());
        self.links().insert(
            port,
            PortLink {
                control,
                frames: frames.clone(),
                close: Arc::new(Notify::new()),
            },
        );
        self.dispatch(Vec::new(), Vec::new());
        (port, frames)
    }

    /// Adds the peer bridge at `addr` as a port ([`Bridge::add_peer`]).
    /// Returns its port number, the control messages meant for it (the
    /// outcomes it is to be told), and what its writer waits on for frames.
    pub fn add_peer(&self, addr: &str) -> (PortId, mpsc::Receiver<Control>, Arc<Notify>) {
        let port = self.next_port();
        self.bridge().add_peer(port, addr);
        let (control, rx) = mpsc::channel(CONTROL_QUEUE_MAX);
        let frames = Arc::new(Notify::new());
        self.links().insert(
            port,
            PortLink {
                control,
                frames: frames.clone(),
                close: Arc::new(Notify::new()),
            },
        );
        self.dispatch(Vec::new(), Vec::new());
        (port, rx, frames)
    }

    /// Runs `f` on the bridge, then sends the control messages and wakes
    /// the writers it returns, and publishes its events.
    pub fn with_bridge<R>(&self, f: impl FnOnce(&mut Bridge) -> (R, Vec<Send>, Vec<PortId>)) -> R {
        let (r, sends, woke) = f(&mut self.bridge());
        self.dispatch(sends, woke);
        r
    }

    /// A frame received from `port`: switches it and wakes the writers of
    /// the ports it was queued for.
    pub fn ingress(&self, port: PortId, frame: Vec<u8>) {
        let woke = self.bridge().ingress(port, frame);
        self.dispatch(Vec::new(), woke);
    }

    /// Takes the next frame queued for `port`.
    pub fn pop(&self, port: PortId) -> Option<Vec<u8>> {
        self.bridge().pop(port)
    }

    /// The port is gone: forgets it and tells the bridge (rule 9).
    pub fn remove_port(&self, port: PortId) {
        self.links().remove(&port);
        if let Some(c) = self.counters(port) {
            say_counters(port, &c);
            tracing::info!(port, counters = ?c, "port removed");
        }
        let sends = self.bridge().remove_port(port);
        self.dispatch(sends, Vec::new());
    }

    /// At the bridge's end (a signal): says what every port still
    /// connected lost, as its removal would have, so a port that had not
    /// hung up yet, or not been noticed to, loses no report.
    pub fn say_counters_at_exit(&self) {
        let mut ports: Vec<PortId> = self.links().keys().copied().collect();
        ports.sort_unstable();
        for port in ports {
            if let Some(c) = self.counters(port) {
                say_counters(port, &c);
            }
        }
    }

    /// The counters of `port`, while it is connected.
    pub fn counters(&self, port: PortId) -> Option<Counters> {
        self.bridge().counters(port)
    }

    /// Carries out what a bridge operation asked for: control messages,
    /// writer wake-ups, and events.
    fn dispatch(&self, sends: Vec<Send>, woke: Vec<PortId>) {
        let (events, ops) = {
            let mut b = self.bridge();
            (b.take_events(), b.take_ops())
        };
        if let Some(tx) = self.registry.get() {
            for op in ops {
                // Closed only when the runtime stops.
                let _ = tx.send(op);
            }
        }
        let links = self.links();
        for Send::Control(port, c) in sends {
            if let Some(l) = links.get(&port) {
                // Closed: the uplink, which takes no control message.
                if let Err(mpsc::error::TrySendError::Full(_)) = l.control.try_send(c) {
                    tracing::warn!(
                        port,
                        "port closed: {CONTROL_QUEUE_MAX} control messages wait for it"
                    );
                    l.close.notify_one();
                }
            }
        }
        for port in woke {
            if let Some(l) = links.get(&port) {
                l.frames.notify_one();
            }
        }
        for e in events {
            let _ = self.events.send(e);
        }
    }
}

/// A listening socket and its file, which goes away with it (see
/// [`crate::sock`]).
pub struct Bound {
    listener: UnixListener,
    _file: SocketFile,
}

/// Binds a private Unix socket at `path` (mode 0600); see [`bind_with`].
pub fn bind(path: &Path) -> Result<Bound, ServerError> {
    bind_with(path, &Access::default())
}

/// Binds a Unix socket at `path` for `access`. Only a stale socket is
/// replaced; a live one, or any other file, is an error that leaves it be.
/// The file appears once it accepts, and is removed when the [`Bound`]
/// is dropped, if it is still ours. Needs a tokio runtime.
pub fn bind_with(path: &Path, access: &Access) -> Result<Bound, ServerError> {
    let (listener, file) = sock::listen(path, access)?;
    let listener = listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|e| ServerError::Bind(path.into(), e))?;
    Ok(Bound {
        listener,
        _file: file,
    })
}

/// Says, once, what a port lost: frames dropped for a full queue or hold
/// buffer, and uses of ids it had no right to.
fn say_counters(port: PortId, c: &Counters) {
    if c.dropped_full > 0 {
        tracing::warn!(
            port,
            "{} frames for the port were dropped: its queue or hold buffer was full",
            c.dropped_full
        );
    }
    if c.forged + c.refused + c.dropped_ids > 0 {
        tracing::warn!(
            port,
            "the port used ids it had no right to: {} frames with forged ids, \
             {} control messages refused, {} frames past its ids not sent to it",
            c.forged,
            c.refused,
            c.dropped_ids
        );
    }
}

/// Serves ports on `bound` until the task is dropped. The recovery
/// after the start ends [`RECOVERY_LEASES`] leases from now.
pub async fn serve(bound: Bound, shared: Arc<Shared>) {
    let s = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(s.lease * RECOVERY_LEASES).await;
        s.end_recovery();
    });
    loop {
        let stream = sock::accept(&bound.listener).await;
        let port = shared.next_port();
        tokio::spawn(run_port(port, stream, shared.clone()));
    }
}

/// The most of a client's text a log line quotes.
const LOG_QUOTE: usize = 200;

/// `what` as text, cut to [`LOG_QUOTE`] bytes: a client's message, or an
/// error quoting it, cannot make a long log line.
fn brief(what: &impl std::fmt::Display) -> String {
    let s = what.to_string();
    if s.len() <= LOG_QUOTE {
        return s;
    }
    let mut end = LOG_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &s[..end], s.len())
}

/// A received message for a log line: its kind and size, not its bytes.
fn describe(m: &Result<Message, crate::protocol::ProtocolError>) -> String {
    match m {
        Ok(Message::Frame(f)) => format!("a frame of {} bytes", f.len()),
        Ok(Message::Control(c)) => brief(&format!("{c:?}")),
        Err(e) => brief(e),
    }
}

/// Reads a port's hello: its VM id and whether it is speculative, or
/// `None` (logged) if the port closes, stays silent or says something else.
async fn read_hello(port: PortId, rd: &mut OwnedReadHalf) -> Option<(u32, bool)> {
    // A client that connects and says nothing must not hold a descriptor
    // for ever.
    let Ok(first) = tokio::time::timeout(HELLO_TIMEOUT, read_message_async(rd)).await else {
        tracing::info!(port, "port closed: no hello within {HELLO_TIMEOUT:?}");
        return None;
    };
    match first.map(|m| decode(&m)) {
        Ok(Ok(Message::Control(Control::Hello { vm, speculative }))) => Some((vm, speculative)),
        // A client that left without a word, such as a check whether the
        // socket is live (crate::sock).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::info!(port, "port closed before its hello");
            None
        }
        Err(e) => {
            tracing::warn!(port, "port closed before its hello: {}", brief(&e));
            None
        }
        Ok(other) => {
            tracing::warn!(
                port,
                "port closed: the first message must be a hello, got {}",
                describe(&other)
            );
            None
        }
    }
}

async fn run_port(port: PortId, stream: UnixStream, shared: Arc<Shared>) {
    let (mut rd, wr) = stream.into_split();
    let Some(hello) = read_hello(port, &mut rd).await else {
        return;
    };
    let next_seq = shared.bridge().add_port(port, hello.0, hello.1);
    let next_seq = match next_seq {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(port, "port refused: {e}");
            shared.dispatch(Vec::new(), Vec::new());
            return;
        }
    };
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE_MAX);
    // The answer to hello goes first.
    let lease_ms = u32::try_from(shared.lease.as_millis()).unwrap_or(u32::MAX);
    let _ = ctl_tx.try_send(Control::Welcome { next_seq, lease_ms });
    let frames = Arc::new(Notify::new());
    let close = Arc::new(Notify::new());
    shared.links().insert(
        port,
        PortLink {
            control: ctl_tx,
            frames: frames.clone(),
            close: close.clone(),
        },
    );
    shared.dispatch(Vec::new(), Vec::new());
    tracing::info!(port, vm = hello.0, speculative = hello.1, "port up");
    let writer = tokio::spawn(write_port(port, wr, ctl_rx, frames, shared.clone()));
    loop {
        // Every message renews the lease; none within it is a hung VMM.
        let read = tokio::select! {
            m = tokio::time::timeout(shared.lease, read_message_async(&mut rd)) => m,
            () = close.notified() => break,
        };
        let msg = match read {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::info!(port, "port down: {e}");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    port,
                    vm = hello.0,
                    "port closed: its lease of {:?} expired (a hung VMM)",
                    shared.lease
                );
                shared.bridge().lease_expired(port);
                break;
            }
        };
        match decode(&msg) {
            Ok(Message::Frame(f)) => shared.ingress(port, f),
            Ok(Message::Control(c)) => {
                let (sends, woke) = shared.bridge().control(port, c);
                shared.dispatch(sends, woke);
            }
            Err(e) => {
                tracing::warn!(port, "port closed on a bad message: {}", brief(&e));
                break;
            }
        }
    }
    writer.abort();
    shared.remove_port(port);
}

async fn write_port(
    port: PortId,
    mut wr: OwnedWriteHalf,
    mut control: mpsc::Receiver<Control>,
    frames: Arc<Notify>,
    shared: Arc<Shared>,
) {
    loop {
        // Control first: an abort must reach the member before frames that
        // it would make moot.
        tokio::select! {
            biased;
            c = control.recv() => {
                let Some(c) = c else { return };
                if write_message_async(&mut wr, &encode_control(&c)).await.is_err() {
                    return;
                }
            }
            () = frames.notified() => {
                loop {
                    let next = shared.pop(port);
                    let Some(f) = next else { break };
                    match write_message_async(&mut wr, &encode_frame(&f)).await {
                        Ok(()) => {}
                        // Nothing was written: the port lives on without it.
                        Err(e @ MessageError::TooLong { .. }) => {
                            tracing::warn!(port, "frame dropped: {e}");
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

/// Streams events as JSON lines to clients of `bound`. A client that
/// stops reading for [`EVENT_WRITE_TIMEOUT`] is dropped.
pub async fn serve_events(bound: Bound, shared: Arc<Shared>) {
    loop {
        let mut stream = sock::accept(&bound.listener).await;
        let mut rx = shared.subscribe();
        tokio::spawn(async move {
            loop {
                let line = match rx.recv().await {
                    Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        format!("{{\"event\":\"lagged\",\"dropped\":{n}}}")
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let line = format!("{line}\n");
                let write = stream.write_all(line.as_bytes());
                if !matches!(
                    tokio::time::timeout(EVENT_WRITE_TIMEOUT, write).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ProtocolError;

    #[test]
    fn log_lines_quote_little_of_a_message() {
        let frame = Ok(Message::Frame(vec![7; 65_535]));
        assert_eq!(describe(&frame), "a frame of 65535 bytes");
        let ids = (0..8000).map(|s| specwire::SpecId::new(0, s)).collect();
        let joined = describe(&Ok(Message::Control(Control::Joined { ids })));
        assert!(joined.len() < 300, "{joined}");
        assert!(
            joined.starts_with("Joined { ids: [SpecId { vm: 0, seq: 0 }, SpecId { vm: 0, seq: 1 }"),
            "{joined}"
        );
        let e = Err(ProtocolError::Control("x".repeat(70_000)));
        let e = describe(&e);
        assert!(e.len() < 300 && e.ends_with("(70021 bytes in all)"), "{e}");
        assert_eq!(brief(&"short"), "short");
        // Cut on a character boundary.
        assert!(brief(&"é".repeat(300)).starts_with(&"é".repeat(100)));
    }
}
