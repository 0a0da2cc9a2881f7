//! virtio-blk with a speculative disk (issue 14): the guest's writes roll
//! back with the VM, in time proportional to the blocks written.
//!
//! - [`overlay`] — the heart, free of KVM and virtio: [`SpecDisk`], a base
//!   image under one in-memory overlay per open checkpoint (4 KiB
//!   granules), with [`SpecDisk::push_level`], [`SpecDisk::rollback_to`]
//!   and [`SpecDisk::fold`].
//! - [`request`] — descriptor chains into requests (IN, OUT, FLUSH, GET_ID,
//!   DISCARD), hostile chains included.
//! - [`device`] — the [`VirtioDevice`](super::VirtioDevice) model.
//! - [`backend`] — the raw image file and [`BlockError`].
//! - [`persist`] — checkpoint state and the overlays' snapshot encoding.
//! - [`config`] — `path=FILE[,readonly]`.
//! - [`export`] — a private disk's committed content to a new file
//!   (`specvm ctl disk-export`).
//!
//! # Integration
//!
//! ```ignore
//! let cfg: BlockConfig = "path=disk.img".parse()?;
//! let irq = EventFd::new(libc::EFD_NONBLOCK)?;
//! vm.fd.register_irqfd(&irq, virtio_gsi(i))?;
//! let (dev, blk) = new_block(&cfg, ram.mem.clone(), irq)?;
//! mmio.insert(dev, mmio_slot_base(i), VIRTIO_MMIO_SIZE)?;
//! // At the points where memory is checkpointed (vCPUs paused):
//! blk.push_level();            // speculate(): returns the new level's index
//! blk.rollback_to(level)?;     // abort back to checkpoint `level`
//! blk.fold(level)?;            // commit of checkpoint `level` (0 writes the base)
//! ```
//!
//! The level indices are the checkpoint stack's frame indices
//! (`spec::stack`): frame `i` pushed ⇔ `push_level()` returned `i`; a
//! rollback popping frames `pos..` ⇔ `rollback_to(pos)`; `remove` folding
//! frame `i` into `i - 1` (or dropping frame 0) ⇔ `fold(i)`.
//!
//! Checkpoints: the transport implements [`crate::persist::Persist`] with
//! [`BlockState`] (also [`BlockHandle::save`] / [`BlockHandle::restore`]),
//! and [`BlockState`] implements [`crate::persist::Encode`] /
//! [`crate::persist::Decode`] for the state file. The device manager
//! (`crate::device_manager`) holds every `--disk` and saves its state in
//! each checkpoint's `DeviceStates`; it opens, drops and folds the levels
//! where the speculation engine checkpoints, rolls back and commits.
//! Snapshots (`crate::snapshot`) save [`BlockHandle::overlay_snapshot`]
//! (the levels and the image's identity) beside the device state; a
//! restore opens the image again in private mode
//! ([`SpecDisk::new_private`]) and puts them back with
//! [`BlockHandle::restore_overlays`], which checks the identity first.
//!
//! # Requests and checkpoints
//!
//! Requests run synchronously on the vCPU thread that notified the queue
//! (as the net device's transmit does), to the end, with the transport
//! locked. So while the vCPUs are paused for a checkpoint no request is
//! half done: every chain the device took is in the used ring with its
//! data in the overlay (or base) and in guest memory, and the memory
//! checkpoint and the level change see the same instant. There is no
//! device thread and nothing to pause.
//!
//! # Flush is output
//!
//! A FLUSH inside a speculation completes at once: its data is in the top
//! overlay and can only reach the base through the outermost commit, which
//! writes and syncs the base. At depth 0 a FLUSH is an fdatasync.
//!
//! # Costs
//!
//! `benches/block_overlay.sh` (release build; sparse images): with
//! 100,000 granules written, a rollback takes 40-50 ms and an inner fold
//! 15-20 ms on a 1 GiB and on a 16 GiB image alike; with 10 granules both
//! take microseconds. The outermost fold is the base's I/O (100,000
//! scattered 4 KiB pwrites and an fdatasync: 2-2.5 s). Overlays hold their
//! data in memory, up to [`DEFAULT_OVERLAY_LIMIT`]; past it a write under
//! speculation fails with IOERR.

pub mod backend;
pub mod config;
pub mod device;
pub mod export;
pub mod overlay;
pub mod persist;
pub mod request;

#[cfg(test)]
mod overlay_tests;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, SharedDevice};
use crate::persist::Writer;
use crate::sync::lock;
use crate::vstate::memory::GuestMemoryMmap;

pub use backend::{BaseIdentity, BlockError, FileBase};
pub use config::{BlockConfig, BlockConfigError};
pub use device::{Block, BlockStats, DEFAULT_OVERLAY_LIMIT};
pub use overlay::{BaseIo, DiskStats, OverlayError, SpecDisk};
pub use persist::{BlockState, OverlaySnapshot};

/// The transport around a block device, shared with the MMIO bus.
pub type BlockTransport = Arc<Mutex<MmioTransport<Block>>>;

