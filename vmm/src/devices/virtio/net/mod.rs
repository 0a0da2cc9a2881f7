//! virtio-net: a network card whose frames go to a Unix socket (netbridge)
//! or a TAP interface, through a [`FrameHook`] that can inspect, rewrite,
//! drop or defer every frame.
//!
//! - [`device`]: the device model (queues, header, limits, counters).
//! - [`backend`]: the socket and tap backends, one frame per message.
//! - [`event_handler`]: the thread that receives from the backend.
//! - [`persist`]: the checkpoint state.
//! - [`config`]: the `--net` option.
//!
//! Start with [`new_net`]; the integration steps are in the documentation
//! of the parent module, [`crate::devices::virtio`].

pub mod backend;
pub mod config;
pub mod device;
pub mod event_handler;
pub mod persist;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, SharedDevice, VirtioError};
use crate::sync::lock;
use crate::vstate::memory::GuestMemoryMmap;

pub use backend::{Backend, BackendError, BackendKind};
pub use config::{NetBackendSpec, NetConfig, NetConfigError, DEFAULT_MTU};
pub use device::{Net, NetStats, RX_PENDING_LIMIT};
pub use event_handler::NetTransport;
pub use persist::NetState;

/// Errors setting up a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The configuration has no MAC or a bad one.
    #[error("invalid configuration: {0}")]
    Config(#[from] NetConfigError),
}

/// What to do with a frame on its way to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxVerdict {
    /// Write it into the guest's receive buffer now.
    Deliver,
    /// Discard it (counted in `rx_hook_dropped`).
    Drop,
    /// Keep it at the head of the receive queue and hold all receive until
    /// [`NetHandle::resume_rx`] is called, then ask again. For a frame that
    /// needs a checkpoint before the guest may see it: the hook tells its
    /// owner (for example over a channel), which pauses the VM, takes the
    /// checkpoint and resumes receive.
    DeferUntilCheckpoint,
}

/// Sees every frame between the guest and the backend.
///
/// Both methods run with the device locked: on the vCPU thread that
/// notified the queue, or on the receive thread. They must not block for
/// long and must not lock the device (through the bus or a
/// [`NetHandle`]): that deadlocks. Frames start at the Ethernet header;
/// the virtio header is never shown.
pub trait FrameHook: Send {
    /// A frame the guest sent. Return it (possibly rewritten, for example
    /// re-tagged) to send it to the backend, or `None` to send nothing now;
    /// a hook that holds frames back (output commit) sends them later with
    /// [`NetHandle::send_to_backend`].
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>>;

    /// A frame about to be written into a receive buffer of the guest.
    /// The hook may rewrite it in place (for example strip the IPv4 tag
    /// option, since a tagged full-size packet exceeds the guest's MTU).
    /// It is asked once per frame, again only after a
    /// [`RxVerdict::DeferUntilCheckpoint`]; edits made before deferring
    /// stay. Frames longer than the MTU after this call are dropped.
    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict;

    /// Whether the hook can take another frame from the guest now. While
    /// it says no, the device leaves the guest's transmit queue alone (the
    /// guest sees back-pressure, as from a busy card) until
    /// [`NetHandle::resume_tx`] is called and the hook says yes again.
    fn tx_ready(&mut self) -> bool {
        true
    }
}

/// The hook that passes every frame through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl FrameHook for PassThrough {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        Some(frame)
    }

    fn on_rx(&mut self, _frame: &mut Vec<u8>) -> RxVerdict {
        RxVerdict::Deliver
    }
}

