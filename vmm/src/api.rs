//! The host control API: a Unix socket speaking JSON lines.
//!
//! Each request is one JSON object on one line, such as `{"op":"status"}`;
//! the answer is one line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! `{"op":"events"}` instead turns the connection into a stream of
//! speculation events, one JSON object per line, until the client leaves.
//! The protocol is documented in `docs/control-api.md`.
//!
//! The server runs on a tokio runtime of its own thread; requests reach the
//! controller through a [`ToVm`] (the VMM wraps them in its event stream)
//! and are answered through a oneshot. No
//! client can block it or grow it: lines are limited while they are read,
//! idle clients and clients that do not read are dropped after a timeout
//! ([`Limits`]), and accept errors (out of descriptors) are waited out.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use specwire::sock::{Access, SockError, SocketFile};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream as TokioUnixStream};
use tokio::sync::{broadcast, oneshot};

/// Longest request line accepted, in bytes.
const MAX_REQUEST: usize = 4096;

/// An operation a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The VM's speculation state.
    Status,
    /// Stop every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// Take a checkpoint, as the VM's owner (rule 8).
    Speculate,
    /// Commit the VM's innermost own speculation.
    Commit,
    /// Abort the VM's innermost own speculation: the VM rolls back.
    Abort,
    /// Stream speculation events.
    Events,
    /// Save the VM to the snapshot directory `path` (`docs/snapshots.md`).
    Snapshot,
    /// Write private disk `disk`'s committed content to the new file
    /// `path` (`docs/disk.md`).
    #[serde(rename = "disk-export")]
    #[value(name = "disk-export")]
    DiskExport,
}

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// The snapshot directory, for `snapshot`; the new image file, for
    /// `disk-export`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<PathBuf>,
    /// The disk's index (its `--disk` in order, from 0), for
    /// `disk-export`; 0 if absent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk: Option<u32>,
}

/// One entry of the checkpoint stack, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The speculation id, `vm:seq`.
    pub id: String,
    /// Started by this VM (true) or joined (false).
    pub explicit: bool,
}

/// An answer line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Why it did not.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The speculation id an operation created or resolved.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    /// Checkpoints held, for `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub depth: Option<usize>,
    /// The dependency set, bottom first, for `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entries: Option<Vec<EntryInfo>>,
    /// Whether the host has paused the VM, for `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub paused: Option<bool>,
    /// The VM's id, for `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vm_id: Option<u32>,
    /// How many `events` clients are listening, for `status`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_clients: Option<usize>,
    /// `full` or `diff`, for `snapshot`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    /// Memory pages written into the snapshot's memory file by a diff
    /// snapshot, for `snapshot`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pages: Option<u64>,
    /// How long the VM was paused, in microseconds, for `snapshot`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub micros: Option<u64>,
    /// The bytes written, for `disk-export`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<u64>,
    /// The private level's granules written over the image, for
    /// `disk-export`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub granules: Option<u64>,
}

impl Response {
    /// A failure with a reason.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }

    /// A plain success.
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }
}

/// A speculation event, as streamed to `events` clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecEvent {
    /// `speculate`, `commit`, `abort` or `rollback`.
    pub event: String,
    /// The speculation concerned.
    pub id: String,
    /// Checkpoints held afterwards.
    pub depth: usize,
    /// Who asked: `guest` or `host`.
    pub by: String,
}

/// Hands a request to the VM; false if the VM is gone.
pub type ToVm = std::sync::Arc<dyn Fn(ApiCall) -> bool + Send + Sync>;

