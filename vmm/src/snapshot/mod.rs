//! Snapshots on disk: a VM's complete state, saved to a directory and
//! restored into a new VMM process (`docs/snapshots.md`).
//!
//! A snapshot directory holds:
//! - `state`: the versioned, checksummed state file ([`codec`]): the VM's
//!   shape (memory size and layout), the host-compat system-call
//!   trampoline's [`TrampolineState`] for a Linux guest, and the
//!   [`MachineState`] (vCPUs, in-kernel devices, device models), saved by
//!   the same code that takes speculation checkpoints and restored by the
//!   same [`crate::machine::restore`], and each disk's overlays with its
//!   image's identity ([`disks`]);
//! - `memory-<id>`: guest memory in layers, each named by the id of the
//!   snapshot that wrote it. A full snapshot writes one layer, all of
//!   memory; a diff snapshot adds a layer holding only the pages written
//!   since the previous snapshot (a sparse file: other pages are holes).
//!   The state file lists the layers, oldest first, with where each holds
//!   data and a checksum per 64 KiB of it ([`layer`]); a restore checks
//!   them ([`verify`]) and applies the layers in order. Past [`MAX_LAYERS`]
//!   layers, the next snapshot is a full one;
//! - `lock`: held by the one process writing a snapshot, and its journal
//!   of the files it may leave behind ([`writer`]).
//!
//! The state file is the commit point: it is written under a new name and
//! renamed over the old one only once every layer it names is on disk, so
//! a crash leaves the previous snapshot whole. specvm deletes only files
//! its own state or journal names.
//!
//! A file that is truncated, corrupt, or of another format version is
//! refused whole, before any VM is built.

pub mod codec;
pub mod disks;
pub mod files;
pub mod layer;
pub mod memory;
pub mod restore;
pub mod source;
pub mod verify;
pub mod writer;

use std::path::PathBuf;

use crate::host_compat::trampoline::TrampolineState;
use crate::machine::MachineState;
use crate::persist::{Decode, DecodeError, Encode};
use crate::vstate::memory::RamLayout;
use codec::{Reader, Writer};
pub use layer::Layer;

/// Most memory layers a snapshot may have; a diff snapshot that would add
/// one more is written as a full one instead, so restores stay quick.
pub const MAX_LAYERS: usize = 16;

/// Errors saving, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file is shorter than its header says.
    #[error("snapshot state file is truncated: {found} bytes, expected {expected}")]
    Truncated {
        /// Bytes the header promises.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The file does not start with the magic.
    #[error("not a specvm snapshot state file (bad magic)")]
    BadMagic,
    /// The file's format version is not this build's.
    #[error(
        "snapshot format version {found} is not supported (this specvm reads version {supported})"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// This build's version.
        supported: u32,
    },
    /// The header and payload do not match their checksum.
    #[error(
        "snapshot state file is corrupt: its checksum (XXH3-64) is {got:016x}, the header says {want:016x}"
    )]
    Checksum {
        /// The header's checksum.
        want: u64,
        /// The checksum of the file's contents.
        got: u64,
    },
    /// A memory layer does not hold what the state file recorded.
    #[error("snapshot memory file {path} is damaged: {what}")]
    Layer {
        /// The layer file.
        path: PathBuf,
        /// Where, and how.
        what: String,
    },
    /// A file of the snapshot is not a regular file.
    #[error("{path} is {kind}; a snapshot's files must be regular files in its directory")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: String,
    },
    /// Another process is writing a snapshot into the directory.
    #[error(
        "another specvm is writing a snapshot into {dir} (it holds {dir}/lock); try again when it is done"
    )]
    Busy {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// The payload is malformed.
    #[error("snapshot state file is corrupt: {0}")]
    Corrupt(String),
    /// The snapshot does not fit the VM it is restored into.
    #[error("snapshot does not match the VM: {0}")]
    Mismatch(String),
    /// A snapshot cannot be taken now.
    #[error("snapshot refused: {0}")]
    Refused(String),
    /// Reading or writing KVM state failed.
    #[error(transparent)]
    State(#[from] crate::vstate::vcpu_state::StateError),
    /// Reading or writing a file failed.
    #[error("{what} {path}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system said.
        err: std::io::Error,
    },
}

impl From<DecodeError> for SnapshotError {
    fn from(e: DecodeError) -> Self {
        Self::Corrupt(e.0)
    }
}

impl From<crate::machine::MachineError> for SnapshotError {
    fn from(e: crate::machine::MachineError) -> Self {
        match e {
            crate::machine::MachineError::State(s) => Self::State(s),
            e => Self::Mismatch(e.to_string()),
        }
    }
}

/// Everything a snapshot's state file holds.
pub struct VmSnapshot {
    /// This snapshot's random id.
    pub id: u64,
    /// The memory layers, oldest (the full one) first; the last is this
    /// snapshot's own.
    pub layers: Vec<Layer>,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// The guest memory ranges (guest address, size), in file order.
    pub ranges: Vec<(u64, u64)>,
    /// Whether the guest booted Linux (its platform devices are needed).
    pub linux: bool,
    /// The host-compat system-call trampoline's state: Some for a Linux
    /// guest run with host compat on (its `kernel_lstar` is 0 if the kernel
    /// had not set LSTAR yet), None for a bare guest or with host compat
    /// off. A restore refuses to change which it is.
    pub trampoline: Option<TrampolineState>,
    /// The host's CLOCK_REALTIME when the state was saved, in ns: on
    /// restore, the guest's clocks move forward by the time since.
    pub saved_at_ns: u64,
    /// The vCPUs, the in-kernel devices and the device models.
    pub machine: MachineState,
    /// Every `--disk`'s overlays and image identity, in slot order (their
    /// device states are in `machine`).
    pub disks: Vec<disks::DiskSnapshot>,
    /// The check of the base memory layer that a restore started, which
    /// it finishes before the machine state is restored (not saved).
    pub memory_check: verify::MemoryCheck,
}

