//! Memory a guest driver shares with a virtio device: where the driver
//! reads and writes it, and the guest-physical address the device uses.
//! The drivers (`virtio_net`, `virtio_blk`) each name their size.

/// `SIZE` bytes shared with a device.
#[derive(Debug)]
pub struct Dma<const SIZE: usize> {
    virt: *mut u8,
    phys: u64,
}

impl<const SIZE: usize> Dma<SIZE> {
    /// `SIZE` bytes at `virt`, which the device sees at `phys`.
    ///
    /// # Safety
    /// `virt..virt + SIZE` must be valid for reads and writes, used by
    /// nothing but the driver and the device while the driver lives, and
    /// be what the device reaches at `phys..phys + SIZE`. Both addresses
    /// must be page-aligned (4096).
    pub const unsafe fn new(virt: *mut u8, phys: u64) -> Self {
        Self { virt, phys }
    }

    /// Identity-mapped memory at `addr` (bare guests).
    ///
    /// # Safety
    /// As for [`Dma::new`] with `virt` = `phys` = `addr`.
    pub const unsafe fn identity(addr: u64) -> Self {
        Self {
            virt: addr as *mut u8,
            phys: addr,
        }
    }

    /// The guest-physical address of byte `offset`, for the device.
    pub(crate) fn phys(&self, offset: usize) -> u64 {
        self.phys + offset as u64
    }

    /// Writes `value` at `offset` (volatile: the device reads it).
    pub(crate) fn write<T: Copy>(&self, offset: usize, value: T) {
        debug_assert!(offset + core::mem::size_of::<T>() <= SIZE);
        // SAFETY: the constructor's contract covers SIZE bytes, and every
        // offset the drivers compute lies inside them, aligned for T.
        unsafe { self.virt.add(offset).cast::<T>().write_volatile(value) }
    }

    /// Reads a value at `offset` (volatile: the device writes it).
    pub(crate) fn read<T: Copy>(&self, offset: usize) -> T {
        debug_assert!(offset + core::mem::size_of::<T>() <= SIZE);
        // SAFETY: as for `write`.
        unsafe { self.virt.add(offset).cast::<T>().read_volatile() }
    }

    /// Copies `data` to `offset`.
    pub(crate) fn copy_in(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= SIZE);
        // SAFETY: checked to lie inside the SIZE bytes the contract
        // covers, which no Rust reference aliases.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.virt.add(offset), data.len()) }
    }

    /// Copies bytes from `offset` into `out`.
    pub(crate) fn copy_out(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= SIZE);
        // SAFETY: as for `copy_in`.
        unsafe {
            core::ptr::copy_nonoverlapping(self.virt.add(offset), out.as_mut_ptr(), out.len())
        }
    }
}
