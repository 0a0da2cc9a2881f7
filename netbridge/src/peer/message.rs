//! The control messages bridges exchange over the peering (docs/netbridge.md,
//! "Peering"): outcomes of speculations, and which ones a bridge still
//! waits for.
//!
//! They travel in VXLAN packets of the *control VNI* (the frames' VNI plus
//! one, so that no VM's frame can ever be read as one), as an Ethernet
//! frame of the IEEE local experimental EtherType 0x88B5 whose payload is
//! one JSON object: a packet capture decodes them as VXLAN and Ethernet,
//! and the JSON reads as the bridge's own port protocol does.

use serde::{Deserialize, Serialize};

use crate::protocol::{Decision, Id};

/// The EtherType of a control message's frame: IEEE 802 local
/// experimental EtherType 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// Ids in one `hold` or `open` message: its JSON stays under about
/// 1,100 bytes, one unfragmented datagram on a 1,500-byte path.
pub const IDS_PER_MESSAGE: usize = 48;
/// Outcomes in one `decided` message, likewise.
pub const DECISIONS_PER_MESSAGE: usize = 20;

/// A control message between peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PeerMessage {
    /// How speculations ended: sent to every peer that was sent a frame
    /// tagged with one of them, at once, and as the answer to `hold`.
    Decided {
        /// The outcomes.
        outcomes: Vec<Decision>,
    },
    /// "I still wait for the outcome of these": sent every
    /// [`HOLD_INTERVAL`](super::HOLD_INTERVAL) for the open ids whose
    /// owner is not on the sender, to the peer they came from (to every
    /// peer for those whose peer it does not know, after a restart).
    Hold {
        /// The ids.
        ids: Vec<Id>,
    },
    /// As `hold`, for open ids whose peer the sender does not know (after
    /// its restart): asked of every peer, and answered only with what the
    /// receiver knows (never "aborted because absent", which only the
    /// owner's side may say).
    Find {
        /// The ids.
        ids: Vec<Id>,
    },
    /// The answer to `hold` and `find` for ids open on the receiver: the sender
    /// of `hold` learns which peer to ask, and this peer tells it the
    /// outcome when it comes.
    Open {
        /// The ids.
        ids: Vec<Id>,
    },
}

/// Why a control frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not of [`ETHERTYPE`].
    #[error("a control frame of EtherType {0:#06x}, not 0x88b5")]
    EtherType(u16),
    /// Its JSON is not a control message.
    #[error("a control frame whose JSON is not a control message: {0}")]
    Json(#[from] serde_json::Error),
}

/// The message as an Ethernet frame (no addresses: it is never switched).
pub fn encode(m: &PeerMessage) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    // Serializing these plain types cannot fail.
    f.extend(serde_json::to_vec(m).unwrap_or_default());
    f
}

/// The message in an Ethernet frame. Never panics, whatever the bytes.
pub fn decode(frame: &[u8]) -> Result<PeerMessage, MessageError> {
    let kind = match frame.get(12..14) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => 0,
    };
    if kind != ETHERTYPE {
        return Err(MessageError::EtherType(kind));
    }
    Ok(serde_json::from_slice(&frame[14..])?)
}

/// `hold`, `find` or `open` messages (by `make`) for `ids`, at most
/// [`IDS_PER_MESSAGE`] each.
pub fn chunk_ids(ids: &[Id], make: fn(Vec<Id>) -> PeerMessage) -> Vec<PeerMessage> {
    ids.chunks(IDS_PER_MESSAGE)
        .map(|c| make(c.to_vec()))
        .collect()
}

/// `decided` messages for `outcomes`, at most [`DECISIONS_PER_MESSAGE`]
/// each.
pub fn chunk_decisions(outcomes: &[Decision]) -> Vec<PeerMessage> {
    outcomes
        .chunks(DECISIONS_PER_MESSAGE)
        .map(|c| PeerMessage::Decided {
            outcomes: c.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<Id> {
        (0..n)
            .map(|i| Id::new(u32::MAX - i as u32, u32::MAX - i as u32))
            .collect()
    }

    #[test]
    fn the_wire_form_is_documented_json() {
        let m = PeerMessage::Decided {
            outcomes: vec![Decision {
                id: Id::new(1, 2),
                outcome: Outcome::Abort,
            }],
        };
        let f = encode(&m);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(
            std::str::from_utf8(&f[14..]).unwrap(),
            r#"{"type":"decided","outcomes":[{"id":4294967298,"outcome":"abort"}]}"#
        );
        assert_eq!(decode(&f).unwrap(), m);
        let hold = encode(&PeerMessage::Hold { ids: ids(1) });
        assert!(std::str::from_utf8(&hold[14..])
            .unwrap()
            .starts_with(r#"{"type":"hold","ids":["#));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(decode(&[]), Err(MessageError::EtherType(0))));
        let mut f = encode(&PeerMessage::Open { ids: vec![] });
        assert!(decode(&f).is_ok());
        f[13] = 0;
        assert!(matches!(decode(&f), Err(MessageError::EtherType(0x8800))));
        let mut g = encode(&PeerMessage::Open { ids: vec![] });
        g.truncate(20);
        assert!(matches!(decode(&g), Err(MessageError::Json(_))));
    }

    #[test]
    fn full_chunks_fit_one_small_datagram() {
        let hold = chunk_ids(&ids(100), |ids| PeerMessage::Hold { ids });
        assert_eq!(hold.len(), 3);
        assert!(encode(&hold[0]).len() < 1200, "{}", encode(&hold[0]).len());
        let d: Vec<Decision> = ids(41)
            .into_iter()
            .map(|id| Decision {
                id,
                outcome: Outcome::Commit,
            })
            .collect();
        let dec = chunk_decisions(&d);
        assert_eq!(dec.len(), 3);
        assert!(encode(&dec[0]).len() < 1200, "{}", encode(&dec[0]).len());
        assert!(chunk_ids(&[], |ids| PeerMessage::Open { ids }).is_empty());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&ETHERTYPE.to_be_bytes());
            f.extend_from_slice(&bytes);
            let _ = decode(&f);
        }

        #[test]
        fn round_trip(raw in proptest::collection::vec(any::<u64>(), 0..48), abort in any::<bool>()) {
            let ids: Vec<Id> = raw.iter().map(|&v| Id::from_u64(v)).collect();
            let m = PeerMessage::Hold { ids: ids.clone() };
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
            let outcome = if abort { Outcome::Abort } else { Outcome::Commit };
            let d = PeerMessage::Decided {
                outcomes: ids.iter().map(|&id| Decision { id, outcome }).collect(),
            };
            prop_assert_eq!(decode(&encode(&d)).unwrap(), d);
        }
    }
}
