//! When a restore checks the base memory layer against its checksums.
//!
//! The base layer is mapped as guest memory, and the guest reads its pages
//! straight from the page cache: no VMM code runs when it first touches
//! one (userfaultfd serves only anonymous and shmem mappings, not a private
//! mapping of a file on disk), so pages cannot be checked one by one as
//! they are first touched. So the check reads the whole layer's data, on a
//! thread of its own (which splits a large layer across more, see
//! `Layer::check_base`):
//! - [`Verify::BeforeOutput`] (the default for `--restore`): the guest
//!   starts at once and runs on its own, but its first write to a device
//!   that reaches outside the VM (console, network, disk, exit port,
//!   hypercall) waits until the check has passed ([`MemoryChecked`], which
//!   the vCPU loop consults). Reading the layer costs about 0.1 ms per MiB
//!   here, far over a 5 ms restore, and is bound by memory bandwidth, so
//!   this is the one way to start a filled guest at once and still let
//!   nothing it computed from damaged memory leave it: the restore is a
//!   speculation on the layer being whole, which the check decides.
//!   Damage ends the VMM (status 1) with none of the guest's output sent.
//! - [`Verify::BeforeStart`] (`--verify before-start`, and always for the
//!   boot cache, which falls back to a boot on damage): the check starts as
//!   soon as the layer is mapped, while the VM, its vCPUs and devices are
//!   built, and the restore waits for it before it restores the machine
//!   state, so no vCPU ever runs on memory that was not checked; a damaged
//!   layer refuses the restore.
//! - [`Verify::Background`] (`--verify background`): the check starts once
//!   the machine is restored, as the guest starts, and goes on beside it; if it
//!   finds damage, the VMM prints the error and exits with status 1. The
//!   guest may have run on the damaged memory until then, and what it
//!   printed or sent is out. (Started with
//!   the mapping, it slowed the build it ran beside: restores of a 4 GiB
//!   snapshot with 4 GiB written took 4.5-10.8 ms, against 2.4-5.1 ms with
//!   the check held back; eight alternating runs each, on a 2-CPU host.)
//!
//! The diff layers are checked in all modes before the guest starts: the
//! restore copies their data into guest memory anyway, and checks each
//! piece before it writes it. A snapshot of the restored VM waits for the
//! check in every mode, so that it never copies damage under fresh
//! checksums.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{Layer, SnapshotError};
use crate::progress::check::CheckProgress;
use crate::sync::{lock, wait_timeout};

/// When the base layer is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Verify {
    /// Before any vCPU runs.
    BeforeStart,
    /// Beside the running guest, whose writes to devices wait for it;
    /// damage ends the VMM with nothing sent (the default).
    #[default]
    BeforeOutput,
    /// Beside the running guest; damage ends the VMM.
    Background,
}

/// Set once by the command line or the boot cache, before the VM is built:
/// the mode's index in [`MODES`]. Unset, the strictest, before-start (a
/// restore that no command line chose for, as in tests); the command line's
/// own default is [`Verify::default`].
static MODE: AtomicU8 = AtomicU8::new(0);
const MODES: [Verify; 3] = [
    Verify::BeforeStart,
    Verify::BeforeOutput,
    Verify::Background,
];

/// Chooses when restores in this process check the base layer.
pub fn set_mode(v: Verify) {
    let i = MODES.iter().position(|m| *m == v).unwrap_or(0);
    MODE.store(i as u8, Ordering::Relaxed);
}

fn mode() -> Verify {
    MODES
        .get(usize::from(MODE.load(Ordering::Relaxed)))
        .copied()
        .unwrap_or_default()
}

/// Whether the restored VM's memory is known good: open from the start for
/// a VM that was not restored, opened by the check when it passes. In
/// [`Verify::BeforeOutput`] mode the vCPUs wait on it before a write that
/// leaves the VM; in every mode a snapshot waits on it.
#[derive(Debug)]
pub struct MemoryChecked {
    open: AtomicBool,
    lock: Mutex<()>,
    opened: Condvar,
    /// Whether vCPUs hold their output until it opens.
    holds_output: bool,
    /// Whether a vCPU has waited on it yet (for one log line).
    held: AtomicBool,
}

impl MemoryChecked {
    /// Open: nothing to check.
    pub fn passed() -> Arc<Self> {
        Arc::new(Self::new(true, false))
    }

    pub(crate) fn new(open: bool, holds_output: bool) -> Self {
        Self {
            open: AtomicBool::new(open),
            lock: Mutex::new(()),
            opened: Condvar::new(),
            holds_output,
            held: AtomicBool::new(false),
        }
    }

    /// True the first time it is called: a vCPU is about to wait.
    pub fn first_hold(&self) -> bool {
        !self.held.swap(true, Ordering::Relaxed)
    }

    /// Whether the memory is known good.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether a write that leaves the VM must wait now.
    pub fn holds_output(&self) -> bool {
        self.holds_output && !self.is_open()
    }

    pub(crate) fn open(&self) {
        let _g = lock(&self.lock);
        self.open.store(true, Ordering::Release);
        self.opened.notify_all();
    }

    /// Waits until the memory is known good (true), or `stop` is set
    /// (false). Damage never opens it: the checking thread ends the
    /// process instead.
    pub fn wait(&self, stop: &AtomicBool) -> bool {
        let mut g = lock(&self.lock);
        while !self.is_open() {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            // A stop sets the flag without this lock: look again now and then.
            g = wait_timeout(&self.opened, g, std::time::Duration::from_millis(20));
        }
        true
    }
}

type Outcome = Result<u64, SnapshotError>;

