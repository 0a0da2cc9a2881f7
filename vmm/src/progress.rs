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

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{BootSource, VmConfig};
use crate::host_compat::HostCompat;

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

/// One step of a Linux boot that the console shows.
pub struct Milestone {
    /// The name reports show and [`BootTimes`] record.
    pub name: &'static str,
    /// A console line shows the milestone when its message (the text after
    /// the kernel's `[ seconds]` stamp) starts with one pattern's first
    /// part and holds its second part after that.
    patterns: &'static [(&'static [u8], &'static [u8])],
}

const fn m(name: &'static str, patterns: &'static [(&'static [u8], &'static [u8])]) -> Milestone {
    Milestone { name, patterns }
}

/// The boot's milestones, in the order Linux 6.1 reaches them (start
/// kernel, `smp_init`, arch, fs and rootfs initcalls, `kernel_init`'s end,
/// then the project's `/init`, `images/init`). Each text was checked in
/// Debian's 6.1 kernel image; with `pci=off` the PCI line is "PCI: Fatal:
/// No config space access function found", without it "PCI: Using
/// configuration type 1". A milestone the console never shows is skipped.
#[rustfmt::skip]
pub const MILESTONES: &[Milestone] = &[
    m("kernel started", &[(b"Linux version ", b"")]),
    m("CPUs up", &[(b"smp: Brought up ", b"")]),
    m("PCI", &[(b"PCI: ", b"")]),
    m("clocksource", &[(b"clocksource: Switched to clocksource", b"")]),
    m("initramfs", &[(b"Trying to unpack rootfs", b""), (b"Unpacking initramfs", b"")]),
    m("user space", &[(b"Freeing unused kernel", b""), (b"Run ", b" as init process")]),
    m("loading modules", &[(b"specvm-init: [", b"] insmod ")]),
    m("ready", &[(b"SPECVM-READY", b"")]),
];
/// The last milestone: the guest is ready.
const READY: usize = MILESTONES.len() - 1;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// The message of a console line: without the kernel's `[    1.234567]`.
fn message(line: &[u8]) -> &[u8] {
    let line = trim_start(line);
    if line.first() == Some(&b'[') {
        if let Some(end) = line.iter().take(24).position(|&c| c == b']') {
            return trim_start(&line[end + 1..]);
        }
    }
    line
}

/// The first milestone at or after `from` that `line` shows.
fn recognise(line: &[u8], from: usize) -> Option<usize> {
    let msg = message(line);
    (from..MILESTONES.len()).find(|&i| {
        MILESTONES[i].patterns.iter().any(|(start, within)| {
            msg.strip_prefix(*start)
                .is_some_and(|rest| contains(rest, within))
        })
    })
}

/// When each milestone was first reached, shared by the console watcher
/// (on a vCPU thread) and the monitor.
#[derive(Debug)]
struct BootClock {
    start: OnceLock<Instant>,
    /// Milliseconds since `start`, plus one; 0: not reached.
    reached: [AtomicU64; MILESTONES.len()],
}

impl BootClock {
    fn new() -> Self {
        Self {
            start: OnceLock::new(),
            reached: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn elapsed(&self) -> Duration {
        self.start.get().map_or(Duration::ZERO, Instant::elapsed)
    }

    /// The furthest milestone reached.
    fn current(&self) -> Option<usize> {
        (0..MILESTONES.len())
            .rev()
            .find(|&i| self.reached[i].load(Ordering::Acquire) != 0)
    }

    /// Records milestone `i` now, unless it or a later one was reached.
    fn reach(&self, i: usize) {
        if self.current().is_some_and(|c| c >= i) {
            return;
        }
        let ms = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let _ = self.reached[i].compare_exchange(0, ms + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    fn times(&self) -> BootTimes {
        let milestones: Vec<(String, f64)> = MILESTONES
            .iter()
            .zip(&self.reached)
            .filter_map(|(m, r)| match r.load(Ordering::Acquire) {
                0 => None,
                v => Some((m.name.to_string(), (v - 1) as f64 / 1000.0)),
            })
            .collect();
        let total_secs = match self.reached[READY].load(Ordering::Acquire) {
            0 => None,
            v => Some((v - 1) as f64 / 1000.0),
        };
        BootTimes {
            milestones,
            total_secs,
        }
    }
}

/// Assembles the guest's console output into lines and records the
/// milestones they show. It runs on the vCPU thread that writes the UART:
/// per byte it only copies into a fixed buffer; it never allocates, and
/// any bytes (not UTF-8, no newline for ever) are fine.
pub struct ConsoleWatch {
    clock: Arc<BootClock>,
    line: [u8; MAX_LINE],
    len: usize,
    /// The first milestone still looked for.
    next: usize,
}

impl ConsoleWatch {
    /// Takes bytes the guest transmitted.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.next > READY {
                return;
            }
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ if self.len < MAX_LINE => {
                    self.line[self.len] = b;
                    self.len += 1;
                }
                _ => {}
            }
        }
    }

