//! The controller's side of snapshots on disk: lock the directory and
//! journal the new snapshot's files, pause, save the machine through the
//! checkpoint code, write the memory file (whole, or only the pages written
//! since this VM's last snapshot in the same directory), commit the state
//! file, resume. See `docs/snapshots.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{ControlError, Controller};
use crate::api::Response;
use crate::host_compat::HostCompat;
use crate::snapshot::verify::MemoryChecked;
use crate::snapshot::writer::DirWriter;
use crate::snapshot::{new_id, now_ns, Layer, SnapshotError, VmSnapshot, MAX_LAYERS};

/// What the controller needs to write snapshots of its VM.
pub struct SnapshotSetup {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Whether the guest booted Linux.
    pub linux: bool,
    /// The host-compat layer, when active: a snapshot saves its system-call
    /// trampoline's state.
    pub compat: Option<HostCompat>,
    /// The snapshot this VM's memory last matched: the directory (made
    /// canonical) and the snapshot's id. A snapshot into the same directory,
    /// while it still holds that snapshot, can be a diff.
    pub base: Option<(PathBuf, u64)>,
    /// Whether the memory this VM was restored with is known good. A
    /// snapshot waits for it: written before the check's verdict, it would
    /// copy damage under checksums of its own.
    pub checked: Arc<MemoryChecked>,
}

/// What a snapshot wrote.
struct Written {
    id: u64,
    diff_pages: Option<u64>,
}

impl Controller {
    /// Why a snapshot cannot be taken now, if it cannot.
    fn snapshot_refusal(&self) -> Option<String> {
        if self.machine.snapshots.is_none() {
            return Some("this VM was built without snapshot support".into());
        }
        if !self.machine.memory.supports_snapshots() {
            return Some(
                "snapshots need copy-on-write checkpoints, not --checkpoint full-copy".into(),
            );
        }
        if self.engine.depth() > 0 {
            let ids: Vec<String> = self
                .engine
                .entries()
                .iter()
                .map(|e| e.id.to_string())
                .collect();
            return Some(format!(
                "the VM holds {} speculation checkpoint(s) (entries {}); a snapshot \
                 persists no checkpoint stack, so commit or abort them first",
                self.engine.depth(),
                ids.join(", ")
            ));
        }
        if self.machine.vcpus.call_pending(None) {
            return Some("a vCPU's hypercall is being served; try again".into());
        }
        None
    }

    /// Serves the `snapshot` API operation: saves the VM into `dir`.
    pub(super) fn snapshot(&mut self, dir: Option<PathBuf>) -> Result<Response, ControlError> {
        let Some(dir) = dir else {
            return Ok(Response::error(
                "snapshot needs a path (the snapshot directory)",
            ));
        };
        if let Some(why) = self.snapshot_refusal() {
            return Ok(Response::error(format!("snapshot refused: {why}")));
        }
        // Private whatever the umask: a snapshot holds all of guest memory.
        let made = {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
        };
        if let Err(e) = made {
            return Ok(Response::error(format!(
                "creating the snapshot directory {}: {e}",
                dir.display()
            )));
        }
        // Locked and journaled before the pause: a second writer is refused
        // without stopping the VM, and the VM does not wait for the
        // journal's sync.
        let p = match prepare(&dir) {
            Ok(p) => p,
            Err(e) => return Ok(Response::error(e.to_string())),
        };
        if let Some(s) = &self.machine.snapshots {
            if !s.checked.is_open() {
                tracing::info!("the snapshot waits for the check of the restored memory");
                // Bounded: the check passes, or ends the process. (In
                // practice the first snapshot after a restore also copies
                // the base layer into the VM's own memory file, reading it
                // behind the check, so none was seen to overtake it; this
                // makes it a rule rather than a race.)
                s.checked.wait(&std::sync::atomic::AtomicBool::new(false));
            }
        }
        let t = Instant::now();
        self.pause(true)?;
        let r = self.write_into(p);
        self.resume();
        self.machine.stats.record("snapshot", t);
        let micros = t.elapsed().as_micros() as u64;
        Ok(match r? {
            Ok(w) => {
                tracing::info!(dir = %dir.display(), id = w.id, diff = ?w.diff_pages, micros, "snapshot");
                Response {
                    id: Some(format!("{:016x}", w.id)),
                    kind: Some(
                        if w.diff_pages.is_some() {
                            "diff"
                        } else {
                            "full"
                        }
                        .into(),
                    ),
                    pages: w.diff_pages,
                    micros: Some(micros),
                    ..Response::ok()
                }
            }
            Err(e) => {
                // The pages taken for this snapshot are gone from the
                // dirty set: the next snapshot must be a full one.
                if let Some(s) = self.machine.snapshots.as_mut() {
                    s.base = None;
                }
                Response::error(e.to_string())
            }
        })
    }

