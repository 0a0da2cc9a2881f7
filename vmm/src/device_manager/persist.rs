//! The bytes of [`DeviceStates`] in a snapshot: a count, then one entry per
//! device, each a kind byte and the device's own encoding. The console
//! comes first, then the net cards and the disks in slot order, so a
//! reader knows each device's place; the kind byte lets it say which
//! device differs when a snapshot does not fit.

use super::DeviceStates;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::net::NetState;
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};
use vm_superio::serial::SerialState;

/// Kind byte of the serial console.
const KIND_SERIAL: u8 = 1;
/// Kind byte of a virtio-net card.
const KIND_NET: u8 = 2;
/// Kind byte of a virtio-blk disk.
const KIND_BLOCK: u8 = 3;

/// Most devices a state may list: far more than any VM has (the console
/// and at most 8 virtio devices), few enough that a corrupt count cannot
/// make the reader allocate without bound.
pub const MAX_DEVICES: usize = 256;

/// The names of the console, `nets` net cards and `blocks` disks, for
/// messages.
pub fn kinds(nets: usize, blocks: usize) -> Vec<&'static str> {
    let mut v = vec!["serial"];
    v.extend(std::iter::repeat_n("virtio-net", nets));
    v.extend(std::iter::repeat_n("virtio-blk", blocks));
    v
}

impl Encode for DeviceStates {
    fn encode(&self, w: &mut Writer) {
        w.u32((1 + self.nets.len() + self.blocks.len()) as u32);
        w.u8(KIND_SERIAL);
        self.serial.encode(w);
        for n in &self.nets {
            w.u8(KIND_NET);
            n.encode(w);
        }
        for b in &self.blocks {
            w.u8(KIND_BLOCK);
            b.encode(w);
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
        let mut blocks = Vec::new();
        for i in 0..n {
            match r.u8("device kind")? {
                KIND_SERIAL if i == 0 => serial = Some(SerialState::decode(r)?),
                KIND_NET if i > 0 && blocks.is_empty() => nets.push(NetState::decode(r)?),
                KIND_BLOCK if i > 0 => blocks.push(BlockState::decode(r)?),
                k @ (KIND_SERIAL | KIND_NET | KIND_BLOCK) => {
                    return Err(DecodeError(format!(
                        "device {i} is of kind {k}, out of its place (the console, the net cards, then the disks)"
                    )))
                }
                k => return Err(DecodeError(format!("unknown device kind {k}"))),
            }
        }
        let serial = serial.ok_or_else(|| DecodeError("no serial console state".into()))?;
        Ok(Self {
            serial,
            nets,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::TransportState;
    use crate::persist::{from_bytes, to_bytes};

    fn transport() -> TransportState {
        TransportState {
            status: 15,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 1 << 32,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: Vec::new(),
        }
    }

    fn states() -> DeviceStates {
        DeviceStates {
            serial: SerialState::default(),
            nets: vec![NetState {
                transport: transport(),
                mac: [2, 0, 0, 0, 0, 1],
                mtu: 1460,
            }],
            blocks: vec![BlockState {
                transport: transport(),
                capacity: 2048,
                read_only: true,
                id: [7; 20],
            }],
        }
    }

    #[test]
    fn every_kind_round_trips_in_its_place() {
        let s = states();
        let b = to_bytes(&s);
        assert_eq!(from_bytes::<DeviceStates>(&b).unwrap(), s);
        // Without disks, the bytes are the old tagged list's.
        let mut old = s.clone();
        old.blocks.clear();
        let b = to_bytes(&old);
        assert_eq!(&b[..4], &2u32.to_le_bytes(), "the console and one card");
        assert_eq!(b[4], KIND_SERIAL);
    }

    #[test]
    fn a_card_after_a_disk_is_out_of_place() {
        let mut s = states();
        s.nets.clear();
        let mut b = to_bytes(&s);
        // Pretend the disk is followed by a card: the count grows, and a
        // card's kind comes after the disk.
        b[..4].copy_from_slice(&3u32.to_le_bytes());
        b.push(KIND_NET);
        b.extend(to_bytes(&states().nets[0]));
        let e = from_bytes::<DeviceStates>(&b).unwrap_err();
        assert!(e.0.contains("out of its place"), "{e}");
    }
}
