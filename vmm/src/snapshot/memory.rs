//! Guest memory of a restored VM: the snapshot's memory file mapped
//! copy-on-write, so a restore does not copy guest memory.
//!
//! The VM is built as usual, on an empty memfd; then every region is
//! mapped again, at the same host address, `MAP_PRIVATE` onto the
//! snapshot's base layer, and the pages of the diff layers are written over
//! it (through vm-memory, so its dirty bitmap sees them), each piece
//! checked against its checksum before it is written. The guest reads
//! the snapshot's pages straight from the page cache, and VMs restored from
//! one snapshot share them until they write; the base layer is checked
//! on a thread of its own ([`super::verify`]).
//!
//! The speculation tracker needs a memory file of the VM's own that it may
//! write (its flushes), which the snapshot's must never be. So the first
//! time the VM checkpoints (speculates or is snapshotted), the tracker
//! *materializes* its memory (`crate::spec::memory`): it copies the base
//! layer into the memfd, flushes every page written since the restore into
//! it, and maps the regions back onto the memfd ([`remap`]). Only VMs that
//! speculate or snapshot pay that copy, and only once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::files::open_layers;
use super::{SnapshotError, VmSnapshot};
use crate::vstate::memory::{GuestMemoryMmap, GuestRam, RamLayout};

/// Maps every region of `mem` again, at the same address, `MAP_PRIVATE`
/// onto `file` at its range's offset in `layout`, which must describe
/// `mem`. Private copies the regions held are dropped.
pub fn remap(mem: &GuestMemoryMmap, layout: &RamLayout, file: &File) -> io::Result<()> {
    if !layout.describes(mem) {
        return Err(io::Error::other("guest memory does not follow its layout"));
    }
    for (r, range) in mem.iter().zip(layout.ranges()) {
        let host = r.as_ptr();
        let len = r.len() as usize;
        let off = range.file_offset;
        // SAFETY: `host..host+len` is exactly one region's mapping, owned by
        // `mem`, which stays alive and unmaps this range when dropped;
        // MAP_FIXED replaces that mapping in place with one of the same
        // size and protection, so every pointer into it stays valid. The
        // file is at least `off + len` bytes long (checked by the caller),
        // and KVM's MMU notifier drops its own mappings of the old pages.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Maps the snapshot's memory as `mem`'s backing: the base layer
/// copy-on-write, the diff layers' pages written over it, each piece
/// checked against its checksum first. Starts the check of the base layer
/// ([`super::verify`]), which [`super::restore::restore_machine`] waits
/// for. Returns the base layer file, which the memory tracker copies from
/// when it materializes.
pub fn restore_memory(
    dir: &Path,
    snap: &VmSnapshot,
    ram: &GuestRam,
) -> Result<File, SnapshotError> {
    let (mem, layout) = (&ram.mem, &ram.layout);
    let size = layout.mem_size();
    if size != snap.mem_size {
        return Err(SnapshotError::Mismatch(format!(
            "the VM has {size} bytes of memory, the snapshot {}",
            snap.mem_size
        )));
    }
    let mut layers = open_layers(dir, snap)?.into_iter().zip(&snap.layers);
    let Some(((base_path, base), base_layer)) = layers.next() else {
        return Err(SnapshotError::Corrupt("no memory layer".into()));
    };
    remap(mem, layout, &base).map_err(|err| SnapshotError::Io {
        what: "mapping the snapshot memory file",
        path: base_path.clone(),
        err,
    })?;
    let for_check = base.try_clone().map_err(|err| SnapshotError::Io {
        what: "opening the snapshot memory file",
        path: base_path.clone(),
        err,
    })?;
    snap.memory_check
        .start(for_check, base_path, base_layer.clone(), snap.mem_size)?;
    for ((path, f), layer) in layers {
        layer.apply_checked(&f, &path, |off, b| write_split(mem, layout, b, off))?;
    }
    Ok(base)
}

/// Writes `data`, which sits at memory-file offset `off`, into guest
/// memory, split where a RAM range ends.
fn write_split(mem: &GuestMemoryMmap, layout: &RamLayout, data: &[u8], off: u64) -> io::Result<()> {
    let pieces = layout
        .split(off, data.len() as u64)
        .ok_or_else(|| io::Error::other(format!("offset {off:#x} is past guest memory")))?;
    let mut start = 0usize;
    for p in pieces {
        let n = p.len as usize;
        mem.write_slice(&data[start..start + n], GuestAddress(p.gpa))
            .map_err(io::Error::other)?;
        start += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::FileExt;

    #[test]
    fn regions_remap_onto_another_file_in_place() {
        let ram = crate::vstate::memory::create_guest_memory(32 << 20).unwrap();
        ram.mem.write_obj(7u32, GuestAddress(0x3000)).unwrap();
        let other = crate::vstate::memory::create_guest_memory(32 << 20)
            .unwrap()
            .file;
        other.write_all_at(&9u32.to_le_bytes(), 0x5000).unwrap();
        remap(&ram.mem, &ram.layout, &other).unwrap();
        assert_eq!(ram.mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 9);
        assert_eq!(
            ram.mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(),
            0,
            "the private copy went with the old mapping"
        );
    }
}
