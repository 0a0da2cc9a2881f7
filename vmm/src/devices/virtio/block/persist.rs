//! The block device's state: per checkpoint ([`BlockState`]: transport
//! and configuration) and per on-disk snapshot ([`OverlaySnapshot`]: the
//! overlays' granules and the identity of the base image they lie over),
//! with their [`Encode`] / [`Decode`] byte encodings, and
//! [`Persist`] for the device's transport (State = [`BlockState`]).
//!
//! The overlays are not part of [`BlockState`]: they live with the device,
//! one per open checkpoint, and the VMM moves them with
//! [`super::SpecDisk::push_level`] / `rollback_to` / `fold` at the points
//! where it checkpoints memory.

use std::collections::BTreeMap;

use super::backend::{BaseIdentity, BlockError};
use super::device::{Block, ID_BYTES};
use super::overlay::{Granule, LevelMap, GRANULE};
use crate::devices::virtio::{MmioTransport, TransportState};
use crate::persist::{Decode, DecodeError, Encode, Persist, Reader, Writer};

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

    /// Writes what [`OverlaySnapshot`]'s [`Encode`] writes for
    /// [`Block::overlay_snapshot`], straight from the device.
    pub fn encode_overlays(&self, w: &mut Writer) -> Result<(), BlockError> {
        self.disk().base().identity()?.encode(w);
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

impl Persist for MmioTransport<Block> {
    type State = BlockState;
    type Error = BlockError;

    fn save(&self) -> Result<BlockState, BlockError> {
        Ok(self.save_block())
    }

    fn restore(&mut self, state: &BlockState) -> Result<(), BlockError> {
        self.restore_block(state)
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

impl Encode for BaseIdentity {
    /// Size, modification time (seconds, nanoseconds), inode, sample hash.
    fn encode(&self, w: &mut Writer) {
        w.u64(self.size);
        w.u64(self.mtime_sec as u64);
        w.u64(self.mtime_nsec as u64);
        w.u64(self.ino);
        w.u64(self.sample_hash);
    }
}

impl Decode for BaseIdentity {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(BaseIdentity {
            size: r.u64("block base size")?,
            mtime_sec: r.u64("block base mtime")? as i64,
            mtime_nsec: r.u64("block base mtime ns")? as i64,
            ino: r.u64("block base inode")?,
            sample_hash: r.u64("block base hash")?,
        })
    }
}

impl Encode for OverlaySnapshot {
    /// The identity, then per level the count of granules and each
    /// granule's index, kind and (for data) its bytes.
    fn encode(&self, w: &mut Writer) {
        self.base.encode(w);
        put_levels(w, &self.levels);
    }
}

impl Decode for OverlaySnapshot {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let base = BaseIdentity::decode(r)?;
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
                    k => return Err(DecodeError(format!("block granule kind {k}"))),
                };
                if level.insert(g, v).is_some() {
                    return Err(DecodeError(format!("block granule {g} saved twice")));
                }
            }
            levels.push(level);
        }
        Ok(Self { base, levels })
    }
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

impl Encode for BlockState {
    /// The transport, then the capacity, the read-only flag and the serial.
    fn encode(&self, w: &mut Writer) {
        self.transport.encode(w);
        w.u64(self.capacity);
        w.bool(self.read_only);
        w.buf.extend_from_slice(&self.id);
    }
}

impl Decode for BlockState {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let transport = TransportState::decode(r)?;
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
}
