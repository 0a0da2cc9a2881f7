//! A device bus: guest address ranges mapped to device models.
//!
//! The vCPU loop hands every PIO and MMIO exit to a bus and never looks at
//! port numbers itself. Each device sees offsets relative to the base of
//! the range it was inserted at.
//!
//! The bus knows nothing of device state: the device manager
//! ([`crate::device_manager`]) holds typed handles to the stateful devices
//! and saves them through [`crate::persist::Persist`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that the guest reaches through a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Like [`BusDevice::write`], for devices whose writes need the whole
    /// VM: they return a [`VcpuTrap`], and the vCPU hands itself to the VMM's
    /// controller. Other devices keep this default.
    fn write_trap(&mut self, offset: u64, data: &[u8]) -> Option<VcpuTrap> {
        self.write(offset, data);
        None
    }
}

/// A request a device makes of the vCPU whose access reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuTrap {
    /// A speculation hypercall with this operation number.
    Hypercall(u32),
    /// The host-compat system-call trampoline's doorbell: the vCPU must be
    /// carried into the guest kernel (see `host_compat::trampoline`).
    SyscallEntry,
}

/// The result of a write on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    /// No device covers the address.
    Unclaimed,
    /// A device took the write.
    Done,
    /// A device took the write and needs the vCPU.
    Trap(VcpuTrap),
}

/// Errors of bus configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero, or one that wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}..{end:#x} overlaps a device at {other:#x}")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// End of the new range (exclusive).
        end: u64,
        /// Base of the existing device.
        other: u64,
    },
}

/// A shared handle to a device on the bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
    /// Whether the device's writes stay inside the VMM (see
    /// [`Bus::insert_internal`]).
    internal: bool,
}

/// Address ranges, each mapped to one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        self.insert_entry(device, base, len, false)
    }

    /// Maps `device` at `[base, base + len)` as a device whose writes
    /// reach nothing outside the VMM (the host-compat layer's doorbell), so
    /// they need not wait while a restored guest's output is held
    /// ([`crate::snapshot::verify::Verify::BeforeOutput`]).
    pub fn insert_internal(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.insert_entry(device, base, len, true)
    }

    fn insert_entry(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
        internal: bool,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest range starting at or below the new end must end at
        // or before the new base.
        if let Some((&other, e)) = self.devices.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, end, other });
            }
        }
        self.devices.insert(
            base,
            Entry {
                len,
                device,
                internal,
            },
        );
        Ok(())
    }

    /// The device covering `addr`, with the offset of `addr` in its range.
    /// An access of `len` bytes must fit entirely inside the range.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        self.entry(addr, len).map(|(e, offset)| (&e.device, offset))
    }

    fn entry(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let (&base, e) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= e.len).then_some((e, offset))
    }

    /// Whether a write of `len` bytes at `addr` reaches a device whose
    /// writes may leave the VM: any claimed address but an internal
    /// device's. An unclaimed write is dropped, so it does not.
    pub fn write_leaves_vm(&self, addr: u64, len: usize) -> bool {
        self.entry(addr, len).is_some_and(|(e, _)| !e.internal)
    }

    /// Dispatches a guest read. Returns false if no device covers it; the
    /// caller decides what an unclaimed read returns.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write.
    pub fn write(&self, addr: u64, data: &[u8]) -> WriteResult {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => match lock(dev).write_trap(offset, data) {
                Some(t) => WriteResult::Trap(t),
                None => WriteResult::Done,
            },
            None => WriteResult::Unclaimed,
        }
    }
}

/// Locks a device. A device whose lock was poisoned by a panicking thread
/// is still used: device models keep no invariant that a panic breaks
/// halfway, and the VMM is ending anyway when a vCPU thread panics.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    crate::sync::lock(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 4).unwrap();
        assert_eq!(bus.write(0x3f9, &[7]), WriteResult::Done);
        assert_eq!(bus.write(0x400, &[1, 2, 3, 4]), WriteResult::Done);
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert_eq!(a.lock().unwrap().writes, vec![(1, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![1, 2, 3, 4])]);
    }

    #[test]
    fn only_claimed_writes_to_devices_not_internal_leave_the_vm() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        bus.insert_internal(Arc::new(Mutex::new(Recorder::default())), 0x20, 4)
            .unwrap();
        assert!(bus.write_leaves_vm(0x12, 2));
        assert!(!bus.write_leaves_vm(0x20, 1), "internal");
        assert!(!bus.write_leaves_vm(0x18, 1), "unclaimed");
        assert!(!bus.write_leaves_vm(0x13, 2), "past the end: unclaimed");
        assert_eq!(
            bus.insert_internal(Arc::new(Mutex::new(Recorder::default())), 0x12, 4),
            Err(BusError::Overlap {
                base: 0x12,
                end: 0x16,
                other: 0x10
            }),
            "an internal device is placed by the same rules"
        );
    }

    #[test]
    fn unclaimed_and_straddling_accesses_miss() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        assert_eq!(bus.write(0x0f, &[0]), WriteResult::Unclaimed);
        assert_eq!(bus.write(0x14, &[0]), WriteResult::Unclaimed);
        assert_eq!(
            bus.write(0x12, &[0, 0, 0, 0]),
            WriteResult::Unclaimed,
            "access past the end"
        );
        assert!(!bus.read(u64::MAX, &mut [0u8; 8]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x80, 0x200),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(d(), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x110, 0x10).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
