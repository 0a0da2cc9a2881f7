//! Fuzz targets of the control API (`vmm::api`, `docs/control-api.md`):
//! its request parser on any line, and its server on any byte stream, read
//! in any pieces. How to run them longer: `docs/fuzzing.md`.

#[path = "../../netbridge/tests/support/fuzz.rs"]
mod fuzz;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use arbitrary::Arbitrary;
use fuzz::{Bytes, Rare, Seq, Target};
use vmm::api::{
    parse, start_with, ApiCall, ApiServer, Limits, Op, Request, Response, SpecEvent, ToVm,
};

/// The longest request line (`docs/control-api.md`).
const MAX_REQUEST: usize = 4096;

/// The outcome a line must get: `None` refused, else the request.
type Want = Option<(Op, Option<PathBuf>)>;

const OPS: &[(&str, Option<Op>)] = &[
    ("status", Some(Op::Status)),
    ("pause", Some(Op::Pause)),
    ("resume", Some(Op::Resume)),
    ("speculate", Some(Op::Speculate)),
    ("commit", Some(Op::Commit)),
    ("abort", Some(Op::Abort)),
    ("events", Some(Op::Events)),
    ("snapshot", Some(Op::Snapshot)),
    ("Status", None),
    ("", None),
    ("snapshot ", None),
    ("explode", None),
];

/// A `path` value.
#[derive(Debug, Arbitrary)]
enum PathValue {
    /// `/` then the text: absolute.
    Absolute(String),
    /// The text alone (relative unless it starts with `/`).
    Text(String),
    /// `..`, `.`, `~/x`: relative forms a shell would expand.
    Dots(u8),
    Null,
    Number(i64),
    Array,
    /// A long absolute path, towards the line limit.
    Long(u16),
}

impl PathValue {
    /// The JSON text, and the path the parser should see (`None`: no path
    /// or null; `Err`: not a string).
    fn json(&self) -> (String, Result<Option<PathBuf>, ()>) {
        let s = |p: String| {
            (
                serde_json::to_string(&p).unwrap(),
                Ok(Some(PathBuf::from(p))),
            )
        };
        match self {
            PathValue::Absolute(t) => s(format!("/{t}")),
            PathValue::Text(t) => s(t.clone()),
            PathValue::Dots(i) => {
                s(["..", ".", "~/x", "./a", "a/../b", ""][usize::from(*i) % 6].into())
            }
            PathValue::Null => ("null".into(), Ok(None)),
            PathValue::Number(n) => (n.to_string(), Err(())),
            PathValue::Array => ("[\"/a\"]".into(), Err(())),
            PathValue::Long(n) => s(format!("/{}", "d".repeat(usize::from(*n) % 5000))),
        }
    }
}

/// A request line built from the grammar, with the outcome it must get.
#[derive(Debug, Arbitrary)]
struct Wellformed {
    op: u8,
    path: Option<PathValue>,
    /// An unknown field, which the parser ignores.
    extra: Rare<(String, i32)>,
    path_first: bool,
    spaces: Rare<u8>,
}

impl Wellformed {
    /// The line, and whether it must parse (with its op and path).
    fn line(&self) -> (String, Want) {
        let (name, op) = OPS[usize::from(self.op) % OPS.len()];
        let sp = " ".repeat(usize::from(self.spaces.0.unwrap_or(0) % 4));
        let mut fields = vec![format!(
            "{sp}\"op\"{sp}:{sp}{}",
            serde_json::to_string(name).unwrap()
        )];
        let mut path = Ok(None);
        if let Some(p) = &self.path {
            let (text, want) = p.json();
            path = want;
            let f = format!("\"path\":{sp}{text}");
            if self.path_first {
                fields.insert(0, f);
            } else {
                fields.push(f);
            }
        }
        if let Some((k, v)) = &self.extra.0 {
            if k != "op" && k != "path" {
                fields.push(format!("{}:{v}", serde_json::to_string(k).unwrap()));
            }
        }
        let line = format!("{{{sp}{}{sp}}}", fields.join(","));
        let want = match (op, path) {
            (Some(op), Ok(p)) if p.as_ref().is_none_or(|p| p.is_absolute()) => Some((op, p)),
            _ => None,
        };
        let want = want.filter(|_| line.len() <= MAX_REQUEST);
        (line, want)
    }
}

