//! Large page copies shared with helper threads on the other CPUs.
//!
//! A checkpoint's flush and a rollback's copy-back each move every dirty
//! page once, with every vCPU paused: the other CPUs are idle while the
//! controller copies. A throwaway C program measured what sharing the copy
//! gains on this 2-CPU host (2,000 pages between a private and a shared
//! mapping of one memfd, started after the CPUs had gone idle, medians of
//! 60):
//! - one thread: 1.38-1.46 ms;
//! - two threads, the helper pinned to the other CPU: 0.69-0.80 ms;
//! - two threads left to the scheduler: 1.29-1.30 ms, since it often wakes
//!   the helper on the CPU that is copying;
//! - at 100 pages, waking the helper (about 10 µs here) costs more than it
//!   saves (46-52 µs alone, 62-65 µs with it); at 300 pages it gains a
//!   fifth (152-159 µs against 120-129 µs).
//!
//! So copies under [`PARALLEL_MIN`] bytes stay on the calling thread.
//! Larger ones are cut into chunks of at most [`CHUNK`] bytes, which the
//! caller and the helpers of the other CPUs claim one at a time. The
//! caller starts at once and never waits for a helper to wake, only for
//! the chunks helpers have claimed to be done: a helper that wakes late
//! finds nothing left and costs only the call that woke it.
//!
//! Written here rather than with a thread pool crate (rayon) because the
//! gain depends on choosing a helper that is *not* on the caller's CPU,
//! at each copy; a general pool's workers are not tied to CPUs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::sync::{lock, wait};

/// Copies smaller than this stay on the calling thread.
pub const PARALLEL_MIN: usize = 1 << 20;

/// The most a chunk holds: small enough that the caller's final wait for
/// a helper's chunk is short, large enough that claiming one is cheap.
pub const CHUNK: usize = 64 << 10;

/// The most helpers a copy wakes: the copy is bound by memory bandwidth
/// well before that.
const MAX_HELPERS: usize = 3;

/// One copy: `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub src: *const u8,
    pub dst: *mut u8,
    pub len: usize,
}

/// The chunks of one copy, and how far the threads have got.
struct Job {
    chunks: Vec<Segment>,
    /// The next chunk to claim.
    next: AtomicUsize,
    /// Chunks copied.
    done: AtomicUsize,
}

// SAFETY: a job's pointers are only dereferenced by `Job::work` for a
// chunk claimed before `Copier::copy` returns (see there), while the
// caller of `copy` guarantees that the memory stays valid and untouched.
unsafe impl Send for Job {}
// SAFETY: as for `Send`; the counters are atomics.
unsafe impl Sync for Job {}

impl Job {
    /// Copies chunks until none is left to claim.
    fn work(&self) -> usize {
        let mut mine = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(c) = self.chunks.get(i) else {
                return mine;
            };
            // SAFETY: `Copier::copy`'s caller guarantees each segment is
            // valid and that destinations overlap nothing else; chunk `i`
            // is copied by this thread alone (it claimed it).
            unsafe { std::ptr::copy_nonoverlapping(c.src, c.dst, c.len) };
            self.done.fetch_add(1, Ordering::Release);
            mine += 1;
        }
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire) >= self.chunks.len()
    }
}

/// What a helper waits for.
#[derive(Default)]
struct Slot {
    job: Option<Arc<Job>>,
    stop: bool,
}

/// A helper thread, pinned to one CPU.
struct Helper {
    cpu: usize,
    slot: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    fn spawn(cpu: usize) -> std::io::Result<Self> {
        let slot: Arc<(Mutex<Slot>, Condvar)> = Arc::default();
        let theirs = Arc::clone(&slot);
        let thread = std::thread::Builder::new()
            .name(format!("specvm-copy{cpu}"))
            .spawn(move || {
                pin_to(cpu);
                helper_loop(&theirs)
            })?;
        Ok(Self {
            cpu,
            slot,
            thread: Some(thread),
        })
    }

