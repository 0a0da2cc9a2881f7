//! Legacy (port I/O) devices.

pub mod exit;
pub mod i8042;
pub mod power;
pub mod serial;

pub use exit::ExitDevice;
pub use i8042::I8042;
pub use power::PowerDevice;
pub use serial::SerialDevice;