/// A byte edit of a line. The byte is printable ASCII, JSON's
/// punctuation included, 15 times in 16; else it is 0xf0-0xff, which no
/// UTF-8 text holds.
#[derive(Debug, Arbitrary)]
enum Edit {
    Set(u16, u8),
    Insert(u16, u8),
    Remove(u16),
}

fn edit_byte(b: u8) -> u8 {
    match b {
        0xf0.. => b,
        _ => 0x20 + b % 0x5f,
    }
}

#[derive(Debug)]
enum Line {
    Raw(Bytes),
    Wellformed(Wellformed),
    Mutated(Wellformed, Seq<Edit>),
    /// A line of `x` around the limit: 8 bytes short of it, plus this
    /// modulo 16.
    Long(u16),
}

impl<'a> Arbitrary<'a> for Line {
    /// 45% well-formed lines, 30% edited ones, 15% raw bytes, 10% long.
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0..=19u8)? {
            0..=8 => Line::Wellformed(u.arbitrary()?),
            9..=14 => Line::Mutated(u.arbitrary()?, u.arbitrary()?),
            15..=17 => Line::Raw(u.arbitrary()?),
            _ => Line::Long(u.arbitrary()?),
        })
    }
}

impl Line {
    /// The bytes, and the outcome a well-formed line must get; `limit` is
    /// the line limit that `Long` lines straddle.
    fn bytes(&self, limit: usize) -> (Vec<u8>, Option<Want>) {
        match self {
            Line::Raw(b) => (b.0.clone(), None),
            Line::Wellformed(w) => {
                let (l, want) = w.line();
                (l.into_bytes(), Some(want))
            }
            Line::Mutated(w, edits) => {
                let mut b = w.line().0.into_bytes();
                for e in &edits.0 {
                    let at = |i: u16, n: usize| usize::from(i) % n.max(1);
                    match *e {
                        Edit::Set(i, v) if !b.is_empty() => {
                            let i = at(i, b.len());
                            b[i] = edit_byte(v);
                        }
                        Edit::Insert(i, v) => {
                            let i = at(i, b.len() + 1);
                            b.insert(i, edit_byte(v));
                        }
                        Edit::Remove(i) if !b.is_empty() => {
                            let i = at(i, b.len());
                            b.remove(i);
                        }
                        _ => {}
                    }
                }
                (b, None)
            }
            Line::Long(n) => {
                let n = limit - 8 + usize::from(*n) % 16;
                (vec![b'x'; n], Some(None))
            }
        }
    }
}

