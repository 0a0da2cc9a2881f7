//! The serial console's state for checkpoints and snapshots: the 8250's
//! registers and its receive FIFO, as vm-superio describes them.
//!
//! The output backend and the console watcher are not state: bytes already
//! sent to the console cannot be taken back, so a restore keeps them.

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{ConsoleOut, IrqTrigger, SerialDevice, SerialOut};
use crate::persist::{Decode, DecodeError, Encode, Persist, Reader, Writer};
use crate::sync::lock;

impl Persist for SerialDevice {
    type State = SerialState;
    type Error = String;

    fn save(&self) -> Result<SerialState, String> {
        Ok(lock(&self.uart).state())
    }

    /// Rebuilds the UART from `state` around the same interrupt eventfd and
    /// the same output.
    fn restore(&mut self, state: &SerialState) -> Result<(), String> {
        let mut g = lock(&self.uart);
        // Unchanged since the checkpoint (a guest that did not touch its
        // console while speculating): nothing to rebuild. A rebuild costs
        // two eventfd duplicates and their closes, four system calls on
        // every rollback.
        if g.state() == *state {
            return Ok(());
        }
        let evt = || {
            g.interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial: {e}"))
        };
        let (placeholder, kept) = (evt()?, evt()?);
        let old = std::mem::replace(
            &mut *g,
            Serial::new(
                IrqTrigger(placeholder),
                ConsoleOut::new(SerialOut::Null, None),
            ),
        );
        let out = old.into_writer();
        *g = Serial::from_state(state, IrqTrigger(kept), NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(())
    }
}

impl Encode for SerialState {
    /// The nine registers, then the FIFO as a byte string.
    fn encode(&self, w: &mut Writer) {
        for b in [
            self.baud_divisor_low,
            self.baud_divisor_high,
            self.interrupt_enable,
            self.interrupt_identification,
            self.line_control,
            self.line_status,
            self.modem_control,
            self.modem_status,
            self.scratch,
        ] {
            w.u8(b);
        }
        w.bytes(&self.in_buffer);
    }
}

impl Decode for SerialState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut b = [0u8; 9];
        b.copy_from_slice(r.take(9, "serial registers")?);
        Ok(SerialState {
            baud_divisor_low: b[0],
            baud_divisor_high: b[1],
            interrupt_enable: b[2],
            interrupt_identification: b[3],
            line_control: b[4],
            line_status: b[5],
            modem_control: b[6],
            modem_status: b[7],
            scratch: b[8],
            in_buffer: r.bytes("serial input")?.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bytes_round_trip() {
        let s = SerialState {
            line_control: 3,
            scratch: 0x5a,
            in_buffer: b"abc".to_vec(),
            ..SerialState::default()
        };
        let b = crate::persist::to_bytes(&s);
        assert_eq!(b.len(), 9 + 4 + 3);
        assert_eq!(crate::persist::from_bytes::<SerialState>(&b).unwrap(), s);
        assert!(crate::persist::from_bytes::<SerialState>(&b[..10]).is_err());
    }
}
