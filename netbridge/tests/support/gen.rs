//! Generators shared by the port-protocol and bridge fuzz targets
//! (`fuzz_protocol.rs`, `fuzz_bridge.rs`): control messages, JSON near
//! their grammar, byte edits, messages, and UDP frames tagged with ids
//! from a small pool.

#![allow(dead_code)]

use arbitrary::Arbitrary;
use specwire::codec::{self, SpecId};
use specwire::protocol::{encode_control, Control, Outcome, KIND_CONTROL, MAX_MESSAGE};

use super::fuzz::{Bytes, Seq};

#[derive(Debug, Clone, Arbitrary)]
pub enum AnyControl {
    Hello(u32, bool),
    Welcome(u32),
    Started(u64),
    Joined(Seq<u64>),
    Resolved(u64, bool),
    Decided(u64, bool, u64, bool),
    Ack(u64),
    Renew,
    Resume(Seq<u64>, Seq<u64>, Seq<u64>, bool),
}

pub fn outcome(commit: bool) -> Outcome {
    if commit {
        Outcome::Commit
    } else {
        Outcome::Abort
    }
}

impl AnyControl {
    pub fn to_control(&self) -> Control {
        match self.clone() {
            AnyControl::Hello(vm, speculative) => Control::Hello { vm, speculative },
            AnyControl::Welcome(next_seq) => Control::Welcome {
                next_seq,
                lease_ms: 1000,
            },
            AnyControl::Renew => Control::Renew,
            AnyControl::Resume(started, joined, decided, commit) => Control::Resume {
                started: started.0.into_iter().map(SpecId::from).collect(),
                joined: joined.0.into_iter().map(SpecId::from).collect(),
                outcomes: decided
                    .0
                    .into_iter()
                    .map(|id| specwire::protocol::Decision {
                        id: id.into(),
                        outcome: outcome(commit),
                    })
                    .collect(),
            },
            AnyControl::Started(id) => Control::Started { id: id.into() },
            AnyControl::Joined(ids) => Control::Joined {
                ids: ids.0.into_iter().map(SpecId::from).collect(),
            },
            AnyControl::Resolved(id, c) => Control::Resolved {
                id: id.into(),
                outcome: outcome(c),
            },
            AnyControl::Decided(id, c, seq, refused) => Control::Decided {
                id: id.into(),
                outcome: outcome(c),
                seq,
                refused,
            },
            AnyControl::Ack(seq) => Control::Ack { seq },
        }
    }
}

/// A JSON value near the control grammar: the right keys with values of
/// every JSON type, numbers at and past the integer limits.
#[derive(Debug, Arbitrary)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big(u64, u8),
    Float(f64),
    Str(Bytes),
    Known(u8),
    Array(Seq<Json>),
    Object(Seq<(u8, Json)>),
}

const KEYS: &[&str] = &[
    "type",
    "vm",
    "speculative",
    "next_seq",
    "id",
    "ids",
    "outcome",
    "seq",
    "Type",
    "",
];
const WORDS: &[&str] = &[
    "hello", "welcome", "started", "joined", "resolved", "decided", "ack", "commit", "abort",
    "Hello", "COMMIT", "nope", "\u{0}", "\\u0000", "é",
];

impl Json {
    fn write(&self, out: &mut String, depth: usize) {
        if depth > 6 {
            out.push_str("null");
            return;
        }
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => out.push_str(&i.to_string()),
            // Past u64: 18446744073709551615 with digits after it.
            Json::Big(v, extra) => out.push_str(&format!("{v}{}", "9".repeat(*extra as usize % 4))),
            Json::Float(f) => out.push_str(&format!("{f:e}")),
            Json::Str(b) => {
                out.push_str(&serde_json::to_string(&String::from_utf8_lossy(&b.0)).unwrap())
            }
            Json::Known(w) => out.push_str(&format!("{:?}", WORDS[*w as usize % WORDS.len()])),
            Json::Array(v) => {
                out.push('[');
                for (i, x) in v.0.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.write(out, depth + 1);
                }
                out.push(']');
            }
            Json::Object(kv) => {
                out.push('{');
                for (i, (k, v)) in kv.0.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!("{:?}:", KEYS[*k as usize % KEYS.len()]));
                    v.write(out, depth + 1);
                }
                out.push('}');
            }
        }
    }
}

/// A byte edit of an encoded message.
#[derive(Debug, Arbitrary)]
pub enum Edit {
    Set(u16, u8),
    Insert(u16, u8),
    Remove(u16),
    Truncate(u16),
}

