//! The bridge's link to a shared registry (`netbridge --registry`): two
//! tokio tasks between the [`Bridge`](crate::bridge::Bridge), which says
//! what it needs as [`Op`]s, and a [`RegistryBackend`].
//!
//! - The **lease task** keeps a lease per connected owner VM (renewed at a
//!   third of its TTL while the VM's port lives, revoked when it goes) and
//!   records `start`s on it. A start the registry does not take is refused
//!   (the owner is told abort, so its guest's `speculate()` returns again):
//!   it never waits behind anything.
//! - The **outcome task** carries out `join` and `resolve`, in order. What
//!   the registry answers is applied to the bridge at once (a join refused
//!   with an outcome). One that finds the registry unreachable waits, with
//!   those behind it, and is tried again every [`RETRY_EVERY`]: outcomes are
//!   never lost and never guessed.
//! - The **watch task** reads every outcome, and every speculation whose
//!   owner's lease ended, from the revision after the last it processed;
//!   it applies outcomes to the bridge (each once: the bridge ignores one
//!   it knows) and races to write the abort of orphans (one bridge wins,
//!   in a transaction). At start, and after its watch was compacted away,
//!   it re-reads every outcome the registry keeps and watches from that
//!   revision on: the revision is not persisted (`docs/registry.md`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::backend::{BackendError, Change, JoinResult, LeaseId, RegistryBackend, Revision};
use super::PortId;
use crate::protocol::{Decision, Id, Outcome};
use crate::server::Shared;

/// How often ops that failed are tried again, and the watch re-opened.
pub const RETRY_EVERY: Duration = Duration::from_millis(100);

/// What the bridge asks of the shared registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A VM's port said hello: it gets a lease.
    VmUp {
        /// The VM.
        vm: u32,
    },
    /// The VM's port went: its lease is revoked (after the aborts of its
    /// open ids, queued before this).
    VmDown {
        /// The VM.
        vm: u32,
    },
    /// The VM started `id`: record it on the VM's lease.
    Start {
        /// The VM.
        vm: u32,
        /// The speculation.
        id: Id,
    },
    /// The VM, reconnected, still holds `id` open: attach it to the VM's
    /// new lease.
    Restart {
        /// The VM.
        vm: u32,
        /// The speculation.
        id: Id,
    },
    /// `port` joined `id`.
    Join {
        /// The member's port.
        port: PortId,
        /// The speculation.
        id: Id,
    },
    /// The owner decided, or its port went (abort): write the outcome.
    Resolve {
        /// The speculation.
        id: Id,
        /// The outcome.
        outcome: Outcome,
    },
}

/// A VM's lease and the task that renews it.
struct VmLease {
    lease: LeaseId,
    renew: JoinHandle<()>,
}

impl Drop for VmLease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// The link's state, shared by its tasks.
struct Link {
    backend: Arc<dyn RegistryBackend>,
    shared: Arc<Shared>,
    /// This bridge's name, in member keys.
    name: String,
    ttl: Duration,
    leases: HashMap<u32, VmLease>,
    /// Set while the registry is unreachable: new speculations are refused
    /// at once instead of each waiting for a timeout.
    down: Arc<AtomicBool>,
    /// When a start last tried the registry while it was down: one tries
    /// again every [`PROBE_EVERY`], so the link notices it is back even
    /// with no other op to carry out.
    last_probe: Instant,
}

