//! The device manager: where each device sits, which interrupt it raises,
//! and the typed handles through which its state is saved and restored.
//!
//! The builder asks it for a place for every device and hands it the
//! device; the buses then go to the vCPU threads, which dispatch guest I/O
//! through them, and the handles stay here, where checkpoints and
//! snapshots reach them: [`DeviceManager::save`] returns one typed
//! [`DeviceStates`], and [`DeviceManager::restore`] puts it back.
//!
//! Adding a stateful device: its folder under `devices/` (with a
//! `persist.rs` implementing [`crate::persist::Persist`] and the state's
//! [`crate::persist::Encode`]/[`crate::persist::Decode`]), a field here
//! and in [`DeviceStates`], and its kind in [`persist`]. `docs/devices.md`
//! walks through the whole of it, speculation included.

pub mod persist;

use std::sync::{Arc, Mutex};

use guest_agent::abi::{
    EXIT_PORT, EXIT_PORT_LEN, HYPERCALL_PORT, HYPERCALL_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN,
};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::VirtioMmioDesc;
use crate::devices::bus::SharedDevice;
use crate::devices::legacy::serial::InputGate;
use crate::devices::legacy::{ExitDevice, SerialDevice};
use crate::devices::virtio::block::{BlockHandle, BlockState};
use crate::devices::virtio::net::{NetHandle, NetState};
use crate::devices::virtio::{mmio_slot_base, virtio_gsi, VIRTIO_MAX_SLOTS, VIRTIO_MMIO_SIZE};
use crate::devices::{Bus, BusError};
use crate::event::EventSender;
use crate::persist::Persist;
use crate::spec::hypercall::HypercallDevice;
use crate::sync::lock;
use crate::vstate::vm::Vm;

/// The legacy ISA interrupt line of COM1.
const COM1_IRQ: u32 = 4;

/// Errors placing devices, or saving and restoring their state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device could not be placed on a bus.
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    /// Every virtio-mmio slot is taken.
    #[error("no free virtio-mmio slot: a VM has at most {VIRTIO_MAX_SLOTS} virtio devices")]
    NoSlot,
    /// An interrupt could not be set up.
    #[error("{what}: {err}")]
    Irq {
        /// What was being set up.
        what: &'static str,
        /// What the system said.
        err: std::io::Error,
    },
    /// Saving or restoring a device failed.
    #[error("{device}: {msg}")]
    State {
        /// The device, as [`persist::kinds`] names it.
        device: String,
        /// What went wrong.
        msg: String,
    },
    /// A saved state does not fit this VM's devices.
    #[error(
        "the saved devices are {saved:?}, this VM's {have:?} (give as many --net and --disk devices as the saved VM had)"
    )]
    Mismatch {
        /// The devices in the state.
        saved: Vec<&'static str>,
        /// This VM's devices.
        have: Vec<&'static str>,
    },
}

/// The saved state of every stateful device, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStates {
    /// The serial console.
    pub serial: SerialState,
    /// The virtio-net cards, by slot order.
    pub nets: Vec<NetState>,
    /// The virtio-blk disks, by slot order (after the cards).
    pub blocks: Vec<BlockState>,
}

/// Where a virtio-mmio slot is: its number, register window and GSI.
#[derive(Debug, Clone, Copy)]
pub struct SlotPlace {
    /// The slot number.
    pub index: u32,
    /// Guest-physical base of its register window.
    pub base: u64,
    /// The GSI it interrupts on.
    pub gsi: u32,
}

/// A virtio-mmio slot given to a device: its place, and its interrupt,
/// already wired to KVM. The device takes `irq`; the place goes back to
/// [`DeviceManager::add_net`] or [`DeviceManager::add_block`].
pub struct VirtioSlot {
    /// Where the slot is.
    pub place: SlotPlace,
    /// The eventfd registered with KVM as the GSI's irqfd.
    pub irq: EventFd,
}

/// Every device of a VM, where it sits, and its state's handle.
pub struct DeviceManager {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input: InputGate,
    nets: Vec<NetHandle>,
    blocks: Vec<BlockHandle>,
    virtio: Vec<VirtioMmioDesc>,
}