pub fn apply(msg: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        let at = |i: u16, n: usize| usize::from(i) % n.max(1);
        match *e {
            Edit::Set(i, b) if !msg.is_empty() => {
                let i = at(i, msg.len());
                msg[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = at(i, msg.len() + 1);
                msg.insert(i, b);
            }
            Edit::Remove(i) if !msg.is_empty() => {
                let i = at(i, msg.len());
                msg.remove(i);
            }
            Edit::Truncate(i) => msg.truncate(at(i, msg.len() + 1)),
            _ => {}
        }
    }
}

/// One message as the bridge or a VMM could receive it.
#[derive(Debug, Arbitrary)]
pub enum AnyMessage {
    Raw(Bytes),
    Control(AnyControl),
    Mutated(AnyControl, Seq<Edit>),
    Json(Json),
    /// `[[[...` or `{"a":{"a":...` that deep: the parser must not recurse
    /// into a stack overflow.
    Deep {
        depth: u16,
        object: bool,
    },
}

impl AnyMessage {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            AnyMessage::Raw(b) => b.0.clone(),
            AnyMessage::Control(c) => encode_control(&c.to_control()),
            AnyMessage::Mutated(c, edits) => {
                let mut m = encode_control(&c.to_control());
                apply(&mut m, &edits.0);
                m
            }
            AnyMessage::Json(j) => {
                let mut s = String::new();
                j.write(&mut s, 0);
                [&[KIND_CONTROL][..], s.as_bytes()].concat()
            }
            AnyMessage::Deep { depth, object } => {
                let open = if *object { "{\"a\":" } else { "[" };
                let n = usize::from(*depth) % (MAX_MESSAGE / open.len());
                [&[KIND_CONTROL][..], open.repeat(n).as_bytes()].concat()
            }
        }
    }
}

/// `decode` on any bytes: no panic, and the answer follows the kind byte.
/// Ports, VMs and ids come from small pools, so that operations collide.
pub const IDS_VMS: u64 = 4;
pub const IDS_SEQS: u64 = 4;

pub fn small_id(i: u8) -> SpecId {
    let i = u64::from(i);
    SpecId::from_u64(((i % IDS_VMS) << 32) | ((i / IDS_VMS) % IDS_SEQS))
}

pub fn mac(n: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, n % 4]
}

/// A frame a port sends.
#[derive(Debug, Arbitrary)]
pub enum AnyFrame {
    Raw(Bytes),
    /// A UDP/IPv4 frame between two of four hosts (or broadcast), tagged
    /// with one or more ids from the pool.
    Udp(Udp),
    /// The same with bytes edited afterwards.
    Mangled(Udp, Seq<Edit>),
}

#[derive(Debug, Arbitrary)]
pub struct Udp {
    /// Host 0-3.
    pub src: u8,
    /// Host 0-3, or broadcast.
    pub dst: Option<u8>,
    /// Payload bytes, modulo 3000.
    pub payload: u16,
    /// The first id of the tag ([`small_id`]).
    pub tag: u8,
    /// Up to two more.
    pub more_tags: Option<(u8, Option<u8>)>,
}

impl Udp {
    pub fn bytes(&self) -> Vec<u8> {
        let dst_mac = self.dst.map_or([0xff; 6], mac);
        let b = etherparse::PacketBuilder::ethernet2(mac(self.src), dst_mac)
            .ipv4(
                [10, 0, 0, self.src % 4],
                [10, 0, 0, self.dst.unwrap_or(255)],
                64,
            )
            .udp(1000, 2000);
        let mut f = Vec::new();
        b.write(&mut f, &vec![0x5a; usize::from(self.payload) % 3000])
            .unwrap();
        let (more, most) = match self.more_tags {
            Some((a, b)) => (Some(a), b),
            None => (None, None),
        };
        let mut ids: Vec<SpecId> = [Some(self.tag), more, most]
            .into_iter()
            .flatten()
            .map(small_id)
            .collect();
        ids.sort();
        ids.dedup();
        ids.truncate(codec::MAX_IDS);
        codec::retag(&f, &ids).unwrap()
    }
}

impl AnyFrame {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            AnyFrame::Raw(b) => b.0.clone(),
            AnyFrame::Udp(u) => u.bytes(),
            AnyFrame::Mangled(u, edits) => {
                let mut f = u.bytes();
                apply(&mut f, &edits.0);
                f
            }
        }
    }
}
