//! Guest memory: one memfd, mapped copy-on-write (`MAP_PRIVATE`) region by
//! region, with a dirty bitmap for writes the VMM makes on the guest's behalf.
//!
//! The memfd is the base that speculation checkpoints roll back to: pages the
//! guest wrote since are private copies that `MADV_DONTNEED` drops. KVM's own
//! dirty log (enabled on every memory slot) tracks the guest's writes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Guest memory with a VMM-side dirty bitmap on every region.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The guest page size that dirty tracking works in.
pub const PAGE_SIZE: usize = 4096;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("creating the guest memory file: {0}")]
    Memfd(io::Error),
    /// The memfd could not be sized.
    #[error("sizing the guest memory file to {0:#x} bytes: {1}")]
    Truncate(u64, io::Error),
    /// A region could not be mapped.
    #[error("mapping guest memory {base:#x}..{end:#x}: {err}")]
    Map {
        /// Guest address of the region.
        base: u64,
        /// End of the region (exclusive).
        end: u64,
        /// What mmap said.
        err: String,
    },
}

/// Guest memory and the file behind it.
pub struct GuestRam {
    /// The mapped regions, as vm-memory sees them.
    pub mem: GuestMemoryMmap,
    /// The memfd all regions map, at increasing offsets.
    pub file: File,
}

/// Creates `mem_size` bytes of guest memory laid out by [`ram_ranges`].
pub fn create_guest_memory(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let file = memfd("specvm-guest-ram")?;
    file.set_len(mem_size)
        .map_err(|e| MemoryError::Truncate(mem_size, e))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, size) in ram_ranges(mem_size) {
        let map_err = |err: String| MemoryError::Map {
            base,
            end: base + size,
            err,
        };
        let fo = FileOffset::new(
            file.try_clone().map_err(|e| map_err(e.to_string()))?,
            offset,
        );
        let bitmap = AtomicBitmap::new(
            size as usize,
            std::num::NonZeroUsize::new(PAGE_SIZE).expect("page size is non-zero"),
        );
        let region = MmapRegionBuilder::new_with_bitmap(size as usize, bitmap)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(base))
                .ok_or_else(|| map_err("region wraps around".into()))?,
        );
        offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        base: 0,
        end: mem_size,
        err: e.to_string(),
    })?;
    Ok(GuestRam { mem, file })
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|e| MemoryError::Memfd(io::Error::other(e)))?;
    // SAFETY: `cname` is a valid NUL-terminated string; the call has no
    // other memory effect.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned to us by memfd_create and nothing else
    // owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_file_backed_private_and_tracked() {
        let ram = create_guest_memory(64 << 20).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        ram.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x5000))
            .unwrap();
        let r = ram.mem.find_region(GuestAddress(0x5000)).unwrap();
        assert!(r.bitmap().dirty_at(0x5000), "VMM write must be tracked");
        assert!(!r.bitmap().dirty_at(0x6000));
        // MAP_PRIVATE: the write is not in the file.
        let mut b = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut b, 0x5000).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