    fn end_line(&mut self) {
        if let Some(i) = recognise(&self.line[..self.len], self.next) {
            self.clock.reach(i);
            self.next = i + 1;
        }
        self.len = 0;
    }
}

/// When a boot reached its milestones, in seconds from its start: the
/// record of one boot, kept to estimate the next boot of the same image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootTimes {
    /// Milestones reached ([`Milestone::name`], seconds), in boot order.
    pub milestones: Vec<(String, f64)>,
    /// Seconds until the guest was ready; `None` if it never was.
    pub total_secs: Option<f64>,
}

impl BootTimes {
    /// Reads a record [`BootTimes::save`] wrote. A missing, unreadable or
    /// malformed file gives `None` (and a debug line).
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read(path)
            .map_err(|e| tracing::debug!("no earlier boot times in {}: {e}", path.display()))
            .ok()?;
        let times: Self = serde_json::from_slice(&text)
            .map_err(|e| tracing::debug!("boot times in {} unreadable: {e}", path.display()))
            .ok()?;
        let mut secs = times.milestones.iter().map(|m| m.1).chain(times.total_secs);
        if secs.all(|s| s.is_finite() && s >= 0.0) {
            Some(times)
        } else {
            tracing::debug!("boot times in {} out of range", path.display());
            None
        }
    }

    /// Writes the record durably: a new file beside `path`, fsync, rename
    /// into place, fsync the folder.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "boot times path has no file name",
            )
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let write = || -> io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&mut f, self)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    fn secs_of(&self, name: &str) -> Option<f64> {
        self.milestones.iter().find(|m| m.0 == name).map(|m| m.1)
    }
}

/// Where this boot is on the previous boot's time line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Seconds of the previous boot this boot has done.
    pub done_secs: f64,
    /// Seconds left.
    pub left_secs: f64,
    /// The previous boot's seconds to ready.
    pub total_secs: f64,
}

/// Estimates the time left of the boot that reached `current`'s milestones
/// and has run `elapsed` seconds, from the `previous` boot of the image.
/// Its anchor is the last milestone both boots reached: time since then
/// counts as done, up to the previous boot's next milestone, where the
/// estimate waits if this boot is slower. `None` without a finished
/// previous boot.
pub fn estimate(current: &BootTimes, elapsed: f64, previous: &BootTimes) -> Option<Estimate> {
    let total = previous.total_secs?;
    let (here, there) = current
        .milestones
        .iter()
        .rev()
        .find_map(|(name, t)| previous.secs_of(name).map(|p| (*t, p)))
        .unwrap_or((0.0, 0.0));
    let next = previous
        .milestones
        .iter()
        .map(|m| m.1)
        .filter(|&p| p > there)
        .fold(total, f64::min);
    let done = (there + (elapsed - here).max(0.0)).min(next.max(there));
    Some(Estimate {
        done_secs: done,
        left_secs: (total - done).max(0.0),
        total_secs: total,
    })
}

