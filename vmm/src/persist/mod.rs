//! The persistence layer: how a part of the machine saves its state and
//! takes it back, and how that state becomes bytes.
//!
//! It sits below `vstate/`, `devices/` and `host_compat/`, which implement
//! it beside their own code (a `persist.rs` in the device's folder, or the
//! state module of a `vstate` owner). Above it, one [`crate::machine`]
//! state gathers every part, and speculation checkpoints (in memory) and
//! snapshots (on disk) both hold that same state.
//!
//! - [`Persist`]: save the state, and restore it *in place*. A rollback
//!   cannot build new objects: the vCPU file descriptors, the device
//!   threads and their sockets stay; only their state goes back.
//! - [`Encode`] / [`Decode`]: the state's bytes in a snapshot, through
//!   [`codec::Writer`] and [`codec::Reader`]. A decoder checks everything
//!   it reads and never panics on a corrupt payload.
//!
//! Adding a saved field to a state means its struct, its `Encode` and its
//! `Decode`, in the owner's file, and a new `FORMAT_VERSION` in
//! [`crate::snapshot::codec`] (the round-trip tests of every state and the
//! state file's fuzz target catch a field forgotten in one of them).

pub mod codec;

pub use codec::{DecodeError, Reader, Writer};

/// A part of the machine whose state can be saved and put back in place.
pub trait Persist {
    /// Everything needed to put the part back where it was.
    type State;
    /// Why saving or restoring failed.
    type Error;
    /// The part's state now. The caller has stopped whatever changes it
    /// (the vCPUs are parked, a device's receive is held).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Puts the part back into `state`. On error the part may be left
    /// changed only if the error ends the VM; a state that does not fit is
    /// refused before anything changes.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// A state that writes itself into a payload.
pub trait Encode {
    /// Appends the state's bytes.
    fn encode(&self, w: &mut Writer);
}

/// A state read back from what its [`Encode`] wrote.
pub trait Decode: Sized {
    /// Reads one state, checking every value.
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// Encodes `v` alone, for tests and checks.
pub fn to_bytes<T: Encode>(v: &T) -> Vec<u8> {
    let mut w = Writer::default();
    v.encode(&mut w);
    w.buf
}

/// Decodes one `T` that fills all of `bytes`.
pub fn from_bytes<T: Decode>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut r = Reader::new(bytes);
    let v = T::decode(&mut r)?;
    r.finish()?;
    Ok(v)
}
