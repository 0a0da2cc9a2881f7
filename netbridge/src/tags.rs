//! The codec as the bridge uses it ([`crate::bridge::TagReader`] and
//! [`crate::bridge::TagStripper`]): errors as text.

use crate::codec;
use crate::protocol::Id;

/// The ids a frame is tagged with; none for untagged and non-IPv4 frames.
pub fn read(frame: &[u8]) -> Result<Vec<Id>, String> {
    codec::parse_tags(frame)
        .map(Option::unwrap_or_default)
        .map_err(|e| e.to_string())
}

/// The frame without its tag, for a port that cannot roll back.
pub fn strip(frame: &[u8]) -> Result<Vec<u8>, String> {
    codec::strip(frame).map_err(|e| e.to_string())
}
