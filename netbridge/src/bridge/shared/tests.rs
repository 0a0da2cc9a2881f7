//! The bridge with a shared registry: what it asks of the registry, and
//! that it applies only what the registry says, once. (The link to a real
//! registry is tested in `tests/tests/registry_etcd.rs`.)

use super::super::{Bridge, Send};
use crate::protocol::{Control, Decision, Id, Outcome};
use crate::registry::link::Op;

/// Test frames: dst(6) src(6) then a tag list as text "t:1,2" (as in
/// `bridge/tests.rs`).
fn frame(dst: u8, src: u8, tags: &[Id]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src];
    let t: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    f.extend_from_slice(format!("t:{}", t.join(",")).as_bytes());
    f
}

fn read(f: &[u8]) -> Result<Vec<Id>, String> {
    let s = std::str::from_utf8(f.get(12..).unwrap_or_default()).map_err(|e| e.to_string())?;
    let list = s.strip_prefix("t:").ok_or("no tag list")?;
    list.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().map_err(|_| "bad id".to_string()))
        .collect()
}

fn strip(f: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = f[..12].to_vec();
    v.extend_from_slice(b"t:");
    Ok(v)
}

const S: Id = Id::new(1, 1);

fn decided(port: u64, id: Id, outcome: Outcome, seq: u64) -> Send {
    Send::Control(port, Control::decided(id, outcome, seq))
}

/// VM 1 on port 1 owns S, VM 2 on port 2 joined it.
fn joined() -> Bridge {
    let mut b = Bridge::new(read, strip).with_shared_registry();
    assert!(b.is_shared());
    b.add_port(1, 1, true).unwrap();
    b.add_port(2, 2, true).unwrap();
    b.control(1, Control::Started { id: S });
    assert_eq!(b.ingress(1, frame(2, 1, &[S])), vec![2]);
    b.control(2, Control::Joined { ids: vec![S] });
    assert_eq!(
        b.take_ops(),
        vec![
            Op::VmUp { vm: 1 },
            Op::VmUp { vm: 2 },
            Op::Start { vm: 1, id: S },
            Op::Join { port: 2, id: S },
        ]
    );
    b
}

#[test]
fn an_outcome_waits_for_the_registry_and_is_applied_once() {
    let mut b = joined();
    let (sends, _) = b.control(
        1,
        Control::Resolved {
            id: S,
            outcome: Outcome::Commit,
        },
    );
    assert!(
        sends.is_empty(),
        "told before the registry had it: {sends:?}"
    );
    assert_eq!(b.outcome(S), None);
    assert_eq!(
        b.take_ops(),
        vec![Op::Resolve {
            id: S,
            outcome: Outcome::Commit
        }]
    );
    let d = [Decision {
        id: S,
        outcome: Outcome::Commit,
    }];
    let (sends, _) = b.outcome_shared(&d);
    assert_eq!(sends, vec![decided(2, S, Outcome::Commit, 1)]);
    assert_eq!(b.outcome(S), Some(Outcome::Commit));
    // The watch and the resolve's answer both bring it: applied once.
    assert!(b.outcome_shared(&d).0.is_empty());
    // A second resolved writes nothing.
    b.control(
        1,
        Control::Resolved {
            id: S,
            outcome: Outcome::Abort,
        },
    );
    assert!(b.take_ops().is_empty());
}

#[test]
fn a_refused_start_aborts_the_owner_and_its_members() {
    let mut b = joined();
    let (sends, _) = b.refuse_start(S);
    assert_eq!(
        sends,
        vec![
            decided(2, S, Outcome::Abort, 1),
            // The owner is told why: its guest sees "refused".
            Send::Control(
                1,
                Control::Decided {
                    id: S,
                    outcome: Outcome::Abort,
                    seq: 1,
                    refused: true,
                },
            ),
        ]
    );
    let events = b.take_events();
    assert!(events
        .iter()
        .any(|e| e.event == "refused" && e.id.as_deref() == Some("1:1") && e.port == 1));
    // A frame tagged with it is dropped from now on (rule 10).
    assert!(b.ingress(1, frame(2, 1, &[S])).is_empty());
}

#[test]
fn an_owner_that_goes_writes_aborts_then_its_lease_ends() {
    let mut b = joined();
    let sends = b.remove_port(1);
    assert!(
        sends.is_empty(),
        "members told before the registry: {sends:?}"
    );
    assert_eq!(
        b.take_ops(),
        vec![
            Op::Resolve {
                id: S,
                outcome: Outcome::Abort
            },
            Op::VmDown { vm: 1 }
        ]
    );
    let (sends, _) = b.outcome_shared(&[Decision {
        id: S,
        outcome: Outcome::Abort,
    }]);
    assert_eq!(sends, vec![decided(2, S, Outcome::Abort, 1)]);
    // A member that goes writes nothing.
    b.remove_port(2);
    assert_eq!(b.take_ops(), vec![Op::VmDown { vm: 2 }]);
}

#[test]
fn an_absent_owner_is_the_registrys_to_judge() {
    // VM 9 is on another bridge: a member that resumes its id is trusted
    // and the join recorded, where the embedded registry would abort it
    // once its recovery is over.
    let remote = Id::new(9, 4);
    let mut b = Bridge::new(read, strip).with_shared_registry();
    b.add_port(2, 2, true).unwrap();
    assert!(b.end_recovery().is_empty());
    let (sends, _) = b.control(
        2,
        Control::Resume {
            started: vec![],
            joined: vec![remote],
            outcomes: vec![],
        },
    );
    assert!(sends.is_empty(), "{sends:?}");
    assert_eq!(
        b.take_ops(),
        vec![
            Op::VmUp { vm: 2 },
            Op::Join {
                port: 2,
                id: remote
            }
        ]
    );
    let (sends, _) = b.outcome_shared(&[Decision {
        id: remote,
        outcome: Outcome::Commit,
    }]);
    assert_eq!(sends, vec![decided(2, remote, Outcome::Commit, 1)]);

    let mut embedded = Bridge::new(read, strip);
    embedded.add_port(2, 2, true).unwrap();
    embedded.end_recovery();
    let (sends, _) = embedded.control(
        2,
        Control::Resume {
            started: vec![],
            joined: vec![remote],
            outcomes: vec![],
        },
    );
    assert_eq!(sends, vec![decided(2, remote, Outcome::Abort, 1)]);
    assert!(embedded.take_ops().is_empty());
}

#[test]
fn outcomes_of_ids_nobody_here_holds_are_remembered_quietly() {
    let mut b = Bridge::new(read, strip).with_shared_registry();
    b.add_port(2, 2, true).unwrap();
    b.take_events();
    let other = Id::new(7, 1);
    let (sends, woke) = b.outcome_shared(&[Decision {
        id: other,
        outcome: Outcome::Abort,
    }]);
    assert!(sends.is_empty() && woke.is_empty());
    assert!(b.take_events().is_empty());
    // A late join learns it at once.
    let (sends, _) = b.control(2, Control::Joined { ids: vec![other] });
    assert_eq!(sends, vec![decided(2, other, Outcome::Abort, 1)]);
}
