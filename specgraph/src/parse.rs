//! Reading event streams: the bridge's (`docs/netbridge.md`, "Events") and
//! the VMM's (`docs/control-api.md`, `{"op":"events"}`), one JSON object a
//! line. A line that is neither is skipped and counted with the reason,
//! never a panic: the streams are files a user hands us, cut short, mixed
//! up or edited.

use std::io::BufRead;

use serde::Deserialize;
use specwire::SpecId;

/// The longest line read. The bridge's and the VMM's lines are under 200
/// bytes; a longer one is skipped as malformed without being kept whole,
/// so a file with no newline cannot make us hold it all.
pub const LINE_MAX: usize = 64 * 1024;

/// The bridge's event kinds (`netbridge/src/bridge.rs`, `Event`).
pub const BRIDGE_KINDS: [&str; 10] = [
    "started",
    "joined",
    "committed",
    "aborted",
    "acked",
    "refused",
    "forged",
    "lease-expired",
    "port-up",
    "port-down",
];

/// The VMM's event kinds (`vmm/src/api.rs`, `SpecEvent`).
pub const VM_KINDS: [&str; 6] = ["speculate", "commit", "abort", "join", "rollback", "budget"];

/// One event of a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeEvent {
    /// One of [`BRIDGE_KINDS`].
    pub kind: &'static str,
    /// The speculation, if the event names one.
    pub id: Option<SpecId>,
    /// The bridge's port.
    pub port: u64,
    /// When the bridge recorded it (µs since the Unix epoch), if the
    /// stream says (bridges before this field did not).
    pub us: Option<u64>,
}

/// One event of a VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    /// One of [`VM_KINDS`].
    pub kind: &'static str,
    /// The speculation; none for `budget`.
    pub id: Option<SpecId>,
    /// `guest`, `host` or `network`.
    pub by: String,
}

/// What one good line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A bridge event.
    Bridge(BridgeEvent),
    /// A VMM event.
    Vm(VmEvent),
    /// The bridge dropped this many events for a slow reader.
    Lagged(u64),
    /// The VMM dropped events for a slow reader (its error line).
    VmGap,
    /// A well-formed event of a kind this tool does not draw (a newer
    /// bridge's, say): counted in the page by kind.
    Unknown(String),
}

/// A line skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number.
    pub line: u64,
    /// Why, in a few words (never the line itself at length).
    pub reason: String,
}

/// One stream, read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The good lines, with their 1-based line numbers, in order.
    pub records: Vec<(u64, Record)>,
    /// How many lines were skipped as malformed.
    pub malformed: u64,
    /// The first [`Parsed::EXAMPLES`] of them.
    pub examples: Vec<Malformed>,
}

impl Parsed {
    /// How many malformed lines are described, at most.
    pub const EXAMPLES: usize = 20;

    fn skip(&mut self, line: u64, reason: String) {
        self.malformed += 1;
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push(Malformed { line, reason });
        }
    }
}

/// The fields either stream's lines may have. Unknown fields are ignored
/// (a newer bridge may add some); a known field of the wrong type makes
/// the line malformed.
#[derive(Deserialize)]
struct Raw {
    event: Option<String>,
    id: Option<String>,
    port: Option<u64>,
    us: Option<u64>,
    dropped: Option<u64>,
    depth: Option<u64>,
    by: Option<String>,
    ok: Option<bool>,
    error: Option<String>,
}

/// Reads a whole stream. Fails only if reading fails; bad lines are
/// counted in the result.
pub fn read_stream(mut input: impl BufRead) -> std::io::Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let (read_any, too_long) = read_line(&mut input, &mut buf)?;
        if !read_any {
            return Ok(parsed);
        }
        line_no += 1;
        if too_long {
            parsed.skip(line_no, format!("longer than {LINE_MAX} bytes"));
            continue;
        }
        match parse_line(&buf) {
            Ok(None) => {}
            Ok(Some(r)) => parsed.records.push((line_no, r)),
            Err(reason) => parsed.skip(line_no, reason),
        }
    }
}

/// Reads one line (without its `\n`) into `buf`, keeping at most
/// [`LINE_MAX`] bytes of it. Returns whether anything was read, and
/// whether the line was longer. `BufRead::read_until` would keep it all.
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<(bool, bool)> {
    let mut read_any = false;
    let mut too_long = false;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok((read_any, too_long));
        }
        read_any = true;
        let (part, used, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = LINE_MAX.saturating_sub(buf.len());
        if part.len() > room {
            too_long = true;
        }
        buf.extend_from_slice(&part[..part.len().min(room)]);
        input.consume(used);
        if end {
            return Ok((true, too_long));
        }
    }
}

