//! The etcd registry: [`RegistryBackend`] on an etcd cluster, through the
//! `etcd-client` crate (`netbridge --registry etcd://HOST:PORT[,...]`).
//!
//! Keys, under a prefix (`/specvm/` by default; `docs/registry.md`):
//! - `spec/VVVVVVVV:SSSSSSSS`: an open speculation, attached to its owner's
//!   lease; it goes with the lease, or when the outcome is written;
//! - `outcome/VVVVVVVV:SSSSSSSS`: `commit` or `abort`, written once, and
//!   kept for the retention ([`Etcd::with_retention`]; an hour by default)
//!   on a lease of its own, so that the keys do not grow without end;
//! - `member/VVVVVVVV:SSSSSSSS/NAME`: a member, for the picture of the
//!   graph; deleted with the outcome.
//!
//! Every operation is one transaction (see each method), so bridges that
//! race agree: the first outcome written holds, and a join after it gets
//! it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::backend::{
    id_key, outcome_text, parse_id_key, parse_outcome, BackendError, BoxFut, Change, JoinResult,
    LeaseId, RegistryBackend, Revision, WatchItem, Watched,
};
use crate::protocol::{Decision, Id, Outcome};

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/specvm/";
/// Changes that may wait for the bridge on one watch.
const WATCH_QUEUE: usize = 4096;

/// A lease's keep-alive stream, kept open between renewals.
type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// The etcd registry.
///
/// It holds one client per member, each connected to that member alone,
/// and sends every request to the member that answered last; a request
/// that finds it unreachable goes to the next. etcd-client's own balanced
/// channel over every member leaves failover to its user (etcdv3/etcd-client
/// issue 12), and with one member of three killed it held a request on the
/// dead one for the whole timeout, often enough that a bridge refused
/// speculations a live majority could take. Staying on one member and
/// moving on when it fails is what etcd's own Go client does.
#[derive(Clone)]
pub struct Etcd {
    clients: Arc<[Client]>,
    /// The index (modulo `clients.len()`) of the member requests go to.
    current: Arc<AtomicUsize>,
    prefix: String,
    /// One keep-alive stream per lease renewed, opened at its first
    /// renewal and dropped at its revoke or first failure.
    keepers: Arc<tokio::sync::Mutex<HashMap<i64, Keeper>>>,
    /// How long one operation may take, its retries included.
    timeout: Duration,
    /// How long outcome keys are kept (`None`: for ever).
    retention: Option<Duration>,
    /// The lease outcome keys are written on now, and when it was granted.
    retain: Arc<tokio::sync::Mutex<Option<(i64, tokio::time::Instant)>>>,
}

/// How long outcome keys are kept when nothing else is said: longer than
/// any bridge is expected to be away (a bridge back after longer finds
/// the outcomes of its members' speculations gone, and they abort by the
/// rule for unknown ids).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);

/// The shortest time one request to one member may take before the next
/// member is tried (a request may wait out a leader election).
const MIN_ATTEMPT: Duration = Duration::from_millis(250);

