//! The virtio-mmio transport (version 2, virtio 1.x section 4.2) that the
//! bare guests' polling drivers share: [`crate::virtio_net`] and
//! [`crate::virtio_blk`]. A new driver takes its register window
//! ([`Mmio`]), brings the device up with [`begin`], sets up each queue
//! with [`setup_queue`] and ends with [`start`].
//!
//! These drivers are test instruments for specvm's device models, written
//! from the virtio spec and not from those models, so a misreading of the
//! spec on one side shows up as a failure rather than agreeing with
//! itself. That is also why they are not the `virtio-drivers` crate: they
//! run at CPL3 in a guest with no allocator and no interrupts, they poll,
//! and some of their paths do on purpose what a production driver would
//! refuse (a write to a read-only disk, to see the device answer IOERR).
//!
//! Each queue is a split virtqueue whose three parts lie in one area of
//! the driver's DMA memory: the descriptor table at [`DESC_OFFSET`], the
//! available ring at [`AVAIL_OFFSET`], the used ring at [`USED_OFFSET`]
//! (room for 16 entries).

/// The guest-physical base of the first virtio-mmio slot of specvm.
pub const FIRST_SLOT_BASE: u64 = 0xd000_0000;

// Registers (virtio 1.x, 4.2.2).
pub const REG_MAGIC: usize = 0x000;
pub const REG_VERSION: usize = 0x004;
pub const REG_DEVICE_ID: usize = 0x008;
pub const REG_DEVICE_FEATURES: usize = 0x010;
pub const REG_DEVICE_FEATURES_SEL: usize = 0x014;
pub const REG_DRIVER_FEATURES: usize = 0x020;
pub const REG_DRIVER_FEATURES_SEL: usize = 0x024;
pub const REG_QUEUE_SEL: usize = 0x030;
pub const REG_QUEUE_NUM_MAX: usize = 0x034;
pub const REG_QUEUE_NUM: usize = 0x038;
pub const REG_QUEUE_READY: usize = 0x044;
pub const REG_QUEUE_NOTIFY: usize = 0x050;
pub const REG_STATUS: usize = 0x070;
pub const REG_QUEUE_DESC: usize = 0x080;
pub const REG_QUEUE_AVAIL: usize = 0x090;
pub const REG_QUEUE_USED: usize = 0x0a0;
pub const REG_CONFIG_GENERATION: usize = 0x0fc;
pub const REG_CONFIG: usize = 0x100;

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
/// VIRTIO_F_VERSION_1, which every driver here requires.
pub const F_VERSION_1: u64 = 1 << 32;

/// Where a queue's parts lie in its area of DMA memory.
pub const DESC_OFFSET: usize = 0;
pub const AVAIL_OFFSET: usize = 0x100;
pub const USED_OFFSET: usize = 0x200;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// VRING_AVAIL_F_NO_INTERRUPT: these drivers poll.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// 32-bit and 8-bit access to a device's register window (offsets from its
/// base).
pub trait Mmio {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);
    /// Reads one byte (of the configuration space) at `offset`.
    fn read8(&self, offset: usize) -> u8;
}

/// A register window at an identity-mapped physical address.
#[derive(Debug, Clone, Copy)]
pub struct PhysMmio {
    base: usize,
}

impl PhysMmio {
    /// The window at `base`.
    ///
    /// # Safety
    /// `base..base + 0x1000` must be mapped at the same virtual address and
    /// belong to a device (or be a hole whose accesses the VMM handles):
    /// the driver reads and writes it.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }
}

impl Mmio for PhysMmio {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract makes the window accessible; offsets
        // come from the drivers and stay inside it.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    fn read8(&self, offset: usize) -> u8 {
        // SAFETY: as for `read32`.
        unsafe { ((self.base + offset) as *const u8).read_volatile() }
    }
}

/// Why the transport could not bring a device up. Each driver turns these
/// into its own error type (`From`), which names the device it expected
/// and says it in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    /// No virtio-mmio device: the magic value read back.
    BadMagic(u32),
    /// Not virtio-mmio version 2.
    BadVersion(u32),
    /// A virtio device of another type: its device id.
    OtherDevice(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device refused the features (FEATURES_OK did not stick).
    FeaturesRefused,
    /// A queue is missing, already live, too small, or would not go live.
    QueueTooSmall {
        /// The queue.
        queue: u16,
        /// Its maximum size.
        max: u32,
    },
    /// The device asks for a reset (status bit DEVICE_NEEDS_RESET).
    NeedsReset,
}

