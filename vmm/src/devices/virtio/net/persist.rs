//! The net device's state for checkpoints: the transport (status,
//! negotiated features, every queue's configuration with its next_avail and
//! next_used indices, the interrupt status) and the device configuration.
//!
//! Frames waiting in the VMM for a receive buffer are not part of it: the
//! guest has not seen them, so no guest state depends on them. After a
//! rollback they are still delivered, and the [`super::FrameHook`] is asked
//! about each one at delivery time, so it can drop the frames of a
//! speculation that was aborted. Frames already written into guest memory
//! roll back with that memory and with the used index saved here.

use super::Net;
use crate::devices::virtio::{MmioTransport, TransportState, VirtioError};
use crate::persist::{Decode, DecodeError, Encode, Persist, Reader, Writer};

/// A checkpoint of a virtio-net device and its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    /// The transport's registers and queues.
    pub transport: TransportState,
    /// The MAC address in the configuration space.
    pub mac: [u8; 6],
    /// The MTU in the configuration space.
    pub mtu: u16,
}

impl MmioTransport<Net> {
    /// The device's state, for a checkpoint.
    pub fn save_net(&self) -> NetState {
        NetState {
            transport: self.save_transport(),
            mac: self.device().mac(),
            mtu: self.device().mtu(),
        }
    }

    /// Puts the device back into `state`. Guest memory is not touched;
    /// receive stays held or released as it was (see
    /// [`super::NetHandle::pause_rx`]).
    pub fn restore_net(&mut self, state: &NetState) -> Result<(), VirtioError> {
        self.restore_transport(&state.transport)?;
        self.device_mut().set_config(state.mac, state.mtu);
        Ok(())
    }
}

impl Persist for MmioTransport<Net> {
    type State = NetState;
    type Error = VirtioError;

    fn save(&self) -> Result<NetState, VirtioError> {
        Ok(self.save_net())
    }

    fn restore(&mut self, state: &NetState) -> Result<(), VirtioError> {
        self.restore_net(state)
    }
}

impl Encode for NetState {
    /// The transport, then the MAC and the MTU.
    fn encode(&self, w: &mut Writer) {
        self.transport.encode(w);
        w.buf.extend_from_slice(&self.mac);
        w.u16(self.mtu);
    }
}

impl Decode for NetState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let transport = TransportState::decode(r)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(r.take(6, "MAC")?);
        Ok(NetState {
            transport,
            mac,
            mtu: r.u16("MTU")?,
        })
    }
}