/// The pause before an operation is tried again on another endpoint.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Parses `etcd://HOST:PORT[,HOST:PORT...]` into endpoints.
pub fn parse_url(url: &str) -> Result<Vec<String>, String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("'{url}' is not etcd://HOST:PORT[,HOST:PORT...]"))?;
    let eps: Vec<String> = rest
        .split(',')
        .map(|hp| {
            let (host, port) = hp
                .rsplit_once(':')
                .ok_or_else(|| format!("'{hp}' in '{url}' has no :PORT"))?;
            if host.is_empty() || host.contains('/') {
                return Err(format!("'{hp}' in '{url}' is not HOST:PORT"));
            }
            port.parse::<u16>()
                .map_err(|_| format!("'{port}' in '{url}' is not a port number"))?;
            Ok(format!("http://{hp}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(eps)
}

fn unreachable(e: etcd_client::Error) -> BackendError {
    BackendError::Unreachable(e.to_string())
}

/// Whether etcd answered that the lease named does not exist (any more).
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://HOST:PORT`), with
    /// keys under `prefix`. Each operation waits at most `timeout`, its
    /// tries on each member included: past it the registry counts as
    /// unreachable. Connects lazily: an unreachable cluster shows in the
    /// first operation.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        if endpoints.is_empty() {
            return Err(BackendError::Unreachable("no etcd endpoint given".into()));
        }
        // Time for a try on each member within the operation's timeout.
        let members = u32::try_from(endpoints.len()).unwrap_or(u32::MAX);
        let attempt = (timeout / members).max(MIN_ATTEMPT).min(timeout);
        let opts = ConnectOptions::new()
            .with_timeout(attempt)
            .with_connect_timeout(attempt)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            clients.push(
                Client::connect([e], Some(opts.clone()))
                    .await
                    .map_err(unreachable)?,
            );
        }
        Ok(Self {
            clients: clients.into(),
            current: Arc::default(),
            retention: Some(DEFAULT_RETENTION),
            retain: Arc::default(),
            prefix: prefix.to_string(),
            keepers: Arc::default(),
            timeout,
        })
    }

    /// The speculations open in the registry now (their `spec/` keys).
    pub async fn open_ids(&self) -> Result<Vec<Id>, BackendError> {
        let prefix = format!("{}spec/", self.prefix);
        let r = self
            .retrying(|| {
                let prefix = prefix.clone();
                Box::pin(async move {
                    self.client()
                        .kv_client()
                        .get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                        .await
                        .map_err(unreachable)
                })
            })
            .await?;
        let mut ids: Vec<Id> = r
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                key.strip_prefix(&prefix).and_then(parse_id_key)
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Keeps outcome keys for `retention` (whole seconds, at least one),
    /// or for ever with `None`. Each is written on a lease shared by the
    /// outcomes of a tenth of the retention, so a key lives between 0.9
    /// and 1 times the retention, and there is one lease per bridge per
    /// tenth, not one per outcome.
    pub fn with_retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// A lease of `secs` seconds, one try: its id and the TTL etcd gave.
    async fn grant_secs(&self, secs: u64) -> Result<(i64, Duration), BackendError> {
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let r = self
            .client()
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(unreachable)?;
        let got = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
        Ok((r.id(), got))
    }

    /// The lease to write an outcome on: `None` when outcomes are kept for
    /// ever. Granted anew each tenth of the retention.
    async fn retention_lease(&self) -> Result<Option<i64>, BackendError> {
        let Some(retention) = self.retention else {
            return Ok(None);
        };
        let mut cur = self.retain.lock().await;
        if let Some((lease, at)) = *cur {
            if at.elapsed() < retention / 10 {
                return Ok(Some(lease));
            }
        }
        let (lease, _) = self.grant_secs(retention.as_secs().max(1)).await?;
        *cur = Some((lease, tokio::time::Instant::now()));
        Ok(Some(lease))
    }

    /// The retention lease was not found (etcd lost it, or it ended): the
    /// next outcome gets a new one.
    async fn retention_lost(&self) {
        *self.retain.lock().await = None;
    }

    /// A put of `o` on the outcome key `key`, on `lease` if any.
    fn put_outcome(key: String, o: Outcome, lease: Option<i64>) -> TxnOp {
        let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
        TxnOp::put(key, outcome_text(o), opts)
    }

    /// Runs an outcome-writing `txn`: one that finds the retention lease
    /// gone drops it and counts as unreachable, so `retrying` writes again
    /// on a new one.
    async fn outcome_txn(
        &self,
        txn: etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse, BackendError> {
        match self.txn(txn).await {
            Err(BackendError::NoLease(_)) => {
                self.retention_lost().await;
                Err(BackendError::Unreachable(
                    "the outcomes' retention lease is gone; writing on a new one".into(),
                ))
            }
            r => r,
        }
    }

    /// The client of the member requests go to now.
    fn client(&self) -> &Client {
        &self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()]
    }

    /// Runs `op` again while it finds etcd unreachable, within the
    /// timeout, each time on the next member. Every operation is safe to
    /// repeat (a start that reached etcd before its answer was lost finds
    /// its own key: see `start`; a resolve finds its own outcome).
    async fn retrying<'a, T, F>(&self, mut op: F) -> Result<T, BackendError>
    where
        F: FnMut() -> BoxFut<'a, Result<T, BackendError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let on = self.current.load(Ordering::Relaxed);
            match op().await {
                Err(BackendError::Unreachable(e))
                    if tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    // Requests that failed together move on once.
                    let next = on.wrapping_add(1);
                    let _ = self.current.compare_exchange(
                        on,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tracing::debug!(
                        "registry: {e}; trying member {} of {}",
                        next % self.clients.len() + 1,
                        self.clients.len()
                    );
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                r => return r,
            }
        }
    }

    fn spec(&self, id: Id) -> String {
        format!("{}spec/{}", self.prefix, id_key(id))
    }

    fn outcome(&self, id: Id) -> String {
        format!("{}outcome/{}", self.prefix, id_key(id))
    }

    fn members(&self, id: Id) -> String {
        format!("{}member/{}/", self.prefix, id_key(id))
    }

    /// The outcome a transaction's `else` branch read (its first op), if
    /// any.
    fn read_outcome(resp: &etcd_client::TxnResponse) -> Result<Option<Outcome>, BackendError> {
        let Some(TxnOpResponse::Get(g)) = resp.op_responses().into_iter().next() else {
            return Ok(None);
        };
        match g.kvs().first() {
            Some(kv) => parse_outcome(kv.value())
                .map(Some)
                .ok_or_else(|| BackendError::Corrupt(format!("outcome {:?}", kv.value()))),
            None => Ok(None),
        }
    }

    async fn txn(&self, txn: etcd_client::Txn) -> Result<etcd_client::TxnResponse, BackendError> {
        self.client()
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| match lease_not_found(&e) {
                true => BackendError::NoLease(0),
                false => unreachable(e),
            })
    }
}

