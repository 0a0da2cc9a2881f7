//! A restored VM's memory: it maps the snapshot's base layer until the
//! first checkpoint, which gives it a memory file of its own (see
//! [`crate::snapshot::memory`]).
//!
//! The costly part of that, copying the base layer's data into the VM's
//! memory file, needs nothing of the guest: the layer never changes, and
//! nothing else writes the file before the first checkpoint. So it runs on
//! a thread of its own from the restore on ([`BaseCopy`]), and the first
//! checkpoint only copies what is left of it, beside that thread, then
//! flushes the pages written since the restore. Before, the first `speculate` after a
//! restore did the whole copy with the guest paused (30 ms for a Linux
//! guest's 79 MiB here, more for larger guests).
//!
//! The price: a restored VM that never checkpoints copies its base layer
//! anyway, once, holding a second copy of the data it restored in memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use super::{CowError, MemoryTracker};
use crate::snapshot::verify::MemoryChecked;
use crate::sync::lock;

/// The copy of a restored VM's base layer into its memory file, on a
/// thread of its own, in chunks that [`BaseCopy::finish`] also takes when
/// the first checkpoint comes before the copy is done. Dropping it stops
/// the copy (between two chunks) and waits for the thread.
pub(super) struct BaseCopy {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the copying thread and [`BaseCopy::finish`] share.
struct Shared {
    base: File,
    file: File,
    /// The layer's data, as (offset, length) chunks
    /// ([`crate::snapshot::files::data_chunks`]): set by the thread once it
    /// has listed them, or the error that kept it from it.
    chunks: OnceLock<io::Result<Vec<(u64, usize)>>>,
    /// The next chunk to claim.
    next: AtomicUsize,
    /// Chunks copied, or given up after an error.
    done: AtomicUsize,
    /// The first error of a chunk.
    failed: Mutex<Option<io::Error>>,
    /// Set by drop: take no more chunks.
    stop: AtomicBool,
    /// When the copy began, once it has.
    began: OnceLock<Instant>,
    /// When its last chunk was done.
    ended: OnceLock<Instant>,
}

impl Shared {
    /// Copies chunks until none is left to claim (or the copy is stopped).
    fn work(&self, chunks: &[(u64, usize)]) {
        let mut buf = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(off, len)) = chunks.get(i) else {
                return;
            };
            buf.resize(len, 0);
            let r = self
                .base
                .read_exact_at(&mut buf, off)
                .and_then(|()| self.file.write_all_at(&buf, off));
            if let Err(e) = r {
                lock(&self.failed).get_or_insert(e);
            }
            if self.done.fetch_add(1, Ordering::Release) + 1 == chunks.len() {
                let _ = self.ended.set(Instant::now());
            }
        }
    }
}

impl BaseCopy {
    /// Starts copying `base`'s data into `file`. Where the guest's output
    /// waits for the check of the layer (`checked` holds output), the copy
    /// waits for that check first, so as not to slow it.
    fn start(base: File, file: File, len: u64, checked: Arc<MemoryChecked>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            base,
            file,
            chunks: OnceLock::new(),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            began: OnceLock::new(),
            ended: OnceLock::new(),
        });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("specvm-materialize".into())
            .spawn(move || {
                let s = &*theirs;
                if checked.holds_output() && !checked.wait(&s.stop) {
                    return;
                }
                let _ = s.began.set(Instant::now());
                let listed = s
                    .chunks
                    .get_or_init(|| crate::snapshot::files::data_chunks(&s.base, len));
                if let Ok(chunks) = listed {
                    s.work(chunks);
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Finishes the copy: takes the chunks the thread has not, waits for
    /// the one it is copying, and returns how long the copy has run. If
    /// the thread has not begun (it waits for the check), the caller waits
    /// for it to list the chunks, since the check must pass first.
    fn finish(mut self) -> io::Result<Duration> {
        let s = Arc::clone(&self.shared);
        let chunks = loop {
            // Asked first: a thread that had ended before the look at the
            // list ended without listing.
            let ended = self.thread.as_ref().is_none_or(JoinHandle::is_finished);
            if let Some(listed) = s.chunks.get() {
                break listed
                    .as_ref()
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            }
            if ended {
                // Stopped before it listed them: never, short of a drop.
                return Err(io::Error::other("the copy ended before it began"));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        s.work(chunks);
        // Every chunk is claimed: wait for the one the thread copies. A
        // thread that ended short of it died in it (a panic).
        while s.done.load(Ordering::Acquire) < chunks.len() {
            if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                if s.done.load(Ordering::Acquire) < chunks.len() {
                    return Err(io::Error::other("the copying thread died in a chunk"));
                }
                break;
            }
            std::thread::yield_now();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = lock(&s.failed).take() {
            return Err(e);
        }
        Ok(match (s.began.get(), s.ended.get()) {
            (Some(&b), Some(&e)) => e.saturating_duration_since(b),
            _ => Duration::ZERO,
        })
    }
}

impl Drop for BaseCopy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
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