impl DeviceManager {
    /// The devices every VM has, on the port bus: the serial console (COM1,
    /// with its interrupt), the exit device and the hypercall device.
    pub fn new(vm: &Vm, serial: SerialDevice, events: &EventSender) -> Result<Self, DeviceError> {
        let serial_input = serial.input_gate();
        let irq = serial.interrupt_evt().map_err(|err| DeviceError::Irq {
            what: "the serial console's interrupt eventfd",
            err,
        })?;
        vm.fd
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| DeviceError::Irq {
                what: "KVM_IRQFD (COM1)",
                err: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        let serial = Arc::new(Mutex::new(serial));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT.into(), SERIAL_PORT_LEN.into())?;
        let exit: SharedDevice = Arc::new(Mutex::new(ExitDevice::new(events.clone())));
        pio.insert(exit, EXIT_PORT.into(), EXIT_PORT_LEN.into())?;
        let hypercall: SharedDevice = Arc::new(Mutex::new(HypercallDevice));
        pio.insert(hypercall, HYPERCALL_PORT.into(), HYPERCALL_PORT_LEN.into())?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            serial_input,
            nets: Vec::new(),
            blocks: Vec::new(),
            virtio: Vec::new(),
        })
    }

    /// The next free virtio-mmio slot, with its interrupt registered.
    pub fn virtio_slot(&self, vm: &Vm) -> Result<VirtioSlot, DeviceError> {
        let index = self.virtio.len() as u32;
        if index >= VIRTIO_MAX_SLOTS {
            return Err(DeviceError::NoSlot);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|err| DeviceError::Irq {
            what: "a virtio interrupt eventfd",
            err,
        })?;
        let gsi = virtio_gsi(index);
        vm.fd
            .register_irqfd(&irq, gsi)
            .map_err(|e| DeviceError::Irq {
                what: "KVM_IRQFD (virtio)",
                err: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        Ok(VirtioSlot {
            place: SlotPlace {
                index,
                base: mmio_slot_base(index),
                gsi,
            },
            irq,
        })
    }

    /// Places a virtio-net card, made on `slot`, on the MMIO bus.
    pub fn add_net(
        &mut self,
        slot: &SlotPlace,
        device: SharedDevice,
        handle: NetHandle,
    ) -> Result<(), DeviceError> {
        self.place_virtio(slot, device)?;
        self.nets.push(handle);
        Ok(())
    }

    /// Places a virtio-blk disk, made on `slot`, on the MMIO bus.
    pub fn add_block(
        &mut self,
        slot: &SlotPlace,
        device: SharedDevice,
        handle: BlockHandle,
    ) -> Result<(), DeviceError> {
        self.place_virtio(slot, device)?;
        self.blocks.push(handle);
        Ok(())
    }

    /// The disks, by slot order.
    pub fn blocks(&self) -> &[BlockHandle] {
        &self.blocks
    }

    /// A checkpoint was taken: every disk opens a level for the writes
    /// that follow it.
    pub fn push_levels(&self) {
        for b in &self.blocks {
            b.push_level();
        }
    }

    /// A rollback restored the checkpoint at `level` (0 is the oldest):
    /// every disk drops the writes made since. No I/O.
    pub fn rollback_levels(&self, level: usize) -> Result<(), DeviceError> {
        for b in &self.blocks {
            b.rollback_to(level)
                .map_err(|e| state_err("virtio-blk", e.to_string()))?;
        }
        Ok(())
    }

    /// The checkpoint at `level` was committed: every disk folds its writes
    /// into the level below, or, for the outermost, into its image file.
    pub fn fold_levels(&self, level: usize) -> Result<(), DeviceError> {
        for b in &self.blocks {
            b.fold(level)
                .map_err(|e| state_err("virtio-blk", e.to_string()))?;
        }
        Ok(())
    }

    fn place_virtio(&mut self, slot: &SlotPlace, device: SharedDevice) -> Result<(), DeviceError> {
        self.mmio.insert(device, slot.base, VIRTIO_MMIO_SIZE)?;
        self.virtio.push(VirtioMmioDesc {
            base: slot.base as u32,
            size: VIRTIO_MMIO_SIZE as u32,
            gsi: slot.gsi,
        });
        Ok(())
    }

    /// The virtio devices' windows and interrupts, for the ACPI tables.
    pub fn virtio_descs(&self) -> &[VirtioMmioDesc] {
        &self.virtio
    }

    /// The net cards, by slot order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// The gate that holds console input back until the machine is whole
    /// (a restore replaces the UART's receive FIFO).
    pub fn serial_input(&self) -> &InputGate {
        &self.serial_input
    }

    /// Stops the devices that write guest memory on their own threads
    /// (the net cards' receive), before memory and device state are saved
    /// or restored.
    pub fn hold_io(&self) {
        for n in &self.nets {
            n.pause_rx();
        }
    }

    /// Lets the devices held by [`DeviceManager::hold_io`] run on.
    pub fn release_io(&self) {
        for n in &self.nets {
            n.resume_rx();
        }
    }

    /// Every stateful device's state. I/O must be held.
    pub fn save(&self) -> Result<DeviceStates, DeviceError> {
        let serial = lock(&self.serial)
            .save()
            .map_err(|msg| state_err("serial", msg))?;
        let nets = self.nets.iter().map(NetHandle::save).collect();
        let blocks = self.blocks.iter().map(BlockHandle::save).collect();
        Ok(DeviceStates {
            serial,
            nets,
            blocks,
        })
    }

    /// Refuses a state whose devices are not this VM's.
    pub fn check_fits(&self, s: &DeviceStates) -> Result<(), DeviceError> {
        if s.nets.len() != self.nets.len() || s.blocks.len() != self.blocks.len() {
            return Err(DeviceError::Mismatch {
                saved: persist::kinds(s.nets.len(), s.blocks.len()),
                have: persist::kinds(self.nets.len(), self.blocks.len()),
            });
        }
        Ok(())
    }

    /// Puts every device back into `s`, in slot order after the console.
    /// I/O must be held.
    pub fn restore(&self, s: &DeviceStates) -> Result<(), DeviceError> {
        self.check_fits(s)?;
        lock(&self.serial)
            .restore(&s.serial)
            .map_err(|msg| state_err("serial", msg))?;
        for (n, st) in self.nets.iter().zip(&s.nets) {
            n.restore(st)
                .map_err(|e| state_err("virtio-net", e.to_string()))?;
        }
        for (b, st) in self.blocks.iter().zip(&s.blocks) {
            b.restore(st)
                .map_err(|e| state_err("virtio-blk", e.to_string()))?;
        }
        Ok(())
    }
}

fn state_err(device: &str, msg: String) -> DeviceError {
    DeviceError::State {
        device: device.into(),
        msg,
    }
}