impl VmSnapshot {
    /// The whole state file: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.id);
        w.u32(self.layers.len() as u32);
        self.layers.iter().for_each(|l| l.put(&mut w));
        w.u64(self.mem_size);
        w.u32(self.ranges.len() as u32);
        for &(base, size) in &self.ranges {
            w.u64(base);
            w.u64(size);
        }
        w.bool(self.linux);
        w.bool(self.trampoline.is_some());
        if let Some(t) = &self.trampoline {
            t.encode(&mut w);
        }
        w.u64(self.saved_at_ns);
        self.machine.encode(&mut w);
        disks::put_disks(&mut w, &self.disks);
        codec::seal(&w.buf)
    }

    /// Parses and checks a whole state file. Nothing is returned unless
    /// every byte of it is valid and its memory layout is this build's.
    pub fn decode(file: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Reader::new(codec::open(file)?);
        let id = r.u64("snapshot id")?;
        let n = r.count(16, "memory layer count")?;
        // Before the layers are read: the checks below are quadratic.
        if n == 0 || n > MAX_LAYERS {
            return Err(SnapshotError::Corrupt(format!(
                "{n} memory layers for snapshot {id:x}"
            )));
        }
        // The layers' extents are checked against the memory size, which
        // comes after them: read them against the largest, then check.
        let layers = (0..n)
            .map(|_| Layer::get(&mut r, crate::config::MAX_MEM_SIZE))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<u64> = layers.iter().map(|l| l.id).collect();
        let unique = ids.iter().enumerate().all(|(i, a)| !ids[..i].contains(a));
        if n == 0 || n > MAX_LAYERS || ids.last() != Some(&id) || !unique {
            return Err(SnapshotError::Corrupt(format!(
                "memory layers {ids:x?} for snapshot {id:x}"
            )));
        }
        let mem_size = r.u64("memory size")?;
        crate::config::check_mem_size(mem_size)
            .map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
        if let Some(&(off, len)) = layers
            .iter()
            .filter_map(|l| l.extents.last())
            .find(|&&(o, n)| o + n > mem_size)
        {
            return Err(SnapshotError::Corrupt(format!(
                "memory layer extent {off:#x}+{len:#x} is past the memory size {mem_size:#x}"
            )));
        }
        let n = r.count(16, "memory range count")?;
        let ranges = (0..n)
            .map(|_| Ok((r.u64("range base")?, r.u64("range size")?)))
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let linux = r.bool("boot kind")?;
        let trampoline = match r.bool("has trampoline state")? {
            true => Some(TrampolineState::decode(&mut r)?),
            false => None,
        };
        if trampoline.is_some() && !linux {
            return Err(SnapshotError::Corrupt(
                "a bare guest's snapshot holds system-call trampoline state".into(),
            ));
        }
        let saved_at_ns = r.u64("save time")?;
        let machine = MachineState::decode(&mut r)?;
        let disks = disks::get_disks(&mut r)?;
        r.finish()?;
        if disks.len() != machine.devices.blocks.len() {
            return Err(SnapshotError::Corrupt(format!(
                "{} disks' overlays for {} virtio-blk devices",
                disks.len(),
                machine.devices.blocks.len()
            )));
        }
        let layout = RamLayout::new(mem_size).gpa_ranges();
        if ranges != layout {
            return Err(SnapshotError::Corrupt(format!(
                "memory ranges {ranges:x?} are not this build's layout for {mem_size:#x} bytes"
            )));
        }
        Ok(Self {
            id,
            layers,
            mem_size,
            ranges,
            linux,
            trampoline,
            saved_at_ns,
            machine,
            disks,
            memory_check: Default::default(),
        })
    }
}

/// The memory layer file written by snapshot `id`.
pub fn memory_name(id: u64) -> String {
    format!("memory-{id:016x}")
}

/// A fresh random snapshot id (never 0), from the kernel's generator.
pub fn new_id() -> u64 {
    let mut b = [0u8; 8];
    loop {
        // SAFETY: `b` is a writable buffer of the length passed.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let id = u64::from_le_bytes(b);
        if n == 8 && id != 0 {
            return id;
        }
    }
}

/// The host's CLOCK_REALTIME in nanoseconds.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The pages (numbered in the memory file) written since the last snapshot
/// this VM wrote or was restored from: every page the speculation
/// tracker's dirty log reported, accumulated as a bitmap, because the
/// tracker consumes the log at every checkpoint.
#[derive(Default)]
pub struct DirtyPages {
    words: Vec<u64>,
}

impl DirtyPages {
    /// Records `pages` as written.
    pub fn note(&mut self, pages: &[u64]) {
        for &p in pages {
            let w = (p / 64) as usize;
            if w >= self.words.len() {
                self.words.resize(w + 1, 0);
            }
            self.words[w] |= 1 << (p % 64);
        }
    }

    /// Every recorded page, sorted, and forgets them.
    pub fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in std::mem::take(&mut self.words).into_iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod dir_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