/// While the registry is unreachable, how often a start tries it anyway.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Starts the link's tasks (lease, outcome, watch, and one routing ops to
/// the first two) for `shared`'s bridge, which must be built with
/// [`Bridge::with_shared_registry`](crate::bridge::Bridge::with_shared_registry).
/// `name` names this bridge in the registry (members are `NAME/PORT`);
/// owner leases get `ttl` (the VMM ports' lease). Returns the sender the
/// server hands the bridge's ops to.
pub fn start(
    backend: Arc<dyn RegistryBackend>,
    shared: Arc<Shared>,
    name: String,
    ttl: Duration,
) -> mpsc::UnboundedSender<Op> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (lease_tx, lease_rx) = mpsc::unbounded_channel();
    let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
    let down = Arc::new(AtomicBool::new(false));
    tokio::spawn(watch_task(backend.clone(), shared.clone(), down.clone()));
    let link = || Link {
        backend: backend.clone(),
        shared: shared.clone(),
        name: name.clone(),
        ttl,
        leases: HashMap::new(),
        down: down.clone(),
        last_probe: Instant::now(),
    };
    tokio::spawn(link().run_leases(lease_rx, lease_tx.clone()));
    tokio::spawn(link().run_outcomes(outcome_rx));
    // Two tasks, so that a start is answered while outcomes wait for an
    // unreachable registry; each keeps its ops in order.
    tokio::spawn(async move {
        while let Some(op) = rx.recv().await {
            let to = match op {
                Op::Resolve { .. } | Op::Join { .. } => &outcome_tx,
                Op::VmUp { .. } | Op::VmDown { .. } | Op::Start { .. } | Op::Restart { .. } => {
                    &lease_tx
                }
            };
            if to.send(op).is_err() {
                return;
            }
        }
    });
    tx
}