/// Creates a net device: opens the backend `config` names, wraps the device
/// in a virtio-mmio transport and starts its receive thread.
///
/// `config.mac` must be set (see [`NetConfig::mac_or_default`]). `irq` is
/// the eventfd registered with KVM (`register_irqfd`) for the slot's GSI.
/// The [`SharedDevice`] goes on the MMIO bus at the slot's base; keep the
/// [`NetHandle`] as long as the VM runs.
pub fn new_net(
    config: NetConfig,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<(SharedDevice, NetHandle), VirtioError> {
    let mac = config
        .mac
        .ok_or_else(|| NetError::Config(NetConfigError::Mac(String::new())))?;
    let backend = match &config.backend {
        NetBackendSpec::Socket(path) => Backend::connect(path),
        NetBackendSpec::Tap(name) => Backend::open_tap(name),
        NetBackendSpec::Bridge(path) => {
            // The bridge speaks its own protocol: the VMM's bridge link
            // opens it and hands the device a backend of its own.
            return Err(VirtioError::InvalidState(format!(
                "bridge={} needs the bridge link (vmm::spec::link)",
                path.display()
            )));
        }
    }
    .map_err(NetError::from)?;
    tracing::info!(
        "virtio-net: {} mac {} mtu {}",
        backend.name(),
        config::format_mac(&mac),
        config.mtu
    );
    new_net_with_backend(backend, mac, config.mtu, mem, irq)
}

/// Like [`new_net`], with a backend opened by the caller (tests use
/// [`Backend::pair`]).
pub fn new_net_with_backend(
    backend: Backend,
    mac: [u8; 6],
    mtu: u16,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<(SharedDevice, NetHandle), VirtioError> {
    let backend = Arc::new(backend);
    let net = Net::new(mac, mtu, backend.clone());
    let transport: NetTransport = Arc::new(Mutex::new(MmioTransport::new(net, mem, irq)?));
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
    let thread_stop = stop.try_clone().map_err(VirtioError::EventFd)?;
    let thread = event_handler::spawn(Arc::downgrade(&transport), backend.clone(), thread_stop)
        .map_err(VirtioError::Thread)?;
    let shared: SharedDevice = transport.clone();
    let handle = NetHandle {
        transport,
        backend,
        stop,
        thread: Some(thread),
    };
    Ok((shared, handle))
}

/// Takes a device's transmit up again after its hook held it back.
#[derive(Clone)]
pub struct TxWaker(NetTransport);

impl TxWaker {
    /// As [`NetHandle::resume_tx`]. Must not be called with the device
    /// locked (from a hook).
    pub fn wake(&self) {
        lock(&self.0).process_backend_event();
    }
}

/// The VMM's side of a net device: receive control, the hook, counters.
/// Dropping it stops the receive thread.
pub struct NetHandle {
    transport: NetTransport,
    backend: Arc<Backend>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl NetHandle {
    /// The transport (the same object as the bus device).
    pub fn transport(&self) -> &NetTransport {
        &self.transport
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        lock(&self.transport).device().stats()
    }

    /// Replaces the frame hook.
    pub fn set_hook(&self, hook: Box<dyn FrameHook>) {
        lock(&self.transport).device_mut().set_hook(hook);
    }

    /// Stops writing received frames into guest memory; they queue up
    /// (bounded) meanwhile. Call before taking or restoring a checkpoint.
    pub fn pause_rx(&self) {
        lock(&self.transport).device_mut().set_rx_held(true);
    }

    /// Releases receive (after [`NetHandle::pause_rx`] or a deferral) and
    /// delivers what the guest has buffers for; a deferred frame is
    /// offered to the hook again.
    pub fn resume_rx(&self) {
        let mut t = lock(&self.transport);
        t.device_mut().set_rx_held(false);
        t.process_backend_event();
    }

    /// Queues `frame` for the guest as if the backend had received it.
    pub fn inject_rx(&self, frame: Vec<u8>) {
        let mut t = lock(&self.transport);
        t.device_mut().enqueue_rx(frame);
        t.process_backend_event();
    }

    /// The backend, for a sender of frames outside the device (output
    /// commit's releases).
    pub fn backend(&self) -> Arc<Backend> {
        self.backend.clone()
    }

    /// Something that can call [`NetHandle::resume_tx`] from another
    /// thread.
    pub fn tx_waker(&self) -> TxWaker {
        TxWaker(self.transport.clone())
    }

    /// Takes transmit up again after the hook held it back
    /// ([`FrameHook::tx_ready`]): the frames the guest queued meanwhile go
    /// through the hook now.
    pub fn resume_tx(&self) {
        lock(&self.transport).process_backend_event();
    }

    /// Sends `frame` straight to the backend, past the hook (for frames the
    /// hook held back and now releases).
    pub fn send_to_backend(&self, frame: &[u8]) -> io::Result<()> {
        self.backend.send(frame)
    }

    /// The device's checkpoint state.
    pub fn save(&self) -> NetState {
        lock(&self.transport).save_net()
    }

    /// Restores a checkpoint state (see [`MmioTransport::restore_net`]).
    pub fn restore(&self, state: &NetState) -> Result<(), VirtioError> {
        lock(&self.transport).restore_net(state)
    }
}

impl Drop for NetHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("virtio-net: stopping the receive thread: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("virtio-net: the receive thread panicked");
            }
        }
    }
}
