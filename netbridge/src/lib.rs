//! netbridge: the virtual switch between specvm guests.
//!
//! It will read the IPOPT_SPEC option on IPv4 packets that cross it, make
//! receivers join the speculations they depend on, and carry COMMIT and
//! ABORT to every member (see `shared/design/SPECULATIONS.md`, rules 2, 4,
//! 6, 7 and 9-12). This crate is a placeholder until the bridge issue: it
//! holds no code yet, so nothing here pretends to work.
