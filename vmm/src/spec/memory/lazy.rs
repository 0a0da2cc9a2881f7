//! A restored VM's memory: it maps the snapshot's base layer until the
//! first checkpoint, which gives it a memory file of its own (see
//! [`crate::snapshot::memory`]).
//!
//! The costly part of that, copying the base layer's data into the VM's
//! memory file, needs nothing of the guest: the layer never changes, and
//! nothing else writes the file before the first checkpoint. So it runs on
//! a thread of its own from the restore on ([`BaseCopy`]), and the first
//! checkpoint only waits for what is left of it, then flushes the pages
//! written since the restore. Before, the first `speculate` after a
//! restore did the whole copy with the guest paused (30 ms for a Linux
//! guest's 79 MiB here, more for larger guests).
//!
//! The price: a restored VM that never checkpoints copies its base layer
//! anyway, once, holding a second copy of the data it restored in memory.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use super::{CowError, MemoryTracker};
use crate::snapshot::verify::MemoryChecked;

/// The copy of a restored VM's base layer into its memory file, on a
/// thread of its own. Dropping it stops the copy (between two chunks) and
/// waits for the thread.
pub(super) struct BaseCopy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Duration>>>,
}

impl BaseCopy {
    /// Starts copying `base`'s data into `file`. Where the guest's output
    /// waits for the check of the layer (`checked` holds output), the copy
    /// waits for that check first, so as not to slow it.
    fn start(base: File, file: File, len: u64, checked: Arc<MemoryChecked>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let theirs = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("specvm-materialize".into())
            .spawn(move || {
                if checked.holds_output() && !checked.wait(&theirs) {
                    return Err(io::Error::other("stopped before the layer was checked"));
                }
                let t = Instant::now();
                if !crate::snapshot::files::copy_data_until(&base, &file, len, &theirs)? {
                    return Err(io::Error::other("stopped"));
                }
                let took = t.elapsed();
                tracing::debug!(
                    micros = took.as_micros() as u64,
                    "base layer copied into the VM's memory file"
                );
                Ok(took)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Waits for the copy to end, and returns how long it ran.
    fn finish(mut self) -> io::Result<Duration> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the copying thread panicked")),
            None => Err(io::Error::other("the copy was already waited for")),
        }
    }
}

impl Drop for BaseCopy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl MemoryTracker {
    /// Tells the tracker that guest memory maps `base`, a snapshot's base
    /// memory layer, copy-on-write, not the tracker's own memory file
    /// (which is empty). The first [`MemoryTracker::checkpoint`] then
    /// materializes memory: the tracker writes into its file, and must
    /// never write into a snapshot. The copy of the layer's data starts
    /// now, on a thread of its own, once `checked` allows ([`BaseCopy`]);
    /// if that thread cannot start, the first checkpoint copies.
    pub fn set_lazy_base(&mut self, base: File, checked: Arc<MemoryChecked>) {
        let copy = base.try_clone().and_then(|b| {
            let file = self.file.try_clone()?;
            BaseCopy::start(b, file, self.layout.mem_size(), checked)
        });
        self.base_copy = match copy {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("copying the base layer ahead: {e}; the first checkpoint will");
                None
            }
        };
        self.lazy_base = Some(base);
    }

    /// How long the last materialization took, once: for the controller's
    /// statistics.
    pub fn take_materialize_time(&mut self) -> Option<Duration> {
        self.materialized_in.take()
    }

    /// With a lazy base: makes sure its data is in the memory file (waiting
    /// for the copy started by [`Self::set_lazy_base`]), flushes every page
    /// written since the restore into the file too, and maps guest memory
    /// onto the file. All vCPUs must be paused.
    pub(super) fn materialize(&mut self, vm: &VmFd) -> Result<(), CowError> {
        let Some(base) = self.lazy_base.take() else {
            return Ok(());
        };
        let t = Instant::now();
        let ahead = match self.base_copy.take() {
            Some(c) => Some(c.finish().map_err(CowError::CopyBase)?),
            None => {
                crate::snapshot::files::copy_data(&base, &self.file, self.layout.mem_size())
                    .map_err(CowError::CopyBase)?;
                None
            }
        };
        let waited = t.elapsed();
        let dirty = self.take_dirty(vm)?;
        self.flush(&dirty, None)?;
        crate::snapshot::memory::remap(&self.mem, &self.layout, &self.file)
            .map_err(CowError::Remap)?;
        let took = t.elapsed();
        tracing::info!(
            micros = took.as_micros() as u64,
            waited_for_copy_micros = waited.as_micros() as u64,
            copy_micros = ahead.map(|d| d.as_micros() as u64),
            pages_since_restore = dirty.len(),
            "restored memory materialized"
        );
        self.materialized_in = Some(took);
        Ok(())
    }
}
