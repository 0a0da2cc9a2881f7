//! The registry's unit tests.
use super::*;

const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;

fn id(vm: u32, seq: u32) -> Id {
    Id::new(vm, seq)
}

fn reg() -> Registry {
    let mut r = Registry::new();
    for (port, vm) in [(10, A), (20, B), (30, C)] {
        assert_eq!(r.add_port(port, vm), Ok(1));
    }
    r
}

/// `port` is sent `id` and joins it.
fn join(r: &mut Registry, port: PortId, id: Id) {
    let new = r.unheld(port, &[id]);
    r.offer(port, &new);
    assert_eq!(r.joined(port, &[id]).joined, vec![id]);
}

#[test]
fn the_owner_decides_and_members_hear_it() {
    let mut r = reg();
    let s = id(A, 1);
    r.started(10, s).unwrap();
    join(&mut r, 20, s);
    join(&mut r, 30, s);
    let n = r.resolved(10, s, Outcome::Commit).unwrap();
    assert_eq!(n.len(), 2);
    assert!(n.iter().all(|x| x.outcome == Outcome::Commit && x.id == s));
    assert_eq!(r.outcome(s), Some(Outcome::Commit));
    assert!(
        r.resolved(10, s, Outcome::Abort).unwrap().is_empty(),
        "decided once"
    );
    assert_eq!(r.outcome(s), Some(Outcome::Commit));
    assert_eq!((r.held(10), r.held(20), r.held(30)), (0, 0, 0));
}

#[test]
fn sequence_numbers_continue_past_what_the_vm_started() {
    let mut r = reg();
    assert_eq!(r.next_seq(A), Some(1));
    r.started(10, id(A, 7)).unwrap();
    assert_eq!(
        r.started(20, id(A, 9)),
        Err(RegistryError::NotOwner {
            port: 20,
            vm: B,
            id: id(A, 9),
            owner: A
        })
    );
    assert_eq!(r.joined(20, &[id(A, 9)]).refused.len(), 1);
    assert_eq!(r.next_seq(A), Some(8), "only VM 1 moves its numbers");
    assert_eq!(
        r.started(10, id(A, 7)),
        Err(RegistryError::StaleSeq {
            id: id(A, 7),
            last: 7
        })
    );
    r.port_gone(10);
    assert!(!r.vm_connected(A));
    assert_eq!(r.add_port(11, A), Ok(8), "remembered after the VM left");
    r.started(11, id(A, u32::MAX)).unwrap();
    assert_eq!(r.next_seq(A), None);
    r.port_gone(11);
    assert_eq!(r.add_port(12, A), Err(RegistryError::SeqsUsedUp { vm: A }));
    assert_eq!(r.add_port(13, B), Err(RegistryError::VmConnected { vm: B }));
}

#[test]
fn only_the_owner_decides() {
    let mut r = reg();
    let s = id(A, 1);
    r.started(10, s).unwrap();
    join(&mut r, 20, s);
    assert!(matches!(
        r.resolved(20, s, Outcome::Abort),
        Err(RegistryError::NotOwner { .. })
    ));
    assert!(r.is_active(s));
    assert_eq!(
        r.resolved(10, id(A, 2), Outcome::Abort),
        Err(RegistryError::NotOpen {
            port: 10,
            id: id(A, 2)
        }),
        "never started"
    );
}

#[test]
fn a_port_joins_only_what_it_was_sent() {
    let mut r = reg();
    let s = id(A, 1);
    r.started(10, s).unwrap();
    let j = r.joined(20, &[s]);
    assert_eq!(j.refused, vec![RegistryError::NotSent { port: 20, id: s }]);
    assert!(!r.may_carry(20, s));
    assert!(r.may_carry(10, s), "the owner carries its own");
    join(&mut r, 20, s);
    assert!(r.may_carry(20, s));
    assert!(!r.may_carry(30, s));
    assert_eq!(r.snapshot(), vec![(s, vec![20])]);
}

#[test]
fn a_late_joiner_learns_the_outcome() {
    let mut r = reg();
    let s = id(A, 1);
    r.started(10, s).unwrap();
    r.resolved(10, s, Outcome::Abort).unwrap();
    let ghost = id(4242, 1);
    assert_eq!(
        r.joined(20, &[s, ghost]).late,
        vec![
            Notice {
                port: 20,
                id: s,
                outcome: Outcome::Abort
            },
            Notice {
                port: 20,
                id: ghost,
                outcome: Outcome::Abort
            }
        ],
        "an id of a VM not connected counts as aborted"
    );
    assert_eq!(r.open_ids(), 0);
}

