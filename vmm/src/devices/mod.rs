//! Device models and the bus that routes guest I/O to them.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, VcpuTrap, WriteResult};
