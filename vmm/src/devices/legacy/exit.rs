//! The exit device: the guest writes a status and the VMM exits with it.
//!
//! Tests use it to end a guest with a verdict. A write of 1, 2 or 4 bytes
//! at offset 0 ends the VM; the VMM's process status is the low 8 bits of
//! the value. Reads return zero. Other offsets and widths are ignored.

use crate::devices::BusDevice;
use crate::event::{EventSender, VmEvent};

/// The exit device.
pub struct ExitDevice {
    events: EventSender,
}

impl ExitDevice {
    /// An exit device that reports to `events`.
    pub fn new(events: EventSender) -> Self {
        Self { events }
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || !matches!(data.len(), 1 | 2 | 4) {
            tracing::warn!(offset, len = data.len(), "exit device: ignored write");
            return;
        }
        // A closed channel means the VMM is already ending; nothing to do.
        let _ = self.events.send(VmEvent::GuestExit(data[0]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_sends_the_low_byte() {
        let (tx, rx) = crate::event::channel();
        let mut d = ExitDevice::new(tx);
        d.write(0, &[0x2a, 0x01, 0, 0]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::GuestExit(0x2a))));
        d.write(1, &[1]);
        d.write(0, &[1, 2, 3]);
        assert!(rx.try_recv().is_err(), "odd writes must be ignored");
    }
}
