//! Events that end or change the whole VM, sent to the VMM's main thread
//! by vCPU threads and devices.

use std::sync::mpsc::{Receiver, Sender};

/// Something the main thread must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked to end, with this exit status (exit device).
    GuestExit(u8),
    /// The guest reset or powered off through a platform device.
    GuestReset,
    /// A vCPU hit an error the VMM cannot continue from; the message names
    /// the vCPU, the exit and the guest RIP.
    Fatal(String),
}

/// The sending side, cloned into every vCPU and device that can end the VM.
pub type EventSender = Sender<VmEvent>;
/// The receiving side, owned by the main thread.
pub type EventReceiver = Receiver<VmEvent>;

/// A new event channel.
pub fn channel() -> (EventSender, EventReceiver) {
    std::sync::mpsc::channel()
}