    /// Saves the paused VM into `dir`. The outer error ends the VM (the
    /// machine state could not be read); the inner one fails the request.
    fn write_snapshot(
        &mut self,
        dir: &Path,
    ) -> Result<Result<Written, SnapshotError>, ControlError> {
        match prepare(dir) {
            Ok(p) => self.write_into(p),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Saves the paused VM as the snapshot `p` prepared.
    fn write_into(&mut self, p: Prepared) -> Result<Result<Written, SnapshotError>, ControlError> {
        let Prepared { mut w, id, canon } = p;
        // The pages written since the last flush are read from the guest's
        // mapping, not flushed; vCPUs, in-kernel devices and device models
        // are saved by the checkpoint code: one mechanism for both.
        let machine = self.machine.capture_for_snapshot()?;
        let pages = self.machine.memory.take_since_snapshot();
        // The disks before the memory layer: a refusal (too much disk
        // data) writes nothing.
        let disks = match crate::snapshot::disks::save_disks(self.machine.devices.blocks()) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let Some(setup) = self.machine.snapshots.as_mut() else {
            return Ok(Err(SnapshotError::Refused("no snapshot support".into())));
        };
        let prev = setup
            .base
            .as_ref()
            .filter(|(d, _)| *d == canon)
            .and_then(|&(_, id)| on_disk(w.committed(), id, setup.mem_size))
            .filter(|layers| layers.len() < MAX_LAYERS);
        let src = self.machine.memory.snapshot_source();
        let layer = match &prev {
            Some(_) => w.write_diff(&src, setup.mem_size, &pages, id),
            None => w.write_full(&src, setup.mem_size, id),
        };
        drop(src);
        let layer = match layer {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        let diff_pages = prev.is_some().then_some(pages.len() as u64);
        let mut layers = prev.unwrap_or_default();
        layers.push(layer);
        let snap = VmSnapshot {
            id,
            layers,
            mem_size: setup.mem_size,
            ranges: self.machine.memory.layout().gpa_ranges(),
            linux: setup.linux,
            // The vCPUs are paused: the kernel writes no MSR meanwhile.
            trampoline: setup.compat.as_ref().and_then(HostCompat::save_trampoline),
            saved_at_ns: now_ns(),
            machine,
            disks,
            memory_check: Default::default(),
        };
        let r = w.commit(&snap).map(|()| Written { id, diff_pages });
        if r.is_ok() {
            setup.base = Some((canon, id));
        }
        Ok(r)
    }
}

impl Controller {
    /// Serves `READY` from `vcpu`: the first time, with a boot cache to
    /// fill, saves the whole VM (every vCPU is paused) so that a restored
    /// copy returns from this very call with RAX = 0. A failure to save is
    /// reported and the VM runs on: the cache is an optimisation.
    pub(super) fn ready(&mut self, vcpu: u8) -> Result<(), ControlError> {
        let Some((save, progress)) = self.boot_cache.take() else {
            tracing::debug!(vcpu, "the guest says it is ready");
            return Ok(());
        };
        if let Some(why) = self.cache_refusal(vcpu) {
            eprintln!("specvm: boot cache: not saved: {why}");
            return Ok(());
        }
        // The restored copy resumes after the hypercall: give it the result
        // now, as the saved registers hold it.
        self.machine.set_result(usize::from(vcpu), [0, 0, 0])?;
        let t = Instant::now();
        let staging = match save.staging() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("specvm: {e}; nothing saved");
                return Ok(());
            }
        };
        let written = self.write_snapshot(&staging.join("snapshot"))?;
        let r = match written {
            Ok(_) => {
                progress.ready();
                save.finish(&staging, Some(progress.boot_times()))
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        // The snapshot's directory was renamed: a later snapshot by the API
        // starts a full one.
        if let Some(s) = self.machine.snapshots.as_mut() {
            s.base = None;
        }
        match r {
            Ok(dir) => eprintln!(
                "specvm: boot cache: saved the ready guest after a {} boot to {} ({} ms)",
                crate::boot_cache::human(save.elapsed()),
                dir.display(),
                t.elapsed().as_millis()
            ),
            Err(e) => {
                eprintln!("specvm: boot cache: saving the ready guest failed: {e}");
                if let Err(e) = std::fs::remove_dir_all(&staging) {
                    tracing::warn!("removing {}: {e}", staging.display());
                }
            }
        }
        self.machine.stats.record("boot-cache-save", t);
        Ok(())
    }

    /// Why the ready guest cannot be saved now, if it cannot.
    fn cache_refusal(&self, caller: u8) -> Option<String> {
        if self.engine.depth() > 0 {
            return Some(format!(
                "the guest said it was ready inside {} speculation(s)",
                self.engine.depth()
            ));
        }
        if self.machine.vcpus.call_pending(Some(usize::from(caller))) {
            return Some("another vCPU's hypercall was being served".into());
        }
        None
    }
}

/// A snapshot directory made ready for a new snapshot.
struct Prepared {
    /// The directory, locked, with the new snapshot's files journaled.
    w: DirWriter,
    /// The new snapshot's id.
    id: u64,
    /// The directory's canonical path, for the diff rule.
    canon: PathBuf,
}

/// Locks `dir` for a new snapshot and journals its files, under a new id.
/// Nothing is paused yet, and nothing is taken from the VM: a refusal
/// (another writer, a state file that is not specvm's) costs it nothing.
fn prepare(dir: &Path) -> Result<Prepared, SnapshotError> {
    let canon = dir.canonicalize().map_err(|err| SnapshotError::Io {
        what: "resolving the snapshot directory",
        path: dir.into(),
        err,
    })?;
    let mut w = DirWriter::open(dir)?;
    let id = new_id();
    w.begin(id)?;
    Ok(Prepared { w, id, canon })
}

/// The memory layers of snapshot `id` of a VM of `mem_size`, if it is the
/// directory's committed snapshot.
fn on_disk(committed: Option<&VmSnapshot>, id: u64, mem_size: u64) -> Option<Vec<Layer>> {
    committed
        .filter(|s| s.id == id && s.mem_size == mem_size)
        .map(|s| s.layers.clone())
}