/// What `parse` must do with any line.
fn check_parse(line: &[u8], want: Option<Want>) {
    match parse(line) {
        Ok(req) => {
            assert!(
                line.len() <= MAX_REQUEST,
                "a line of {} bytes parsed",
                line.len()
            );
            assert!(
                std::str::from_utf8(line).is_ok(),
                "a line that is not UTF-8 parsed"
            );
            if let Some(p) = &req.path {
                assert!(p.is_absolute(), "relative path {} accepted", p.display());
            }
            // What was accepted writes back as the same request.
            let again = parse(serde_json::to_string(&req).unwrap().as_bytes())
                .expect("a request the parser accepted, written back");
            assert_eq!((again.op, again.path.as_ref()), (req.op, req.path.as_ref()));
            if let Some(want) = want {
                assert_eq!(
                    Some((req.op, req.path)),
                    want,
                    "{}",
                    String::from_utf8_lossy(line)
                );
            }
        }
        Err(e) => {
            assert!(
                e.starts_with("bad request: "),
                "error without its prefix: {e}"
            );
            if line.len() > MAX_REQUEST {
                assert!(e.contains("longer than"), "{e}");
            }
            if let Some(Some(w)) = want {
                panic!(
                    "{:?} refused ({e}), expected {w:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

#[test]
fn api_parse_any_line() {
    Target {
        name: "api_parse_any_line",
        default_cases: 100_000,
        max_len: 2048,
    }
    .run(|l: Line| {
        let (bytes, want) = l.bytes(MAX_REQUEST);
        check_parse(&bytes, want);
    });
}

// ---------------------------------------------------------------------
// The server, on a socket, with a controller that answers every call.

/// Line limit of the server under test: small, so that long lines are
/// cheap to send.
const SERVER_MAX: usize = 256;

struct Server {
    _server: ApiServer,
    events: tokio::sync::broadcast::Sender<SpecEvent>,
    path: PathBuf,
    dir: PathBuf,
}

impl Server {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("specvm-fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (tx, rx) = std::sync::mpsc::channel::<ApiCall>();
        let to_vm: ToVm = std::sync::Arc::new(move |c| tx.send(c).is_ok());
        let limits = Limits {
            max_request: SERVER_MAX,
            idle: Duration::from_secs(10),
            write: Duration::from_secs(10),
        };
        let server = start_with(&path, &Default::default(), limits, to_vm).unwrap();
        std::thread::spawn(move || {
            while let Ok(c) = rx.recv() {
                let _ = c.reply.send(Response {
                    ok: true,
                    depth: Some(3),
                    ..Default::default()
                });
            }
        });
        Self {
            events: server.events.clone(),
            _server: server,
            path,
            dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client's bytes: lines, each ended by a newline or now and then not
/// (then the next line's bytes follow it), written in pieces of any size.
#[derive(Debug, Arbitrary)]
struct Conversation {
    lines: Seq<(Line, Rare<()>)>,
    pieces: Seq<u16>,
}

/// The answers the server owes `bytes`, in order: `Ok(true)` an answer
/// with ok, `Ok(false)` a bad request, `Err(())` the long-line error that
/// ends the connection. An `events` request ends the answers too.
fn expected_answers(bytes: &[u8]) -> Vec<Result<bool, ()>> {
    let mut out = Vec::new();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    for line in lines {
        if line.len() > SERVER_MAX {
            out.push(Err(()));
            break;
        }
        match parse(line) {
            Ok(Request { op: Op::Events, .. }) => break,
            Ok(_) => out.push(Ok(true)),
            Err(_) => out.push(Ok(false)),
        }
    }
    out
}

#[test]
fn api_server_any_stream() {
    let server = Server::start();
    Target {
        name: "api_server_any_stream",
        default_cases: 2_000,
        max_len: 4096,
    }
    .run(|c: Conversation| {
        let mut bytes = Vec::new();
        for (line, no_newline) in &c.lines.0 {
            bytes.extend(line.bytes(SERVER_MAX).0);
            if no_newline.0.is_none() {
                bytes.push(b'\n');
            }
        }
        let want = expected_answers(&bytes);
        let s = UnixStream::connect(&server.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server answers as it reads: read while writing.
        let reader = {
            let s = s.try_clone().unwrap();
            let n = want.len();
            std::thread::spawn(move || {
                let mut rd = BufReader::new(s);
                let mut got = Vec::new();
                let mut line = String::new();
                while got.len() < n && rd.read_line(&mut line).unwrap_or(0) > 0 {
                    got.push(line.clone());
                    line.clear();
                }
                got
            })
        };
        let mut w = &s;
        let mut at = 0;
        for (i, p) in c
            .pieces
            .0
            .iter()
            .chain(std::iter::repeat(&u16::MAX))
            .enumerate()
        {
            if at >= bytes.len() {
                break;
            }
            let end = (at + 1 + usize::from(*p) % 512).min(bytes.len());
            // The server may close after a long line: writes then fail.
            if w.write_all(&bytes[at..end]).is_err() {
                break;
            }
            at = end;
            if i % 8 == 7 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len(), "answers {got:?}, expected {want:?}");
        for (g, w) in got.iter().zip(&want) {
            let r: Response = serde_json::from_str(g).unwrap_or_else(|e| panic!("{g:?}: {e}"));
            match w {
                Ok(true) => assert_eq!((r.ok, r.depth), (true, Some(3)), "{g}"),
                Ok(false) => {
                    assert!(
                        !r.ok && r.error.as_ref().unwrap().starts_with("bad request"),
                        "{g}"
                    )
                }
                Err(()) => assert!(r.error.unwrap().contains("longer than"), "{g}"),
            }
        }
        // An `events` client that left is only noticed at the next event.
        let _ = server.events.send(SpecEvent {
            event: "speculate".into(),
            id: "1:1".into(),
            depth: 1,
            by: "host".into(),
        });
    });
}
