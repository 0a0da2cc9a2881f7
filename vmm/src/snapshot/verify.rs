//! When a restore checks the base memory layer against its checksums.
//!
//! The base layer is mapped as guest memory, and the guest reads its pages
//! straight from the page cache: no VMM code runs when it first touches
//! one (userfaultfd serves only anonymous and shmem mappings, not a private
//! mapping of a file on disk), so pages cannot be checked one by one as
//! they are first touched. So the check reads the whole layer's data, on a
//! thread of its own (which splits a large layer across more, see
//! `Layer::check_base`):
//! - [`Verify::BeforeStart`] (the default): the check starts as soon as the
//!   layer is mapped, while the VM, its vCPUs and devices are built, and
//!   the restore waits for it before it restores the machine state, so no
//!   vCPU ever runs on memory that was not checked; a damaged layer
//!   refuses the restore.
//! - [`Verify::Background`] (`--verify background`): the check starts once
//!   the machine is restored, as the guest starts, and goes on beside it; if it
//!   finds damage, the VMM prints the error and exits with status 1. The
//!   guest may have run on the damaged memory until then. (Started with
//!   the mapping, it slowed the build it ran beside: restores of a 4 GiB
//!   snapshot with 4 GiB written took 4.5-10.8 ms, against 2.4-5.1 ms with
//!   the check held back; eight alternating runs each, on a 2-CPU host.)
//!
//! The diff layers are checked in both modes before the guest starts: the
//! restore copies their data into guest memory anyway, and checks each
//! piece before it writes it.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{Layer, SnapshotError};

/// When the base layer is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Verify {
    /// Before any vCPU runs (the default).
    #[default]
    BeforeStart,
    /// Beside the running guest; damage ends the VMM.
    Background,
}

/// Set once by the command line, before the VM is built.
static BACKGROUND: AtomicBool = AtomicBool::new(false);

/// Chooses when restores in this process check the base layer.
pub fn set_mode(v: Verify) {
    BACKGROUND.store(v == Verify::Background, Ordering::Relaxed);
}

fn mode() -> Verify {
    if BACKGROUND.load(Ordering::Relaxed) {
        Verify::Background
    } else {
        Verify::BeforeStart
    }
}

type Outcome = Result<u64, SnapshotError>;

/// The check of a restore's base layer, while it runs.
#[derive(Default)]
pub struct MemoryCheck {
    /// A check the restore waits for (before-start mode).
    before: Mutex<Option<JoinHandle<Outcome>>>,
    /// In background mode, what lets the check begin: sent by
    /// [`MemoryCheck::begin_background`] once the machine is restored;
    /// dropped unsent when the restore fails first, and then the check
    /// does not run.
    go: Mutex<Option<mpsc::Sender<()>>>,
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
        let background = mode() == Verify::Background;
        let (go, gate) = mpsc::channel::<()>();
        let what = path.clone();
        let h = std::thread::Builder::new()
            .name("snapshot-check".into())
            .spawn(move || {
                if background && gate.recv().is_err() {
                    // The restore failed before the guest started.
                    return Ok(0);
                }
                let started = Instant::now();
                let r = layer
                    .check_base(&file, &path, mem_size, !background)
                    .map(|()| started.elapsed().as_micros() as u64);
                if background {
                    report_in_background(&r);
                }
                r
            })
            .map_err(|err| SnapshotError::Io {
                what: "starting the thread that checks",
                path: what,
                err,
            })?;
        if background {
            *lock(&self.go) = Some(go);
        } else {
            *lock(&self.before) = Some(h);
        }
        Ok(())
    }

    /// Lets a background check begin: called once the machine is
    /// restored, as the guest starts. Does nothing in the other mode.
    pub fn begin_background(&self) {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// In background mode, the check's thread reports its own verdict: the
/// time it took, or the damage, which ends the VMM.
fn report_in_background(r: &Outcome) {
    match r {
        Ok(micros) => tracing::info!(micros, "snapshot memory checked in the background"),
        Err(e) => {
            eprintln!("specvm: error: {e} (found by the background check; the VM is stopped)");
            std::process::exit(1);
        }
    }
}
