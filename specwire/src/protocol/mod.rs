//! The port protocol between a VMM and the bridge.
//!
//! A VMM connects to the bridge's Unix stream socket. Each message is a
//! 4-byte little-endian length, then that many bytes, the first of which
//! says what the message is:
//! - `0x00` then an Ethernet frame;
//! - `0x01` then one control message, JSON ([`Control`]).
//!
//! The first message of a connection must be a [`Control::Hello`].
//! See `docs/netbridge.md`.
//!
//! Messages are read and written whole, length checks included, by
//! [`read_message`] and [`write_message`] on blocking streams, and by
//! [`read_message_async`] and [`write_message_async`] on tokio ones
//! (feature `tokio`).

use serde::{Deserialize, Serialize};

mod stream;

pub use stream::{read_message, write_message, MessageError};
#[cfg(feature = "tokio")]
pub use stream::{read_message_async, write_message_async};

/// Kind byte of a frame message.
pub const KIND_FRAME: u8 = 0;
/// Kind byte of a control message.
pub const KIND_CONTROL: u8 = 1;
/// Largest message: a kind byte and a 64 KiB frame, with room to spare.
/// A longer length prefix is a protocol error that closes the port.
pub const MAX_MESSAGE: usize = 65_600;

/// A speculation id as the protocol carries it: [`SpecId`](crate::SpecId),
/// a JSON number on the wire (`(vm << 32) | seq`).
pub type Id = crate::SpecId;

/// How a speculation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Kept.
    Commit,
    /// Rolled back.
    Abort,
}

/// The lease a bridge gives when it says nothing (an older bridge).
pub const DEFAULT_LEASE_MS: u32 = 1000;

fn default_lease_ms() -> u32 {
    DEFAULT_LEASE_MS
}

/// Most decisions a [`Control::Resume`] carries: the VMM remembers its
/// last this many outcomes. With the largest started and joined lists it
/// stays well under [`MAX_MESSAGE`].
pub const RESUME_OUTCOMES_MAX: usize = 1024;

/// One decision of an owner, as [`Control::Resume`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The speculation.
    pub id: Id,
    /// Its outcome.
    pub outcome: Outcome,
}

/// A control message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    /// VMM → bridge, first: who this port is. A port that cannot roll back
    /// (`speculative: false`) gets tagged frames only once every id in the
    /// tag has committed (output commit, rule 11).
    Hello {
        /// The VM's id (the high half of its speculation ids).
        vm: u32,
        /// Whether the port's VM takes part in speculations.
        speculative: bool,
    },
    /// Bridge → VMM, the answer to hello: the first sequence number the VM
    /// may use for its speculation ids (past every id of its VM id that the
    /// bridge has seen, so ids never repeat on this bridge).
    Welcome {
        /// The first sequence number.
        next_seq: u32,
        /// The port's lease in milliseconds: the bridge takes a port that
        /// sends nothing for this long for a hung VMM and closes it (rules
        /// 9, 13). The VMM renews at a third of it. Absent from an older
        /// bridge: [`DEFAULT_LEASE_MS`].
        #[serde(default = "default_lease_ms")]
        lease_ms: u32,
    },
    /// VMM → bridge: the VMM is alive; renews its lease. Any message
    /// renews it; a VMM with nothing else to say sends this at a third of
    /// the lease.
    Renew,
    /// VMM → bridge, after a reconnect (the bridge restarted, or the
    /// connection was lost): what the VMM holds, so the bridge can rebuild
    /// its soft state (docs/netbridge.md, "Restart"). The VMMs are the
    /// source of truth.
    Resume {
        /// Open speculations this VM started.
        started: Vec<Id>,
        /// Speculations of other VMs this VM joined and still holds.
        joined: Vec<Id>,
        /// The VM's latest decisions on its own speculations (at most
        /// [`RESUME_OUTCOMES_MAX`]), old ones included: any may not have
        /// reached a member before the old connection ended.
        outcomes: Vec<Decision>,
    },
    /// VMM → bridge: the VM started speculation `id` (it is the owner).
    Started {
        /// The speculation.
        id: Id,
    },
    /// VMM → bridge: the VM joined these speculations (rule 2).
    Joined {
        /// The speculations.
        ids: Vec<Id>,
    },
    /// VMM → bridge: the owner decided (rules 3, 5, 8).
    Resolved {
        /// The speculation.
        id: Id,
        /// Its outcome.
        outcome: Outcome,
    },
    /// Bridge → VMM: a speculation the VM joined has ended (rules 4, 6).
    /// The VMM answers with [`Control::Ack`] once it has acted.
    Decided {
        /// The speculation.
        id: Id,
        /// Its outcome.
        outcome: Outcome,
        /// Sequence number to acknowledge.
        seq: u64,
        /// To the owner, with an abort: its start was refused (the bridge's
        /// registry could not record it), so the speculation never began.
        /// Absent (false) otherwise, and from an older bridge.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        refused: bool,
    },
    /// VMM → bridge: a [`Control::Decided`] was carried out.
    Ack {
        /// Its sequence number.
        seq: u64,
    },
}

impl Control {
    /// [`Control::Decided`] of an outcome: the usual one, not a refusal.
    pub fn decided(id: Id, outcome: Outcome, seq: u64) -> Self {
        Self::Decided {
            id,
            outcome,
            seq,
            refused: false,
        }
    }
}

