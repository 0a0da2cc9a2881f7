//! The rules every [`RegistryBackend`] keeps, as checks that run on any of
//! them: the embedded registry's unit tests run them in memory, and
//! `tests/tests/registry_etcd.rs` against a real etcd (started by the test).
//! Each check takes a registry of its own (empty, or with a prefix of its
//! own) and returns what broke.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::backend::{BackendError, Change, JoinResult, RegistryBackend, WatchItem, Watched};
use crate::protocol::{Decision, Id, Outcome};

/// The longest a check waits for a change it expects.
const WAIT: Duration = Duration::from_secs(15);

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn e(what: &str) -> impl Fn(BackendError) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// The next change within `within`, or `None`.
async fn next(
    rx: &mut mpsc::Receiver<WatchItem>,
    within: Duration,
) -> Result<Option<Watched>, String> {
    match tokio::time::timeout(within, rx.recv()).await {
        Err(_) => Ok(None),
        Ok(None) => Err("the watch ended".into()),
        Ok(Some(Err(err))) => Err(format!("the watch failed: {err}")),
        Ok(Some(Ok(w))) => Ok(Some(w)),
    }
}

/// Changes until `n` are seen, or [`WAIT`].
async fn take(rx: &mut mpsc::Receiver<WatchItem>, n: usize) -> Result<Vec<Watched>, String> {
    let deadline = Instant::now() + WAIT;
    let mut v = Vec::new();
    while v.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match next(rx, left).await? {
            Some(w) => v.push(w),
            None => {
                return Err(format!(
                    "{} changes within {WAIT:?}, not {n}: {v:?}",
                    v.len()
                ))
            }
        }
    }
    Ok(v)
}

fn decided(w: &Watched) -> Option<Decision> {
    match w.change {
        Change::Decided(d) => Some(d),
        Change::Orphaned(_) => None,
    }
}

/// Start, join, resolve and watch: a second start is refused, a join of an
/// open id is recorded, the first outcome holds, and the watch yields it.
pub async fn start_join_resolve_watch(r: &dyn RegistryBackend) -> Result<(), String> {
    let (rev, _) = r.outcomes().await.map_err(e("outcomes"))?;
    let mut rx = r.watch(rev + 1).await.map_err(e("watch"))?;
    let (lease, _) = r.grant(Duration::from_secs(30)).await.map_err(e("grant"))?;
    let id = Id::new(7, 1);
    r.start(id, lease).await.map_err(e("start"))?;
    check!(
        r.start(id, lease).await == Ok(()),
        "a start repeated on its lease (a retry whose answer was lost) failed"
    );
    let (other, _) = r.grant(Duration::from_secs(30)).await.map_err(e("grant"))?;
    check!(
        r.start(id, other).await == Err(BackendError::Exists(id)),
        "a start of an id open on another lease was not refused as Exists"
    );
    let j = r.join(id, "b/2".into()).await.map_err(e("join"))?;
    check!(j == JoinResult::Joined, "join of an open id: {j:?}");
    let o = r.resolve(id, Outcome::Commit).await.map_err(e("resolve"))?;
    check!(o == Outcome::Commit, "resolve returned {o:?}");
    let o = r
        .resolve(id, Outcome::Abort)
        .await
        .map_err(e("resolve again"))?;
    check!(
        o == Outcome::Commit,
        "a second resolve changed the outcome to {o:?}"
    );
    let seen = take(&mut rx, 1).await?;
    check!(
        decided(&seen[0])
            == Some(Decision {
                id,
                outcome: Outcome::Commit
            }),
        "the watch yielded {seen:?}"
    );
    check!(
        seen[0].revision > rev,
        "revision {} not past {rev}",
        seen[0].revision
    );
    // Nothing more: the second resolve wrote nothing.
    let more = next(&mut rx, Duration::from_millis(300)).await?;
    check!(more.is_none(), "the second resolve was watched: {more:?}");
    check!(
        r.start(id, lease).await == Err(BackendError::Decided(id, Outcome::Commit)),
        "a start of a decided id was not refused with its outcome"
    );
    Ok(())
}