/// A request from the API on its way to the controller.
#[derive(Debug)]
pub struct ApiCall {
    /// The operation (never `events`, which the server serves itself).
    pub op: Op,
    /// The request's `path`, if it had one.
    pub path: Option<PathBuf>,
    /// The request's `disk`, if it had one.
    pub disk: Option<u32>,
    /// Where the controller answers.
    pub reply: oneshot::Sender<Response>,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket's path is taken (a live socket, a file that is not a
    /// socket), or the socket could not be made.
    #[error("the API socket: {0}")]
    Socket(#[from] SockError),
    /// The runtime or its thread could not start.
    #[error("starting the API server: {0}")]
    Start(std::io::Error),
}

/// How the server bounds what one client may cost it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest request line, in bytes, checked while reading.
    pub max_request: usize,
    /// How long a client may take to send its next request.
    pub idle: Duration,
    /// How long one answer or event line may wait for a client that does
    /// not read.
    pub write: Duration,
}

/// The server's limits.
pub const LIMITS: Limits = Limits {
    max_request: MAX_REQUEST,
    idle: Duration::from_secs(60),
    write: Duration::from_secs(30),
};

/// The group that may use the API socket besides its owner
/// (`--api-sock-group`); set before [`start`].
static SOCKET_GROUP: OnceLock<u32> = OnceLock::new();

/// Lets group `gid` connect to the API socket too (mode 0660, not 0600).
/// Call it before [`start`]; only the first call counts.
pub fn set_socket_group(gid: u32) {
    let _ = SOCKET_GROUP.set(gid);
}

/// The running API server. Dropping it removes the socket file, if the path
/// still names it.
pub struct ApiServer {
    _file: SocketFile,
    /// Where the controller publishes events for `events` clients.
    pub events: broadcast::Sender<SpecEvent>,
}

/// Starts the API server on `path`, sending calls to the controller via
/// `to_vm`. The socket is mode 0600 (0660 with [`set_socket_group`]),
/// replaces only a stale socket, and appears once it accepts
/// ([`specwire::sock`]).
pub fn start(path: &Path, to_vm: ToVm) -> Result<ApiServer, ApiError> {
    let access = Access {
        group: SOCKET_GROUP.get().copied(),
    };
    start_with(path, &access, LIMITS, to_vm)
}

/// [`start`], with the socket's access and the limits given.
pub fn start_with(
    path: &Path,
    access: &Access,
    limits: Limits,
    to_vm: ToVm,
) -> Result<ApiServer, ApiError> {
    let (std_listener, file) = specwire::sock::listen(path, access)?;
    std_listener
        .set_nonblocking(true)
        .map_err(ApiError::Start)?;
    let (events, _) = broadcast::channel(1024);
    let ev = events.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiError::Start)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("the API server cannot listen: {e}");
                        return;
                    }
                };
                // Accept errors (out of descriptors) never end the loop.
                loop {
                    let stream = specwire::sock::accept(&listener).await;
                    tokio::spawn(serve_client(stream, to_vm.clone(), ev.clone(), limits));
                }
            })
        })
        .map_err(ApiError::Start)?;
    Ok(ApiServer {
        _file: file,
        events,
    })
}

/// How long, and how many bytes of, a refused client's further input are
/// taken and dropped before its connection closes.
const REFUSAL_DRAIN: Duration = Duration::from_secs(1);
const REFUSAL_DRAIN_BYTES: usize = 32 << 20;

/// Closes a connection after refusing its request without losing the
/// answer: a Unix socket closed with unread input resets the connection,
/// and the peer may then lose the answer before reading it. So our side is
/// shut down first (the client reads the answer, then the end), and what
/// the client still sends is read and dropped, for [`REFUSAL_DRAIN`] and
/// [`REFUSAL_DRAIN_BYTES`] at most, before the socket closes.
async fn close_after_refusal<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    mut wr: tokio::net::unix::OwnedWriteHalf,
) {
    use tokio::io::AsyncReadExt;
    let _ = wr.shutdown().await;
    let mut buf = vec![0u8; 64 << 10];
    let drain = async {
        let mut left = REFUSAL_DRAIN_BYTES;
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(REFUSAL_DRAIN, drain).await;
}

async fn serve_client(
    stream: TokioUnixStream,
    to_vm: ToVm,
    events: broadcast::Sender<SpecEvent>,
    limits: Limits,
) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = TokioBufReader::new(rd);
    loop {
        let read = tokio::time::timeout(limits.idle, read_line(&mut rd, limits.max_request));
        let line = match read.await {
            Ok(Ok(Line::Full(line))) => line,
            Ok(Ok(Line::TooLong)) => {
                let e = format!(
                    "bad request: a line longer than {} bytes; closing",
                    limits.max_request
                );
                let _ = write_line(&mut wr, &Response::error(e), limits.write).await;
                close_after_refusal(rd, wr).await;
                return;
            }
            Ok(Ok(Line::End) | Err(_)) => return,
            Err(_) => {
                let e = format!("no request for {:?}; closing", limits.idle);
                let _ = write_line(&mut wr, &Response::error(e), limits.write).await;
                return;
            }
        };
        let resp = match parse(&line) {
            Ok(Request { op: Op::Events, .. }) => {
                stream_events(&mut wr, events.subscribe(), limits.write).await;
                return;
            }
            Ok(req) => call(&to_vm, req).await,
            Err(e) => Response::error(e),
        };
        if write_line(&mut wr, &resp, limits.write).await.is_err() {
            return;
        }
    }
}

