//! The record of a boot's times ([`BootTimes`], saved per image), the
//! estimate of the time left from the previous boot, and the text of the
//! report lines.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::MILESTONES;

/// When a boot reached its milestones, in seconds from its start: the
/// record of one boot, kept to estimate the next boot of the same image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootTimes {
    /// Milestones reached ([`Milestone::name`](super::Milestone::name), seconds), in boot order.
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
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        crate::durable::replace_file(path, &text)
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
pub(super) fn fmt_secs(secs: f64) -> String {
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
pub(super) fn bar_message(current: &BootTimes, elapsed: f64, est: Option<Estimate>) -> String {
    let (secs, at) = (fmt_secs(elapsed), at_milestone(current));
    match est {
        Some(e) => format!("{secs} {at}, {}", fmt_left(e.left_secs)),
        None => format!("boot: {secs} {at}; no earlier boot to estimate from"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::test_support::{previous, times};
    use crate::test_util::TempDir;

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
}