/// A join after the outcome is refused and returns the outcome; a join of
/// an id the registry never saw is Unknown, and expire aborts it.
pub async fn join_after_outcome_returns_it(r: &dyn RegistryBackend) -> Result<(), String> {
    let (lease, _) = r.grant(Duration::from_secs(30)).await.map_err(e("grant"))?;
    let id = Id::new(8, 1);
    r.start(id, lease).await.map_err(e("start"))?;
    r.resolve(id, Outcome::Abort).await.map_err(e("resolve"))?;
    let j = r.join(id, "b/3".into()).await.map_err(e("join"))?;
    check!(
        j == JoinResult::Decided(Outcome::Abort),
        "join after abort: {j:?}"
    );
    let unknown = Id::new(8, 99);
    let j = r
        .join(unknown, "b/3".into())
        .await
        .map_err(e("join unknown"))?;
    check!(j == JoinResult::Unknown, "join of an unknown id: {j:?}");
    let x = r.expire(unknown).await.map_err(e("expire"))?;
    check!(
        x == (Some(Outcome::Abort), true),
        "expire of an unknown id: {x:?}"
    );
    let j = r
        .join(unknown, "b/3".into())
        .await
        .map_err(e("join again"))?;
    check!(
        j == JoinResult::Decided(Outcome::Abort),
        "join after expire: {j:?}"
    );
    // An open id is not expired.
    let open = Id::new(8, 2);
    r.start(open, lease).await.map_err(e("start open"))?;
    let x = r.expire(open).await.map_err(e("expire open"))?;
    check!(x == (None, false), "expire of an open id: {x:?}");
    Ok(())
}

/// A bridge that watched up to revision R and comes back (a restart)
/// watching from R + 1 gets every outcome it missed, once, in order, and
/// none it had; `outcomes` (the re-read at start) holds them all.
pub async fn replay_from_a_revision_is_exactly_once(r: &dyn RegistryBackend) -> Result<(), String> {
    let (rev, _) = r.outcomes().await.map_err(e("outcomes"))?;
    let (lease, _) = r.grant(Duration::from_secs(30)).await.map_err(e("grant"))?;
    let ids: Vec<Id> = (1..=6).map(|s| Id::new(9, s)).collect();
    for &id in &ids {
        r.start(id, lease).await.map_err(e("start"))?;
    }
    let mut rx = r.watch(rev + 1).await.map_err(e("watch"))?;
    r.resolve(ids[0], Outcome::Commit)
        .await
        .map_err(e("resolve"))?;
    r.resolve(ids[1], Outcome::Abort)
        .await
        .map_err(e("resolve"))?;
    let seen = take(&mut rx, 2).await?;
    let last = seen[1].revision;
    // The bridge goes away; decisions go on without it.
    drop(rx);
    for (i, &id) in ids[2..].iter().enumerate() {
        let o = if i % 2 == 0 {
            Outcome::Abort
        } else {
            Outcome::Commit
        };
        r.resolve(id, o).await.map_err(e("resolve while away"))?;
    }
    let mut rx = r.watch(last + 1).await.map_err(e("watch again"))?;
    let replay = take(&mut rx, 4).await?;
    let got: Vec<Id> = replay.iter().filter_map(decided).map(|d| d.id).collect();
    check!(
        got == ids[2..],
        "replayed {got:?}, expected {:?}",
        &ids[2..]
    );
    check!(
        replay.windows(2).all(|w| w[0].revision < w[1].revision),
        "replay out of order: {replay:?}"
    );
    let more = next(&mut rx, Duration::from_millis(300)).await?;
    check!(more.is_none(), "replayed more than was missed: {more:?}");
    let (_, all) = r.outcomes().await.map_err(e("outcomes"))?;
    let all: HashMap<Id, Outcome> = all.into_iter().map(|d| (d.id, d.outcome)).collect();
    check!(
        ids.iter().all(|id| all.contains_key(id)),
        "the re-read misses outcomes: {all:?}"
    );
    check!(
        all[&ids[1]] == Outcome::Abort && all[&ids[3]] == Outcome::Commit,
        "wrong outcomes: {all:?}"
    );
    Ok(())
}