impl Link {
    /// The lease task: leases, starts, restarts. It never waits for the
    /// registry longer than one request: a start it cannot record is
    /// refused; a restart is sent again later (behind newer ops); a lease
    /// not granted is granted at the VM's next start.
    async fn run_leases(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Op>,
        me: mpsc::UnboundedSender<Op>,
    ) {
        while let Some(op) = rx.recv().await {
            if let Err(op @ Op::Restart { .. }) = self.carry_out(op).await {
                let me = me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_EVERY).await;
                    let _ = me.send(op);
                });
            }
        }
    }

    /// The outcome task: joins and outcomes, in order; one that finds the
    /// registry unreachable waits, with those behind it, and is tried
    /// again every [`RETRY_EVERY`].
    async fn run_outcomes(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut pending: VecDeque<Op> = VecDeque::new();
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                op = rx.recv() => {
                    let Some(op) = op else { return };
                    if pending.is_empty() {
                        if let Err(op) = self.carry_out(op).await {
                            pending.push_back(op);
                        }
                    } else {
                        pending.push_back(op);
                    }
                }
                _ = tick.tick(), if !pending.is_empty() => {
                    while let Some(op) = pending.pop_front() {
                        if let Err(op) = self.carry_out(op).await {
                            pending.push_front(op);
                            break;
                        }
                    }
                    if pending.is_empty() {
                        tracing::info!("registry: reachable again, every waiting op is done");
                    }
                }
            }
        }
    }

    fn reached(&self, r: &Result<impl Sized, BackendError>) {
        let unreachable = matches!(r, Err(BackendError::Unreachable(_)));
        let was = self.down.swap(unreachable, Ordering::Relaxed);
        if unreachable && !was {
            if let Err(e) = r {
                tracing::error!(
                    "{e}: new speculations are refused; members hold their output until it returns"
                );
            }
        }
    }

    /// Carries out `op`; gives it back if it must be tried again.
    async fn carry_out(&mut self, op: Op) -> Result<(), Op> {
        match op {
            Op::VmUp { vm } => {
                if self.lease(vm).await.is_none() {
                    return Err(op);
                }
            }
            Op::VmDown { vm } => {
                if let Some(l) = self.leases.remove(&vm) {
                    let r = self.backend.revoke(l.lease).await;
                    self.reached(&r);
                    if r.is_err() {
                        // Not renewed any more, it lapses on its own; an
                        // early revoke is only faster.
                        tracing::warn!(vm, "registry: lease not revoked, it lapses");
                    }
                }
            }
            Op::Start { vm, id } => self.start(vm, id).await,
            Op::Restart { vm, id } => {
                let Some(lease) = self.lease(vm).await else {
                    return Err(op);
                };
                let r = self.backend.restart(id, lease).await;
                self.reached(&r);
                match r {
                    Ok(None) => {}
                    Ok(Some(o)) => self.apply(id, o),
                    Err(BackendError::NoLease(_)) => {
                        self.leases.remove(&vm);
                        return Err(op);
                    }
                    Err(e) => {
                        tracing::debug!(%id, "registry: restart waits: {e}");
                        return Err(op);
                    }
                }
            }
            Op::Join { port, id } => {
                let r = self.backend.join(id, format!("{}/{port}", self.name)).await;
                self.reached(&r);
                match r {
                    Ok(JoinResult::Joined) => {}
                    Ok(JoinResult::Decided(o)) => self.apply(id, o),
                    Ok(JoinResult::Unknown) => {
                        // Neither open nor decided. Its start may still be
                        // on its way from the owner's bridge: the id gets
                        // an owner's lease to show up, then the rule for
                        // unknown ids (its owner is gone) applies, the
                        // abort written once. Meanwhile other ops go on.
                        tokio::spawn(unknown(
                            self.backend.clone(),
                            self.shared.clone(),
                            id,
                            format!("{}/{port}", self.name),
                            self.ttl,
                        ));
                    }
                    Err(_) => return Err(op),
                }
            }
            Op::Resolve { id, outcome } => {
                let r = self.backend.resolve(id, outcome).await;
                self.reached(&r);
                match r {
                    Ok(o) => self.apply(id, o),
                    Err(e) => {
                        tracing::debug!(%id, "registry: outcome waits: {e}");
                        return Err(op);
                    }
                }
            }
        }
        Ok(())
    }

    /// A `start`: recorded, or refused at once (the owner is told abort).
    async fn start(&mut self, vm: u32, id: Id) {
        if self.down.load(Ordering::Relaxed) && self.last_probe.elapsed() < PROBE_EVERY {
            self.refuse(id, "the registry is unreachable", true);
            return;
        }
        self.last_probe = Instant::now();
        let Some(lease) = self.lease(vm).await else {
            self.refuse(id, "the registry is unreachable (no lease)", true);
            return;
        };
        let r = self.backend.start(id, lease).await;
        self.reached(&r);
        match r {
            Ok(()) => {}
            Err(BackendError::Decided(_, o)) => self.apply(id, o),
            Err(BackendError::Exists(_)) => {
                // Another bridge has this id open: a VM id used twice in
                // the fabric. Its owner is not ours to abort.
                self.refuse(
                    id,
                    "the id is open on another bridge (a VM id used twice?)",
                    false,
                );
            }
            Err(BackendError::NoLease(_)) => {
                self.leases.remove(&vm);
                self.refuse(id, "the VM's lease lapsed in the registry", true);
            }
            Err(e) => self.refuse(id, &e.to_string(), true),
        }
    }

    /// Refuses the start of `id`: the bridge aborts it (its owner and
    /// members are told). With `write`, the abort is written to the
    /// registry too (the start may have reached it before it failed).
    fn refuse(&mut self, id: Id, why: &str, write: bool) {
        tracing::warn!(%id, "speculation refused: {why}");
        self.shared.apply_registry(|b| b.refuse_start(id));
        if write {
            let tx = self.shared.registry_ops();
            if let Some(tx) = tx {
                let _ = tx.send(Op::Resolve {
                    id,
                    outcome: Outcome::Abort,
                });
            }
        }
    }

    fn apply(&self, id: Id, outcome: Outcome) {
        self.shared
            .apply_registry(|b| b.outcome_shared(&[Decision { id, outcome }]));
    }

    /// The lease of `vm`, granted now if it has none (and renewed from
    /// then on); `None` while the registry is unreachable.
    async fn lease(&mut self, vm: u32) -> Option<LeaseId> {
        if let Some(l) = self.leases.get(&vm) {
            if !l.renew.is_finished() {
                return Some(l.lease);
            }
        }
        let r = self.backend.grant(self.ttl).await;
        self.reached(&r);
        let (lease, ttl) = r.ok()?;
        let backend = self.backend.clone();
        let renew = tokio::spawn(async move {
            let every = (ttl / 3).max(Duration::from_millis(50));
            loop {
                tokio::time::sleep(every).await;
                match backend.keep_alive(lease).await {
                    Ok(()) => {}
                    Err(BackendError::NoLease(_)) => {
                        tracing::warn!(vm, "registry: the VM's lease lapsed");
                        return;
                    }
                    // Unreachable: keep trying; etcd extends leases when
                    // it gets a leader again.
                    Err(e) => tracing::debug!(vm, "registry: renewal failed: {e}"),
                }
            }
        });
        self.leases.insert(vm, VmLease { lease, renew });
        Some(lease)
    }
}

