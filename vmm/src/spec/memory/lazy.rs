//! A restored VM's memory: it maps the snapshot's base layer until the
//! first checkpoint, which gives it a memory file of its own (see
//! [`crate::snapshot::memory`]).

use std::fs::File;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use super::{CowError, MemoryTracker};

impl MemoryTracker {
    /// Tells the tracker that guest memory maps `base`, a snapshot's base
    /// memory layer, copy-on-write, not the tracker's own memory file
    /// (which is empty). The first [`MemoryTracker::checkpoint`] then
    /// materializes memory: the tracker writes into its file, and must
    /// never write into a snapshot.
    pub fn set_lazy_base(&mut self, base: File) {
        self.lazy_base = Some(base);
    }

    /// How long the last materialization took, once: for the controller's
    /// statistics.
    pub fn take_materialize_time(&mut self) -> Option<Duration> {
        self.materialized_in.take()
    }

    /// With a lazy base: copies it into the memory file, flushes every page
    /// written since the restore into the file too, and maps guest memory
    /// onto the file. All vCPUs must be paused.
    pub(super) fn materialize(&mut self, vm: &VmFd) -> Result<(), CowError> {
        let Some(base) = self.lazy_base.take() else {
            return Ok(());
        };
        let t = Instant::now();
        crate::snapshot::files::copy_data(&base, &self.file, self.layout.mem_size())
            .map_err(CowError::CopyBase)?;
        let dirty = self.take_dirty(vm)?;
        self.flush(&dirty, None)?;
        crate::snapshot::memory::remap(&self.mem, &self.layout, &self.file)
            .map_err(CowError::Remap)?;
        let took = t.elapsed();
        tracing::info!(
            micros = took.as_micros() as u64,
            "restored memory materialized"
        );
        self.materialized_in = Some(took);
        Ok(())
    }
}
