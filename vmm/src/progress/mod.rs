//! Progress a person can read during a long run: on a host where a Linux
//! boot takes twenty minutes, the person watching must see where the boot
//! is and roughly how long is left.
//!
//! - The serial device hands every byte the guest transmits to a
//!   [`ConsoleWatch`], which assembles lines and recognises the boot's
//!   [`MILESTONES`] ("Linux version", "smp: Brought up", ... `SPECVM-READY`),
//!   recording when each was first reached.
//! - [`BootTimes`] is that record, saved per image by the caller, so the
//!   next boot of the same image can estimate its time left.
//! - The monitor ([`spawn_monitor`]) reports: on a terminal, an `indicatif`
//!   bar (a spinner without an earlier boot to compare with); elsewhere,
//!   one `info` line every [`REPORT_INTERVAL`]. It stops reporting the boot
//!   once the guest is ready. Runs that are not Linux boots (bare guests,
//!   restored VMs) get a plain line only once they run longer than that.
//! - Exit counts and sampled vCPU RIPs stay, at `debug` level.
//!
//! While a bar shows, everything else written to the terminal goes through
//! one lock ([`log_writer`] for the log, the serial console's stdout
//! backend through [`write_console`]), which takes the bar off the screen,
//! writes, and puts it back, so log lines and console lines stay whole.

pub mod check;
mod milestones;
mod monitor;
mod screen;
mod times;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{BootSource, VmConfig};
use crate::host_compat::HostCompat;
use crate::sync::lock;

pub use milestones::{ConsoleWatch, Milestone, MILESTONES};
pub use monitor::{spawn_monitor, Monitor};
pub use screen::{log_writer, write_console, LogWriter};
pub use times::{boot_line, estimate, BootTimes, Estimate};

use milestones::{BootClock, READY};

/// How often the monitor writes a plain report line.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// How often the monitor looks at the boot and redraws the bar.
const TICK: Duration = Duration::from_millis(250);
/// How long the vCPUs get to answer a sample request.
const SAMPLE_WAIT: Duration = Duration::from_millis(50);
/// Console bytes kept per line for recognising milestones; the rest of a
/// longer line is dropped (milestone texts are near a line's start).
const MAX_LINE: usize = 160;
/// Most console bytes held back without a newline while a bar shows.
const MAX_HELD: usize = 4096;

/// Errors starting the monitor.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The thread could not be started.
    #[error("starting the progress monitor: {0}")]
    Thread(std::io::Error),
}

/// Counters shared by the vCPU threads, the console and the monitor.
#[derive(Debug)]
pub struct Progress {
    exits: AtomicU64,
    sample: Vec<AtomicBool>,
    rips: Vec<AtomicU64>,
    /// The running vCPU threads, to kick. A thread removes itself before
    /// it ends, under this lock, so a kick never reaches a thread that has
    /// ended (whose id may be reused).
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    clock: Arc<BootClock>,
    /// Whether this run is a Linux boot, with milestones to watch.
    booting: bool,
    previous: Mutex<Option<BootTimes>>,
}

impl Progress {
    /// Counters for `vcpus` vCPUs of a run that is not a boot.
    pub fn new(vcpus: u8) -> Self {
        Self {
            exits: AtomicU64::new(0),
            sample: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            rips: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            threads: Mutex::new(vec![None; usize::from(vcpus)]),
            clock: Arc::new(BootClock::new()),
            booting: false,
            previous: Mutex::new(None),
        }
    }

    /// Counters for `vcpus` vCPUs of a Linux boot, whose milestones the
    /// console shows.
    pub fn booting(vcpus: u8) -> Self {
        Self {
            booting: true,
            ..Self::new(vcpus)
        }
    }

    /// The counters for `config`'s VM: a Linux boot has milestones; bare
    /// guests and restored VMs do not.
    pub fn for_vm(config: &VmConfig) -> Self {
        match config.boot {
            BootSource::Linux { .. } => Self::booting(config.vcpus),
            _ => Self::new(config.vcpus),
        }
    }

    /// A watcher for the serial console's output; `None` unless booting.
    pub fn console_watch(&self) -> Option<ConsoleWatch> {
        self.booting.then(|| ConsoleWatch {
            clock: self.clock.clone(),
            line: [0; MAX_LINE],
            len: 0,
            next: 0,
        })
    }

    /// Gives the times of the previous boot of the same image, to estimate
    /// this one's from. Call before [`Vmm::run`](crate::builder::Vmm::run)
    /// or during it.
    pub fn set_previous(&self, times: BootTimes) {
        *lock(&self.previous) = Some(times);
    }

    fn previous(&self) -> Option<BootTimes> {
        lock(&self.previous).clone()
    }

    /// Records that the guest is ready (its `READY` hypercall), if its
    /// console has not said so already.
    pub fn ready(&self) {
        if self.booting {
            self.clock.reach(READY);
        }
    }

    /// This boot's times so far; `total_secs` is set once it is ready.
    pub fn boot_times(&self) -> BootTimes {
        self.clock.times()
    }

    /// Starts the clock of the run (once; later calls return the start).
    fn start_clock(&self) -> Instant {
        *self.clock.start.get_or_init(Instant::now)
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<Option<libc::pthread_t>>> {
        lock(&self.threads)
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

    /// The debug line for `elapsed` time: exits, `compat`'s counts, RIPs.
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

    #[test]
    fn runs_that_are_not_boots_watch_nothing() {
        let p = Progress::new(1);
        assert!(p.console_watch().is_none());
        p.ready();
        assert_eq!(p.boot_times(), BootTimes::default());
    }
}

/// Boot-time records the tests of several submodules share.
#[cfg(test)]
mod test_support {
    use super::BootTimes;

    pub(super) fn times(milestones: &[(&str, f64)], total: Option<f64>) -> BootTimes {
        BootTimes {
            milestones: milestones
                .iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect(),
            total_secs: total,
        }
    }

    pub(super) fn previous() -> BootTimes {
        times(
            &[
                ("kernel started", 1.0),
                ("CPUs up", 200.0),
                ("PCI", 300.0),
                ("user space", 900.0),
                ("ready", 1142.0),
            ],
            Some(1142.0),
        )
    }
}
