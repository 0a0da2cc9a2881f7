//! The virtio-blk device model: one request queue over a [`SpecDisk`].
//!
//! Features: VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
//! VIRTIO_BLK_F_BLK_SIZE (512), and VIRTIO_BLK_F_DISCARD on a writable
//! disk or VIRTIO_BLK_F_RO on a read-only one. The configuration space
//! (5.2.4) is `virtio_blk_config` up to `write_zeroes_may_unmap`:
//! `capacity` in sectors, `seg_max`, `blk_size`, and the discard limits;
//! the other fields read as zero.
//!
//! Requests run on the vCPU thread that notified the queue, to the end,
//! before the notification returns; each notification takes at most the
//! queue's size of chains (later ones come with their own notification).

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::backend::FileBase;
use super::overlay::{SpecDisk, SECTOR_SIZE};
use super::request::{Chain, Env, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use crate::devices::virtio::{QueueContext, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// The request queue's index.
pub const REQUEST_QUEUE: usize = 0;
/// The largest size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments a request may have (`seg_max`): the queue's size less
/// the header and status descriptors, as Linux assumes for direct chains.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the serial number GET_ID returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The budget of the speculative overlays by default: 1 GiB.
pub const DEFAULT_OVERLAY_LIMIT: u64 = 1 << 30;
/// Discard alignment the device advertises, in sectors: one granule.
const DISCARD_ALIGNMENT: u32 = (super::overlay::GRANULE / SECTOR_SIZE) as u32;
/// Length of the configuration space served.
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, unused1) + 3;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Counters of what the device did with requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests answered OK.
    pub ok: u64,
    /// Requests answered IOERR.
    pub ioerr: u64,
    /// Requests answered UNSUPP.
    pub unsupp: u64,
    /// Chains returned without a status (no place to write one).
    pub dropped: u64,
}

/// The virtio-blk device.
pub struct Block {
    disk: SpecDisk<FileBase>,
    id: [u8; ID_BYTES],
    acked: u64,
    active: bool,
    stats: BlockStats,
}

impl Block {
    /// A device over `disk`, reporting serial number `id`.
    pub fn new(disk: SpecDisk<FileBase>, id: [u8; ID_BYTES]) -> Self {
        Self {
            disk,
            id,
            acked: 0,
            active: false,
            stats: BlockStats::default(),
        }
    }

    /// The speculative disk (levels, reads, counters).
    pub fn disk(&self) -> &SpecDisk<FileBase> {
        &self.disk
    }

    /// The speculative disk, mutably: the VMM's checkpoint calls go here.
    pub fn disk_mut(&mut self) -> &mut SpecDisk<FileBase> {
        &mut self.disk
    }

    /// The serial number.
    pub fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }

    /// Sets the serial number (restoring a checkpoint).
    pub(super) fn set_id(&mut self, id: [u8; ID_BYTES]) {
        self.id = id;
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The request counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        if !self.read_only() {
            for (at, v) in [
                (
                    offset_of!(virtio_blk_config, max_discard_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_discard_seg),
                    MAX_DISCARD_SEG,
                ),
                (
                    offset_of!(virtio_blk_config, discard_sector_alignment),
                    DISCARD_ALIGNMENT,
                ),
            ] {
                put(at, &v.to_le_bytes());
            }
        }
        c
    }

    fn process_requests(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(REQUEST_QUEUE) else {
            return Ok(());
        };
        let env_discard = self.acked & bit(VIRTIO_BLK_F_DISCARD) != 0;
        let mut used = 0u32;
        // Only as many chains as the queue holds: a driver that keeps
        // adding cannot hold the vCPU here forever.
        while used < u32::from(q.size()) {
            let Some(chain) = q.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let len = match Chain::parse(chain, mem) {
                Ok((req, status_at)) => {
                    let env = Env {
                        id: &self.id,
                        discard: env_discard,
                    };
                    let out = req.execute(mem, &mut self.disk, &env);
                    if mem.write_obj(out.status, status_at).is_ok() {
                        self.count(out.status);
                        out.used_len
                    } else {
                        self.stats.dropped += 1;
                        0
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-blk: dropping a request: {e}");
                    self.stats.dropped += 1;
                    0
                }
            };
            q.add_used(mem, head, len)?;
            used += 1;
        }
        if used > 0 && q.needs_notification(mem)? {
            ctx.interrupt.signal_used();
        }
        Ok(())
    }

    fn count(&mut self, status: u8) {
        match status {
            super::request::S_OK => self.stats.ok += 1,
            super::request::S_UNSUPP => self.stats.unsupp += 1,
            _ => self.stats.ioerr += 1,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let common = VIRTIO_F_VERSION_1
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        if self.read_only() {
            common | bit(VIRTIO_BLK_F_RO)
        } else {
            common | bit(VIRTIO_BLK_F_DISCARD)
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No writable field: VIRTIO_BLK_F_CONFIG_WCE is not offered.
        tracing::debug!(
            "virtio-blk: ignored a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.acked = acked_features;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        // The disk and its levels stay: they follow the VM's checkpoints,
        // not the driver.
        self.acked = 0;
        self.active = false;
    }

    fn process_queue(
        &mut self,
        index: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), VirtioError> {
        if index != REQUEST_QUEUE || !self.active {
            return Ok(());
        }
        self.process_requests(ctx)
    }
}
