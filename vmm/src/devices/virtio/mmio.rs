//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2): the
//! register file through which a driver discovers a device, negotiates
//! features, sets up the virtqueues and notifies them.
//!
//! Registers are 32 bits wide and little-endian; any other access to them
//! is refused. The device's configuration space starts at offset 0x100 and
//! takes any width. A driver that breaks the rules (clears status bits,
//! accepts features that were not offered, readies a queue whose size or
//! rings are invalid, notifies before DRIVER_OK) has the access refused and
//! logged; failures while processing a queue set DEVICE_NEEDS_RESET (status
//! bit 0x40) and raise a configuration interrupt. Nothing the driver writes
//! makes the VMM panic.

use std::fmt;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, QueueContext, VirtioDevice, VirtioError, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

/// "virt" in little-endian ASCII, the value of the MagicValue register.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The transport version: 2, the non-legacy layout.
pub const MMIO_VERSION: u32 = 2;
/// The vendor id the devices report: "SPVM" in little-endian ASCII.
pub const VENDOR_ID: u32 = 0x4d56_5053;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Refusals logged at warn level per device; later ones go to debug, so a
/// hostile guest cannot flood the log.
const MAX_WARNINGS: u32 = 32;

/// The queue registers as the driver last wrote them. They become a live
/// queue only when the driver sets QueueReady and they pass validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// QueueNum: the size the driver chose (not validated yet).
    pub num: u32,
    /// QueueDescLow/High: the descriptor table.
    pub desc: u64,
    /// QueueDriverLow/High: the available ring.
    pub driver: u64,
    /// QueueDeviceLow/High: the used ring.
    pub device: u64,
}

/// One queue in a checkpoint: its registers and the live queue state
/// (readiness, addresses, next_avail and next_used indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedQueue {
    /// The registers.
    pub regs: QueueRegs,
    /// The queue itself, as virtio-queue describes it.
    pub queue: QueueState,
}

/// The transport's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue, in order.
    pub queues: Vec<SavedQueue>,
}

