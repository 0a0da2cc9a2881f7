//! Fuzz targets of the port protocol (`specwire::protocol`): `decode`
//! on any message (raw bytes, JSON near the control grammar, valid
//! messages with bytes edited, nesting deep enough to overflow a naive
//! parser's stack), and encode/decode round trips. The bridge behind the
//! decoder, and the `netbridge` binary's framed reader: `fuzz_bridge.rs`.
//! How to run them longer: `docs/fuzzing.md`.

#[path = "support/fuzz.rs"]
mod fuzz;
#[path = "support/gen.rs"]
mod gen;

use fuzz::{Bytes, Target};
use gen::{AnyControl, AnyMessage};
use specwire::protocol::{
    decode, encode_control, encode_frame, framed, Message, ProtocolError, KIND_CONTROL, KIND_FRAME,
};

fn check_decode(msg: &[u8]) {
    let r = decode(msg);
    match msg.split_first() {
        None => assert_eq!(r, Err(ProtocolError::Empty)),
        Some((&KIND_FRAME, rest)) => assert_eq!(r, Ok(Message::Frame(rest.to_vec()))),
        Some((&KIND_CONTROL, _)) => match r {
            // What was accepted writes back as itself.
            Ok(Message::Control(c)) => {
                let again = encode_control(&c);
                assert_eq!(decode(&again), Ok(Message::Control(c)));
            }
            Err(ProtocolError::Control(_)) => {}
            other => panic!("a control message decoded as {other:?}"),
        },
        Some((&k, _)) => assert_eq!(r, Err(ProtocolError::Kind(k))),
    }
    let f = framed(msg);
    assert_eq!(f[..4], (msg.len() as u32).to_le_bytes());
    assert_eq!(&f[4..], msg);
}

#[test]
fn decode_any_message() {
    Target {
        name: "decode_any_message",
        default_cases: 100_000,
        max_len: 2048,
    }
    .run(|m: AnyMessage| check_decode(&m.bytes()));
}

#[test]
fn messages_round_trip() {
    Target {
        name: "messages_round_trip",
        default_cases: 100_000,
        max_len: 1024,
    }
    .run(|(c, Bytes(frame)): (AnyControl, Bytes)| {
        let c = c.to_control();
        assert_eq!(decode(&encode_control(&c)), Ok(Message::Control(c.clone())));
        assert_eq!(decode(&encode_frame(&frame)), Ok(Message::Frame(frame)));
    });
}
