//! Guest memory: one memfd, mapped copy-on-write (`MAP_PRIVATE`) region by
//! region, with a dirty bitmap for writes the VMM makes on the guest's behalf.
//!
//! The memfd holds the state that speculation checkpoints roll back to:
//! pages written since are private copies in the mapping (see
//! [`crate::spec::memory`]). KVM's own dirty log (enabled on every memory
//! slot) tracks the guest's writes.
//!
//! [`RamLayout`] is the one place that knows where each byte of the memfd
//! sits in guest-physical space.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::FromRawFd;

use super::dirty_bitmap::DirtyBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Guest memory with a VMM-side dirty bitmap on every region.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// The guest page size that dirty tracking works in.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;

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
    /// The mapped regions, as vm-memory sees them: one per range of
    /// `layout`, in the same order.
    pub mem: GuestMemoryMmap,
    /// The memfd all regions map, at increasing offsets.
    pub file: File,
    /// Where each region sits in the file and in guest-physical space.
    pub layout: RamLayout,
}

/// One range of guest RAM: where it is in guest-physical space and in the
/// memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Size in bytes (whole pages).
    pub size: u64,
    /// Offset of its first byte in the memory file.
    pub file_offset: u64,
}

impl RamRange {
    /// The file offset just past the range.
    pub fn file_end(&self) -> u64 {
        self.file_offset + self.size
    }

    /// The file's page numbers the range covers.
    pub fn pages(&self) -> Range<u64> {
        self.file_offset / PAGE..self.file_end() / PAGE
    }
}

/// A piece of a memory-file extent that lies inside one [`RamRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the range in [`RamLayout::ranges`].
    pub range: usize,
    /// Offset of the piece in the memory file.
    pub file_offset: u64,
    /// Guest-physical address of the piece.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The layout of guest RAM, made from the memory size by [`ram_ranges`]:
/// the ranges fill the memory file back to back, in guest-address order.
/// The only place that maps memory-file offsets and page numbers to
/// guest-physical addresses and ranges (regions, memory slots), and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    ranges: Vec<RamRange>,
}

impl RamLayout {
    /// The layout of a guest with `mem_size` bytes of RAM.
    pub fn new(mem_size: u64) -> Self {
        let mut file_offset = 0;
        let ranges = ram_ranges(mem_size)
            .into_iter()
            .map(|(gpa, size)| {
                let r = RamRange {
                    gpa,
                    size,
                    file_offset,
                };
                file_offset += size;
                r
            })
            .collect();
        Self { ranges }
    }

    /// Bytes of RAM: the size of the memory file.
    pub fn mem_size(&self) -> u64 {
        self.ranges.last().map_or(0, RamRange::file_end)
    }

    /// The ranges, in file (and guest-address) order. Range `i` is guest
    /// memory region `i` and KVM memory slot `i`.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The ranges as `(guest address, size)`, as a snapshot stores them.
    pub fn gpa_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|r| (r.gpa, r.size)).collect()
    }

    /// The index of the range holding memory-file offset `off`.
    pub fn range_of_offset(&self, off: u64) -> Option<usize> {
        self.ranges
            .iter()
            .position(|r| (r.file_offset..r.file_end()).contains(&off))
    }

    /// The guest-physical address of memory-file offset `off`.
    pub fn offset_to_gpa(&self, off: u64) -> Option<u64> {
        let r = &self.ranges[self.range_of_offset(off)?];
        Some(r.gpa + (off - r.file_offset))
    }

    /// The guest-physical address of the memory file's page `page`.
    pub fn page_to_gpa(&self, page: u64) -> Option<u64> {
        self.offset_to_gpa(page.checked_mul(PAGE)?)
    }

    /// The memory-file offset of guest-physical address `gpa`, if it is RAM.
    pub fn gpa_to_offset(&self, gpa: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|r| (r.gpa..r.gpa + r.size).contains(&gpa))
            .map(|r| r.file_offset + (gpa - r.gpa))
    }

    /// The file extent `off..off + len`, split where a range ends; `None`
    /// if any of it is past the end of RAM.
    pub fn split(&self, off: u64, len: u64) -> Option<Vec<Piece>> {
        let mut out = Vec::new();
        let (mut off, end) = (off, off.checked_add(len)?);
        while off < end {
            let range = self.range_of_offset(off)?;
            let r = &self.ranges[range];
            let n = (end - off).min(r.file_end() - off);
            out.push(Piece {
                range,
                file_offset: off,
                gpa: r.gpa + (off - r.file_offset),
                len: n,
            });
            off += n;
        }
        Some(out)
    }

    /// The contiguous runs of the sorted file page numbers `pages`, split
    /// where a range ends, each with the index of its range. Pages past the
    /// end of RAM are left out.
    pub fn page_runs(&self, pages: &[u64]) -> Vec<(usize, Range<u64>)> {
        let mut out: Vec<(usize, Range<u64>)> = Vec::new();
        let mut ranges = self.ranges.iter().map(RamRange::pages).enumerate();
        let Some(mut current) = ranges.next() else {
            return out;
        };
        for &p in pages {
            while p >= current.1.end {
                match ranges.next() {
                    Some(next) => current = next,
                    None => return out,
                }
            }
            match out.last_mut() {
                Some((i, run)) if *i == current.0 && run.end == p => run.end += 1,
                _ => out.push((current.0, p..p + 1)),
            }
        }
        out
    }

    /// Whether `mem`'s regions are this layout's ranges, in order.
    pub fn describes(&self, mem: &GuestMemoryMmap) -> bool {
        mem.num_regions() == self.ranges.len()
            && mem
                .iter()
                .zip(&self.ranges)
                .all(|(m, r)| m.start_addr().0 == r.gpa && m.len() == r.size)
    }
}