/// Reads outcomes and orphans from the registry and applies them, from the
/// revision after the last it processed; see the module's documentation.
async fn watch_task(backend: Arc<dyn RegistryBackend>, shared: Arc<Shared>, down: Arc<AtomicBool>) {
    let mut last: Option<Revision> = None;
    let mut backoff = RETRY_EVERY;
    loop {
        let from = match last {
            Some(r) => r,
            None => match backend.outcomes().await {
                Ok((rev, ds)) => {
                    tracing::info!("registry: {} outcomes read as of revision {rev}", ds.len());
                    shared.apply_registry(|b| b.outcome_shared(&ds));
                    last = Some(rev);
                    rev
                }
                Err(e) => {
                    tracing::debug!("registry: reading outcomes: {e}");
                    down.store(true, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut rx = match backend.watch(from + 1).await {
            Ok(rx) => rx,
            Err(e) => {
                // Not `down` for this alone: with several members, the
                // next try goes to a live one. The ops judge reachability.
                tracing::debug!("registry: watching from {}: {e}", from + 1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        down.store(false, Ordering::Relaxed);
        backoff = RETRY_EVERY;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(w) => {
                    last = Some(w.revision);
                    match w.change {
                        Change::Decided(d) => shared.apply_registry(|b| b.outcome_shared(&[d])),
                        Change::Orphaned(id) => {
                            tokio::spawn(expire(backend.clone(), shared.clone(), id));
                        }
                    }
                }
                Err(BackendError::Compacted(..)) => {
                    tracing::warn!("registry: watch compacted; reading every outcome again");
                    last = None;
                    break;
                }
                Err(e) => {
                    let next = last.unwrap_or(from) + 1;
                    tracing::warn!("registry: watch lost: {e}; watching again from {next}");
                    break;
                }
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// A join of an id the registry did not know: joined again after `ttl`,
/// and if it is still unknown, expired (see [`RegistryBackend::expire`]).
async fn unknown(
    backend: Arc<dyn RegistryBackend>,
    shared: Arc<Shared>,
    id: Id,
    member: String,
    ttl: Duration,
) {
    tokio::time::sleep(ttl).await;
    loop {
        if shared.knows_outcome(id) {
            return;
        }
        match backend.join(id, member.clone()).await {
            Ok(JoinResult::Joined) => return,
            Ok(JoinResult::Decided(o)) => {
                shared.apply_registry(|b| b.outcome_shared(&[Decision { id, outcome: o }]));
                return;
            }
            Ok(JoinResult::Unknown) => {
                tracing::warn!(%id, "unknown to the registry after a lease: aborted");
                expire(backend, shared, id).await;
                return;
            }
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

/// An orphan: writes its abort, racing the other bridges (one wins), and
/// applies what holds. Tried again while the registry is unreachable.
async fn expire(backend: Arc<dyn RegistryBackend>, shared: Arc<Shared>, id: Id) {
    loop {
        if shared.knows_outcome(id) {
            return;
        }
        match backend.expire(id).await {
            Ok((Some(o), wrote)) => {
                if wrote {
                    tracing::warn!(%id, "its owner's lease lapsed in the registry: aborted");
                }
                shared.apply_registry(|b| b.outcome_shared(&[Decision { id, outcome: o }]));
                return;
            }
            // Open again (a restarted bridge attached it to a new lease).
            Ok((None, _)) => return,
            Err(_) => tokio::time::sleep(RETRY_EVERY).await,
        }
    }
}

#[cfg(test)]
mod tests;