impl RegistryBackend for Etcd {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<(LeaseId, Duration), BackendError>> {
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let (lease, got) = self.grant_secs(etcd_ttl_secs(ttl)).await?;
                Ok((LeaseId(lease), got))
            })
        }))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        // A renewal whose stream went to a member that died is tried again
        // on a new stream, to the next member (`retrying`).
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let mut keepers = self.keepers.lock().await;
                let keeper = match keepers.entry(lease.0) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(
                        self.client()
                            .lease_client()
                            .keep_alive(lease.0)
                            .await
                            .map_err(unreachable)?,
                    ),
                };
                let renewed = async {
                    keeper.0.keep_alive().await.map_err(unreachable)?;
                    match keeper.1.message().await.map_err(unreachable)? {
                        Some(r) if r.ttl() > 0 => Ok(()),
                        Some(_) => Err(BackendError::NoLease(lease.0)),
                        None => Err(BackendError::Unreachable("keep-alive stream closed".into())),
                    }
                }
                .await;
                if renewed.is_err() {
                    keepers.remove(&lease.0);
                }
                renewed
            })
        }))
    }

    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.keepers.lock().await.remove(&lease.0);
            self.retrying(move || {
                Box::pin(async move {
                    match self.client().lease_client().revoke(lease.0).await {
                        Ok(_) => Ok(()),
                        // Gone already (or revoked by a try whose answer
                        // was lost): what revoking would do is done.
                        Err(e) if lease_not_found(&e) => Ok(()),
                        Err(e) => Err(unreachable(e)),
                    }
                })
            })
            .await
        })
    }

    /// `if version(spec) = 0 and version(outcome) = 0 then put spec (lease)
    /// else get outcome, get spec`. A spec key on this same lease is this
    /// start's own, from a try whose answer was lost: done.
    fn start(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        Box::pin(self.retrying(move || Box::pin(async move {
            let (spec, outcome) = (self.spec(id), self.outcome(id));
            let txn = etcd_client::Txn::new()
                .when([
                    Compare::version(spec.clone(), CompareOp::Equal, 0),
                    Compare::version(outcome.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    spec.clone(),
                    "",
                    Some(etcd_client::PutOptions::new().with_lease(lease.0)),
                )])
                .or_else([TxnOp::get(outcome, None), TxnOp::get(spec.clone(), None)]);
            let r = self.txn(txn).await.map_err(|e| match e {
                BackendError::NoLease(_) => BackendError::NoLease(lease.0),
                e => e,
            })?;
            if r.succeeded() {
                return Ok(());
            }
            if let Some(o) = Self::read_outcome(&r)? {
                return Err(BackendError::Decided(id, o));
            }
            let ours = r.op_responses().iter().any(|op| {
                matches!(op, TxnOpResponse::Get(g)
                    if g.kvs().first().is_some_and(|kv| kv.key() == spec.as_bytes() && kv.lease() == lease.0))
            });
            match ours {
                true => Ok(()),
                false => Err(BackendError::Exists(id)),
            }
        })))
    }

    /// `if version(outcome) = 0 then put spec (new lease) else get outcome`.
    fn restart(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<Option<Outcome>, BackendError>> {
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let (spec, outcome) = (self.spec(id), self.outcome(id));
                let txn = etcd_client::Txn::new()
                    .when([Compare::version(outcome.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        spec,
                        "",
                        Some(etcd_client::PutOptions::new().with_lease(lease.0)),
                    )])
                    .or_else([TxnOp::get(outcome, None)]);
                let r = self.txn(txn).await.map_err(|e| match e {
                    BackendError::NoLease(_) => BackendError::NoLease(lease.0),
                    e => e,
                })?;
                if r.succeeded() {
                    return Ok(None);
                }
                Self::read_outcome(&r)
            })
        }))
    }

    /// `if version(outcome) = 0 and version(spec) > 0 then put member
    /// else get outcome`: no outcome read back is an unknown id.
    fn join(&self, id: Id, member: String) -> BoxFut<'_, Result<JoinResult, BackendError>> {
        Box::pin(self.retrying(move || {
            let member = member.clone();
            Box::pin(async move {
                let (spec, outcome) = (self.spec(id), self.outcome(id));
                let txn = etcd_client::Txn::new()
                    .when([
                        Compare::version(outcome.clone(), CompareOp::Equal, 0),
                        Compare::version(spec, CompareOp::Greater, 0),
                    ])
                    .and_then([TxnOp::put(
                        format!("{}{member}", self.members(id)),
                        "",
                        None,
                    )])
                    .or_else([TxnOp::get(outcome, None)]);
                let r = self.txn(txn).await?;
                if r.succeeded() {
                    return Ok(JoinResult::Joined);
                }
                Ok(match Self::read_outcome(&r)? {
                    Some(o) => JoinResult::Decided(o),
                    None => JoinResult::Unknown,
                })
            })
        }))
    }

    /// `if version(outcome) = 0 then put outcome, delete spec, delete
    /// member/ID/* else get outcome`.
    fn resolve(&self, id: Id, o: Outcome) -> BoxFut<'_, Result<Outcome, BackendError>> {
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let outcome = self.outcome(id);
                let lease = self.retention_lease().await?;
                let txn = etcd_client::Txn::new()
                    .when([Compare::version(outcome.clone(), CompareOp::Equal, 0)])
                    .and_then([
                        Self::put_outcome(outcome.clone(), o, lease),
                        TxnOp::delete(self.spec(id), None),
                        TxnOp::delete(self.members(id), Some(DeleteOptions::new().with_prefix())),
                    ])
                    .or_else([TxnOp::get(outcome, None)]);
                let r = self.outcome_txn(txn).await?;
                if r.succeeded() {
                    return Ok(o);
                }
                Self::read_outcome(&r)?
                    .ok_or_else(|| BackendError::Corrupt(format!("{id}: outcome vanished")))
            })
        }))
    }

    /// `if version(outcome) = 0 and version(spec) = 0 then put abort,
    /// delete member/ID/* else get outcome`.
    fn expire(&self, id: Id) -> BoxFut<'_, Result<(Option<Outcome>, bool), BackendError>> {
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let outcome = self.outcome(id);
                let lease = self.retention_lease().await?;
                let txn = etcd_client::Txn::new()
                    .when([
                        Compare::version(outcome.clone(), CompareOp::Equal, 0),
                        Compare::version(self.spec(id), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        Self::put_outcome(outcome.clone(), Outcome::Abort, lease),
                        TxnOp::delete(self.members(id), Some(DeleteOptions::new().with_prefix())),
                    ])
                    .or_else([TxnOp::get(outcome, None)]);
                let r = self.outcome_txn(txn).await?;
                if r.succeeded() {
                    return Ok((Some(Outcome::Abort), true));
                }
                Ok((Self::read_outcome(&r)?, false))
            })
        }))
    }

    fn outcomes(&self) -> BoxFut<'_, Result<(Revision, Vec<Decision>), BackendError>> {
        Box::pin(self.retrying(move || {
            Box::pin(async move {
                let prefix = format!("{}outcome/", self.prefix);
                let r = self
                    .client()
                    .kv_client()
                    .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(unreachable)?;
                let rev = r.header().map_or(0, |h| h.revision());
                let mut v = Vec::new();
                for kv in r.kvs() {
                    let key = String::from_utf8_lossy(kv.key());
                    let id = key.strip_prefix(&prefix).and_then(parse_id_key);
                    match (id, parse_outcome(kv.value())) {
                        (Some(id), Some(outcome)) => v.push(Decision { id, outcome }),
                        _ => tracing::warn!("registry: unreadable outcome key {key} ignored"),
                    }
                }
                Ok((rev, v))
            })
        }))
    }

    fn watch(&self, from: Revision) -> BoxFut<'_, Result<mpsc::Receiver<WatchItem>, BackendError>> {
        Box::pin(async move {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(from.max(1));
            let (watcher, mut stream) = self
                .retrying(|| {
                    let opts = opts.clone();
                    Box::pin(async move {
                        self.client()
                            .watch_client()
                            .watch(self.prefix.clone(), Some(opts))
                            .await
                            .map_err(unreachable)
                    })
                })
                .await?;
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let spec = format!("{}spec/", self.prefix);
            let outcome = format!("{}outcome/", self.prefix);
            tokio::spawn(async move {
                // Dropping the watcher cancels the watch: it lives here.
                let _watcher = watcher;
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(BackendError::Unreachable("watch ended".into())))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(unreachable(e))).await;
                            return;
                        }
                    };
                    if resp.compact_revision() > 0 {
                        let c = BackendError::Compacted(from, resp.compact_revision());
                        let _ = tx.send(Err(c)).await;
                        return;
                    }
                    if resp.canceled() {
                        let why = format!("watch cancelled: {}", resp.cancel_reason());
                        let _ = tx.send(Err(BackendError::Unreachable(why))).await;
                        return;
                    }
                    for w in changes(resp.events(), &spec, &outcome) {
                        if tx.send(Ok(w)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(rx)
        })
    }
}

