//! netbridge: the virtual switch between specvm guests.
//!
//! It reads the IPOPT_SPEC option on IPv4 packets that cross it, learns who
//! owns and who joined every speculation, carries COMMIT and ABORT to every
//! member, drops frames of aborted speculations, and holds tagged frames
//! for ports that cannot roll back until their speculations commit (see
//! `shared/design/SPECULATIONS.md`, rules 2, 4, 6, 7 and 9-12, and
//! `docs/netbridge.md`).
//!
//! - [`codec`]: reads, strips and writes IPOPT_SPEC on Ethernet frames
//!   (`docs/wire-format.md`); [`specwire::codec`], re-exported;
//! - [`protocol`]: the messages between a VMM port and the bridge;
//!   [`specwire::protocol`], re-exported;
//! - [`registry`]: owners, members and outcomes of speculations, and
//!   which ids each port may start, join and hold;
//! - [`bridge`]: switching decisions, queues, output commit, anti-messages;
//! - [`vet`]: which ids a port's frames may carry (forged tags stripped);
//! - [`server`]: the tokio I/O around them, and the `netbridge` binary;
//! - [`uplink`]: the TAP port to the host (`--uplink tap=NAME`);
//! - [`peer`]: peer bridges on other hosts, over UDP in VXLAN framing
//!   (`--peer HOST:PORT`);
//! - [`sock`]: listening Unix sockets that replace no one else's file
//!   (shared with specvm); [`specwire::sock`], re-exported.
//!
//! The VMM side (tagging every guest frame, joining on receive) is
//! `vmm/src/spec/link.rs`.

pub mod bridge;
pub mod peer;
pub mod registry;
pub mod server;
pub mod tags;
pub mod uplink;
pub mod vet;

pub use specwire::{codec, protocol, sock};