/// What [`read_line`] read.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, without its newline (or the last bytes before the end).
    Full(Vec<u8>),
    /// More than the limit without a newline: the rest is not read.
    TooLong,
    /// The client closed the connection.
    End,
}

/// Reads one line of at most `max` bytes, never holding more than that
/// (and the reader's buffer): the limit is checked while reading, not
/// after.
async fn read_line<R: AsyncBufRead + Unpin>(rd: &mut R, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = rd.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match line.is_empty() {
                true => Line::End,
                false => Line::Full(line),
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        rd.consume(take + usize::from(done));
        if done {
            return Ok(Line::Full(line));
        }
    }
}

/// Parses a request line, with a message for every way it can be wrong.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "bad request: a line of {} bytes is longer than {MAX_REQUEST}",
            line.len()
        ));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("bad request: not UTF-8: {e}"))?;
    let req = serde_json::from_str::<Request>(text).map_err(|e| format!("bad request: {e}"))?;
    if let Some(p) = req.path.as_ref().filter(|p| !p.is_absolute()) {
        return Err(format!(
            "bad request: path {} is relative, and the VMM does not know the \
             caller's directory; send an absolute path (specvm ctl does)",
            p.display()
        ));
    }
    Ok(req)
}

async fn call(to_vm: &ToVm, req: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    let c = ApiCall {
        op: req.op,
        path: req.path,
        disk: req.disk,
        reply: tx,
    };
    if !to_vm(c) {
        return Response::error("the VM has stopped");
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the VM stopped before answering"))
}

async fn stream_events(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    mut rx: broadcast::Receiver<SpecEvent>,
    timeout: Duration,
) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if write_line(wr, &ev, timeout).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let note = Response::error(format!(
                    "{n} events were dropped: the client read too slowly"
                ));
                if write_line(wr, &note, timeout).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Writes one JSON line, giving up after `timeout` on a client that does
/// not read.
async fn write_line<T: Serialize>(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    v: &T,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    match tokio::time::timeout(timeout, wr.write_all(s.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// How long `specvm ctl` waits for an answer by default: a snapshot writes
/// all of guest memory (about 10 s for 4 GiB here), so it gets longer.
/// For `events`, the wait covers connecting and sending the request only.
pub fn default_timeout(op: Op) -> Duration {
    match op {
        Op::Snapshot | Op::DiskExport => Duration::from_secs(600),
        _ => Duration::from_secs(30),
    }
}

/// The client side, for `specvm ctl`: sends `op` and prints the answer (or,
/// for `events`, every event line until the VMM goes away) to `out`.
/// Returns whether the answer was a success.
pub fn client(path: &Path, op: Op, out: &mut impl Write) -> std::io::Result<bool> {
    let req = Request {
        op,
        path: None,
        disk: None,
    };
    client_request(path, &req, Some(default_timeout(op)), out)
}

/// Like [`client`], for a whole request (one with a `path`, which is sent
/// absolute, resolved against this process's directory), waiting at most
/// `timeout` (`None`: for ever) to connect and for the answer.
pub fn client_request(
    path: &Path,
    req: &Request,
    timeout: Option<Duration>,
    out: &mut impl Write,
) -> std::io::Result<bool> {
    let op = req.op;
    let req = Request {
        op,
        path: req.path.as_deref().map(std::path::absolute).transpose()?,
        disk: req.disk,
    };
    let context = |what: &str, e: std::io::Error| {
        let e = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "no answer within {:?}; is the VM stuck? (--timeout)",
                timeout.unwrap_or_default()
            ),
            _ => e.to_string(),
        };
        std::io::Error::other(format!("{what} {}: {e}", path.display()))
    };
    let mut s = specwire::sock::connect(path, timeout).map_err(|e| context("connecting to", e))?;
    s.set_write_timeout(timeout)
        .and_then(|()| s.set_read_timeout(timeout))
        .map_err(|e| context("setting up", e))?;
    let mut line = serde_json::to_string(&req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| context("sending to", e))?;
    let mut rd = BufReader::new(s);
    let mut line = String::new();
    if op == Op::Events {
        rd.get_ref()
            .set_read_timeout(None)
            .map_err(|e| context("setting up", e))?;
        while rd.read_line(&mut line)? > 0 {
            out.write_all(line.as_bytes())?;
            out.flush()?;
            line.clear();
        }
        return Ok(true);
    }
    if rd
        .read_line(&mut line)
        .map_err(|e| context("reading from", e))?
        == 0
    {
        return Err(context(
            "reading from",
            std::io::Error::other("the VMM closed the connection without an answer"),
        ));
    }
    out.write_all(line.as_bytes())?;
    let resp: Response = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    Ok(resp.ok)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::{UnixListener as StdListener, UnixStream};

    use super::*;

    use crate::test_util::TempDir;

    /// A server on `dir/api.sock` with `limits`, and a fake controller
    /// that answers every call with its depth set to 3.
    fn serve(dir: &TempDir, limits: Limits) -> (ApiServer, PathBuf) {
        let path = dir.join("api.sock");
        let (tx, rx) = std::sync::mpsc::channel::<ApiCall>();
        let to_vm: ToVm = std::sync::Arc::new(move |c| tx.send(c).is_ok());
        let server = start_with(&path, &Access::default(), limits, to_vm).unwrap();
        std::thread::spawn(move || {
            while let Ok(c) = rx.recv() {
                let _ = c.reply.send(Response {
                    ok: true,
                    depth: Some(3),
                    ..Default::default()
                });
            }
        });
        (server, path)
    }

    fn read_answer(rd: &mut impl BufRead) -> String {
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(br#"{"op":"status"}"#).unwrap().op, Op::Status);
        assert_eq!(parse(br#"{"op":"abort"}"#).unwrap().op, Op::Abort);
        let r = parse(br#"{"op":"snapshot","path":"/tmp/s"}"#).unwrap();
        assert_eq!((r.op, r.path), (Op::Snapshot, Some("/tmp/s".into())));
        assert!(parse(br#"{"op":"explode"}"#)
            .unwrap_err()
            .contains("bad request"));
        assert!(parse(b"not json").is_err());
        assert!(parse("x".repeat(MAX_REQUEST + 1).as_bytes())
            .unwrap_err()
            .contains("longer"));
        let e = parse(b"{\"op\":\"status\xff\"}").unwrap_err();
        assert!(e.starts_with("bad request: not UTF-8"), "{e}");
        let e = parse(br#"{"op":"snapshot","path":"rel/dir"}"#).unwrap_err();
        assert!(e.contains("rel/dir is relative"), "{e}");
    }

    #[test]
    fn responses_skip_empty_fields() {
        let s = serde_json::to_string(&Response::ok()).unwrap();
        assert_eq!(s, r#"{"ok":true}"#);
        let s = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(s, r#"{"ok":false,"error":"no"}"#);
    }

    #[tokio::test]
    async fn lines_are_read_within_the_limit() {
        let mut rd: &[u8] = b"ab\ncd";
        assert_eq!(
            read_line(&mut rd, 4).await.unwrap(),
            Line::Full(b"ab".to_vec())
        );
        assert_eq!(
            read_line(&mut rd, 4).await.unwrap(),
            Line::Full(b"cd".to_vec())
        );
        assert_eq!(read_line(&mut rd, 4).await.unwrap(), Line::End);
        let mut rd: &[u8] = b"abcd\nabcde\n";
        assert_eq!(
            read_line(&mut rd, 4).await.unwrap(),
            Line::Full(b"abcd".to_vec())
        );
        assert_eq!(read_line(&mut rd, 4).await.unwrap(), Line::TooLong);
    }

    #[test]
    fn server_answers_and_removes_its_socket() {
        let dir = TempDir::new("api-answers");
        let (server, path) = serve(&dir, LIMITS);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let mut out = Vec::new();
        assert!(client(&path, Op::Status, &mut out).unwrap());
        assert!(String::from_utf8(out).unwrap().contains(r#""depth":3"#));
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn a_regular_file_is_not_replaced() {
        let dir = TempDir::new("api-file");
        let path = dir.join("notes.txt");
        std::fs::write(&path, "notes").unwrap();
        let to_vm: ToVm = std::sync::Arc::new(|_| false);
        let e = start(&path, to_vm).err().expect("refused");
        assert!(
            e.to_string()
                .contains("notes.txt exists and is a regular file"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "notes");
    }

    /// A line without a newline is cut off at the limit, not buffered
    /// until the newline comes.
    #[test]
    fn a_long_line_is_refused_while_it_is_read() {
        let dir = TempDir::new("api-long");
        let (_server, path) = serve(&dir, LIMITS);
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 << 10];
            // Ends when the server closes the connection.
            for _ in 0..256 {
                if w.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let mut rd = BufReader::new(s);
        let line = read_answer(&mut rd);
        assert!(line.contains("longer than 4096 bytes"), "{line}");
        assert_eq!(read_answer(&mut rd), "", "the connection is closed");
        writer.join().unwrap();
    }

    #[test]
    fn a_line_that_is_not_utf8_gets_an_answer() {
        let dir = TempDir::new("api-utf8");
        let (_server, path) = serve(&dir, LIMITS);
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rd = BufReader::new(s.try_clone().unwrap());
        s.write_all(b"{\"op\":\"\xc3\x28\"}\n").unwrap();
        let line = read_answer(&mut rd);
        assert!(
            line.starts_with(r#"{"ok":false,"error":"bad request: not UTF-8"#),
            "{line}"
        );
        s.write_all(b"{\"op\":\"status\"}\n").unwrap();
        assert!(read_answer(&mut rd).contains(r#""depth":3"#));
    }

    #[test]
    fn an_idle_client_is_dropped() {
        let dir = TempDir::new("api-idle");
        let limits = Limits {
            idle: Duration::from_millis(200),
            ..LIMITS
        };
        let (_server, path) = serve(&dir, limits);
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rd = BufReader::new(s);
        assert!(read_answer(&mut rd).contains("no request for"));
        assert_eq!(read_answer(&mut rd), "");
    }

    #[test]
    fn the_client_gives_up_on_a_silent_server_and_sends_absolute_paths() {
        let dir = TempDir::new("api-silent");
        let path = dir.join("api.sock");
        let listener = StdListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut req)
                .unwrap();
            // Say nothing until the client has gone.
            let _ = s.read(&mut [0u8; 1]);
            req
        });
        let req = Request {
            op: Op::Snapshot,
            path: Some("snap".into()),
            disk: None,
        };
        let t = std::time::Instant::now();
        let e = client_request(
            &path,
            &req,
            Some(Duration::from_millis(300)),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no answer within 300ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let sent: Request = serde_json::from_str(&server.join().unwrap()).unwrap();
        let want = std::env::current_dir().unwrap().join("snap");
        assert_eq!(sent.path, Some(want));
    }
}
