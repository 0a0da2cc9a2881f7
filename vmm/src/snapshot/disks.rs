//! The disks in a snapshot (format version 4): for each `--disk`, in slot
//! order, the image's path as the saved VM named it, whether that VM ran
//! it private, and its overlays with the image's identity
//! ([`OverlaySnapshot`]). The device's own state ([`BlockState`]) is in
//! the machine state's device list, like every device's.
//!
//! A restore does not open the saved path: the user gives `--disk
//! path=FILE` again (as `--net`), and the image must have the identity the
//! snapshot recorded. The restored disks always run private
//! ([`crate::devices::virtio::block::SpecDisk::new_private`]): the image
//! is opened read-only, and the saved overlays go into the private level,
//! so any number of VMs restored from one snapshot share the image and
//! never write it.
//!
//! [`BlockState`]: crate::devices::virtio::block::BlockState

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::SnapshotError;
use crate::device_manager::DeviceManager;
use crate::devices::virtio::block::{BlockHandle, OverlaySnapshot};
use crate::persist::{Decode, DecodeError, Encode, Reader, Writer};

/// Most bytes of disk data (the overlays' granules and map entries, all
/// disks together) a snapshot stores: they go into the state file, whose
/// payload is at most [`super::codec::MAX_PAYLOAD`]. A snapshot of a VM
/// whose disks hold more is refused.
pub const MAX_DISK_STATE: u64 = 48 << 20;

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// The image's path as the saved VM was given it (for messages only).
    pub path: PathBuf,
    /// Whether the saved VM ran the disk private.
    pub private: bool,
    /// The overlays (at most the private level: a snapshot holds no open
    /// speculation) and the image's identity when it was saved.
    pub overlays: OverlaySnapshot,
}

impl Encode for DiskSnapshot {
    /// The path's bytes, the private flag, then the overlays.
    fn encode(&self, w: &mut Writer) {
        w.bytes(self.path.as_os_str().as_bytes());
        w.bool(self.private);
        self.overlays.encode(w);
    }
}

impl Decode for DiskSnapshot {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let path = PathBuf::from(OsStr::from_bytes(r.bytes("disk path")?));
        let private = r.bool("disk private")?;
        let overlays = OverlaySnapshot::decode(r)?;
        Ok(Self {
            path,
            private,
            overlays,
        })
    }
}

/// Encodes a list of disks: the count, then each.
pub fn put_disks(w: &mut Writer, disks: &[DiskSnapshot]) {
    w.u32(disks.len() as u32);
    disks.iter().for_each(|d| d.encode(w));
}

/// Decodes what [`put_disks`] wrote.
pub fn get_disks(r: &mut Reader<'_>) -> Result<Vec<DiskSnapshot>, DecodeError> {
    // A disk takes at least its path's length, a flag, the identity and a
    // level count.
    let n = r.count(4 + 1 + 40 + 4, "disk count")?;
    (0..n).map(|_| DiskSnapshot::decode(r)).collect()
}

/// Saves every disk of a paused VM with no speculation open: syncs the
/// images that the VM writes (the snapshot refers to their content), and
/// copies the overlays with each image's identity. Refused past
/// [`MAX_DISK_STATE`].
pub fn save_disks(blocks: &[BlockHandle]) -> Result<Vec<DiskSnapshot>, SnapshotError> {
    let held: u64 = blocks.iter().map(BlockHandle::held_bytes).sum();
    if held > MAX_DISK_STATE {
        return Err(SnapshotError::Refused(format!(
            "the VM's disks hold {} MiB of private writes, and a snapshot stores at most \
             {} MiB of them",
            held >> 20,
            MAX_DISK_STATE >> 20
        )));
    }
    blocks
        .iter()
        .map(|b| {
            let refused = |e: crate::devices::virtio::block::BlockError| {
                SnapshotError::Refused(format!("saving a disk: {e}"))
            };
            b.sync_image().map_err(refused)?;
            Ok(DiskSnapshot {
                path: b.path(),
                private: b.private(),
                overlays: b.overlay_snapshot().map_err(refused)?,
            })
        })
        .collect()
}

/// Puts the saved disks back into a restored VM's (private) disks, after
/// checking that there are as many and that each image is the one the
/// snapshot was taken over. Nothing else of the VM is restored on an
/// error, and the message names the disk and what changed.
pub fn restore_disks(
    devices: &DeviceManager,
    disks: Vec<DiskSnapshot>,
) -> Result<(), SnapshotError> {
    let have = devices.blocks();
    if have.len() != disks.len() {
        let saved: Vec<String> = disks.iter().map(|d| d.path.display().to_string()).collect();
        return Err(SnapshotError::Mismatch(format!(
            "the snapshot has {} disk(s) ({}), and {} --disk given: give `--disk path=FILE` \
             for each, in the same order, with the image the snapshot was taken over",
            disks.len(),
            if saved.is_empty() {
                "none".into()
            } else {
                saved.join(", ")
            },
            have.len()
        )));
    }
    // Every identity first: a refusal leaves every disk as it was.
    for (i, (b, d)) in have.iter().zip(&disks).enumerate() {
        if !b.private() {
            return Err(SnapshotError::Mismatch(format!(
                "disk {i} ({}) is not private; a restored VM's disks must be",
                b.path().display()
            )));
        }
        b.check_base_identity(&d.overlays.base).map_err(|e| {
            SnapshotError::Mismatch(format!(
                "{e} (the snapshot's disk {i} was taken over {}); restore with that image \
                 as it was, unchanged",
                d.path.display()
            ))
        })?;
    }
    for (i, (b, d)) in have.iter().zip(disks).enumerate() {
        b.restore_overlays(d.overlays)
            .map_err(|e| SnapshotError::Mismatch(format!("disk {i}: {e}")))?;
    }
    Ok(())
}

/// For the boot cache, whose key hashed each image's whole content: takes
/// the images `disks` name as the ones `snap` was taken over, by writing
/// their identities (inode, times) into `snap`, so that an image rebuilt
/// or copied with the same bytes restores. Refused (with the reason) when
/// the number of disks differs, or an image's size or sampled content
/// does not match the saved one.
pub fn adopt_identities(
    disks: &[crate::devices::virtio::block::BlockConfig],
    snap: &mut super::VmSnapshot,
) -> Result<(), String> {
    if disks.len() != snap.disks.len() {
        return Err(format!(
            "it holds {} disk(s), and {} --disk given",
            snap.disks.len(),
            disks.len()
        ));
    }
    for (cfg, saved) in disks.iter().zip(snap.disks.iter_mut()) {
        let now = crate::devices::virtio::block::FileBase::open(&cfg.path, true)
            .and_then(|b| b.identity())
            .map_err(|e| e.to_string())?;
        let then = &saved.overlays.base;
        if (then.size, then.sample_hash) != (now.size, now.sample_hash) {
            return Err(format!(
                "disk image {} differs from the one saved (size or content)",
                cfg.path.display()
            ));
        }
        saved.overlays.base = now;
    }
    Ok(())
}
