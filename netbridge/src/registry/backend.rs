//! The registry shared by bridges (issue 15): where a speculation's start,
//! its members' joins and its outcome are recorded, so that bridges on
//! several hosts agree on every outcome and hear it once each.
//!
//! [`RegistryBackend`] is the interface. Two implement it:
//! - [`Embedded`](super::embedded::Embedded): in the bridge's memory, the
//!   default; one host needs no server. Bridges of one process may share
//!   one (the benchmark does).
//! - [`Etcd`](super::etcd::Etcd): an etcd cluster (`netbridge --registry
//!   etcd://HOST:PORT[,HOST:PORT...]`), with the key layout and the
//!   transactions in `docs/registry.md`.
//!
//! Both keep the same rules, which the tests in `registry/backend_tests.rs`
//! run against each:
//! - **start** records an open speculation, attached to its owner's lease;
//!   an id that is open or decided already is refused;
//! - **join** is refused once the speculation has an outcome, and says
//!   which: the bridge applies it at once;
//! - **resolve** writes the first outcome only; a later one gets the first;
//! - **watch** yields every outcome, and every speculation whose owner's
//!   lease ended before it had one, from a revision on: a bridge that
//!   watched up to revision R and watches again from R + 1 misses nothing
//!   and sees nothing twice;
//! - **expire** writes the abort of a speculation whose owner's lease
//!   ended, once, whoever calls it first.
//!
//! The methods return boxed futures (rather than `async fn`) so that the
//! bridge can hold either registry as a `dyn RegistryBackend`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::protocol::{Decision, Id, Outcome};

/// A boxed future of a registry operation.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lease: the liveness of one owner VM. Its speculations' keys go when it
/// ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A revision of the registry: every change gets the next one.
pub type Revision = i64;

/// Errors of the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The registry could not be reached, or did not answer in time. What
    /// was asked may or may not have been done: the caller asks again (each
    /// operation is safe to repeat) or refuses what depended on it.
    #[error("the registry is unreachable: {0}")]
    Unreachable(String),
    /// `start` of an id the registry has open already.
    #[error("speculation {0} is open in the registry already")]
    Exists(Id),
    /// `start` of an id the registry has decided already.
    #[error("speculation {0} has its outcome already ({1:?})")]
    Decided(Id, Outcome),
    /// The lease is not (or no longer) known to the registry.
    #[error("lease {0:#x} is not known to the registry (expired?)")]
    NoLease(i64),
    /// `watch` from a revision the registry no longer has.
    #[error("revision {0} is compacted; the oldest kept is {1}")]
    Compacted(Revision, Revision),
    /// The registry holds something this bridge cannot read.
    #[error("unreadable registry data: {0}")]
    Corrupt(String),
}

/// What a join found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinResult {
    /// The member is recorded; the outcome will come by the watch.
    Joined,
    /// The speculation has its outcome already: the join is refused, and
    /// the bridge applies the outcome at once.
    Decided(Outcome),
    /// The registry knows nothing of the id: neither open nor decided. The
    /// rule for unknown ids applies ([`RegistryBackend::expire`] aborts it).
    Unknown,
}

/// A change seen by a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A speculation got its outcome.
    Decided(Decision),
    /// A speculation's key went without an outcome: its owner's lease
    /// ended. Whoever sees it calls [`RegistryBackend::expire`].
    Orphaned(Id),
}

/// One change and the revision that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    /// The revision.
    pub revision: Revision,
    /// The change.
    pub change: Change,
}

/// What a watch yields: changes in revision order, or the error that ended
/// it (the watcher then watches again from its last revision + 1).
pub type WatchItem = Result<Watched, BackendError>;

/// The registry shared by bridges. See the module's documentation.
pub trait RegistryBackend: Send + Sync {
    /// `embedded` or `etcd`, for logs.
    fn kind(&self) -> &'static str;

    /// A new lease that, once no longer renewed, ends within about `ttl`
    /// where the registry can (etcd counts whole seconds and checks for
    /// ended leases every half second, so it gets a TTL of `ttl` less that
    /// half second, rounded down, and at least its own minimum). Returns
    /// the TTL granted: renew within it.
    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<(LeaseId, Duration), BackendError>>;

