//! The monitor thread: what it reports tick by tick ([`Reporter`]), the
//! bar's styles, and starting and stopping it ([`spawn_monitor`],
//! [`Monitor`]).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::screen::{Screen, SCREEN};
use super::times::{bar_message, boot_line, estimate, fmt_secs};
use super::{Progress, ProgressError, REPORT_INTERVAL, SAMPLE_WAIT, TICK};
use crate::host_compat::HostCompat;
use crate::sync::lock;

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
            lock(screen).show(b.clone(), hold_console);
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
            lock(self.screen).clear(&mut self.console);
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

pub(super) fn bar_style() -> ProgressStyle {
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
    use crate::progress::test_support::previous;

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
            lock(&screen).bar.is_none(),
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
        let console = |s: &[u8], out: &mut TermWriter| lock(&screen).console(out, s).unwrap();
        w.feed(b"[ 0.1] Linux version 6.1\n");
        assert_eq!(r.tick(Duration::from_secs(5), false), None);
        let bar_line = "boot: 5s at \"kernel started\" (1/8); no earlier boot to estimate from";
        assert!(term.contents().ends_with(bar_line), "{}", term.contents());
        // A console line arriving in pieces, and a log line in between.
        console(b"[ 0.2] smp: Bring", &mut out);
        lock(&screen)
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
        assert!(lock(&screen).bar.is_none());
        let rows: Vec<String> = term.contents().lines().map(str::to_string).collect();
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[2], "[ 0.3] x86: Booting", "{rows:?}");
        // From now on the console goes straight through.
        console(b" SMP configuration:", &mut out);
        assert!(term.contents().ends_with("Booting SMP configuration:"));
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
