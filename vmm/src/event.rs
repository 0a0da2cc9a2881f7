//! Messages between the vCPU threads, the devices, and the controller on
//! the VMM's main thread.

use std::fmt;
use std::sync::mpsc::{Receiver, Sender};

use crate::vstate::vcpu_state::VcpuState;

/// Says, as it is dropped, that the controller has acted on the event it
/// came with. The bridge's reader waits for it after an outcome before it
/// passes on the next frame: the bridge sends an outcome before the frames
/// that came after it, and a frame that reached the guest before the
/// rollback it was sent after would be undone with it (rule 4), so lost.
#[derive(Debug)]
pub struct Acted(Option<std::sync::mpsc::SyncSender<()>>);

impl Acted {
    /// A guard, and what its drop wakes.
    pub fn new() -> (Self, std::sync::mpsc::Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        (Self(Some(tx)), rx)
    }
}

impl Drop for Acted {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            // The reader may have gone; then no one waits.
            let _ = tx.try_send(());
        }
    }
}

/// Something the controller must act on.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest asked to end, with this exit status (exit device).
    GuestExit(u8),
    /// The guest reset or powered off through a platform device.
    GuestReset,
    /// A vCPU hit an error the VMM cannot continue from; the message names
    /// the vCPU, the exit and the guest RIP.
    Fatal(String),
    /// A vCPU made a speculation hypercall and is parking itself.
    Hypercall {
        /// The vCPU.
        vcpu: u8,
        /// The operation (EAX).
        op: u32,
        /// The argument (RDI).
        arg: u64,
    },
    /// The VMM received SIGINT or SIGTERM (the signal number).
    Terminate(i32),
    /// The net device's hook needs the VM to join these speculations before
    /// the tagged frame it holds reaches the guest (rule 2).
    Join {
        /// The ids.
        ids: Vec<crate::spec::stack::SpecId>,
    },
    /// A message from the bridge, or its loss; the [`Acted`] goes once the
    /// controller has acted on it.
    Bridge(crate::spec::link::BridgeEvent, Acted),
    /// A request from the control API.
    Api(crate::api::ApiCall),
}

/// A command to a parked vCPU.
pub enum VcpuCmd {
    /// Save the vCPU's complete state.
    Save,
    /// Restore this state; with a time in ns, move the TSC forward by it
    /// (see [`crate::machine::RestoreMode`]). Not answered, as
    /// [`VcpuCmd::SetResult`]: the vCPUs restore while the controller
    /// restores the devices, and a vCPU that fails ends the VM.
    Restore(Box<VcpuState>, Option<u64>),
    /// Write hypercall results into RAX, RDX and RSI. Not answered: the
    /// controller goes on at once (a round trip between threads is tens of
    /// microseconds here), the vCPU writes them before anything sent after,
    /// and a failure to write them ends the VM.
    SetResult([u64; 3]),
    /// Run on.
    Resume,
}

/// What a vCPU tells the controller on its own channel.
pub enum VcpuReply {
    /// It stopped at a clean instruction boundary and waits for commands.
    Parked,
    /// The same, for a `speculate` hypercall, with its state saved on the
    /// way: the checkpoint that follows takes it instead of asking for it
    /// (one wait between threads fewer). Good until the next command.
    ParkedSaved(Box<VcpuState>),
    /// The saved state.
    Saved(Box<VcpuState>),
    /// The command was carried out.
    Done,
    /// The command failed; the message says how.
    Failed(String),
}

impl fmt::Debug for VcpuReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Parked => write!(f, "Parked"),
            Self::ParkedSaved(_) => write!(f, "ParkedSaved"),
            Self::Saved(_) => write!(f, "Saved"),
            Self::Done => write!(f, "Done"),
            Self::Failed(m) => write!(f, "Failed({m})"),
        }
    }
}

/// The sending side, cloned into every vCPU and device that reports.
pub type EventSender = Sender<VmEvent>;
/// The receiving side, owned by the controller.
pub type EventReceiver = Receiver<VmEvent>;

/// A new event channel.
pub fn channel() -> (EventSender, EventReceiver) {
    std::sync::mpsc::channel()
}