    /// Renews `lease` for another TTL. [`BackendError::NoLease`] once it
    /// has ended.
    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>>;

    /// Ends `lease` now: the keys attached to it go (open speculations of
    /// the lease become [`Change::Orphaned`]).
    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>>;

    /// Records `id` as open, attached to `lease`, in one transaction that
    /// fails if the id is open on another lease ([`BackendError::Exists`])
    /// or decided ([`BackendError::Decided`]) already. Open on `lease`
    /// already is success: a retry whose first answer was lost.
    fn start(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>>;

    /// Attaches `id` (open, as the owner's bridge restarted) to a new
    /// `lease`, unless it is decided: then the outcome.
    fn restart(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<Option<Outcome>, BackendError>>;

    /// Records `member` (a name: bridge and port) as a member of `id`, in
    /// one transaction that fails if `id` has an outcome, and then returns
    /// it.
    fn join(&self, id: Id, member: String) -> BoxFut<'_, Result<JoinResult, BackendError>>;

    /// Writes `outcome` for `id` unless it has one: returns the outcome
    /// that holds (the first).
    fn resolve(&self, id: Id, outcome: Outcome) -> BoxFut<'_, Result<Outcome, BackendError>>;

    /// Writes abort for `id` if it is neither open nor decided (its
    /// owner's lease ended, or it never started), in one transaction.
    /// Returns the outcome that holds, if any, and whether this call wrote
    /// it: of bridges racing, one writes.
    fn expire(&self, id: Id) -> BoxFut<'_, Result<(Option<Outcome>, bool), BackendError>>;

    /// Every outcome the registry keeps, and the revision they are as of:
    /// a watch from that revision + 1 follows on without a gap.
    fn outcomes(&self) -> BoxFut<'_, Result<(Revision, Vec<Decision>), BackendError>>;

    /// The changes from revision `from` on, in order, on a channel; the
    /// channel ends after an error (or when the registry goes).
    fn watch(&self, from: Revision) -> BoxFut<'_, Result<mpsc::Receiver<WatchItem>, BackendError>>;
}

/// Key names shared by both registries, and `docs/registry.md`: an id as
/// `vvvvvvvv:ssssssss`, its VM and sequence in hexadecimal, fixed width, so
/// that keys sort by VM then sequence.
pub fn id_key(id: Id) -> String {
    format!("{:08x}:{:08x}", id.vm, id.seq)
}

/// The id of an [`id_key`].
pub fn parse_id_key(s: &str) -> Option<Id> {
    let (vm, seq) = s.split_once(':')?;
    if vm.len() != 8 || seq.len() != 8 {
        return None;
    }
    Some(Id::new(
        u32::from_str_radix(vm, 16).ok()?,
        u32::from_str_radix(seq, 16).ok()?,
    ))
}

/// An outcome as stored: `commit` or `abort`.
pub fn outcome_text(o: Outcome) -> &'static str {
    match o {
        Outcome::Commit => "commit",
        Outcome::Abort => "abort",
    }
}

/// The outcome of an [`outcome_text`].
pub fn parse_outcome(s: &[u8]) -> Option<Outcome> {
    match s {
        b"commit" => Some(Outcome::Commit),
        b"abort" => Some(Outcome::Abort),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_vm_then_sequence_and_parse_back() {
        let ids = [
            Id::new(1, 2),
            Id::new(1, 10),
            Id::new(2, 1),
            Id::new(u32::MAX, u32::MAX),
        ];
        let keys: Vec<String> = ids.iter().map(|&i| id_key(i)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for (k, &i) in keys.iter().zip(&ids) {
            assert_eq!(parse_id_key(k), Some(i));
        }
        assert_eq!(parse_id_key("1:2"), None);
        assert_eq!(parse_id_key("0000000g:00000001"), None);
        assert_eq!(parse_outcome(b"commit"), Some(Outcome::Commit));
        assert_eq!(
            parse_outcome(outcome_text(Outcome::Abort).as_bytes()),
            Some(Outcome::Abort)
        );
        assert_eq!(parse_outcome(b"maybe"), None);
    }
}
