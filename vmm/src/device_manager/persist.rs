//! The bytes of [`DeviceStates`] in a snapshot: a count, then one entry per
//! device, each a kind byte and the device's own encoding. The console
//! comes first, then the virtio devices in slot order, so a reader knows
//! each device's place; the kind byte lets it say which device differs
//! when a snapshot does not fit.

use super::DeviceStates;
use crate::devices::virtio::net::NetState;
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};
use vm_superio::serial::SerialState;

/// Kind byte of the serial console.
const KIND_SERIAL: u8 = 1;
/// Kind byte of a virtio-net card.
const KIND_NET: u8 = 2;

/// Most devices a state may list: far more than any VM has (the console
/// and at most 8 virtio devices), few enough that a corrupt count cannot
/// make the reader allocate without bound.
pub const MAX_DEVICES: usize = 256;

/// The names of `serial` consoles followed by `nets` net cards, for
/// messages.
pub fn kinds(serial: usize, nets: usize) -> Vec<&'static str> {
    let mut v = vec!["serial"; serial];
    v.extend(std::iter::repeat_n("virtio-net", nets));
    v
}

impl Encode for DeviceStates {
    fn encode(&self, w: &mut Writer) {
        w.u32(1 + self.nets.len() as u32);
        w.u8(KIND_SERIAL);
        self.serial.encode(w);
        for n in &self.nets {
            w.u8(KIND_NET);
            n.encode(w);
        }
    }
}

impl Decode for DeviceStates {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.count(1, "device count")?;
        if n == 0 || n > MAX_DEVICES {
            return Err(DecodeError(format!("{n} devices")));
        }
        let mut serial = None;
        let mut nets = Vec::new();
        for i in 0..n {
            match r.u8("device kind")? {
                KIND_SERIAL if i == 0 => serial = Some(SerialState::decode(r)?),
                KIND_NET if i > 0 => nets.push(NetState::decode(r)?),
                k @ (KIND_SERIAL | KIND_NET) => {
                    return Err(DecodeError(format!(
                        "device {i} is of kind {k}, out of its place (the console comes first, then the virtio devices)"
                    )))
                }
                k => return Err(DecodeError(format!("unknown device kind {k}"))),
            }
        }
        let serial = serial.ok_or_else(|| DecodeError("no serial console state".into()))?;
        Ok(Self { serial, nets })
    }
}
