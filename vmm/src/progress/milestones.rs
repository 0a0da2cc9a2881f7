//! The boot's milestones and how they are recognised: [`MILESTONES`], the
//! shared [`BootClock`] recording when each was reached, and the
//! [`ConsoleWatch`] that reads them off the guest's console.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{BootTimes, MAX_LINE};

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
pub(super) const READY: usize = MILESTONES.len() - 1;

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
pub(super) struct BootClock {
    pub(super) start: OnceLock<Instant>,
    /// Milliseconds since `start`, plus one; 0: not reached.
    reached: [AtomicU64; MILESTONES.len()],
}

impl BootClock {
    pub(super) fn new() -> Self {
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
    pub(super) fn reach(&self, i: usize) {
        if self.current().is_some_and(|c| c >= i) {
            return;
        }
        let ms = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let _ = self.reached[i].compare_exchange(0, ms + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(super) fn times(&self) -> BootTimes {
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
    pub(super) clock: Arc<BootClock>,
    pub(super) line: [u8; MAX_LINE],
    pub(super) len: usize,
    /// The first milestone still looked for.
    pub(super) next: usize,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;

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
}