/// Opens the image `config` names and wraps a block device for it in a
/// virtio-mmio transport, with an overlay budget of
/// [`DEFAULT_OVERLAY_LIMIT`]. The [`SharedDevice`] goes on the MMIO bus;
/// the [`BlockHandle`] is the VMM's side (levels, checkpoints).
pub fn new_block(
    config: &BlockConfig,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<(SharedDevice, BlockHandle), BlockError> {
    // A private disk never writes its image: open it read-only.
    let base = FileBase::open(&config.path, config.read_only || config.private)?;
    let size = base.size();
    let disk = if config.private {
        SpecDisk::new_private(base, size, config.read_only, DEFAULT_OVERLAY_LIMIT)
    } else {
        SpecDisk::new(base, size, config.read_only, DEFAULT_OVERLAY_LIMIT)
    };
    tracing::info!(
        "virtio-blk: {} ({} sectors{}{})",
        config.path.display(),
        size / overlay::SECTOR_SIZE,
        if config.read_only { ", read-only" } else { "" },
        if config.private { ", private" } else { "" }
    );
    let block = Block::new(disk, config.default_id());
    let transport: BlockTransport = Arc::new(Mutex::new(MmioTransport::new(block, mem, irq)?));
    let shared: SharedDevice = transport.clone();
    Ok((shared, BlockHandle { transport }))
}

/// The VMM's side of a block device. Every call locks the transport, so
/// it waits for a request in progress; call the level methods with the
/// vCPUs paused, where memory is checkpointed.
#[derive(Clone)]
pub struct BlockHandle {
    transport: BlockTransport,
}

impl BlockHandle {
    /// The transport (the same object as the bus device).
    pub fn transport(&self) -> &BlockTransport {
        &self.transport
    }

    fn path_err(t: &MmioTransport<Block>, source: OverlayError) -> BlockError {
        let path = t.device().disk().base().path().to_path_buf();
        BlockError::Overlay { path, source }
    }

    /// `speculate()`: opens a level; returns its index.
    pub fn push_level(&self) -> usize {
        lock(&self.transport).device_mut().disk_mut().push_level()
    }

    /// An abort restored checkpoint `level`: drops levels `level..`.
    pub fn rollback_to(&self, level: usize) -> Result<(), BlockError> {
        let mut t = lock(&self.transport);
        let r = t.device_mut().disk_mut().rollback_to(level);
        r.map_err(|e| Self::path_err(&t, e))
    }

    /// Checkpoint `level` was committed: folds its level down (level 0
    /// into the base, which is synced).
    pub fn fold(&self, level: usize) -> Result<(), BlockError> {
        let mut t = lock(&self.transport);
        let r = t.device_mut().disk_mut().fold(level);
        r.map_err(|e| Self::path_err(&t, e))
    }

    /// Levels open.
    pub fn depth(&self) -> usize {
        lock(&self.transport).device().disk().depth()
    }

    /// Whether the disk is private (its image is never written).
    pub fn private(&self) -> bool {
        lock(&self.transport).device().disk().private()
    }

    /// The image's path, as given.
    pub fn path(&self) -> std::path::PathBuf {
        let t = lock(&self.transport);
        t.device().disk().base().path().to_path_buf()
    }

    /// Bytes the levels hold (data and map entries), which a snapshot
    /// stores in its state file.
    pub fn held_bytes(&self) -> u64 {
        lock(&self.transport).device().disk().held_bytes()
    }

    /// Before a snapshot: makes the image's content durable when the VM
    /// writes it (a shared disk at depth 0), since the snapshot refers
    /// to it; a private disk's image is never written, so nothing to do.
    pub fn sync_image(&self) -> Result<(), BlockError> {
        let mut t = lock(&self.transport);
        let r = t.device_mut().disk_mut().sync_shared_base();
        r.map_err(|e| Self::path_err(&t, e))
    }

    /// The request and disk counters.
    pub fn stats(&self) -> (BlockStats, DiskStats) {
        let t = lock(&self.transport);
        (t.device().stats(), t.device().disk().stats())
    }

    /// The device's checkpoint state.
    pub fn save(&self) -> BlockState {
        lock(&self.transport).save_block()
    }

    /// Restores a checkpoint state; nothing changes on an error.
    pub fn restore(&self, state: &BlockState) -> Result<(), BlockError> {
        lock(&self.transport).restore_block(state)
    }

    /// A copy of the overlays with the base's identity.
    pub fn overlay_snapshot(&self) -> Result<OverlaySnapshot, BlockError> {
        lock(&self.transport).device().overlay_snapshot()
    }

    /// Appends the overlays and the base's identity to a snapshot payload.
    pub fn encode_overlays(&self, w: &mut Writer) -> Result<(), BlockError> {
        lock(&self.transport).device().encode_overlays(w)
    }

    /// Checks that the base image is still the one `saved` describes.
    pub fn check_base_identity(&self, saved: &BaseIdentity) -> Result<(), BlockError> {
        lock(&self.transport).device().check_base_identity(saved)
    }

    /// Puts saved overlays back over the (checked) base.
    pub fn restore_overlays(&self, snap: OverlaySnapshot) -> Result<(), BlockError> {
        lock(&self.transport).device_mut().restore_overlays(snap)
    }
}