/// etcd's TTL, in its whole seconds, for a lease that should end within
/// `ttl` of its last renewal: etcd's lessor ends expired leases on a tick
/// of [`ETCD_EXPIRY_TICK`], so one ends between its TTL and that tick
/// later. At least a second (etcd may raise it further, to its minimum:
/// 1.5 election timeouts).
pub fn etcd_ttl_secs(ttl: Duration) -> u64 {
    (ttl.saturating_sub(ETCD_EXPIRY_TICK).as_secs()).max(1)
}

/// How often etcd's lessor looks for expired leases (every 500 ms in its
/// `runLoop`, etcd 3.4; here a 1 s lease ended 1.0 to 1.25 s after its
/// last renewal).
pub const ETCD_EXPIRY_TICK: Duration = Duration::from_millis(500);

/// The changes of one watch response: outcomes written, and spec keys
/// deleted without an outcome in the same revision (the resolve
/// transaction deletes its spec key as it writes the outcome).
fn changes(events: &[etcd_client::Event], spec: &str, outcome: &str) -> Vec<Watched> {
    let mut out: Vec<Watched> = Vec::new();
    for e in events {
        let Some(kv) = e.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        let revision = kv.mod_revision();
        match e.event_type() {
            EventType::Put => {
                let Some(id) = key.strip_prefix(outcome).and_then(parse_id_key) else {
                    continue;
                };
                match parse_outcome(kv.value()) {
                    Some(o) => out.push(Watched {
                        revision,
                        change: Change::Decided(Decision { id, outcome: o }),
                    }),
                    None => tracing::warn!("registry: unreadable outcome at {key} ignored"),
                }
            }
            EventType::Delete => {
                let Some(id) = key.strip_prefix(spec).and_then(parse_id_key) else {
                    continue;
                };
                let decided_now = out.iter().any(|w| {
                    w.revision == revision && matches!(w.change, Change::Decided(d) if d.id == id)
                });
                if !decided_now {
                    out.push(Watched {
                        revision,
                        change: Change::Orphaned(id),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etcd_ttl_ends_the_lease_within_the_ttl_asked_where_it_can() {
        let ms = Duration::from_millis;
        // Under 1.5 s nothing fits: etcd's least, one second.
        assert_eq!(etcd_ttl_secs(ms(30)), 1);
        assert_eq!(etcd_ttl_secs(ms(1000)), 1);
        assert_eq!(etcd_ttl_secs(ms(1999)), 1);
        // From 1.5 s on, TTL + the lessor's tick stays within what was asked.
        for asked in [1500, 2000, 2499, 2500, 5000, 60_000, 600_000] {
            let secs = etcd_ttl_secs(ms(asked));
            assert!(
                Duration::from_secs(secs) + ETCD_EXPIRY_TICK <= ms(asked),
                "{asked} ms -> {secs} s"
            );
            assert!(
                Duration::from_secs(secs + 1) + ETCD_EXPIRY_TICK > ms(asked),
                "{asked} ms -> {secs} s is shorter than it need be"
            );
        }
        assert_eq!(etcd_ttl_secs(Duration::MAX), u64::MAX);
    }

    #[test]
    fn urls_parse_into_endpoints_and_bad_ones_say_why() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379,h2:1").unwrap(),
            vec![
                "http://127.0.0.1:2379".to_string(),
                "http://h2:1".to_string()
            ]
        );
        assert_eq!(
            parse_url("etcd://[::1]:2379").unwrap(),
            vec!["http://[::1]:2379"]
        );
        assert!(parse_url("http://h:1")
            .unwrap_err()
            .contains("is not etcd://"));
        assert!(parse_url("etcd://h").unwrap_err().contains("has no :PORT"));
        assert!(parse_url("etcd://h:99999")
            .unwrap_err()
            .contains("not a port"));
        assert!(parse_url("etcd://:1")
            .unwrap_err()
            .contains("not HOST:PORT"));
    }
}
