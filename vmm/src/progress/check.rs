//! Progress of a long check of a snapshot's memory layer. From a page cache
//! it takes about 0.1 ms per MiB, but a layer read from the disk goes at
//! the disk's pace: seconds for gigabytes, with the guest not started or
//! its output held. A check that is still running after [`QUIET`] shows
//! how far it has come: an `indicatif` bar where stderr is a terminal,
//! else one line; and one line when it ends.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget};

use super::monitor::bar_style;
use super::screen::SCREEN;

use crate::sync::lock;

/// How long a check runs before it is shown.
pub const QUIET: Duration = Duration::from_secs(1);
/// How often a bar is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// A running check's watcher; [`CheckProgress::finish`] ends it.
pub struct CheckProgress {
    end: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CheckProgress {
    /// Watches a check of `total` bytes whose progress `done` counts;
    /// `waiting` says what waits for it ("the guest's output"), if
    /// anything. Without a thread to watch with, the check runs unwatched.
    pub fn start(total: u64, done: Arc<AtomicU64>, waiting: Option<&'static str>) -> Self {
        let (end, ended) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("check-progress".into())
            .spawn(move || {
                let w = Watch {
                    total,
                    done: &done,
                    waiting,
                };
                w.run(&ended, ProgressDrawTarget::stderr(), &mut io::stderr())
            })
            .ok();
        Self {
            end: Some(end),
            thread,
        }
    }

    /// Ends the watch, and the bar with it, before the check's verdict is
    /// told.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // A closed channel ends the watch.
        self.end.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CheckProgress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// What a watch shows.
struct Watch<'a> {
    total: u64,
    done: &'a AtomicU64,
    waiting: Option<&'static str>,
}

impl Watch<'_> {
    /// Quiet for [`QUIET`], then a bar on `draw` (a terminal) or else a
    /// line on `out`, until `ended` closes; then a last line if it showed.
    fn run(&self, ended: &mpsc::Receiver<()>, draw: ProgressDrawTarget, out: &mut dyn Write) {
        let started = Instant::now();
        if !matches!(
            ended.recv_timeout(QUIET),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) {
            return;
        }
        let what = format!(
            "checking the snapshot's memory ({} MiB of data)",
            mib(self.total)
        );
        let bar = (!draw.is_hidden()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(self.total), draw);
            bar.set_style(bar_style());
            lock(&SCREEN).show(bar.clone(), io::stdout().is_terminal());
            bar
        });
        if bar.is_none() {
            let _ = match self.waiting {
                Some(w) => writeln!(out, "specvm: {what}; {w} waits for it"),
                None => writeln!(out, "specvm: {what}"),
            };
        }
        while let Err(mpsc::RecvTimeoutError::Timeout) = ended.recv_timeout(TICK) {
            if let Some(bar) = &bar {
                let d = self.checked();
                bar.set_position(d);
                bar.set_message(format!(
                    "checking the snapshot's memory: {} of {} MiB",
                    mib(d),
                    mib(self.total)
                ));
            }
        }
        if bar.is_some() {
            lock(&SCREEN).clear(&mut io::stdout());
        }
        let _ = writeln!(
            out,
            "specvm: snapshot memory: {} of {} MiB checked in {:.1} s",
            mib(self.checked()),
            mib(self.total),
            started.elapsed().as_secs_f64()
        );
    }

    fn checked(&self) -> u64 {
        self.done.load(Ordering::Relaxed).min(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_of(total: u64, done: &AtomicU64) -> Watch<'_> {
        Watch {
            total,
            done,
            waiting: Some("the guest's output"),
        }
    }

    #[test]
    fn a_short_check_shows_nothing() {
        let (end, ended) = mpsc::channel::<()>();
        drop(end);
        let mut out = Vec::new();
        let done = AtomicU64::new(0);
        watch_of(1 << 30, &done).run(&ended, ProgressDrawTarget::hidden(), &mut out);
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn a_long_check_says_so_and_says_when_it_ends() {
        let (end, ended) = mpsc::channel::<()>();
        let done = Arc::new(AtomicU64::new(0));
        let watcher = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                // No terminal: lines, not a bar.
                watch_of(256 << 20, &done).run(&ended, ProgressDrawTarget::hidden(), &mut out);
                String::from_utf8(out).unwrap()
            })
        };
        std::thread::sleep(QUIET + Duration::from_millis(200));
        done.store(256 << 20, Ordering::Relaxed);
        drop(end);
        let out = watcher.join().unwrap();
        assert!(
            out.contains(
                "specvm: checking the snapshot's memory (256 MiB of data); \
                 the guest's output waits for it"
            ),
            "{out}"
        );
        assert!(out.contains("256 of 256 MiB checked in 1."), "{out}");
    }
}
