//! The ACPI power device: the sleep control, sleep status and reset
//! registers that the hardware-reduced FADT points at.
//!
//! `poweroff` in the guest ends in a write of `SLP_TYPx << 2 | SLP_EN` to
//! the sleep control register, with the sleep type of the DSDT's `_S5`
//! package; a reboot through ACPI writes the FADT's reset value to the reset
//! register. Either ends the VM with [`VmEvent::GuestReset`].

use crate::devices::BusDevice;
use crate::event::{EventSender, VmEvent};

/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u64 = 1;
/// Offset of the reset register.
pub const RESET: u64 = 2;
/// Number of ports the device covers.
pub const PORTS: u64 = 3;
/// The value the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 1;
/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// WAK_STS in the sleep status register.
const WAK_STS: u8 = 1 << 7;

/// The device.
pub struct PowerDevice {
    events: EventSender,
    s5_type: u8,
}

impl PowerDevice {
    /// A power device that treats sleep type `s5_type` as power-off.
    pub fn new(events: EventSender, s5_type: u8) -> Self {
        Self { events, s5_type }
    }

    fn end(&self, why: &str) {
        tracing::info!("guest {why}: ending the VM");
        // A closed channel means the VMM is already ending.
        let _ = self.events.send(VmEvent::GuestReset);
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS {
            // Always "awake": a guest polling for wake-up sees it at once.
            if let Some(b) = data.first_mut() {
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let kind = (v >> 2) & 7;
                if kind == self.s5_type {
                    self.end("powered off (ACPI S5)");
                } else {
                    tracing::warn!(
                        sleep_type = kind,
                        "guest asked for an unsupported sleep state"
                    );
                }
            }
            RESET if v == RESET_VALUE => self.end("reset (ACPI reset register)"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset_end_the_vm() {
        let (tx, rx) = crate::event::channel();
        let mut d = PowerDevice::new(tx, 5);
        d.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        d.write(SLEEP_CONTROL, &[5 << 2]);
        assert!(
            rx.try_recv().is_err(),
            "S3 and writes without SLP_EN do nothing"
        );
        d.write(SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::GuestReset)));
        d.write(RESET, &[RESET_VALUE]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::GuestReset)));
        let mut b = [0u8];
        d.read(SLEEP_STATUS, &mut b);
        assert_eq!(b[0], WAK_STS);
    }
}