/// `45s`, `6m30s`, `1h02m`.
fn fmt_secs(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `about 12m left`, `about 1h05m left`, `less than a minute left`.
fn fmt_left(secs: f64) -> String {
    let m = (secs / 60.0).round() as u64;
    match m {
        0 => "less than a minute left".to_string(),
        1..60 => format!("about {m}m left"),
        _ => format!("about {}h{:02}m left", m / 60, m % 60),
    }
}

/// Where a boot is: `at "PCI" (3/8)`.
fn at_milestone(current: &BootTimes) -> String {
    let at = current.milestones.last().and_then(|(name, _)| {
        let i = MILESTONES.iter().position(|m| m.name == name)?;
        Some(format!("at \"{name}\" ({}/{})", i + 1, MILESTONES.len()))
    });
    at.unwrap_or_else(|| format!("no milestone yet (0/{})", MILESTONES.len()))
}

/// The plain report line of a boot not yet ready, `elapsed` seconds in.
pub fn boot_line(current: &BootTimes, elapsed: f64, previous: Option<&BootTimes>) -> String {
    let head = format!(
        "boot: {} elapsed, {}",
        fmt_secs(elapsed),
        at_milestone(current)
    );
    match previous.and_then(|p| estimate(current, elapsed, p)) {
        Some(e) => format!(
            "{head}, {} (previous boot of this image: {})",
            fmt_left(e.left_secs),
            fmt_secs(e.total_secs)
        ),
        None => format!("{head}, no earlier boot of this image to estimate from"),
    }
}

/// The bar's message, short enough for 80 columns beside the bar.
fn bar_message(current: &BootTimes, elapsed: f64, est: Option<Estimate>) -> String {
    let (secs, at) = (fmt_secs(elapsed), at_milestone(current));
    match est {
        Some(e) => format!("{secs} {at}, {}", fmt_left(e.left_secs)),
        None => format!("boot: {secs} {at}; no earlier boot to estimate from"),
    }
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
        *self.previous.lock().unwrap_or_else(|e| e.into_inner()) = Some(times);
    }

    fn previous(&self) -> Option<BootTimes> {
        self.previous
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

/// The terminal while a bar may show on it. There is one stderr and one
/// stdout per process, so there is one of these ([`SCREEN`]).
struct Screen {
    bar: Option<ProgressBar>,
    /// Whether console output shares the bar's terminal: then it is held
    /// back to whole lines, each written with the bar off the screen.
    hold_console: bool,
    held: Vec<u8>,
}

static SCREEN: Mutex<Screen> = Mutex::new(Screen::new());

fn lock_screen(s: &Mutex<Screen>) -> std::sync::MutexGuard<'_, Screen> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Screen {
    const fn new() -> Self {
        Self {
            bar: None,
            hold_console: false,
            held: Vec::new(),
        }
    }

    /// Writes log output, with the bar off the screen meanwhile.
    fn log(&self, out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
        match &self.bar {
            Some(bar) => bar.suspend(|| out.write_all(buf).and_then(|()| out.flush())),
            None => out.write_all(buf),
        }
    }

    /// Writes console output: straight through, or, while a bar shares the
    /// terminal, whole lines with the bar off the screen.
    fn console(&mut self, out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
        let Some(bar) = self.bar.as_ref().filter(|_| self.hold_console) else {
            self.release(out)?;
            out.write_all(buf)?;
            return out.flush();
        };
        self.held.extend_from_slice(buf);
        let end = if buf.contains(&b'\n') {
            self.held.iter().rposition(|&b| b == b'\n').map(|i| i + 1)
        } else {
            None
        };
        let (end, broken) = match end {
            Some(e) => (e, false),
            None if self.held.len() >= MAX_HELD => (self.held.len(), true),
            None => return Ok(()),
        };
        let held = &self.held[..end];
        let r = bar.suspend(|| {
            out.write_all(held)?;
            if broken {
                out.write_all(b"\n")?;
            }
            out.flush()
        });
        self.held.drain(..end);
        r
    }

    fn release(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let r = out.write_all(&self.held).and_then(|()| out.flush());
        self.held.clear();
        r
    }

    fn show(&mut self, bar: ProgressBar, hold_console: bool) {
        self.bar = Some(bar);
        self.hold_console = hold_console;
    }

    /// Takes the bar off the screen for good, and writes what was held.
    fn clear(&mut self, out: &mut dyn Write) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let _ = self.release(out);
    }
}

