//! The embedded registry: [`RegistryBackend`] in the process's memory, the
//! default (one host needs no server). It keeps the same rules as the etcd
//! one, with the same transactions done under one lock, so the tests and
//! the benchmark run both through the trait; bridges of one process may
//! share one.
//!
//! Bounds: outcomes are kept for the last [`KEEP`] decisions, and watches
//! replay from the last [`KEEP`] changes (older revisions are
//! [`BackendError::Compacted`]). A watcher that lets [`WATCH_QUEUE`]
//! changes wait is cut off; it watches again from its last revision.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::backend::{
    BackendError, BoxFut, Change, JoinResult, LeaseId, RegistryBackend, Revision, WatchItem,
    Watched,
};
use crate::protocol::{Decision, Id, Outcome};

/// Outcomes and changes kept.
pub const KEEP: usize = 65_536;
/// Changes that may wait for one watcher.
pub const WATCH_QUEUE: usize = 4096;
/// How often lapsed leases are looked for.
const REAP_EVERY: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct Lease {
    deadline: Instant,
    ttl: Duration,
    ids: BTreeSet<Id>,
}

#[derive(Debug, Default)]
struct State {
    rev: Revision,
    next_lease: i64,
    leases: HashMap<i64, Lease>,
    /// Open speculations and their lease.
    open: HashMap<Id, i64>,
    members: HashMap<Id, BTreeSet<String>>,
    outcomes: HashMap<Id, Outcome>,
    /// Decided ids, oldest first, to forget past [`KEEP`].
    decided: VecDeque<Id>,
    /// The last [`KEEP`] changes.
    log: VecDeque<Watched>,
    /// The revision of the newest change dropped from `log`.
    compacted: Revision,
    watchers: Vec<mpsc::Sender<WatchItem>>,
}

impl State {
    fn change(&mut self, change: Change) {
        self.rev += 1;
        let w = Watched {
            revision: self.rev,
            change,
        };
        self.log.push_back(w);
        if self.log.len() > KEEP {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.revision;
            }
        }
        // A watcher that is full or gone is dropped: it sees its channel
        // end and watches again from its last revision.
        self.watchers.retain(|tx| tx.try_send(Ok(w)).is_ok());
    }

    fn decide(&mut self, id: Id, outcome: Outcome) {
        if let Some(lease) = self.open.remove(&id) {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.ids.remove(&id);
            }
        }
        self.members.remove(&id);
        self.outcomes.insert(id, outcome);
        self.decided.push_back(id);
        if self.decided.len() > KEEP {
            if let Some(old) = self.decided.pop_front() {
                self.outcomes.remove(&old);
            }
        }
        self.change(Change::Decided(Decision { id, outcome }));
    }

    /// Ends `lease`: its open ids become orphans.
    fn end_lease(&mut self, lease: i64) {
        let Some(l) = self.leases.remove(&lease) else {
            return;
        };
        for id in l.ids {
            self.open.remove(&id);
            self.members.remove(&id);
            self.change(Change::Orphaned(id));
        }
    }

    fn reap(&mut self, now: Instant) {
        let mut lapsed: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&k, _)| k)
            .collect();
        lapsed.sort_unstable();
        for k in lapsed {
            self.end_lease(k);
        }
    }
}

/// The embedded registry. Clones share it.
#[derive(Debug, Clone)]
pub struct Embedded {
    state: Arc<Mutex<State>>,
}

impl Default for Embedded {
    fn default() -> Self {
        Self::new()
    }
}

