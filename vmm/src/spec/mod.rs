//! Speculation: the checkpoint stack, copy-on-write memory checkpoints,
//! and the hypercall device through which guests speculate.
//!
//! The model is `shared/design/SPECULATIONS.md`; [`stack`] implements its
//! rules on an abstract checkpoint, [`memory`] the memory half of a real
//! checkpoint, and [`checkpoint`] the whole machine.

pub mod bridge_conn;
pub mod checkpoint;
pub mod hypercall;
pub mod link;
pub mod memory;
pub mod stack;
pub mod verify;
