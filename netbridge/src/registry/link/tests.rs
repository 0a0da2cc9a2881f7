//! The link between bridges and a shared registry, in one process: two
//! bridges (servers on sockets of their own) share one embedded registry,
//! wrapped so the test can make it unreachable. Real etcd:
//! `tests/tests/registry_etcd.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::super::backend::{
    BackendError, BoxFut, JoinResult, LeaseId, RegistryBackend, Revision, WatchItem,
};
use super::super::embedded::Embedded;
use crate::bridge::Bridge;
use crate::protocol::{
    decode, encode_control, read_message_async, write_message_async, Control, Decision, Id,
    Message, Outcome,
};
use crate::server::{self, Shared};

/// The embedded registry, unreachable while `down` is set.
#[derive(Clone)]
struct Flaky {
    inner: Embedded,
    down: Arc<AtomicBool>,
}

impl Flaky {
    fn gate<'a, T: Send + 'a>(
        &'a self,
        f: BoxFut<'a, Result<T, BackendError>>,
    ) -> BoxFut<'a, Result<T, BackendError>> {
        if self.down.load(Ordering::Relaxed) {
            return Box::pin(async { Err(BackendError::Unreachable("test: down".into())) });
        }
        f
    }
}

impl RegistryBackend for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn grant(&self, ttl: Duration) -> BoxFut<'_, Result<(LeaseId, Duration), BackendError>> {
        self.gate(self.inner.grant(ttl))
    }
    fn keep_alive(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.gate(self.inner.keep_alive(lease))
    }
    fn revoke(&self, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.gate(self.inner.revoke(lease))
    }
    fn start(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<(), BackendError>> {
        self.gate(self.inner.start(id, lease))
    }
    fn restart(&self, id: Id, lease: LeaseId) -> BoxFut<'_, Result<Option<Outcome>, BackendError>> {
        self.gate(self.inner.restart(id, lease))
    }
    fn join(&self, id: Id, member: String) -> BoxFut<'_, Result<JoinResult, BackendError>> {
        self.gate(self.inner.join(id, member))
    }
    fn resolve(&self, id: Id, outcome: Outcome) -> BoxFut<'_, Result<Outcome, BackendError>> {
        self.gate(self.inner.resolve(id, outcome))
    }
    fn expire(&self, id: Id) -> BoxFut<'_, Result<(Option<Outcome>, bool), BackendError>> {
        self.gate(self.inner.expire(id))
    }
    fn outcomes(&self) -> BoxFut<'_, Result<(Revision, Vec<Decision>), BackendError>> {
        self.gate(self.inner.outcomes())
    }
    fn watch(&self, from: Revision) -> BoxFut<'_, Result<mpsc::Receiver<WatchItem>, BackendError>> {
        self.gate(self.inner.watch(from))
    }
}

const LEASE: Duration = Duration::from_millis(1000);

/// A bridge on `dir/name.sock`, linked to `registry`.
async fn bridge(dir: &std::path::Path, name: &str, registry: Arc<dyn RegistryBackend>) -> PathBuf {
    let sock = dir.join(format!("{name}.sock"));
    let shared = Shared::with_lease(
        Bridge::new(crate::tags::read, crate::tags::strip).with_shared_registry(),
        LEASE,
    );
    let tx = super::start(registry, shared.clone(), name.into(), LEASE);
    shared.set_registry(tx);
    let bound = server::bind(&sock).unwrap();
    tokio::spawn(server::serve(bound, shared));
    sock
}

async fn send(s: &mut UnixStream, c: Control) {
    write_message_async(s, &encode_control(&c)).await.unwrap();
}

/// A port as VM `vm`, after its welcome.
async fn port(sock: &PathBuf, vm: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.unwrap();
    send(
        &mut s,
        Control::Hello {
            vm,
            speculative: true,
        },
    )
    .await;
    let w = read_message_async(&mut s).await.unwrap();
    assert!(matches!(
        decode(&w),
        Ok(Message::Control(Control::Welcome { .. }))
    ));
    s
}

/// The next `decided` within `within` (acknowledged), or `None`.
async fn decided(s: &mut UnixStream, within: Duration) -> Option<(Id, Outcome)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = tokio::time::timeout_at(deadline, read_message_async(s))
            .await
            .ok()?
            .ok()?;
        if let Ok(Message::Control(Control::Decided {
            id, outcome, seq, ..
        })) = decode(&m)
        {
            send(s, Control::Ack { seq }).await;
            return Some((id, outcome));
        }
    }
}

/// A member on `sock` as VM `vm` of `id` (a reconnecting VMM's resume: no
/// frame needed between the bridges).
async fn member(sock: &PathBuf, vm: u32, id: Id) -> UnixStream {
    let mut m = port(sock, vm).await;
    send(
        &mut m,
        Control::Resume {
            started: vec![],
            joined: vec![id],
            outcomes: vec![],
        },
    )
    .await;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_share_outcomes_hold_while_the_registry_is_down_and_refuse_starts() {
    let dir = TempDir::new();
    let dir = &dir.0;
    let down = Arc::new(AtomicBool::new(false));
    let registry = Flaky {
        inner: Embedded::new(),
        down: down.clone(),
    };
    let a = bridge(dir, "a", Arc::new(registry.clone())).await;
    let b = bridge(dir, "b", Arc::new(registry)).await;
    let short = Duration::from_millis(300);
    let long = Duration::from_secs(5);

    // Commit across bridges.
    let mut owner = port(&a, 1).await;
    let s1 = Id::new(1, 1);
    send(&mut owner, Control::Started { id: s1 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut m2 = member(&b, 2, s1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(
        &mut owner,
        Control::Resolved {
            id: s1,
            outcome: Outcome::Commit,
        },
    )
    .await;
    assert_eq!(decided(&mut m2, long).await, Some((s1, Outcome::Commit)));

    // The registry goes down with a member waiting: nothing is guessed.
    let s2 = Id::new(1, 2);
    send(&mut owner, Control::Started { id: s2 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut m3 = member(&b, 3, s2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    down.store(true, Ordering::Relaxed);
    send(
        &mut owner,
        Control::Resolved {
            id: s2,
            outcome: Outcome::Commit,
        },
    )
    .await;
    assert_eq!(
        decided(&mut m3, short).await,
        None,
        "told while the registry was down"
    );
    // A start meanwhile is refused: its owner is told abort.
    let s3 = Id::new(1, 3);
    send(&mut owner, Control::Started { id: s3 }).await;
    assert_eq!(decided(&mut owner, long).await, Some((s3, Outcome::Abort)));
    assert_eq!(decided(&mut m3, short).await, None, "still nothing guessed");
    // Back: the waiting commit goes through and arrives.
    down.store(false, Ordering::Relaxed);
    assert_eq!(decided(&mut m3, long).await, Some((s2, Outcome::Commit)));

    // An owner that goes aborts what it owned, on the other bridge too.
    let s4 = Id::new(1, 4);
    send(&mut owner, Control::Started { id: s4 }).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut m4 = member(&b, 4, s4).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(owner);
    assert_eq!(decided(&mut m4, long).await, Some((s4, Outcome::Abort)));
}

/// The test's folder, removed when dropped, also when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(format!("netbridge-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
