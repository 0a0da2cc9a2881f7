//! The block device's state: per checkpoint ([`BlockState`]: transport
//! and configuration) and per on-disk snapshot ([`OverlaySnapshot`]: the
//! overlays' granules and the identity of the base image they lie over),
//! with their byte encodings in the snapshot codec.
//!
//! The overlays are not part of [`BlockState`]: they live with the device,
//! one per open checkpoint, and the VMM moves them with
//! [`super::SpecDisk::push_level`] / `rollback_to` / `fold` at the points
//! where it checkpoints memory.

use std::collections::BTreeMap;

use virtio_queue::QueueState;

use super::backend::{BaseIdentity, BlockError};
use super::device::{Block, ID_BYTES};
use super::overlay::{Granule, LevelMap, GRANULE};
use crate::devices::bus::DeviceState;
use crate::devices::virtio::{MmioTransport, QueueRegs, SavedQueue, TransportState, VirtioError};
use crate::snapshot::codec::{Reader, Writer};
use crate::snapshot::SnapshotError;

/// A checkpoint of a virtio-blk device and its transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// The transport's registers and queues.
    pub transport: TransportState,
    /// Capacity in sectors (must match the image at restore).
    pub capacity: u64,
    /// Whether the disk is read-only (must match at restore).
    pub read_only: bool,
    /// The serial number.
    pub id: [u8; ID_BYTES],
}

/// Wraps a block state as the bus stores it.
///
/// `DeviceState` has no block variant yet, so this saves `Stateless`;
/// once `DeviceState::Block(Box<BlockState>)` exists, the body becomes
/// `DeviceState::Block(Box::new(state))`. Until then use
/// [`MmioTransport::save_block`] / [`MmioTransport::restore_block`].
pub fn to_bus_state(state: BlockState) -> DeviceState {
    let _ = state;
    DeviceState::Stateless
}

/// Finds the block state in what the bus stored. Refuses everything until
/// `DeviceState` has a block variant (then: match it and return the box),
/// so a rollback fails loudly instead of desynchronising the ring.
pub fn from_bus_state(state: &DeviceState) -> Result<BlockState, VirtioError> {
    Err(VirtioError::InvalidState(format!(
        "not a virtio-blk state: {state:?}"
    )))
}

impl Block {
    /// The device's part of a checkpoint, with the transport's.
    pub fn save_state(&self, transport: TransportState) -> BlockState {
        BlockState {
            transport,
            capacity: self.capacity(),
            read_only: self.read_only(),
            id: self.id(),
        }
    }

    /// Restores the device's part of `state`: the serial number. The
    /// capacity and read-only flag belong to the image and must match.
    pub fn restore_state(&mut self, state: &BlockState) -> Result<(), BlockError> {
        self.check_state(state)?;
        self.set_id(state.id);
        Ok(())
    }

    /// Whether `state` was saved for a disk like this one.
    fn check_state(&self, state: &BlockState) -> Result<(), BlockError> {
        if (state.capacity, state.read_only) != (self.capacity(), self.read_only()) {
            return Err(BlockError::State(format!(
                "saved for {} sectors{}, the disk has {} sectors{}",
                state.capacity,
                if state.read_only { " read-only" } else { "" },
                self.capacity(),
                if self.read_only() { " read-only" } else { "" },
            )));
        }
        Ok(())
    }

    /// Checks that the base image is still the one `saved` describes.
    pub fn check_base_identity(&self, saved: &BaseIdentity) -> Result<(), BlockError> {
        let base = self.disk().base();
        match saved.diff(&base.identity()?) {
            None => Ok(()),
            Some(what) => Err(BlockError::Identity {
                path: base.path().to_path_buf(),
                what,
            }),
        }
    }

    /// A copy of the overlays and the base image's identity, for an
    /// on-disk snapshot (see [`Block::encode_overlays`] to write them
    /// without the copy).
    pub fn overlay_snapshot(&self) -> Result<OverlaySnapshot, BlockError> {
        Ok(OverlaySnapshot {
            base: self.disk().base().identity()?,
            levels: self.disk().levels().to_vec(),
        })
    }

    /// Writes what [`OverlaySnapshot::encode`] writes for
    /// [`Block::overlay_snapshot`], straight from the device.
    pub fn encode_overlays(&self, w: &mut Writer) -> Result<(), BlockError> {
        put_identity(w, &self.disk().base().identity()?);
        put_levels(w, self.disk().levels());
        Ok(())
    }

    /// Puts saved overlays back, after checking that the base image is the
    /// one they were taken over. Nothing changes on an error.
    pub fn restore_overlays(&mut self, snap: OverlaySnapshot) -> Result<(), BlockError> {
        self.check_base_identity(&snap.base)?;
        let path = self.disk().base().path().to_path_buf();
        self.disk_mut()
            .set_levels(snap.levels)
            .map_err(|source| BlockError::Overlay { path, source })
    }
}

impl MmioTransport<Block> {
    /// The device's state, for a checkpoint.
    pub fn save_block(&self) -> BlockState {
        self.device().save_state(self.save_transport())
    }

    /// Puts the device back into `state`. Guest memory is not touched;
    /// the overlays are not either (see [`super::SpecDisk::rollback_to`]).
    pub fn restore_block(&mut self, state: &BlockState) -> Result<(), BlockError> {
        // Check the device's part first: a failed restore changes nothing.
        self.device().check_state(state)?;
        self.restore_transport(&state.transport)?;
        self.device_mut().set_id(state.id);
        Ok(())
    }
}