/// One line: `Ok(None)` for a blank line, a record, or why it is bad.
pub fn parse_line(line: &[u8]) -> Result<Option<Record>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| {
        // serde_json's message names the place, never quotes the input.
        format!("not an event object: {e}")
    })?;
    if raw.ok == Some(false) {
        return match raw.error {
            Some(_) => Ok(Some(Record::VmGap)),
            None => Err("an error line without an error".into()),
        };
    }
    let Some(event) = raw.event else {
        return Err("no \"event\"".into());
    };
    if event == "lagged" {
        return match raw.dropped {
            Some(n) => Ok(Some(Record::Lagged(n))),
            None => Err("lagged without \"dropped\"".into()),
        };
    }
    if let Some(&kind) = BRIDGE_KINDS.iter().find(|k| **k == event) {
        let port = raw.port.ok_or_else(|| format!("{kind} without \"port\""))?;
        let id = match raw.id.as_deref() {
            Some(s) => Some(parse_id(s)?),
            None if needs_id(kind) => return Err(format!("{kind} without \"id\"")),
            None => None,
        };
        return Ok(Some(Record::Bridge(BridgeEvent {
            kind,
            id,
            port,
            us: raw.us,
        })));
    }
    if let Some(&kind) = VM_KINDS.iter().find(|k| **k == event) {
        let (Some(by), Some(_depth)) = (raw.by, raw.depth) else {
            return Err(format!("{kind} without \"by\" and \"depth\""));
        };
        let id = match raw.id.as_deref() {
            // `budget` names no speculation: its id is empty.
            Some("") | None if kind == "budget" => None,
            Some(s) => Some(parse_id(s)?),
            None => return Err(format!("{kind} without \"id\"")),
        };
        return Ok(Some(Record::Vm(VmEvent { kind, id, by })));
    }
    if event.is_empty() || event.len() > 64 {
        return Err("an empty or overlong event kind".into());
    }
    Ok(Some(Record::Unknown(event)))
}

/// Bridge events that always name a speculation.
fn needs_id(kind: &str) -> bool {
    matches!(
        kind,
        "started" | "joined" | "committed" | "aborted" | "acked"
    )
}

fn parse_id(s: &str) -> Result<SpecId, String> {
    s.parse::<SpecId>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Option<Record>, String> {
        parse_line(line.as_bytes())
    }

    #[test]
    fn bridge_lines_with_and_without_time() {
        let r = one(r#"{"event":"joined","id":"1:2","port":3,"us":1700000000000123}"#);
        assert_eq!(
            r,
            Ok(Some(Record::Bridge(BridgeEvent {
                kind: "joined",
                id: Some(SpecId::new(1, 2)),
                port: 3,
                us: Some(1_700_000_000_000_123),
            })))
        );
        let r = one(r#"{"event":"port-up","port":1}"#);
        assert_eq!(
            r,
            Ok(Some(Record::Bridge(BridgeEvent {
                kind: "port-up",
                id: None,
                port: 1,
                us: None,
            })))
        );
        assert_eq!(
            one(r#"{"event":"lagged","dropped":7}"#),
            Ok(Some(Record::Lagged(7)))
        );
    }

    #[test]
    fn vm_lines() {
        let r = one(r#"{"event":"rollback","id":"1:1","depth":0,"by":"network"}"#);
        assert_eq!(
            r,
            Ok(Some(Record::Vm(VmEvent {
                kind: "rollback",
                id: Some(SpecId::new(1, 1)),
                by: "network".into(),
            })))
        );
        let r = one(r#"{"event":"budget","id":"","depth":3,"by":"guest"}"#);
        assert!(matches!(r, Ok(Some(Record::Vm(VmEvent { id: None, .. })))));
        let r = one(r#"{"ok":false,"error":"3 events were dropped: slow"}"#);
        assert_eq!(r, Ok(Some(Record::VmGap)));
    }

    #[test]
    fn bad_lines_say_why() {
        for (line, why) in [
            ("{", "not an event object"),
            ("[1,2]", "not an event object"),
            (r#"{"event":"joined","port":1}"#, "joined without \"id\""),
            (
                r#"{"event":"joined","id":"1:x","port":1}"#,
                "not of the form",
            ),
            (r#"{"event":"joined","id":"1:1"}"#, "without \"port\""),
            (r#"{"event":"joined","id":"1:1","port":-1}"#, "not an event"),
            (
                r#"{"event":"started","id":"4294967296:1","port":1}"#,
                "not of the form",
            ),
            (r#"{"id":"1:1","port":1}"#, "no \"event\""),
            (r#"{"event":"commit","id":"1:1"}"#, "without \"by\""),
            (r#"{"event":""}"#, "empty"),
        ] {
            match one(line) {
                Err(e) => assert!(e.contains(why), "{line}: {e}"),
                Ok(r) => panic!("{line} was taken: {r:?}"),
            }
        }
        assert!(one("\u{0}\u{ff}").is_err());
        assert_eq!(parse_line(&[0xff, 0xfe]), Err("not UTF-8".into()));
        assert_eq!(one("   "), Ok(None));
        assert_eq!(
            one(r#"{"event":"peer-up","peer":"x"}"#),
            Ok(Some(Record::Unknown("peer-up".into())))
        );
    }

    #[test]
    fn a_stream_counts_what_it_skips() {
        let text = format!(
            "{}\n\nnot json\n{}\n{}\n{}",
            r#"{"event":"started","id":"1:1","port":1,"us":5}"#,
            r#"{"event":"committed","id":"1:1","port":1,"us":9}"#,
            "x".repeat(LINE_MAX + 10),
            // The last line may lack its newline (a stream cut short).
            r#"{"event":"port-down","port":1}"#
        );
        let p = read_stream(text.as_bytes()).expect("reading a slice");
        assert_eq!(p.records.len(), 3);
        assert_eq!(p.records[1].0, 4);
        assert_eq!(p.records[2].0, 6);
        assert_eq!(p.malformed, 2);
        assert_eq!(p.examples[0].line, 3);
        assert_eq!(p.examples[1].line, 5);
        assert!(p.examples[1].reason.contains("longer than"));
    }

    #[test]
    fn a_line_is_read_whole_across_small_buffers() {
        let text = "{\"event\":\"port-up\",\"port\":12}\n{\"event\":\"port-up\",\"port\":13}\n";
        let reader = std::io::BufReader::with_capacity(3, text.as_bytes());
        let p = read_stream(reader).expect("reading a slice");
        assert_eq!(p.malformed, 0);
        assert_eq!(p.records.len(), 2);
    }
}