#[test]
fn ids_per_port_are_bounded() {
    let mut r = reg();
    for seq in 1..=IDS_PER_PORT as u32 {
        r.started(20, id(B, seq)).unwrap();
    }
    let over = id(B, IDS_PER_PORT as u32 + 1);
    assert_eq!(
        r.started(20, over),
        Err(RegistryError::TooManyIds { port: 20, id: over })
    );
    assert_eq!(r.room(20), 0);
    r.started(10, id(A, 1)).unwrap();
    assert_eq!(r.unheld(20, &[id(A, 1), id(B, 1)]), vec![id(A, 1)]);
    r.port_gone(20);
    r.resolved(10, id(A, 1), Outcome::Commit).unwrap();
    assert_eq!((r.open_ids(), r.held(10)), (0, 0));
}

#[test]
fn owner_death_aborts_member_death_does_not() {
    let mut r = reg();
    let a1 = id(A, 1);
    let b1 = id(B, 1);
    r.started(10, a1).unwrap();
    r.started(20, b1).unwrap();
    join(&mut r, 20, a1);
    join(&mut r, 10, b1);
    join(&mut r, 30, a1);
    join(&mut r, 30, b1);
    let (aborted, notices) = r.port_gone(30);
    assert!(aborted.is_empty(), "a member's death aborts nothing");
    assert!(notices.is_empty());
    let (aborted, notices) = r.port_gone(10);
    assert_eq!(aborted, vec![a1]);
    assert_eq!(
        notices,
        vec![Notice {
            port: 20,
            id: a1,
            outcome: Outcome::Abort
        }]
    );
    assert!(r.is_active(b1), "b1's owner lives");
    assert_eq!(r.snapshot(), vec![(b1, vec![])]);
    assert_eq!(r.held(20), 1);
}

fn decision(id: Id, outcome: Outcome) -> Decision {
    Decision { id, outcome }
}

/// A bridge restart: a new registry, the member resumes before the owner
/// comes back; the owner's resume decides (commit) and the member hears it
/// once; a second resume is refused.
#[test]
fn a_restarted_registry_learns_from_the_vmms() {
    let s = id(A, 3);
    let mut r = Registry::new();
    r.add_port(20, B).unwrap();
    let m = r.resume(20, &[], &[s], &[]);
    assert_eq!((m.joined, m.notices), (vec![s], vec![]), "kept for A");
    assert!(r.is_active(s));
    r.add_port(10, A).unwrap();
    let o = r.resume(10, &[], &[], &[decision(s, Outcome::Commit)]);
    assert_eq!(o.decided, vec![decision(s, Outcome::Commit)]);
    assert_eq!(
        o.notices,
        vec![Notice {
            port: 20,
            id: s,
            outcome: Outcome::Commit
        }]
    );
    assert_eq!(r.next_seq(A), Some(4), "numbers stay past the decided one");
    assert_eq!(
        r.resume(10, &[], &[], &[decision(s, Outcome::Abort)])
            .refused,
        vec![RegistryError::ResumedTwice { port: 10 }]
    );
    assert_eq!(r.outcome(s), Some(Outcome::Commit));
    assert_eq!((r.held(10), r.held(20), r.open_ids()), (0, 0, 0));
}

/// The owner resumes its open id first; the member joins it again; the
/// owner's later abort reaches the member.
#[test]
fn an_owner_resumes_its_open_ids() {
    let s = id(A, 1);
    let mut r = Registry::new();
    r.add_port(10, A).unwrap();
    r.add_port(20, B).unwrap();
    assert_eq!(r.resume(10, &[s], &[], &[]).started, vec![s]);
    assert!(r.started(10, s).is_err(), "a repeat is refused");
    assert_eq!(r.resume(20, &[], &[s], &[]).joined, vec![s]);
    assert!(r.may_carry(20, s));
    let n = r.resolved(10, s, Outcome::Abort).unwrap();
    assert_eq!(n.len(), 1);
    assert_eq!((r.held(10), r.held(20)), (0, 0));
}

/// An owner that does not come back within the recovery aborts what its
/// members kept for it; after the recovery, an unknown id of an absent
/// owner is aborted at once; an id decided while the port was away is
/// told to its owner.
#[test]
fn owners_that_do_not_come_back_abort() {
    let (s, t) = (id(A, 1), id(C, 1));
    let mut r = Registry::new();
    r.add_port(20, B).unwrap();
    r.resume(20, &[], &[s], &[]);
    let (aborted, notices) = r.end_recovery();
    assert_eq!(aborted, vec![s]);
    assert_eq!(notices.len(), 1);
    r.add_port(21, C).unwrap();
    r.started(21, t).unwrap();
    r.port_gone(21);
    r.add_port(22, C).unwrap();
    let back = r.resume(22, &[t], &[], &[]);
    assert_eq!(
        back.notices,
        vec![Notice {
            port: 22,
            id: t,
            outcome: Outcome::Abort
        }],
        "the owner learns its id was aborted"
    );
    r.add_port(30, 9).unwrap();
    let late = r.resume(30, &[], &[id(A, 2), id(B, 1)], &[]);
    assert_eq!(late.notices.len(), 1, "A is absent: aborted");
    assert_eq!(late.joined, vec![id(B, 1)], "B is connected: kept for it");
    assert!(late.refused.is_empty());
}
