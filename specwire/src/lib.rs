//! specwire: the speculation wire that specvm's VMM and its switch,
//! netbridge, both speak, kept in one place so the two sides cannot drift.
//!
//! - [`SpecId`]: the speculation id, `(vm, seq)`, in every form it takes
//!   (a `u64` in the port protocol's JSON, 8 big-endian bytes in a tag);
//! - [`codec`]: reads, strips and writes the IPOPT_SPEC IPv4 option on
//!   Ethernet frames (`docs/wire-format.md`);
//! - [`protocol`]: the length-prefixed messages between a VMM port and the
//!   bridge, and the one reader and writer of them, blocking and (feature
//!   `tokio`) async (`docs/netbridge.md`);
//! - [`tap`]: opening a TAP interface, for the VMM's TAP backend and the
//!   bridge's uplink;
//! - [`sock`]: listening Unix sockets that replace no one else's file, for
//!   the bridge's sockets and the VMM's API and serial sockets.
//!
//! Feature `tokio` adds the async message reader and writer and
//! [`sock::accept`]; without it the crate uses no async runtime.

pub mod codec;
mod id;
pub mod protocol;
pub mod sock;
pub mod tap;

pub use id::{ParseSpecIdError, SpecId, ID_LEN};