/// Whether `mmio` holds a virtio-mmio version 2 device of type `device_id`.
pub fn probe(mmio: &impl Mmio, device_id: u32) -> Result<(), TransportError> {
    match mmio.read32(REG_MAGIC) {
        MAGIC => {}
        v => return Err(TransportError::BadMagic(v)),
    }
    match mmio.read32(REG_VERSION) {
        2 => {}
        v => return Err(TransportError::BadVersion(v)),
    }
    match mmio.read32(REG_DEVICE_ID) {
        id if id == device_id => Ok(()),
        id => Err(TransportError::OtherDevice(id)),
    }
}

/// Checks the device ([`probe`]), resets and acknowledges it, and
/// negotiates: VIRTIO_F_VERSION_1, which it must offer, and whatever of
/// `optional` it offers. Returns the features agreed, with FEATURES_OK set
/// and checked (virtio 1.x, 3.1.1 steps 1 to 6).
pub fn begin(mmio: &impl Mmio, device_id: u32, optional: u64) -> Result<u64, TransportError> {
    probe(mmio, device_id)?;
    mmio.write32(REG_STATUS, 0);
    mmio.write32(REG_STATUS, S_ACKNOWLEDGE);
    mmio.write32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio.write32(REG_DEVICE_FEATURES_SEL, 0);
    let lo = mmio.read32(REG_DEVICE_FEATURES);
    mmio.write32(REG_DEVICE_FEATURES_SEL, 1);
    let hi = mmio.read32(REG_DEVICE_FEATURES);
    let offered = u64::from(hi) << 32 | u64::from(lo);
    if offered & F_VERSION_1 == 0 {
        return Err(TransportError::NoVersion1);
    }
    let wanted = offered & (F_VERSION_1 | optional);
    mmio.write32(REG_DRIVER_FEATURES_SEL, 0);
    mmio.write32(REG_DRIVER_FEATURES, wanted as u32);
    mmio.write32(REG_DRIVER_FEATURES_SEL, 1);
    mmio.write32(REG_DRIVER_FEATURES, (wanted >> 32) as u32);
    mmio.write32(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if mmio.read32(REG_STATUS) & S_FEATURES_OK == 0 {
        return Err(TransportError::FeaturesRefused);
    }
    Ok(wanted)
}

/// Sets up queue `queue` with `size` entries whose area of DMA memory is
/// at guest-physical `area` (see the module's layout), interrupts off,
/// and makes it live. `avail_flags` is where the driver's view of the
/// available ring's flags is, to write [`AVAIL_F_NO_INTERRUPT`] there.
pub fn setup_queue(
    mmio: &impl Mmio,
    queue: u16,
    size: u16,
    area: u64,
    avail_flags: impl FnOnce(u16),
) -> Result<(), TransportError> {
    mmio.write32(REG_QUEUE_SEL, queue.into());
    let max = mmio.read32(REG_QUEUE_NUM_MAX);
    let too_small = TransportError::QueueTooSmall { queue, max };
    if max < u32::from(size) || mmio.read32(REG_QUEUE_READY) != 0 {
        return Err(too_small);
    }
    mmio.write32(REG_QUEUE_NUM, size.into());
    for (reg, offset) in [
        (REG_QUEUE_DESC, DESC_OFFSET),
        (REG_QUEUE_AVAIL, AVAIL_OFFSET),
        (REG_QUEUE_USED, USED_OFFSET),
    ] {
        let addr = area + offset as u64;
        mmio.write32(reg, addr as u32);
        mmio.write32(reg + 4, (addr >> 32) as u32);
    }
    avail_flags(AVAIL_F_NO_INTERRUPT);
    mmio.write32(REG_QUEUE_READY, 1);
    if mmio.read32(REG_QUEUE_READY) != 1 {
        return Err(too_small);
    }
    Ok(())
}

/// Sets DRIVER_OK: the device is live (3.1.1 step 8).
pub fn start(mmio: &impl Mmio) -> Result<(), TransportError> {
    let status = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    mmio.write32(REG_STATUS, status);
    match needs_reset(mmio) {
        true => Err(TransportError::NeedsReset),
        false => Ok(()),
    }
}

/// Whether the device asks for a reset.
pub fn needs_reset(mmio: &impl Mmio) -> bool {
    mmio.read32(REG_STATUS) & S_NEEDS_RESET != 0
}

/// Runs `read` over the configuration space until the configuration
/// generation holds still across it (at most eight times), and returns
/// its last result.
pub fn read_config<M: Mmio, T>(mmio: &M, mut read: impl FnMut(&M) -> T) -> T {
    let mut tries = 0;
    loop {
        let generation = mmio.read32(REG_CONFIG_GENERATION);
        let value = read(mmio);
        tries += 1;
        if mmio.read32(REG_CONFIG_GENERATION) == generation || tries == 8 {
            return value;
        }
    }
}