/// An owner's lease that lapses orphans its open ids; two bridges that
/// both see it race to expire each, and the abort is written once; a
/// lease kept alive past its TTL orphans nothing.
pub async fn lease_expiry_aborts_once_with_two_bridges_racing(
    a: &dyn RegistryBackend,
    b: &dyn RegistryBackend,
) -> Result<(), String> {
    let (rev, _) = a.outcomes().await.map_err(e("outcomes"))?;
    let mut wa = a.watch(rev + 1).await.map_err(e("watch a"))?;
    let mut wb = b.watch(rev + 1).await.map_err(e("watch b"))?;
    let (short, ttl) = a.grant(Duration::from_secs(1)).await.map_err(e("grant"))?;
    let (kept, _) = a
        .grant(Duration::from_secs(1))
        .await
        .map_err(e("grant kept"))?;
    let ids = [Id::new(10, 1), Id::new(10, 2)];
    for &id in &ids {
        a.start(id, short).await.map_err(e("start"))?;
    }
    let alive = Id::new(11, 1);
    a.start(alive, kept).await.map_err(e("start kept"))?;
    let started = Instant::now();
    let mut seen: HashMap<Id, usize> = HashMap::new();
    let mut wrote: HashMap<Id, usize> = HashMap::new();
    let mut decided_seen: HashMap<Id, usize> = HashMap::new();
    let renew = async {
        // Renew `kept` at a third of its TTL until the others have lapsed
        // and a TTL more.
        let until = Instant::now() + ttl * 3;
        while Instant::now() < until {
            tokio::time::sleep(ttl / 3).await;
            a.keep_alive(kept).await.map_err(e("keep_alive"))?;
        }
        Ok::<(), String>(())
    };
    let race = async {
        // Both bridges see both orphans, then both expire each at once.
        let oa = take(&mut wa, 2).await?;
        let ob = take(&mut wb, 2).await?;
        for w in oa.iter().chain(&ob) {
            match w.change {
                Change::Orphaned(id) => *seen.entry(id).or_default() += 1,
                Change::Decided(d) => return Err(format!("decided before expiry: {d:?}")),
            }
        }
        for &id in &ids {
            let (xa, xb) = tokio::join!(a.expire(id), b.expire(id));
            for x in [xa, xb] {
                let (o, w) = x.map_err(e("expire"))?;
                check!(o == Some(Outcome::Abort), "expire of {id} gave {o:?}");
                *wrote.entry(id).or_default() += usize::from(w);
            }
        }
        let da = take(&mut wa, 2).await?;
        let db = take(&mut wb, 2).await?;
        for w in da.iter().chain(&db) {
            match decided(w) {
                Some(d) if d.outcome == Outcome::Abort => {
                    *decided_seen.entry(d.id).or_default() += 1
                }
                _ => return Err(format!("expected aborts, got {w:?}")),
            }
        }
        Ok::<(), String>(())
    };
    let (r1, r2) = tokio::join!(renew, race);
    r1?;
    r2?;
    let lapsed = started.elapsed();
    for id in ids {
        check!(
            seen.get(&id) == Some(&2),
            "{id} orphaned {:?} times over two watches",
            seen.get(&id)
        );
        check!(
            wrote.get(&id) == Some(&1),
            "{id}'s abort written {:?} times",
            wrote.get(&id)
        );
        check!(
            decided_seen.get(&id) == Some(&2),
            "{id}'s abort watched {:?} times over two watches (one each)",
            decided_seen.get(&id)
        );
    }
    check!(
        lapsed >= ttl,
        "orphaned after {lapsed:?}, before the TTL {ttl:?}"
    );
    // The renewed lease's id is still open: not expired, no change for it.
    let x = a.expire(alive).await.map_err(e("expire kept"))?;
    check!(x == (None, false), "the kept-alive id was expired: {x:?}");
    a.revoke(kept).await.map_err(e("revoke"))?;
    let w = take(&mut wa, 1).await?;
    check!(w[0].change == Change::Orphaned(alive), "revoke gave {w:?}");
    Ok(())
}