/// Creates `mem_size` bytes of guest memory laid out by [`RamLayout`].
pub fn create_guest_memory(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let file = memfd("specvm-guest-ram")?;
    file.set_len(mem_size)
        .map_err(|e| MemoryError::Truncate(mem_size, e))?;
    let layout = RamLayout::new(mem_size);
    let mut regions = Vec::new();
    for r in layout.ranges() {
        let (base, size) = (r.gpa, r.size);
        let map_err = |err: String| MemoryError::Map {
            base,
            end: base + size,
            err,
        };
        let fo = FileOffset::new(
            file.try_clone().map_err(|e| map_err(e.to_string()))?,
            r.file_offset,
        );
        let bitmap = DirtyBitmap::new(size as usize);
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
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        base: 0,
        end: mem_size,
        err: e.to_string(),
    })?;
    Ok(GuestRam { mem, file, layout })
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
    use vm_memory::Bytes;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_small_guest_is_one_range_at_offset_zero() {
        let l = RamLayout::new(256 << 20);
        assert_eq!(l.mem_size(), 256 << 20);
        assert_eq!(l.gpa_ranges(), ram_ranges(256 << 20));
        assert_eq!(l.offset_to_gpa(0x5000), Some(0x5000));
        assert_eq!(l.offset_to_gpa(256 << 20), None);
        assert_eq!(l.page_runs(&[1, 2, 5, 1 << 20]), vec![(0, 1..3), (0, 5..6)]);
    }

    #[test]
    fn offsets_and_pages_map_across_the_mmio_gap() {
        let l = RamLayout::new(4 * GIB);
        assert_eq!(l.gpa_ranges(), ram_ranges(4 * GIB));
        assert_eq!(l.mem_size(), 4 * GIB);
        assert_eq!(l.ranges()[1].file_offset, 3 * GIB);
        assert_eq!(l.ranges()[1].pages(), (3 * GIB / PAGE)..(4 * GIB / PAGE));
        // The last byte below the gap, then the first above it.
        assert_eq!(l.offset_to_gpa(3 * GIB - 1), Some(3 * GIB - 1));
        assert_eq!(l.offset_to_gpa(3 * GIB), Some(4 * GIB));
        assert_eq!(l.offset_to_gpa(4 * GIB - 1), Some(5 * GIB - 1));
        assert_eq!(l.offset_to_gpa(4 * GIB), None);
        assert_eq!(l.range_of_offset(3 * GIB - 1), Some(0));
        assert_eq!(l.range_of_offset(3 * GIB), Some(1));
        let first_high = 3 * GIB / PAGE;
        assert_eq!(l.page_to_gpa(first_high - 1), Some(3 * GIB - PAGE));
        assert_eq!(l.page_to_gpa(first_high), Some(4 * GIB));
        assert_eq!(l.page_to_gpa(u64::MAX), None);
        // And back; the gap itself is not RAM.
        assert_eq!(l.gpa_to_offset(4 * GIB + 0x1234), Some(3 * GIB + 0x1234));
        assert_eq!(l.gpa_to_offset(3 * GIB - 1), Some(3 * GIB - 1));
        assert_eq!(l.gpa_to_offset(3 * GIB), None);
        assert_eq!(l.gpa_to_offset(4 * GIB - 1), None);
        assert_eq!(l.gpa_to_offset(5 * GIB), None);
    }

    #[test]
    fn extents_and_page_runs_split_at_the_gap() {
        let l = RamLayout::new(4 * GIB);
        let pieces = l.split(3 * GIB - 0x1800, 0x3000).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece {
                    range: 0,
                    file_offset: 3 * GIB - 0x1800,
                    gpa: 3 * GIB - 0x1800,
                    len: 0x1800
                },
                Piece {
                    range: 1,
                    file_offset: 3 * GIB,
                    gpa: 4 * GIB,
                    len: 0x1800
                },
            ]
        );
        assert_eq!(l.split(4 * GIB - 0x1000, 0x2000), None, "past the end");
        assert_eq!(l.split(0, 0), Some(vec![]));
        let g = 3 * GIB / PAGE;
        let end = 4 * GIB / PAGE;
        assert_eq!(
            l.page_runs(&[g - 2, g - 1, g, g + 1, g + 5, end - 1, end, end + 3]),
            vec![
                (0, g - 2..g),
                (1, g..g + 2),
                (1, g + 5..g + 6),
                (1, end - 1..end)
            ]
        );
    }

    #[test]
    fn guest_memory_follows_its_layout() {
        let ram = create_guest_memory(64 << 20).unwrap();
        assert!(ram.layout.describes(&ram.mem));
        assert!(!RamLayout::new(32 << 20).describes(&ram.mem));
    }

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