/// The overlays of a block device and the base image they lie over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySnapshot {
    /// The base image when the snapshot was taken.
    pub base: BaseIdentity,
    /// The levels, outermost first.
    pub levels: Vec<LevelMap>,
}

/// Granule kinds in the encoding.
const GRANULE_ZERO: u8 = 0;
const GRANULE_DATA: u8 = 1;

impl OverlaySnapshot {
    /// Appends the snapshot: the identity, then per level the count of
    /// granules and each granule's index, kind and (for data) its bytes.
    pub fn encode(&self, w: &mut Writer) {
        put_identity(w, &self.base);
        put_levels(w, &self.levels);
    }

    /// Reads what [`OverlaySnapshot::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, SnapshotError> {
        let base = BaseIdentity {
            size: r.u64("block base size")?,
            mtime_sec: r.u64("block base mtime")? as i64,
            mtime_nsec: r.u64("block base mtime ns")? as i64,
            ino: r.u64("block base inode")?,
            sample_hash: r.u64("block base hash")?,
        };
        let n = r.count(4, "block overlay levels")?;
        let mut levels = Vec::with_capacity(n);
        for _ in 0..n {
            let count = r.count(9, "block overlay granules")?;
            let mut level = BTreeMap::new();
            for _ in 0..count {
                let g = r.u64("block granule index")?;
                let v = match r.u8("block granule kind")? {
                    GRANULE_ZERO => Granule::Zero,
                    GRANULE_DATA => {
                        Granule::Data(r.take(GRANULE as usize, "block granule")?.into())
                    }
                    k => return Err(corrupt(format!("block granule kind {k}"))),
                };
                if level.insert(g, v).is_some() {
                    return Err(corrupt(format!("block granule {g} saved twice")));
                }
            }
            levels.push(level);
        }
        Ok(Self { base, levels })
    }
}

fn corrupt(what: String) -> SnapshotError {
    SnapshotError::Corrupt(what)
}

fn put_identity(w: &mut Writer, id: &BaseIdentity) {
    w.u64(id.size);
    w.u64(id.mtime_sec as u64);
    w.u64(id.mtime_nsec as u64);
    w.u64(id.ino);
    w.u64(id.sample_hash);
}

fn put_levels(w: &mut Writer, levels: &[LevelMap]) {
    w.u32(levels.len() as u32);
    for level in levels {
        w.u32(level.len() as u32);
        for (&g, v) in level {
            w.u64(g);
            match v {
                Granule::Zero => w.u8(GRANULE_ZERO),
                Granule::Data(d) => {
                    w.u8(GRANULE_DATA);
                    w.buf.extend_from_slice(d);
                }
            }
        }
    }
}

/// Appends a block device's checkpoint state.
pub fn encode_block_state(w: &mut Writer, s: &BlockState) {
    put_transport(w, &s.transport);
    w.u64(s.capacity);
    w.bool(s.read_only);
    w.buf.extend_from_slice(&s.id);
}

/// Reads what [`encode_block_state`] wrote.
pub fn decode_block_state(r: &mut Reader<'_>) -> Result<BlockState, SnapshotError> {
    let transport = get_transport(r)?;
    let capacity = r.u64("block capacity")?;
    let read_only = r.bool("block read-only")?;
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(r.take(ID_BYTES, "block serial")?);
    Ok(BlockState {
        transport,
        capacity,
        read_only,
        id,
    })
}

/// The transport, in the layout `snapshot::state` uses for virtio-net.
fn put_transport(w: &mut Writer, t: &TransportState) {
    for v in [
        t.status,
        t.device_features_sel,
        t.driver_features_sel,
        t.queue_sel,
        t.interrupt_status,
        t.config_generation,
    ] {
        w.u32(v);
    }
    w.u64(t.driver_features);
    w.u32(t.queues.len() as u32);
    for q in &t.queues {
        w.u32(q.regs.num);
        for v in [q.regs.desc, q.regs.driver, q.regs.device] {
            w.u64(v);
        }
        let s = &q.queue;
        for v in [s.max_size, s.next_avail, s.next_used, s.size] {
            w.u16(v);
        }
        w.bool(s.event_idx_enabled);
        w.bool(s.ready);
        for v in [s.desc_table, s.avail_ring, s.used_ring] {
            w.u64(v);
        }
    }
}

fn get_transport(r: &mut Reader<'_>) -> Result<TransportState, SnapshotError> {
    let mut v = [0u32; 6];
    for x in v.iter_mut() {
        *x = r.u32("virtio transport register")?;
    }
    let driver_features = r.u64("virtio driver features")?;
    let n = r.count(60, "virtio queue count")?;
    let mut queues = Vec::with_capacity(n);
    for _ in 0..n {
        let regs = QueueRegs {
            num: r.u32("queue num")?,
            desc: r.u64("queue desc")?,
            driver: r.u64("queue driver")?,
            device: r.u64("queue device")?,
        };
        let queue = QueueState {
            max_size: r.u16("queue max size")?,
            next_avail: r.u16("queue next avail")?,
            next_used: r.u16("queue next used")?,
            size: r.u16("queue size")?,
            event_idx_enabled: r.bool("queue event idx")?,
            ready: r.bool("queue ready")?,
            desc_table: r.u64("queue desc table")?,
            avail_ring: r.u64("queue avail ring")?,
            used_ring: r.u64("queue used ring")?,
        };
        queues.push(SavedQueue { regs, queue });
    }
    Ok(TransportState {
        status: v[0],
        device_features_sel: v[1],
        driver_features_sel: v[2],
        driver_features,
        queue_sel: v[3],
        interrupt_status: v[4],
        config_generation: v[5],
        queues,
    })
}