    fn give(&self, job: &Arc<Job>) {
        let (m, cv) = &*self.slot;
        lock(m).job = Some(Arc::clone(job));
        cv.notify_one();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let (m, cv) = &*self.slot;
        lock(m).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn helper_loop(slot: &(Mutex<Slot>, Condvar)) {
    let (m, cv) = slot;
    loop {
        let job = {
            let mut s = lock(m);
            loop {
                if s.stop {
                    return;
                }
                if let Some(j) = s.job.take() {
                    break j;
                }
                s = wait(cv, s);
            }
        };
        let _ = job.work();
    }
}

/// Pins the calling thread to `cpu`; a helper that cannot be pinned still
/// helps, wherever the scheduler puts it.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for `cpu` below CPU_SETSIZE (checked by the caller's mask).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The CPUs this thread may run on, lowest first.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size given.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// The CPU the calling thread runs on now, if the kernel says.
fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments; returns -1 on error.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// Copies page runs, on the calling thread and, for large copies, on
/// helper threads of the other CPUs (started at the first large copy).
#[derive(Default)]
pub struct Copier {
    helpers: OnceLock<Vec<Helper>>,
}

impl Copier {
    /// Helpers for up to `MAX_HELPERS + 1` allowed CPUs, so that one not
    /// on the caller's CPU is always left to wake. None on a single CPU.
    fn helpers(&self) -> &[Helper] {
        self.helpers.get_or_init(|| {
            let cpus = allowed_cpus();
            if cpus.len() < 2 {
                return Vec::new();
            }
            let mut out = Vec::new();
            for cpu in cpus.into_iter().take(MAX_HELPERS + 1) {
                match Helper::spawn(cpu) {
                    Ok(h) => out.push(h),
                    Err(e) => {
                        tracing::warn!(cpu, "no copy helper thread ({e}): copying alone");
                        break;
                    }
                }
            }
            out
        })
    }

    /// Copies every segment.
    ///
    /// # Safety
    /// Each segment's `src` must be valid for reads and `dst` for writes of
    /// `len` bytes until this returns; no destination may overlap a source
    /// or another destination; and nothing else may touch them meanwhile.
    pub unsafe fn copy(&self, segments: &[Segment]) {
        let total: usize = segments.iter().map(|s| s.len).sum();
        if total < PARALLEL_MIN {
            for s in segments {
                // SAFETY: the caller's guarantees.
                unsafe { std::ptr::copy_nonoverlapping(s.src, s.dst, s.len) };
            }
            return;
        }
        let job = Arc::new(Job {
            chunks: chunks(segments),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        let here = current_cpu();
        for h in self
            .helpers()
            .iter()
            .filter(|h| Some(h.cpu) != here)
            .take(MAX_HELPERS)
        {
            h.give(&job);
        }
        let mine = job.work();
        // Every chunk is claimed now; wait for those a helper is copying.
        // A helper that claims later finds none, so once this returns no
        // helper touches the segments again.
        let mut spins = 0u32;
        while !job.finished() {
            if spins < 1 << 16 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        tracing::trace!(
            chunks = job.chunks.len(),
            by_helpers = job.chunks.len() - mine,
            "copied with helpers"
        );
    }
}

/// `segments` cut into pieces of at most [`CHUNK`] bytes.
fn chunks(segments: &[Segment]) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        let mut off = 0;
        while off < s.len {
            let len = CHUNK.min(s.len - off);
            out.push(Segment {
                // SAFETY: `off + len <= s.len`, inside the segment.
                src: unsafe { s.src.add(off) },
                // SAFETY: as above.
                dst: unsafe { s.dst.add(off) },
                len,
            });
            off += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `lens` segments laid end to end in one buffer into another,
    /// as a flush or a copy-back does, and checks every byte.
    fn copy_and_check(lens: &[usize]) {
        let total: usize = lens.iter().sum();
        let src: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut dst = vec![0u8; total];
        let c = Copier::default();
        for _ in 0..3 {
            dst.fill(0);
            let mut segs = Vec::new();
            let mut off = 0;
            for &len in lens {
                segs.push(Segment {
                    src: src[off..].as_ptr(),
                    dst: dst[off..].as_mut_ptr(),
                    len,
                });
                off += len;
            }
            // SAFETY: every segment lies inside `src` and `dst`, which
            // outlive the call; the segments are disjoint.
            unsafe { c.copy(&segs) };
            assert!(dst == src, "copy of {lens:?} differs");
        }
    }

    #[test]
    fn small_copies_stay_on_the_caller() {
        copy_and_check(&[4096, 8192, 4096]);
        let c = Copier::default();
        let src = [1u8; 4096];
        let mut dst = [0u8; 4096];
        let seg = Segment {
            src: src.as_ptr(),
            dst: dst.as_mut_ptr(),
            len: 4096,
        };
        // SAFETY: both buffers hold 4096 bytes and outlive the call.
        unsafe { c.copy(&[seg]) };
        assert_eq!(dst, src);
        assert!(c.helpers.get().is_none(), "a small copy started helpers");
    }

    #[test]
    fn large_copies_are_shared_and_whole() {
        // Runs of odd sizes, some larger than a chunk, some not a
        // multiple of it, over several chunks each.
        copy_and_check(&[
            PARALLEL_MIN,
            3 * 4096,
            CHUNK + 4096,
            17 * 4096,
            5 * CHUNK - 4096,
        ]);
        copy_and_check(&[PARALLEL_MIN + 1]);
    }

    #[test]
    fn chunks_cover_each_segment_exactly() {
        let a = [0u8; 3 * CHUNK + 100];
        let mut b = [0u8; 3 * CHUNK + 100];
        let seg = Segment {
            src: a.as_ptr(),
            dst: b.as_mut_ptr(),
            len: a.len(),
        };
        let c = chunks(&[seg]);
        assert_eq!(
            c.iter().map(|s| s.len).collect::<Vec<_>>(),
            [CHUNK, CHUNK, CHUNK, 100]
        );
        for (i, s) in c.iter().enumerate() {
            assert_eq!(s.src as usize - a.as_ptr() as usize, i * CHUNK);
            assert_eq!(s.dst as usize - b.as_ptr() as usize, i * CHUNK);
        }
    }
}