/// The check of a restore's base layer, while it runs.
#[derive(Default)]
pub struct MemoryCheck {
    /// A check the restore waits for (before-start mode).
    before: Mutex<Option<JoinHandle<Outcome>>>,
    /// When the check runs beside the guest (before-output and background
    /// modes), what lets it begin: sent by
    /// [`MemoryCheck::begin_beside_guest`] once the machine is restored;
    /// dropped unsent when the restore fails first, and then the check
    /// does not run.
    go: Mutex<Option<mpsc::Sender<()>>>,
    /// Opened when the check passes.
    checked: Mutex<Option<Arc<MemoryChecked>>>,
}

impl MemoryCheck {
    /// Starts checking `layer` (the file at `path`, of `mem_size` bytes),
    /// in the mode the command line chose.
    pub fn start(
        &self,
        file: File,
        path: PathBuf,
        layer: Layer,
        mem_size: u64,
    ) -> Result<(), SnapshotError> {
        let mode = mode();
        // Beside the guest, from when it starts; or before it starts.
        let beside = mode != Verify::BeforeStart;
        let checked = Arc::new(MemoryChecked::new(false, mode == Verify::BeforeOutput));
        *lock(&self.checked) = Some(checked.clone());
        let (go, gate) = mpsc::channel::<()>();
        let what = path.clone();
        let h = std::thread::Builder::new()
            .name("snapshot-check".into())
            .spawn(move || {
                if beside && gate.recv().is_err() {
                    // The restore failed before the guest started.
                    return Ok(0);
                }
                let started = Instant::now();
                // A guest whose output waits for the check is best served
                // by every CPU; one that runs free keeps the other.
                let spread = mode != Verify::Background;
                let done = Arc::new(AtomicU64::new(0));
                let waiting = match mode {
                    Verify::BeforeStart => Some("the guest's start"),
                    Verify::BeforeOutput => Some("the guest's output"),
                    Verify::Background => None,
                };
                let watch = CheckProgress::start(layer.data_bytes(), done.clone(), waiting);
                let r = layer
                    .check_base(&file, &path, mem_size, spread, &done)
                    .map(|()| started.elapsed().as_micros() as u64);
                watch.finish();
                // Told before the output flows, so that the line comes
                // before any the guest makes.
                if beside {
                    report_beside_guest(&r, mode);
                }
                if r.is_ok() {
                    checked.open();
                }
                r
            })
            .map_err(|err| SnapshotError::Io {
                what: "starting the thread that checks",
                path: what,
                err,
            })?;
        if beside {
            *lock(&self.go) = Some(go);
        } else {
            *lock(&self.before) = Some(h);
        }
        Ok(())
    }

    /// What tells whether the memory is known good: open at once for a VM
    /// that was not restored or whose layer needs no check.
    pub fn checked(&self) -> Arc<MemoryChecked> {
        lock(&self.checked)
            .clone()
            .unwrap_or_else(MemoryChecked::passed)
    }

    /// Lets a check beside the guest begin: called once the machine is
    /// restored, as the guest starts. Does nothing when the check ran
    /// before the start.
    pub fn begin_beside_guest(&self) {
        if let Some(go) = lock(&self.go).take() {
            // The thread may have ended already (it cannot have begun).
            let _ = go.send(());
        }
    }

    /// Waits for the check, if one runs before the guest starts, and
    /// returns its verdict.
    pub fn wait(&self) -> Result<(), SnapshotError> {
        let Some(h) = lock(&self.before).take() else {
            return Ok(());
        };
        let micros = h
            .join()
            .map_err(|_| SnapshotError::Corrupt("the memory check panicked".into()))??;
        tracing::info!(micros, "snapshot memory checked before start");
        Ok(())
    }
}

/// Beside a running guest, the check's thread reports its own verdict:
/// the time it took, or the damage, which ends the VMM.
fn report_beside_guest(r: &Outcome, mode: Verify) {
    match (r, mode) {
        (Ok(micros), Verify::BeforeOutput) => {
            tracing::info!(micros, "snapshot memory checked; the guest's output flows")
        }
        (Ok(micros), _) => tracing::info!(micros, "snapshot memory checked in the background"),
        (Err(e), Verify::BeforeOutput) => {
            eprintln!(
                "specvm: error: {e} (found by the check the guest's output waited for; \
                 the VM is stopped, and none of its output left it)"
            );
            std::process::exit(1);
        }
        (Err(e), _) => {
            eprintln!("specvm: error: {e} (found by the background check; the VM is stopped)");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_that_was_not_restored_holds_nothing() {
        let c = MemoryChecked::passed();
        assert!(c.is_open());
        assert!(!c.holds_output());
        assert!(c.wait(&AtomicBool::new(true)), "open even when stopping");
    }

    #[test]
    fn output_is_held_until_the_check_opens_it() {
        let c = Arc::new(MemoryChecked::new(false, true));
        assert!(c.holds_output());
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait(&AtomicBool::new(false)))
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(!waiter.is_finished(), "the wait ended before the check did");
        c.open();
        assert!(waiter.join().unwrap());
        assert!(!c.holds_output());
    }

    #[test]
    fn a_stop_ends_the_wait_without_opening() {
        let c = Arc::new(MemoryChecked::new(false, true));
        let stop = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || c.wait(&stop))
        };
        stop.store(true, Ordering::Release);
        assert!(!waiter.join().unwrap());
        assert!(c.holds_output(), "still closed");
    }

    #[test]
    fn only_before_output_mode_holds_output() {
        // Closed in every mode until the check passes; only one mode
        // makes vCPUs wait on it.
        assert!(!MemoryChecked::new(false, false).holds_output());
        assert!(!MemoryChecked::new(false, false).is_open());
    }

    #[test]
    fn the_first_hold_is_told_once() {
        let c = MemoryChecked::new(false, true);
        assert!(c.first_hold());
        assert!(!c.first_hold());
    }
}
