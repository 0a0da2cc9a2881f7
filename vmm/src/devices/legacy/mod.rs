//! Legacy (port I/O) devices.

pub mod exit;
pub mod serial;

pub use exit::ExitDevice;
pub use serial::SerialDevice;
