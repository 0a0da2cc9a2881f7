//! Signs of life for long runs: on a host where a Linux boot takes twenty
//! minutes, the person watching must see that the guest moves.
//!
//! The vCPU loops count their exits here, and sample their RIP when asked.
//! A monitor thread asks every [`REPORT_INTERVAL`], kicks the vCPUs out of
//! `KVM_RUN` so even a vCPU that has not exited for a while answers, and
//! logs one line at `info` level: elapsed time, exits, what the host-compat
//! layer completed, and where each vCPU is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host_compat::HostCompat;

/// How often the monitor reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// How long the vCPUs get to answer a sample request.
const SAMPLE_WAIT: Duration = Duration::from_millis(50);

/// Errors starting the monitor.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The thread could not be started.
    #[error("starting the progress monitor: {0}")]
    Thread(std::io::Error),
}

/// Counters shared by the vCPU threads and the monitor.
#[derive(Debug)]
pub struct Progress {
    exits: AtomicU64,
    sample: Vec<AtomicBool>,
    rips: Vec<AtomicU64>,
    /// The running vCPU threads, to kick. A thread removes itself before
    /// it ends, under this lock, so a kick never reaches a thread that has
    /// ended (whose id may be reused).
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
}

impl Progress {
    /// Counters for `vcpus` vCPUs.
    pub fn new(vcpus: u8) -> Self {
        Self {
            exits: AtomicU64::new(0),
            sample: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            rips: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            threads: Mutex::new(vec![None; usize::from(vcpus)]),
        }
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<Option<libc::pthread_t>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on vCPU `idx`'s own thread when it starts.
    pub fn thread_started(&self, idx: u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Some(t) = self.threads().get_mut(usize::from(idx)) {
            *t = Some(me);
        }
    }

    /// Called on vCPU `idx`'s own thread before it ends.
    pub fn thread_ending(&self, idx: u8) {
        if let Some(t) = self.threads().get_mut(usize::from(idx)) {
            *t = None;
        }
    }

    /// Sends `signal` to every running vCPU thread.
    fn kick(&self, signal: i32) {
        for t in self.threads().iter().flatten() {
            // SAFETY: the thread is registered, so it has not ended: it
            // unregisters under the lock we hold before it ends. The signal
            // has a handler (installed before the vCPUs started).
            unsafe { libc::pthread_kill(*t, signal) };
        }
    }
    /// Counts one exit from `KVM_RUN`.
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether vCPU `idx` should record its RIP now (clears the request).
    pub fn wants_sample(&self, idx: u8) -> bool {
        self.sample
            .get(usize::from(idx))
            .is_some_and(|s| s.swap(false, Ordering::AcqRel))
    }

    /// Records vCPU `idx`'s RIP.
    pub fn record_rip(&self, idx: u8, rip: u64) {
        if let Some(r) = self.rips.get(usize::from(idx)) {
            r.store(rip, Ordering::Relaxed);
        }
    }

    fn request_samples(&self) {
        for s in &self.sample {
            s.store(true, Ordering::Release);
        }
    }

    /// The report line for `elapsed` time, with `compat`'s counts.
    pub fn line(&self, elapsed: Duration, compat: Option<&HostCompat>) -> String {
        let rips: Vec<String> = self
            .rips
            .iter()
            .map(|r| format!("{:#x}", r.load(Ordering::Relaxed)))
            .collect();
        let mut s = format!(
            "still running after {} s: {} exits",
            elapsed.as_secs(),
            self.exits.load(Ordering::Relaxed)
        );
        if let Some(c) = compat {
            let st = c.stats();
            s += &format!(
                ", {} emulated instructions completed ({} int3/int n, {} clac/stac), {} MSR writes, {} system calls",
                st.completed.load(Ordering::Relaxed),
                st.int.load(Ordering::Relaxed),
                st.clac_stac.load(Ordering::Relaxed),
                st.msr_writes.load(Ordering::Relaxed),
                st.syscalls.load(Ordering::Relaxed)
            );
        }
        s + &format!(", guest RIP {}", rips.join(" "))
    }
}

/// Starts the monitor. It ends when `stop` is set. It kicks the vCPU threads
/// with `signal`, which must have a handler.
pub fn spawn_monitor(
    progress: Arc<Progress>,
    compat: Option<HostCompat>,
    stop: Arc<AtomicBool>,
    signal: i32,
) -> Result<(), ProgressError> {
    let start = Instant::now();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let mut next = start + REPORT_INTERVAL;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(250));
                if Instant::now() < next {
                    continue;
                }
                next += REPORT_INTERVAL;
                progress.request_samples();
                progress.kick(signal);
                std::thread::sleep(SAMPLE_WAIT);
                tracing::info!("{}", progress.line(start.elapsed(), compat.as_ref()));
            }
        })
        .map(|_| ())
        .map_err(ProgressError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_requested_once() {
        let p = Progress::new(2);
        assert!(!p.wants_sample(0));
        p.request_samples();
        assert!(p.wants_sample(1));
        assert!(!p.wants_sample(1));
        assert!(!p.wants_sample(9));
        p.record_rip(0, 0xffff_ffff_8100_0000);
        p.count_exit();
        let l = p.line(Duration::from_secs(30), Some(&HostCompat::new()));
        assert!(
            l.contains("30 s: 1 exits, 0 emulated instructions completed (0 int3"),
            "{l}"
        );
        assert!(l.contains("guest RIP 0xffffffff81000000 0x0"), "{l}");
    }
}
