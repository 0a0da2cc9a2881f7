//! Speculation across VMs: two bare guests on `netbridge`, the receiver
//! joining the sender's speculation implicitly and rolling back with it.

use std::time::Duration;

use specvm_tests::{bare_guest, skip_without_kvm, spawn_specvm, NetBridge};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the receiver (VM 2) and then the sender (VM 1, role `sender_arg`);
/// returns both outputs and the bridge's events.
fn exchange(name: &str, sender_arg: &str) -> (String, String, String) {
    let bridge = NetBridge::start(&format!("net-{name}"));
    let net = bridge.net_arg();
    let guest = bare_guest("net_spec");
    let guest = guest.to_str().expect("UTF-8 path");
    let mut rx = spawn_specvm(&[
        "run",
        "--bare",
        guest,
        "--guest-arg",
        "2",
        "--id",
        "2",
        "--net",
        &net,
    ]);
    rx.wait_for_line("net_spec: ready", TIMEOUT)
        .expect("receiver ready");
    let tx = spawn_specvm(&[
        "run",
        "--bare",
        guest,
        "--guest-arg",
        sender_arg,
        "--id",
        "1",
        "--net",
        &net,
    ]);
    let tx = tx.finish(TIMEOUT);
    let rx = rx.finish(TIMEOUT);
    tx.assert_status(0);
    rx.assert_status(0);
    std::thread::sleep(Duration::from_millis(200));
    (tx.stdout, rx.stdout, bridge.events())
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_receiver_rolls_back_with_the_senders_abort() {
    skip_without_kvm!();
    let (tx, rx, events) = exchange("abort", "1");
    assert!(tx.contains("net_spec: rolled back (reason 1)"), "{tx}");
    assert!(
        rx.contains("net_spec: received spec-2"),
        "the tagged frame was delivered: {rx}"
    );
    // After the rollback spec-2 never happened for the receiver.
    assert!(rx.contains("net_spec: final log 1 3\n"), "{rx}");
    for e in [
        r#"{"event":"started","id":"1:1""#,
        r#"{"event":"joined","id":"1:1""#,
        r#"{"event":"aborted","id":"1:1""#,
        r#"{"event":"acked","id":"1:1""#,
    ] {
        assert!(events.contains(e), "missing {e} in {events}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_receiver_keeps_what_the_sender_commits() {
    skip_without_kvm!();
    let (tx, rx, events) = exchange("commit", "3");
    assert!(tx.contains("net_spec: committed: Ok(())"), "{tx}");
    assert!(rx.contains("net_spec: final log 1 2 3\n"), "{rx}");
    assert!(
        events.contains(r#"{"event":"committed","id":"1:1""#),
        "{events}"
    );
    assert!(
        events.contains(r#"{"event":"joined","id":"1:1""#),
        "{events}"
    );
}