impl Embedded {
    /// An empty registry. Inside a tokio runtime, a task ends lapsed
    /// leases as they lapse; outside one, they end at the next operation.
    pub fn new() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(REAP_EVERY);
                loop {
                    tick.tick().await;
                    let Some(s) = weak.upgrade() else { return };
                    lock(&s).reap(Instant::now());
                }
            });
        }
        Self { state }
    }

    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> T + Send + 'static,
    ) -> BoxFut<'_, T> {
        let state = self.state.clone();
        Box::pin(async move {
            let mut s = lock(&state);
            s.reap(Instant::now());
            f(&mut s)
        })
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl RegistryBackend for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<(LeaseId, Duration), BackendError>> {
        self.with(move |s| {
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(
                id,
                Lease {
                    deadline: Instant::now() + ttl,
                    ttl,
                    ids: BTreeSet::new(),
                },
            );
            Ok((LeaseId(id), ttl))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.with(move |s| match s.leases.get_mut(&lease.0) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(BackendError::NoLease(lease.0)),
        })
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.with(move |s| {
            s.end_lease(lease.0);
            Ok(())
        })
    }

    fn start(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.with(move |s| {
            if let Some(&o) = s.outcomes.get(&id) {
                return Err(BackendError::Decided(id, o));
            }
            match s.open.get(&id) {
                // A retry of this very start: done already.
                Some(&l) if l == lease.0 => return Ok(()),
                Some(_) => return Err(BackendError::Exists(id)),
                None => {}
            }
            let l = s
                .leases
                .get_mut(&lease.0)
                .ok_or(BackendError::NoLease(lease.0))?;
            l.ids.insert(id);
            s.open.insert(id, lease.0);
            s.rev += 1;
            Ok(())
        })
    }

    fn restart(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<Option<Outcome>, BackendError>> {
        self.with(move |s| {
            if let Some(&o) = s.outcomes.get(&id) {
                return Ok(Some(o));
            }
            if !s.leases.contains_key(&lease.0) {
                return Err(BackendError::NoLease(lease.0));
            }
            if let Some(old) = s.open.insert(id, lease.0) {
                if let Some(l) = s.leases.get_mut(&old) {
                    l.ids.remove(&id);
                }
            }
            if let Some(l) = s.leases.get_mut(&lease.0) {
                l.ids.insert(id);
            }
            s.rev += 1;
            Ok(None)
        })
    }

    fn join(&self, id: Id, member: String) -> BoxFut<'_, Result<JoinResult, BackendError>> {
        self.with(move |s| {
            if let Some(&o) = s.outcomes.get(&id) {
                return Ok(JoinResult::Decided(o));
            }
            if !s.open.contains_key(&id) {
                return Ok(JoinResult::Unknown);
            }
            s.members.entry(id).or_default().insert(member);
            s.rev += 1;
            Ok(JoinResult::Joined)
        })
    }

    fn resolve(&self, id: Id, outcome: Outcome) -> BoxFut<'_, Result<Outcome, BackendError>> {
        self.with(move |s| {
            if let Some(&o) = s.outcomes.get(&id) {
                return Ok(o);
            }
            s.decide(id, outcome);
            Ok(outcome)
        })
    }

    fn expire(&self, id: Id) -> BoxFut<'_, Result<(Option<Outcome>, bool), BackendError>> {
        self.with(move |s| {
            if let Some(&o) = s.outcomes.get(&id) {
                return Ok((Some(o), false));
            }
            if s.open.contains_key(&id) {
                return Ok((None, false));
            }
            s.decide(id, Outcome::Abort);
            Ok((Some(Outcome::Abort), true))
        })
    }

    fn outcomes(&self) -> BoxFut<'_, Result<(Revision, Vec<Decision>), BackendError>> {
        self.with(|s| {
            let v = s
                .decided
                .iter()
                .filter_map(|&id| s.outcomes.get(&id).map(|&outcome| Decision { id, outcome }))
                .collect();
            Ok((s.rev, v))
        })
    }

    fn watch(&self, from: Revision) -> BoxFut<'_, Result<mpsc::Receiver<WatchItem>, BackendError>> {
        self.with(move |s| {
            if from <= s.compacted {
                return Err(BackendError::Compacted(from, s.compacted + 1));
            }
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            for w in s.log.iter().filter(|w| w.revision >= from) {
                if tx.try_send(Ok(*w)).is_err() {
                    // More to replay than the queue holds: the watcher
                    // takes these and watches again from the last.
                    return Ok(rx);
                }
            }
            s.watchers.push(tx);
            Ok(rx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    #[tokio::test]
    async fn start_join_resolve_watch() {
        conformance::start_join_resolve_watch(&Embedded::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn join_after_outcome_returns_it() {
        conformance::join_after_outcome_returns_it(&Embedded::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn replay_from_a_revision_is_exactly_once() {
        conformance::replay_from_a_revision_is_exactly_once(&Embedded::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn lease_expiry_aborts_once_with_two_bridges_racing() {
        let shared = Embedded::new();
        let other = shared.clone();
        conformance::lease_expiry_aborts_once_with_two_bridges_racing(&shared, &other)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_watch_from_a_dropped_revision_is_compacted() {
        let r = Embedded::new();
        let (lease, _) = r.grant(Duration::from_secs(60)).await.unwrap();
        for s in 1..=(KEEP as u32 + 2) {
            let id = Id::new(1, s);
            r.start(id, lease).await.unwrap();
            r.resolve(id, Outcome::Commit).await.unwrap();
        }
        assert!(matches!(
            r.watch(1).await,
            Err(BackendError::Compacted(1, _))
        ));
        let (_, kept) = r.outcomes().await.unwrap();
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept.first().map(|d| d.id), Some(Id::new(1, 3)));
    }
}
