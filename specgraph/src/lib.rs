//! `specvm-graph`: turns netbridge's event streams (and, to annotate them,
//! specvm's) into one self-contained HTML page that draws the speculation
//! graph: speculations as nodes, joins as edges labelled with the member's
//! port (and VM, where known), outcomes as colours, on a time axis, one
//! lane per bridge. `docs/graph.md` says how to use it.
//!
//! - [`parse`] reads the JSON lines, skipping and counting bad ones;
//! - [`live`] reads event sockets, stdin and FIFOs until they end or the
//!   user stops;
//! - [`model`] builds the graph;
//! - [`render`] writes the page;
//! - [`write`] puts it on disk durably.

pub mod live;
pub mod model;
pub mod parse;
pub mod render;
pub mod write;
