//! The etcd registry (issue 15, part 1), against real etcd servers that the
//! tests start on loopback (Debian's `etcd-server`, fetched by
//! `tests/tools/fetch-etcd.sh`; without it every test here is recorded as
//! skipped, with the reason).
//!
//! - The registry rules (`netbridge::registry::conformance`), the same
//!   checks the embedded registry's unit tests run, through the same trait.

use std::time::Duration;

use netbridge::registry::backend::RegistryBackend;
use netbridge::registry::conformance;
use netbridge::registry::etcd::Etcd;
use specvm_tests::etcd::EtcdCluster;
use specvm_tests::record_skip;

/// An etcd for one test, or `None` after recording the skip.
fn etcd_or_skip(test: &str, members: usize) -> Option<EtcdCluster> {
    match EtcdCluster::start(test, members) {
        Ok(c) => Some(c),
        Err(why) => {
            record_skip(test, &why);
            None
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn client(c: &EtcdCluster, prefix: &str) -> Etcd {
    Etcd::connect(&c.endpoints(), prefix, Duration::from_secs(2))
        .await
        .expect("an etcd client")
}

#[test]
fn etcd_registry_keeps_the_registry_rules() {
    let test = "registry_etcd::etcd_registry_keeps_the_registry_rules";
    let Some(c) = etcd_or_skip(test, 1) else { return };
    rt().block_on(async {
        let r = client(&c, "/t1/").await;
        conformance::start_join_resolve_watch(&r).await.unwrap();
        let r = client(&c, "/t2/").await;
        conformance::join_after_outcome_returns_it(&r).await.unwrap();
        let r = client(&c, "/t3/").await;
        conformance::replay_from_a_revision_is_exactly_once(&r).await.unwrap();
        // Two bridges: two clients of their own.
        let a = client(&c, "/t4/").await;
        let b = client(&c, "/t4/").await;
        conformance::lease_expiry_aborts_once_with_two_bridges_racing(&a, &b)
            .await
            .unwrap();
        assert_eq!(a.kind(), "etcd");
    });
}