/// Errors decoding a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// An empty message.
    #[error("empty message")]
    Empty,
    /// The kind byte is unknown.
    #[error("unknown message kind {0:#04x}")]
    Kind(u8),
    /// The control message is not valid JSON of a known type.
    #[error("bad control message: {0}")]
    Control(String),
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// An Ethernet frame.
    Frame(Vec<u8>),
    /// A control message.
    Control(Control),
}

/// Decodes one received message.
pub fn decode(msg: &[u8]) -> Result<Message, ProtocolError> {
    match msg.split_first() {
        None => Err(ProtocolError::Empty),
        Some((&KIND_FRAME, f)) => Ok(Message::Frame(f.to_vec())),
        Some((&KIND_CONTROL, c)) => serde_json::from_slice(c)
            .map(Message::Control)
            .map_err(|e| ProtocolError::Control(e.to_string())),
        Some((&k, _)) => Err(ProtocolError::Kind(k)),
    }
}

/// Encodes a frame message, without its length prefix.
pub fn encode_frame(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(frame.len() + 1);
    v.push(KIND_FRAME);
    v.extend_from_slice(frame);
    v
}

/// Encodes a control message, without its length prefix.
pub fn encode_control(c: &Control) -> Vec<u8> {
    let mut v = vec![KIND_CONTROL];
    // Serializing these plain enums cannot fail.
    v.extend(serde_json::to_vec(c).unwrap_or_default());
    v
}

/// Prefixes a message with its length, ready to write. It does not check
/// the length: [`write_message`] does, and tests build bad messages with
/// this.
pub fn framed(msg: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(msg.len() + 4);
    v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    v.extend_from_slice(msg);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let f = vec![1, 2, 3];
        assert_eq!(decode(&encode_frame(&f)), Ok(Message::Frame(f)));
        for c in [
            Control::Hello {
                vm: 3,
                speculative: true,
            },
            Control::Welcome {
                next_seq: 5,
                lease_ms: 300,
            },
            Control::Renew,
            Control::Resume {
                started: vec![Id::new(3, 1)],
                joined: vec![Id::new(1, 1)],
                outcomes: vec![Decision {
                    id: Id::new(3, 0),
                    outcome: Outcome::Commit,
                }],
            },
            Control::Started { id: Id::new(0, 7) },
            Control::Joined {
                ids: vec![Id::new(0, 1), Id::new(1, 2)],
            },
            Control::Resolved {
                id: Id::new(u32::MAX, 9),
                outcome: Outcome::Abort,
            },
            Control::Decided {
                id: Id::new(3, 9),
                outcome: Outcome::Commit,
                seq: 4,
                refused: false,
            },
            Control::Decided {
                id: Id::new(3, 10),
                outcome: Outcome::Abort,
                seq: 5,
                refused: true,
            },
            Control::Ack { seq: 4 },
        ] {
            assert_eq!(decode(&encode_control(&c)), Ok(Message::Control(c)));
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(decode(&[]), Err(ProtocolError::Empty));
        assert_eq!(decode(&[7, 1]), Err(ProtocolError::Kind(7)));
        assert!(matches!(
            decode(b"\x01{\"type\":\"nope\"}"),
            Err(ProtocolError::Control(_))
        ));
        assert!(matches!(
            decode(b"\x01not json"),
            Err(ProtocolError::Control(_))
        ));
    }

    #[test]
    fn wire_form_is_readable() {
        let v = encode_control(&Control::Resolved {
            id: Id::new(0, 1),
            outcome: Outcome::Commit,
        });
        assert_eq!(&v[1..], br#"{"type":"resolved","id":1,"outcome":"commit"}"#);
    }

    #[test]
    fn an_older_welcome_means_the_default_lease() {
        assert_eq!(
            decode(b"\x01{\"type\":\"welcome\",\"next_seq\":4}"),
            Ok(Message::Control(Control::Welcome {
                next_seq: 4,
                lease_ms: DEFAULT_LEASE_MS
            }))
        );
        assert_eq!(
            &encode_control(&Control::Renew)[1..],
            br#"{"type":"renew"}"#
        );
    }

    /// The largest resume a VMM sends fits one message.
    #[test]
    fn the_largest_resume_fits() {
        let big = Id::new(u32::MAX, u32::MAX);
        let m = encode_control(&Control::Resume {
            started: vec![big; 64],
            joined: vec![big; 256],
            outcomes: vec![
                Decision {
                    id: big,
                    outcome: Outcome::Commit
                };
                RESUME_OUTCOMES_MAX
            ],
        });
        assert!(m.len() < MAX_MESSAGE, "{}", m.len());
    }

    #[test]
    fn ids_are_json_numbers() {
        let v = encode_control(&Control::Joined {
            ids: vec![Id::new(1, 2), Id::new(0, 3)],
        });
        assert_eq!(&v[1..], br#"{"type":"joined","ids":[4294967298,3]}"#);
        let d = decode(b"\x01{\"type\":\"started\",\"id\":8589934593}");
        assert_eq!(
            d,
            Ok(Message::Control(Control::Started { id: Id::new(2, 1) }))
        );
        // An id that is not a u64 is a bad message, as it was.
        assert!(decode(b"\x01{\"type\":\"started\",\"id\":\"2:1\"}").is_err());
    }
}
