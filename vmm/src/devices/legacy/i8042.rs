//! The i8042 keyboard controller, as far as a VM needs it: its "pulse the
//! reset line" command (0xfe to port 0x64), which Linux uses with
//! `reboot=k`, ends the VM. vm-superio's model does the decoding.

use vm_superio::{I8042Device, Trigger};

use crate::devices::BusDevice;
use crate::event::{EventSender, VmEvent};

/// Sends [`VmEvent::GuestReset`] when the controller resets the CPU.
pub struct ResetTrigger(EventSender);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        tracing::info!("guest reset through the i8042 controller: ending the VM");
        // A closed channel means the VMM is already ending.
        let _ = self.0.send(VmEvent::GuestReset);
        Ok(())
    }
}

/// The i8042 on the port bus, at 0x60..0x65 (offset 4 is port 0x64).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 that reports resets to `events`.
    pub fn new(events: EventSender) -> Self {
        Self(I8042Device::new(ResetTrigger(events)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            // The trigger cannot fail.
            let _ = self.0.write(o, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let (tx, rx) = crate::event::channel();
        let mut d = I8042::new(tx);
        d.write(0, &[0xfe]);
        assert!(
            rx.try_recv().is_err(),
            "0xfe to the data port is not a reset"
        );
        d.write(4, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::GuestReset)));
    }
}