/// The log's writer (for `tracing_subscriber`'s `with_writer`): stderr,
/// with the progress bar taken off the screen while a line is written.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// Stderr for the log; see [`log_writer`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock_screen(&SCREEN).log(&mut io::stderr().lock(), buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes the guest's console output to `out` (the VMM's stdout), in whole
/// lines while a progress bar shares the terminal.
pub fn write_console(out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
    lock_screen(&SCREEN).console(out, buf)
}

/// What the monitor shows, decided tick by tick.
struct Reporter<'a> {
    progress: &'a Progress,
    screen: &'a Mutex<Screen>,
    /// The bar, on a terminal, until the boot is ready.
    bar: Option<ProgressBar>,
    /// Whether the bar has a length (the previous boot's total).
    bar_has_length: bool,
    /// Whether the boot reports are over (ready, or not a boot).
    boot_over: bool,
    /// Where console output held back while the bar showed goes.
    console: Box<dyn Write + 'a>,
}

impl<'a> Reporter<'a> {
    /// `bar`: where to draw, if on a terminal; used only for a boot.
    /// `hold_console`: whether the console (`console`) shares the terminal.
    fn new(
        progress: &'a Progress,
        screen: &'a Mutex<Screen>,
        bar: Option<ProgressBar>,
        hold_console: bool,
        console: Box<dyn Write + 'a>,
    ) -> Self {
        let bar = match bar {
            Some(b) if !progress.booting => {
                b.finish_and_clear();
                None
            }
            b => b,
        };
        if let Some(b) = &bar {
            b.set_style(spinner_style());
            lock_screen(screen).show(b.clone(), hold_console);
        }
        Self {
            progress,
            screen,
            bar,
            bar_has_length: false,
            boot_over: !progress.booting,
            console,
        }
    }

    /// One tick, `elapsed` into the run; `due` when a plain line is due.
    /// Returns the line to log at `info` level, if any.
    fn tick(&mut self, elapsed: Duration, due: bool) -> Option<String> {
        let secs = elapsed.as_secs_f64();
        if self.boot_over {
            let long = due && !self.progress.booting;
            return long.then(|| format!("still running after {}", fmt_secs(secs)));
        }
        let current = self.progress.boot_times();
        let previous = self.progress.previous();
        if let Some(total) = current.total_secs {
            self.boot_over = true;
            self.end();
            let earlier = match previous.and_then(|p| p.total_secs) {
                Some(p) => format!("previous boot of this image: {}", fmt_secs(p)),
                None => "no earlier boot of this image".to_string(),
            };
            return Some(format!("boot: ready after {} ({earlier})", fmt_secs(total)));
        }
        let Some(bar) = &self.bar else {
            return due.then(|| boot_line(&current, secs, previous.as_ref()));
        };
        let est = previous.as_ref().and_then(|p| estimate(&current, secs, p));
        let msg = bar_message(&current, secs, est);
        if let (Some(e), false) = (est, self.bar_has_length) {
            bar.set_style(bar_style());
            bar.set_length(e.total_secs.ceil() as u64);
            self.bar_has_length = true;
        }
        bar.set_message(msg);
        match est {
            Some(e) => bar.set_position(e.done_secs as u64),
            None => bar.tick(),
        }
        None
    }