/// A virtio device behind a virtio-mmio register file.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    regs: Vec<QueueRegs>,
    queues: Vec<Queue>,
    config_generation: u32,
    warnings: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, which reaches guest memory through `mem` and
    /// interrupts through `irq` (an eventfd registered with KVM as an irqfd).
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            regs: vec![QueueRegs::default(); queues.len()],
            queues,
            device,
            mem,
            interrupt: Interrupt::new(irq),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            warnings: 0,
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status()
    }

    /// Queue `index`, if the device has it.
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// Whether the driver finished setting the device up and no failure
    /// since asked for a reset: only then are queues processed.
    pub fn is_active(&self) -> bool {
        self.status & S_DRIVER_OK != 0 && self.status & S_NEEDS_RESET == 0
    }

    /// Lets the device do host-side work (for example deliver received
    /// frames). Does nothing unless the device is active.
    pub fn process_backend_event(&mut self) {
        if self.is_active() {
            self.run_device(|dev, ctx| dev.process_backend(ctx));
        }
    }

    fn run_device(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueContext<'_>) -> Result<(), VirtioError>,
    ) {
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &mut self.interrupt,
        };
        if let Err(e) = f(&mut self.device, &mut ctx) {
            self.fail(format_args!("{e}"));
        }
    }

    /// Logs a refused access (rate-limited).
    fn refuse(&mut self, what: fmt::Arguments<'_>) {
        let kind = self.device.device_type();
        if self.warnings < MAX_WARNINGS {
            self.warnings += 1;
            let more = if self.warnings == MAX_WARNINGS {
                " (further refusals are logged at debug level)"
            } else {
                ""
            };
            tracing::warn!("virtio-mmio (type {kind}): refused: {what}{more}");
        } else {
            tracing::debug!("virtio-mmio (type {kind}): refused: {what}");
        }
    }

    /// Marks the device as needing a reset and tells the driver.
    fn fail(&mut self, why: fmt::Arguments<'_>) {
        self.refuse(format_args!("device needs reset: {why}"));
        self.status |= S_NEEDS_RESET;
        if self.status & S_DRIVER_OK != 0 {
            self.interrupt.raise(INT_CONFIG);
        }
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let sel = self.queue_sel as usize;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.queues.get(sel).map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.queues.get(sel).is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            VIRTIO_MMIO_SHM_LEN_LOW..=VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.with_regs(|r| r.num = v),
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.with_regs(|r| set_low(&mut r.desc, v)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.with_regs(|r| set_high(&mut r.desc, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.with_regs(|r| set_low(&mut r.driver, v)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.with_regs(|r| set_high(&mut r.driver, v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.with_regs(|r| set_low(&mut r.device, v)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.with_regs(|r| set_high(&mut r.device, v)),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.refuse(format_args!("write of {v:#x} to register {offset:#x}")),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & S_FEATURES_OK != 0 {
            return self.refuse(format_args!("feature write after FEATURES_OK"));
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | u64::from(v) << 32,
            sel if v != 0 => self.refuse(format_args!("features {v:#x} in word {sel}")),
            _ => {}
        }
    }

    /// Applies `f` to the selected queue's registers, if it exists and is
    /// not live: a ready queue's configuration is frozen.
    fn with_regs(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        let sel = self.queue_sel as usize;
        match self.queues.get(sel) {
            None => self.refuse(format_args!("queue register write for queue {sel}")),
            Some(q) if q.ready() => {
                self.refuse(format_args!("reconfiguring ready queue {sel}"));
            }
            Some(_) => f(&mut self.regs[sel]),
        }
    }

    fn set_queue_ready(&mut self, v: u32) {
        let sel = self.queue_sel as usize;
        let Some((max, ready)) = self.queues.get(sel).map(|q| (q.max_size(), q.ready())) else {
            return self.refuse(format_args!("QueueReady for queue {sel}"));
        };
        match v {
            0 => self.queues[sel].reset(),
            1 if ready => {}
            1 => match build_queue(max, &self.regs[sel], &self.mem) {
                Ok(live) => self.queues[sel] = live,
                Err(why) => self.refuse(format_args!("queue {sel} not made ready: {why}")),
            },
            _ => self.refuse(format_args!("QueueReady value {v}")),
        }
    }

    fn notify(&mut self, v: u32) {
        let index = v as usize;
        if !self.is_active() {
            return self.refuse(format_args!("notify of queue {v} while not active"));
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return self.refuse(format_args!("notify of queue {v}, which is not ready"));
        }
        self.run_device(|dev, ctx| dev.process_queue(index, ctx));
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let needs_reset = self.status & S_NEEDS_RESET;
        let old = self.status & !S_NEEDS_RESET;
        // NEEDS_RESET belongs to the device; the driver cannot set it.
        let mut new = value & !S_NEEDS_RESET;
        if new & old != old {
            return self.refuse(format_args!(
                "status {value:#x} clears bits of {old:#x} without a reset"
            ));
        }
        let added = new & !old;
        if added & S_FEATURES_OK != 0 && !self.features_acceptable() {
            let f = self.driver_features;
            self.refuse(format_args!("FEATURES_OK with features {f:#x}"));
            new &= !S_FEATURES_OK;
        }
        self.status = new | needs_reset;
        if added & S_DRIVER_OK != 0 {
            self.driver_ok();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn driver_ok(&mut self) {
        if self.status & S_FEATURES_OK == 0 {
            return self.fail(format_args!("DRIVER_OK without FEATURES_OK"));
        }
        if self.status & S_NEEDS_RESET != 0 {
            return;
        }
        if let Err(e) = self.device.activate(self.driver_features) {
            return self.fail(format_args!("activation: {e}"));
        }
        self.process_backend_event();
    }

    /// The reset that writing 0 to the status register asks for.
    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
        self.regs.fill(QueueRegs::default());
        self.interrupt.set_status(0);
    }

    /// The transport's state, for a checkpoint.
    pub fn save_transport(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: (self.regs.iter().zip(&self.queues))
                .map(|(r, q)| SavedQueue {
                    regs: *r,
                    queue: q.state(),
                })
                .collect(),
        }
    }

    /// Puts the transport back into `state`, then activates or resets the
    /// device to match it. The state is validated as if a driver had
    /// written it; on error nothing changes. Guest memory is not touched.
    pub fn restore_transport(&mut self, state: &TransportState) -> Result<(), VirtioError> {
        let queues = self.restored_queues(state)?;
        let active = state.status & S_DRIVER_OK != 0 && state.status & S_NEEDS_RESET == 0;
        if active {
            self.device.activate(state.driver_features)?;
        } else {
            self.device.reset();
        }
        self.queues = queues;
        self.regs = state.queues.iter().map(|q| q.regs).collect();
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        Ok(())
    }

    fn restored_queues(&self, state: &TransportState) -> Result<Vec<Queue>, VirtioError> {
        let bad = |m: String| VirtioError::InvalidState(m);
        if state.queues.len() != self.queues.len() {
            let (got, want) = (state.queues.len(), self.queues.len());
            return Err(bad(format!("{got} queues saved, device has {want}")));
        }
        let offered = self.device.device_features();
        if state.driver_features & !offered != 0 {
            return Err(bad(format!("features {:#x}", state.driver_features)));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, live)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.queue.max_size != live.max_size() || saved.queue.event_idx_enabled {
                return Err(bad(format!("queue {i}: {:?}", saved.queue)));
            }
            let q = Queue::try_from(saved.queue)?;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(bad(format!("queue {i}: rings outside guest memory")));
            }
            queues.push(q);
        }
        Ok(queues)
    }
}

/// Builds a live queue from the registers, or says why it cannot be one.
fn build_queue(max: u16, regs: &QueueRegs, mem: &GuestMemoryMmap) -> Result<Queue, String> {
    let size = u16::try_from(regs.num).map_err(|_| format!("size {}", regs.num))?;
    let mut q = Queue::new(max).map_err(|e| e.to_string())?;
    q.try_set_size(size)
        .map_err(|_| format!("size {size} (max {max}, must be a power of 2)"))?;
    q.try_set_desc_table_address(GuestAddress(regs.desc))
        .map_err(|e| format!("descriptor table {:#x}: {e}", regs.desc))?;
    q.try_set_avail_ring_address(GuestAddress(regs.driver))
        .map_err(|e| format!("available ring {:#x}: {e}", regs.driver))?;
    q.try_set_used_ring_address(GuestAddress(regs.device))
        .map_err(|e| format!("used ring {:#x}: {e}", regs.device))?;
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(format!(
            "rings outside guest memory (desc {:#x}, avail {:#x}, used {:#x}, size {size})",
            regs.desc, regs.driver, regs.device
        ));
    }
    Ok(q)
}

fn set_low(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

fn set_high(r: &mut u64, v: u32) {
    *r = (*r & 0xffff_ffff) | u64::from(v) << 32;
}

/// A register access, if `offset` and `len` make one: 4 bytes, aligned.
fn register(offset: u64, len: usize) -> Option<u32> {
    (len == 4 && offset & 3 == 0)
        .then(|| u32::try_from(offset).ok())
        .flatten()
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            return self.device.read_config(offset - CONFIG_OFFSET, data);
        }
        match register(offset, data.len()) {
            Some(reg) => data.copy_from_slice(&self.read_reg(reg).to_le_bytes()),
            None => {
                data.fill(0);
                let len = data.len();
                self.refuse(format_args!("{len}-byte read at {offset:#x}"));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return self.device.write_config(offset - CONFIG_OFFSET, data);
        }
        match (register(offset, data.len()), <[u8; 4]>::try_from(data)) {
            (Some(reg), Ok(bytes)) => self.write_reg(reg, u32::from_le_bytes(bytes)),
            _ => {
                let len = data.len();
                self.refuse(format_args!("{len}-byte write at {offset:#x}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{r32, test_memory, w32, Ring};
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

    /// A device with two queues that records what the transport asks of it.
    #[derive(Default)]
    struct Dummy {
        activated: Option<u64>,
        resets: u32,
        notified: Vec<usize>,
        fail_next: bool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = offset as u8 + i as u8);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, acked: u64) -> Result<(), VirtioError> {
            self.activated = Some(acked);
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn process_queue(&mut self, i: usize, _: &mut QueueContext<'_>) -> Result<(), VirtioError> {
            self.notified.push(i);
            if std::mem::take(&mut self.fail_next) {
                return Err(VirtioError::Queue(virtio_queue::Error::InvalidChain));
            }
            Ok(())
        }
    }

    const ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

    fn transport() -> (MmioTransport<Dummy>, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Dummy::default(), test_memory(), evt.try_clone().unwrap());
        (t.unwrap(), evt)
    }

    fn negotiate(t: &mut MmioTransport<Dummy>, features: u64) -> u32 {
        w32(t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, VIRTIO_MMIO_STATUS, ACK_DRIVER | S_FEATURES_OK);
        r32(t, VIRTIO_MMIO_STATUS)
    }

    fn ready_queue(t: &mut MmioTransport<Dummy>, index: u32, ring: &Ring) -> bool {
        w32(t, VIRTIO_MMIO_QUEUE_SEL, index);
        ring.program(t);
        w32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        r32(t, VIRTIO_MMIO_QUEUE_READY) == 1
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1");
        w32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no such queue");
        assert_eq!(r32(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        let mut cfg = [0u8; 3];
        t.read(CONFIG_OFFSET + 4, &mut cfg);
        assert_eq!(cfg, [4, 5, 6]);
    }

    #[test]
    fn odd_width_and_unaligned_accesses_are_refused() {
        let (mut t, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(1, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(t.status(), 0);
        w32(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 5);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, _) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1 | 1);
        assert_ne!(s & S_FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.save_transport().driver_features, VIRTIO_F_VERSION_1 | 1);

        let (mut t, _) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1 | 2);
        assert_eq!(s & S_FEATURES_OK, 0, "feature 1 was not offered");
        let (mut t, _) = transport();
        let s = negotiate(&mut t, 1);
        assert_eq!(s & S_FEATURES_OK, 0, "legacy drivers are refused");
        // DRIVER_OK without FEATURES_OK asks for a reset.
        w32(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER | S_DRIVER_OK);
        assert_ne!(t.status() & S_NEEDS_RESET, 0);
        assert_eq!(t.device().activated, None);
    }

    #[test]
    fn status_cannot_lose_bits_and_zero_resets() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        w32(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(t.status(), ACK_DRIVER | S_FEATURES_OK);
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | S_FEATURES_OK | S_NEEDS_RESET,
        );
        assert_eq!(t.status() & S_NEEDS_RESET, 0, "the driver cannot set it");
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.device().resets, 1);
        assert_eq!(t.save_transport().driver_features, 0);
    }

    #[test]
    fn queue_setup_is_validated() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        let good = Ring::new(0x1_0000, 16);
        // Size 0, not a power of 2, above the maximum, above u16.
        for num in [0, 12, 32, 0x1_0010] {
            assert!(!ready_queue(&mut t, 0, &good.with_size(num)), "size {num}");
        }
        // Rings outside guest memory, misaligned, or wrapping around.
        for ring in [
            Ring::new(0x100_0000 - 0x80, 16),
            Ring::new(0xd000_0000, 16),
            Ring::new(0x1_0008, 16),
            Ring::new(u64::MAX - 0x100, 16),
        ] {
            assert!(!ready_queue(&mut t, 0, &ring), "{ring:?}");
        }
        assert!(!ready_queue(&mut t, 5, &good), "no queue 5");
        assert!(ready_queue(&mut t, 0, &good));
        // A ready queue's registers are frozen.
        w32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(t.save_transport().queues[0].regs.num, 16);
        w32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn notifications_reach_only_ready_queues_of_active_devices() {
        let (mut t, evt) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert!(ready_queue(&mut t, 0, &Ring::new(0x1_0000, 16)));
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.device().notified.is_empty(), "before DRIVER_OK");
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1));
        for q in [1, 2, u32::MAX, 0] {
            w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, q);
        }
        assert_eq!(t.device().notified, vec![0]);
        // A processing failure asks for a reset and stops processing.
        t.device_mut().fail_next = true;
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(t.status() & S_NEEDS_RESET, 0);
        assert_eq!(t.interrupt_status(), INT_CONFIG);
        assert_eq!(evt.read().unwrap(), 1);
        w32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.device().notified, vec![0, 0]);
        w32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(t.interrupt_status(), 0);
    }

    #[test]
    fn transport_state_round_trips_and_is_validated() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert!(ready_queue(&mut t, 1, &Ring::new(0x2_0000, 8)));
        w32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        let saved = t.save_transport();
        w32(&mut t, VIRTIO_MMIO_STATUS, 0);
        t.restore_transport(&saved).unwrap();
        assert_eq!(t.save_transport(), saved);
        assert!(t.is_active());
        assert_eq!(t.device().activated, Some(VIRTIO_F_VERSION_1));

        let mut bad = saved.clone();
        bad.queues[1].queue.size = 3;
        assert!(t.restore_transport(&bad).is_err());
        let mut bad = saved.clone();
        bad.queues[1].queue.used_ring = 0xd000_0000;
        assert!(t.restore_transport(&bad).is_err());
        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(t.restore_transport(&bad).is_err());
        let mut bad = saved.clone();
        bad.driver_features |= 4;
        assert!(t.restore_transport(&bad).is_err());
        assert_eq!(t.save_transport(), saved, "failed restores change nothing");
    }
}
