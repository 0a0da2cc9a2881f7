//! The host control API: a Unix socket speaking JSON lines.
//!
//! Each request is one JSON object on one line, such as `{"op":"status"}`;
//! the answer is one line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! `{"op":"events"}` instead turns the connection into a stream of
//! speculation events, one JSON object per line, until the client leaves.
//! The protocol is documented in `docs/control-api.md`.
//!
//! The server runs on a tokio runtime of its own thread; requests reach the
//! controller as [`VmEvent::Api`] and are answered through a oneshot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream as TokioUnixStream};
use tokio::sync::{broadcast, oneshot};

use crate::event::{EventSender, VmEvent};

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
}

/// A request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The operation.
    pub op: Op,
    /// The snapshot directory, for `snapshot`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<PathBuf>,
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

/// A request from the API on its way to the controller.
#[derive(Debug)]
pub struct ApiCall {
    /// The operation (never `events`, which the server serves itself).
    pub op: Op,
    /// The request's `path`, if it had one.
    pub path: Option<PathBuf>,
    /// Where the controller answers.
    pub reply: oneshot::Sender<Response>,
}

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be bound.
    #[error("binding the API socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    /// The runtime or its thread could not start.
    #[error("starting the API server: {0}")]
    Start(std::io::Error),
}

/// The running API server. Dropping it removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// Where the controller publishes events for `events` clients.
    pub events: broadcast::Sender<SpecEvent>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the API server on `path`, sending calls to the controller via
/// `to_vm`.
pub fn start(path: &Path, to_vm: EventSender) -> Result<ApiServer, ApiError> {
    if path.exists() {
        // A socket left by a VMM that died; binding would fail otherwise.
        let _ = std::fs::remove_file(path);
    }
    let std_listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| ApiError::Bind(path.into(), e))?;
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
                let Ok(listener) = UnixListener::from_std(std_listener) else {
                    return;
                };
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_client(stream, to_vm.clone(), ev.clone()));
                }
            })
        })
        .map_err(ApiError::Start)?;
    Ok(ApiServer {
        path: path.into(),
        events,
    })
}

async fn serve_client(
    stream: TokioUnixStream,
    to_vm: EventSender,
    events: broadcast::Sender<SpecEvent>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = TokioBufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match parse(&line) {
            Ok(Request { op: Op::Events, .. }) => {
                stream_events(&mut wr, events.subscribe()).await;
                return;
            }
            Ok(req) => call(&to_vm, req).await,
            Err(e) => Response::error(e),
        };
        if write_line(&mut wr, &resp).await.is_err() {
            return;
        }
    }
}

/// Parses a request line, with a message for every way it can be wrong.
pub fn parse(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "request of {} bytes is longer than {MAX_REQUEST}",
            line.len()
        ));
    }
    serde_json::from_str::<Request>(line).map_err(|e| format!("bad request: {e}"))
}

async fn call(to_vm: &EventSender, req: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    let c = ApiCall {
        op: req.op,
        path: req.path,
        reply: tx,
    };
    if to_vm.send(VmEvent::Api(c)).is_err() {
        return Response::error("the VM has stopped");
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the VM stopped before answering"))
}

async fn stream_events(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    mut rx: broadcast::Receiver<SpecEvent>,
) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                if write_line(wr, &ev).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let note = Response::error(format!(
                    "{n} events were dropped: the client read too slowly"
                ));
                if write_line(wr, &note).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn write_line<T: Serialize>(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    v: &T,
) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    wr.write_all(s.as_bytes()).await
}

/// The client side, for `specvm ctl`: sends `op` and prints the answer (or,
/// for `events`, every event line until the VMM goes away) to `out`.
/// Returns whether the answer was a success.
pub fn client(path: &Path, op: Op, out: &mut impl Write) -> std::io::Result<bool> {
    client_request(path, &Request { op, path: None }, out)
}

/// Like [`client`], for a whole request (one with a `path`).
pub fn client_request(path: &Path, req: &Request, out: &mut impl Write) -> std::io::Result<bool> {
    let op = req.op;
    let mut s = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display()))
    })?;
    let mut req = serde_json::to_string(req).map_err(std::io::Error::other)?;
    req.push('\n');
    s.write_all(req.as_bytes())?;
    let mut rd = BufReader::new(s);
    let mut line = String::new();
    if op == Op::Events {
        while rd.read_line(&mut line)? > 0 {
            out.write_all(line.as_bytes())?;
            out.flush()?;
            line.clear();
        }
        return Ok(true);
    }
    rd.read_line(&mut line)?;
    out.write_all(line.as_bytes())?;
    let resp: Response = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    Ok(resp.ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(r#"{"op":"status"}"#).unwrap().op, Op::Status);
        assert_eq!(parse(r#"{"op":"abort"}"#).unwrap().op, Op::Abort);
        let r = parse(r#"{"op":"snapshot","path":"/tmp/s"}"#).unwrap();
        assert_eq!((r.op, r.path), (Op::Snapshot, Some("/tmp/s".into())));
        assert!(parse(r#"{"op":"explode"}"#)
            .unwrap_err()
            .contains("bad request"));
        assert!(parse("not json").is_err());
        assert!(parse(&"x".repeat(MAX_REQUEST + 1))
            .unwrap_err()
            .contains("longer"));
    }

    #[test]
    fn responses_skip_empty_fields() {
        let s = serde_json::to_string(&Response::ok()).unwrap();
        assert_eq!(s, r#"{"ok":true}"#);
        let s = serde_json::to_string(&Response::error("no")).unwrap();
        assert_eq!(s, r#"{"ok":false,"error":"no"}"#);
    }

    #[test]
    fn server_answers_and_streams() {
        let dir = std::env::temp_dir().join(format!("specvm-api-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let (tx, rx) = crate::event::channel();
        let server = start(&path, tx).unwrap();
        // A fake controller answering one call.
        let ctl = std::thread::spawn(move || {
            if let Ok(VmEvent::Api(c)) = rx.recv() {
                assert_eq!(c.op, Op::Status);
                let _ = c.reply.send(Response {
                    ok: true,
                    depth: Some(3),
                    ..Default::default()
                });
            }
        });
        let mut out = Vec::new();
        assert!(client(&path, Op::Status, &mut out).unwrap());
        assert!(String::from_utf8(out).unwrap().contains(r#""depth":3"#));
        ctl.join().unwrap();
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