    /// Takes the bar away for good.
    fn end(&mut self) {
        if self.bar.take().is_some() {
            lock_screen(self.screen).clear(&mut self.console);
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} [{bar:24}] {wide_msg}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The running monitor; dropping it stops the monitor and clears its bar.
#[must_use = "the monitor stops when this is dropped"]
pub struct Monitor {
    wake: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // A closed channel wakes the thread at once; it clears the bar.
        self.wake.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the monitor. It ends when `stop` is set or the returned
/// [`Monitor`] is dropped. It kicks the vCPU threads with `signal`, which
/// must have a handler, to sample their RIPs for the debug line.
pub fn spawn_monitor(
    progress: Arc<Progress>,
    compat: Option<HostCompat>,
    stop: Arc<AtomicBool>,
    signal: i32,
) -> Result<Monitor, ProgressError> {
    // A bar that is made is drawn when dropped, even unused: make one only
    // for a boot, and only where stderr is a terminal.
    let bar = progress
        .booting
        .then(ProgressDrawTarget::stderr)
        .filter(|draw| !draw.is_hidden())
        .map(|draw| ProgressBar::with_draw_target(None, draw));
    let hold_console = std::io::IsTerminal::is_terminal(&io::stdout());
    spawn(
        progress,
        compat,
        stop,
        signal,
        bar,
        hold_console,
        REPORT_INTERVAL,
    )
}

fn spawn(
    progress: Arc<Progress>,
    compat: Option<HostCompat>,
    stop: Arc<AtomicBool>,
    signal: i32,
    bar: Option<ProgressBar>,
    hold_console: bool,
    interval: Duration,
) -> Result<Monitor, ProgressError> {
    let start = progress.start_clock();
    let (wake, sleep) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let stdout = Box::new(io::stdout());
            let mut reporter = Reporter::new(&progress, &SCREEN, bar, hold_console, stdout);
            let mut next = start + interval;
            while let Err(mpsc::RecvTimeoutError::Timeout) = sleep.recv_timeout(TICK) {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let now = Instant::now();
                let due = now >= next;
                while next <= now {
                    next += interval;
                }
                if let Some(line) = reporter.tick(start.elapsed(), due) {
                    tracing::info!("{line}");
                }
                if due && tracing::enabled!(tracing::Level::DEBUG) {
                    progress.request_samples();
                    progress.kick(signal);
                    std::thread::sleep(SAMPLE_WAIT);
                    tracing::debug!("{}", progress.line(start.elapsed(), compat.as_ref()));
                }
            }
            reporter.end();
        })
        .map_err(ProgressError::Thread)?;
    Ok(Monitor {
        wake: Some(wake),
        thread: Some(thread),
    })
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

    /// A console transcript as Debian's 6.1 kernel and `images/init` write
    /// it (abridged), with CRLF line ends as the 8250 console sends them.
    const CONSOLE: &str = "\
[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\r\n\
[    0.000000] Command line: console=ttyS0 reboot=k panic=-1 pci=off\r\n\
[    0.004000] smpboot: Allowing 2 CPUs, 0 hotplug CPUs\r\n\
[    0.300000] ACPI: PCI: Interrupt link LNKA configured\r\n\
[    2.100000] smp: Bringing up secondary CPUs ...\r\n\
[    2.200000] smp: Brought up 1 node, 2 CPUs\r\n\
[    3.000000] PCI: Fatal: No config space access function found\r\n\
[    4.000000] clocksource: Switched to clocksource kvm-clock\r\n\
[    4.100000] Trying to unpack rootfs image as initramfs...\r\n\
[    9.000000] Freeing unused kernel image (initmem) memory: 2784K\r\n\
[    9.100000] Run /init as init process\r\n\
specvm-init: [9.52] start\r\n\
specvm-init: [10.01] insmod virtio_ring\r\n\
specvm-init: [11.20] insmod virtio_net\r\n\
SPECVM-READY\r\n\
~ # ";

    fn names(t: &BootTimes) -> Vec<&str> {
        t.milestones.iter().map(|m| m.0.as_str()).collect()
    }

    #[test]
    fn milestones_come_from_the_console_in_any_chunks() {
        let all: Vec<&str> = MILESTONES.iter().map(|m| m.name).collect();
        for chunk in [1, 2, 3, 7, 64, CONSOLE.len()] {
            let p = Progress::booting(1);
            let mut w = p.console_watch().unwrap();
            for part in CONSOLE.as_bytes().chunks(chunk) {
                w.feed(part);
            }
            let t = p.boot_times();
            assert_eq!(names(&t), all, "chunks of {chunk}");
            assert_eq!(t.total_secs, Some(0.0), "the clock was not started");
        }
        // Part of the way: the furthest milestone so far, nothing after.
        let p = Progress::booting(1);
        let mut w = p.console_watch().unwrap();
        let upto = CONSOLE.find("[    4.0").unwrap();
        w.feed(&CONSOLE.as_bytes()[..upto]);
        assert_eq!(names(&p.boot_times()), ["kernel started", "CPUs up", "PCI"]);
        assert_eq!(p.boot_times().total_secs, None);
        // A line counts only once it ends.
        w.feed(b"[    4.000000] clocksource: Switched to clocksource kvm-clock");
        assert_eq!(p.boot_times().milestones.len(), 3);
        w.feed(b"\r\n");
        assert_eq!(p.boot_times().milestones.len(), 4);
    }

    #[test]
    fn the_clock_times_the_milestones() {
        let p = Progress::booting(1);
        let started = Instant::now()
            .checked_sub(Duration::from_secs(100))
            .unwrap();
        p.clock.start.set(started).unwrap();
        assert_eq!(p.start_clock(), started, "the first start stays");
        let mut w = p.console_watch().unwrap();
        w.feed(b"[ 0.1] Linux version 6.1\n");
        p.ready();
        let t = p.boot_times();
        assert_eq!(names(&t), ["kernel started", "ready"]);
        assert!((100.0..110.0).contains(&t.milestones[0].1), "{t:?}");
        assert!(t.milestones[1].1 >= t.milestones[0].1, "{t:?}");
        assert_eq!(t.total_secs, Some(t.milestones[1].1));
        // Nothing is recorded after ready, nor twice.
        w.feed(b"PCI: late\nSPECVM-READY\n");
        assert_eq!(p.boot_times(), t);
    }

    #[test]
    fn garbage_and_long_lines_are_harmless() {
        let p = Progress::booting(1);
        let mut w = p.console_watch().unwrap();
        w.feed(&[0xff, 0xfe, 0x00, 0x1b, b'[', 0xc3]);
        w.feed(b"\n\n\r\r\n");
        // Not UTF-8 after the milestone text: still the milestone.
        w.feed(b"[    0.0] Linux version \xff\xfe\x80\r\n");
        // A milestone text past the kept part of a long line is not seen.
        let mut long = vec![b'x'; 10 * MAX_LINE];
        long.extend_from_slice(b" smp: Brought up 1 node\n");
        w.feed(&long);
        assert_eq!(names(&p.boot_times()), ["kernel started"]);
        // One at the start of a long line is.
        let mut long = b"[    2.2] smp: Brought up 1 node, 2 CPUs ".to_vec();
        long.extend(std::iter::repeat_n(0xffu8, 100_000));
        long.push(b'\n');
        w.feed(&long);
        assert_eq!(names(&p.boot_times()), ["kernel started", "CPUs up"]);
        // Lookalikes: other messages that mention the words.
        w.feed(b"[ 0.3] ACPI: PCI: Interrupt link\n[ 0.4] e820: [mem 0x1000] available for PCI devices\n");
        w.feed(b"echo SPECVM-READY\nspecvm-init: [1.0] start\ninsmod: ERROR\n");
        assert_eq!(p.boot_times().milestones.len(), 2);
        // An earlier milestone's line after a later one changes nothing.
        w.feed(b"[ 9.0] Run /init as init process\n[ 9.1] PCI: again\n");
        assert_eq!(
            names(&p.boot_times()),
            ["kernel started", "CPUs up", "user space"]
        );
    }

    #[test]
    fn runs_that_are_not_boots_watch_nothing() {
        let p = Progress::new(1);
        assert!(p.console_watch().is_none());
        p.ready();
        assert_eq!(p.boot_times(), BootTimes::default());
    }

    fn times(milestones: &[(&str, f64)], total: Option<f64>) -> BootTimes {
        BootTimes {
            milestones: milestones
                .iter()
                .map(|(n, t)| (n.to_string(), *t))
                .collect(),
            total_secs: total,
        }
    }

    fn previous() -> BootTimes {
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

    #[test]
    fn estimates_anchor_on_the_last_shared_milestone() {
        let prev = previous();
        let est = |cur: &BootTimes, elapsed| estimate(cur, elapsed, &prev).unwrap();
        // No milestone yet: the previous boot's clock from 0.
        let e = est(&times(&[], None), 0.5);
        assert_eq!(
            (e.done_secs, e.left_secs, e.total_secs),
            (0.5, 1141.5, 1142.0)
        );
        // At "PCI" since 250 s (reached 100 s later than last time), 390 s in.
        let cur = times(
            &[("kernel started", 1.0), ("CPUs up", 150.0), ("PCI", 250.0)],
            None,
        );
        let e = est(&cur, 390.0);
        assert_eq!((e.done_secs, e.left_secs), (440.0, 702.0));
        // Much slower than last time: it waits at the next milestone the
        // previous boot had ("user space" at 900 s).
        let e = est(&cur, 5000.0);
        assert_eq!((e.done_secs, e.left_secs), (900.0, 242.0));
        // A milestone the previous boot did not record: the anchor is the
        // last one it did.
        let cur = times(
            &[
                ("kernel started", 1.0),
                ("CPUs up", 150.0),
                ("clocksource", 400.0),
            ],
            None,
        );
        let e = est(&cur, 160.0);
        assert_eq!((e.done_secs, e.left_secs), (210.0, 932.0));
        // Past the last milestone: never less than nothing left.
        let cur = times(&[("user space", 800.0)], None);
        assert_eq!(est(&cur, 2000.0).left_secs, 0.0);
        // No estimate from a boot that never got ready.
        assert_eq!(estimate(&cur, 1.0, &times(&[("PCI", 3.0)], None)), None);
    }

    #[test]
    fn report_lines_read_well() {
        let cur = times(
            &[("kernel started", 1.0), ("CPUs up", 150.0), ("PCI", 250.0)],
            None,
        );
        assert_eq!(
            boot_line(&cur, 390.0, Some(&previous())),
            "boot: 6m30s elapsed, at \"PCI\" (3/8), about 12m left \
             (previous boot of this image: 19m02s)"
        );
        assert_eq!(
            boot_line(&cur, 390.0, None),
            "boot: 6m30s elapsed, at \"PCI\" (3/8), no earlier boot of this image to estimate from"
        );
        assert_eq!(
            boot_line(&times(&[], None), 30.2, Some(&times(&[], None))),
            "boot: 30s elapsed, no milestone yet (0/8), no earlier boot of this image to estimate from"
        );
        assert_eq!(fmt_secs(59.4), "59s");
        assert_eq!(fmt_secs(3599.0), "59m59s");
        assert_eq!(fmt_secs(3720.0), "1h02m");
        assert_eq!(fmt_left(29.0), "less than a minute left");
        assert_eq!(fmt_left(3900.0), "about 1h05m left");
    }

    use crate::test_util::TempDir;

    #[test]
    fn boot_times_round_trip_durably() {
        let dir = TempDir::new("progress-save");
        let path = dir.join("boot-times.json");
        let t = previous();
        t.save(&path).unwrap();
        assert_eq!(BootTimes::load(&path), Some(t.clone()));
        // Saving again replaces the record, and leaves no temporary file.
        let t2 = times(&[("kernel started", 2.5)], None);
        t2.save(&path).unwrap();
        assert_eq!(BootTimes::load(&path), Some(t2));
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        // No such folder: an error, not a panic.
        assert!(t.save(&dir.join("missing/boot-times.json")).is_err());
    }

    #[test]
    fn bad_boot_time_files_are_none() {
        let dir = TempDir::new("progress-bad");
        let path = dir.join("boot-times.json");
        assert_eq!(BootTimes::load(&path), None, "missing");
        for bad in [
            &b""[..],
            b"{",
            b"\xff\xfe",
            b"{\"milestones\": 3, \"total_secs\": null}",
            b"{\"milestones\": [[\"PCI\", -1.0]], \"total_secs\": 5.0}",
            b"[1, 2]",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(
                BootTimes::load(&path),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn plain_reports_every_interval_until_ready() {
        let screen = Mutex::new(Screen::new());
        let p = Progress::booting(1);
        p.set_previous(previous());
        let mut r = Reporter::new(&p, &screen, None, false, Box::new(io::sink()));
        let at = Duration::from_secs;
        assert_eq!(r.tick(at(10), false), None);
        let mut w = p.console_watch().unwrap();
        w.feed(b"[ 1.0] Linux version 6.1\n");
        let line = r.tick(at(30), true).unwrap();
        assert!(
            line.starts_with("boot: 30s elapsed, at \"kernel started\" (1/8), about 19m left"),
            "{line}"
        );
        w.feed(b"SPECVM-READY\n");
        assert_eq!(
            r.tick(at(31), false).as_deref(),
            Some("boot: ready after 0s (previous boot of this image: 19m02s)")
        );
        // After ready: nothing at info level.
        assert_eq!(r.tick(at(60), true), None);
    }

    #[test]
    fn other_runs_say_only_that_they_run_long() {
        let screen = Mutex::new(Screen::new());
        let p = Progress::new(1);
        let bar = ProgressBar::hidden();
        let mut r = Reporter::new(&p, &screen, Some(bar), true, Box::new(io::sink()));
        assert!(
            lock_screen(&screen).bar.is_none(),
            "no bar for a run that is not a boot"
        );
        assert_eq!(r.tick(Duration::from_secs(29), false), None);
        assert_eq!(
            r.tick(Duration::from_secs(30), true).as_deref(),
            Some("still running after 30s")
        );
    }

    /// Writes into an in-memory terminal as a tty would (LF as CR LF).
    struct TermWriter(indicatif::InMemoryTerm);

    impl Write for TermWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let s = String::from_utf8_lossy(buf).replace('\n', "\r\n");
            indicatif::TermLike::write_str(&self.0, &s)?;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_bar_keeps_log_and_console_lines_whole() {
        let term = indicatif::InMemoryTerm::new(10, 80);
        let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
        let bar = ProgressBar::with_draw_target(None, target);
        let screen = Mutex::new(Screen::new());
        let p = Progress::booting(1);
        let mut w = p.console_watch().unwrap();
        let mut out = TermWriter(term.clone());
        let stdout = Box::new(TermWriter(term.clone()));
        let mut r = Reporter::new(&p, &screen, Some(bar), true, stdout);
        let console =
            |s: &[u8], out: &mut TermWriter| lock_screen(&screen).console(out, s).unwrap();
        w.feed(b"[ 0.1] Linux version 6.1\n");
        assert_eq!(r.tick(Duration::from_secs(5), false), None);
        let bar_line = "boot: 5s at \"kernel started\" (1/8); no earlier boot to estimate from";
        assert!(term.contents().ends_with(bar_line), "{}", term.contents());
        // A console line arriving in pieces, and a log line in between.
        console(b"[ 0.2] smp: Bring", &mut out);
        lock_screen(&screen)
            .log(&mut out, b"INFO something happened\n")
            .unwrap();
        console(b"ing up secondary CPUs ...\n[ 0.3] x86: Booting", &mut out);
        p.set_previous(previous());
        assert_eq!(r.tick(Duration::from_secs(6), false), None);
        let rows: Vec<String> = term.contents().lines().map(str::to_string).collect();
        assert_eq!(rows[0], "INFO something happened", "{rows:?}");
        assert_eq!(
            rows[1], "[ 0.2] smp: Bringing up secondary CPUs ...",
            "{rows:?}"
        );
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(
            rows[2].contains("[====>") || rows[2].contains("[>"),
            "{rows:?}"
        );
        assert!(rows[2].ends_with("about 19m left"), "{rows:?}");
        // Ready: the bar goes, and what was held comes out.
        w.feed(b"SPECVM-READY\n");
        assert!(r
            .tick(Duration::from_secs(7), false)
            .unwrap()
            .starts_with("boot: ready"));
        assert!(lock_screen(&screen).bar.is_none());
        let rows: Vec<String> = term.contents().lines().map(str::to_string).collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[2], "[ 0.3] x86: Booting", "{rows:?}");
        // From now on the console goes straight through.
        console(b" SMP configuration:", &mut out);
        assert!(term.contents().ends_with("Booting SMP configuration:"));
    }

    #[test]
    fn log_writer_fits_tracing_subscriber() {
        // What `main` would install; built, not made the global default.
        let _ = tracing_subscriber::fmt().with_writer(log_writer).finish();
        assert_eq!(LogWriter.write(b"").unwrap(), 0);
    }

    #[test]
    fn the_monitor_stops_when_dropped() {
        let p = Arc::new(Progress::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let m = spawn(
            p.clone(),
            None,
            stop,
            libc::SIGUSR1,
            None,
            false,
            Duration::from_millis(1),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let t = Instant::now();
        drop(m);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(Arc::strong_count(&p), 1, "the thread has ended");
    }
}
