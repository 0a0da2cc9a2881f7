//! Unit tests of the bridge core, with frames of their own: a MAC header,
//! then the tag as text (`t:1,2`).

use super::*;
use crate::registry::IDS_PER_PORT;

/// Test frames: dst(6) src(6) then a tag list as text "t:1,2".
pub(super) fn frame(dst: u8, src: u8, tags: &[Id]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src];
    let t: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    f.extend_from_slice(format!("t:{}", t.join(",")).as_bytes());
    f
}

pub(super) fn read(f: &[u8]) -> Result<Vec<Id>, String> {
    let s = std::str::from_utf8(f.get(12..).unwrap_or_default()).map_err(|e| e.to_string())?;
    let list = s.strip_prefix("t:").ok_or("no tag list")?;
    list.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().map_err(|_| "bad id".to_string()))
        .collect()
}

pub(super) fn strip(f: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = f[..12].to_vec();
    v.extend_from_slice(b"t:");
    Ok(v)
}

pub(super) fn write(f: &[u8], ids: &[Id]) -> Result<Vec<u8>, String> {
    Ok(frame(f[5], f[11], ids))
}

const S: Id = Id::new(1, 1); // VM 1's first speculation

fn bridge() -> Bridge {
    let mut b = Bridge::new(read, strip).with_tag_writer(write);
    assert_eq!(b.add_port(1, 1, true), Ok(1));
    b.add_port(2, 2, true).unwrap();
    b.add_port(3, 3, false).unwrap(); // an uplink
    assert!(b.add_port(4, 1, true).is_err(), "VM 1 is connected already");
    b
}

/// `bridge()`, with S started by VM 1.
fn started() -> Bridge {
    let mut b = bridge();
    b.control(1, Control::Started { id: S });
    b
}

fn decide(b: &mut Bridge, port: PortId, id: Id, outcome: Outcome) -> (Vec<Send>, Vec<PortId>) {
    b.control(port, Control::Resolved { id, outcome })
}

fn decided(port: PortId, id: Id, outcome: Outcome, seq: u64) -> Send {
    Send::Control(port, Control::decided(id, outcome, seq))
}

#[test]
fn learns_macs_and_floods_unknown() {
    let mut b = bridge();
    assert_eq!(b.ingress(1, frame(9, 1, &[])), vec![2, 3], "unknown: flood");
    assert_eq!(b.ingress(2, frame(1, 2, &[])), vec![1], "learned");
    assert_eq!(b.pop(1), Some(frame(1, 2, &[])));
    assert_eq!(b.counters(1).unwrap().rx, 1);
}

#[test]
fn output_commit_holds_until_commit() {
    let mut b = started();
    b.ingress(3, frame(3, 3, &[])); // learn the uplink's MAC
    assert!(b.ingress(1, frame(3, 1, &[S])).is_empty(), "held");
    assert_eq!(b.pop(3), None);
    let (sends, woke) = decide(&mut b, 1, S, Outcome::Commit);
    assert!(sends.is_empty());
    assert_eq!(woke, vec![3]);
    assert_eq!(
        b.pop(3),
        Some(strip(&frame(3, 1, &[S])).unwrap()),
        "released stripped"
    );
    assert_eq!(b.counters(3).unwrap().released, 1);
}

#[test]
fn abort_drops_queued_and_held_frames_and_later_ones() {
    let mut b = started();
    b.ingress(1, frame(9, 1, &[S])); // flood: queued to 2, held for 3
    b.control(2, Control::Joined { ids: vec![S] });
    let (sends, _) = decide(&mut b, 1, S, Outcome::Abort);
    assert_eq!(sends, vec![decided(2, S, Outcome::Abort, 1)]);
    assert_eq!(b.pop(2), None, "anti-message: the queued frame is gone");
    assert_eq!(b.counters(3).unwrap().dropped_aborted, 1);
    assert!(
        b.ingress(1, frame(9, 1, &[S])).is_empty(),
        "late frames of an aborted id are dropped"
    );
    assert_eq!(b.unacked(2), 1);
    b.control(2, Control::Ack { seq: 1 });
    assert_eq!(b.unacked(2), 0);
}

#[test]
fn a_non_owner_cannot_decide() {
    let mut b = started();
    b.ingress(1, frame(9, 1, &[S]));
    b.control(2, Control::Joined { ids: vec![S] });
    let (sends, _) = decide(&mut b, 2, S, Outcome::Abort);
    assert!(sends.is_empty());
    assert_eq!(b.speculations(), vec![("1:1".to_string(), vec![2])]);
    assert_eq!(b.counters(2).unwrap().refused, 1);
}

#[test]
fn owner_disconnect_aborts_and_tells_members() {
    let mut b = started();
    b.ingress(1, frame(9, 1, &[S]));
    b.control(2, Control::Joined { ids: vec![S] });
    let sends = b.remove_port(1);
    assert_eq!(sends, vec![decided(2, S, Outcome::Abort, 1)]);
    let ev = b.take_events();
    assert!(ev
        .iter()
        .any(|e| e.event == "aborted" && e.id.as_deref() == Some("1:1")));
    assert_eq!((b.open_ids(), b.usage(2).unwrap().ids), (0, 0));
}

#[test]
fn the_uplink_takes_no_vm_id_and_its_tags_are_stripped_as_forged() {
    let mut b = started();
    b.add_uplink(5);
    b.add_uplink(6);
    assert_eq!(b.speculations(), vec![("1:1".to_string(), vec![])]);
    // A tag from the host is forged: stripped, then switched untagged.
    assert_eq!(b.ingress(5, frame(9, 5, &[S])), vec![1, 2, 3, 6]);
    assert_eq!(b.pop(1), Some(strip(&frame(9, 5, &[S])).unwrap()));
    assert_eq!(b.pop(6), Some(strip(&frame(9, 5, &[S])).unwrap()));
    let c = b.counters(5).unwrap();
    assert_eq!((c.rx, c.forged, c.dropped_malformed), (1, 1, 0));
    // A VMM port's tag is believed: held for the uplinks (rule 11).
    assert_eq!(b.ingress(1, frame(9, 1, &[S])), vec![2]);
    assert_eq!(b.counters(5).unwrap().held, 1);
    assert_eq!(b.counters(1).unwrap().forged, 0);
    // The uplink has no ids: it starts and joins nothing.
    b.control(5, Control::Started { id: Id::new(5, 1) });
    b.control(5, Control::Joined { ids: vec![S] });
    assert_eq!(b.counters(5).unwrap().refused, 2);
    // The uplink going away aborts nothing.
    assert!(b.remove_port(5).is_empty());
    assert_eq!(b.pop(5), None);
}

#[test]
fn forgeries_are_logged_and_announced_thinned_out() {
    let mut b = bridge();
    b.take_events();
    for _ in 0..100 {
        b.ingress(2, frame(9, 2, &[S]));
    }
    let forged = b
        .take_events()
        .iter()
        .filter(|e| e.event == "forged")
        .count();
    assert_eq!(forged, 7, "the 1st, 2nd, 4th... 64th");
    assert_eq!(b.counters(2).unwrap().forged, 100);
}

#[test]
fn a_frame_past_the_receivers_id_budget_is_dropped_before_it_joins() {
    let mut b = bridge();
    b.add_port(7, 7, true).unwrap();
    b.ingress(2, frame(9, 2, &[])); // learn 2's MAC: frames to 2 go to 2 only
    let ids: Vec<Id> = (1..=200)
        .map(|s| Id::new(1, s))
        .chain((1..=100).map(|s| Id::new(7, s)))
        .collect();
    for &id in &ids {
        let owner = PortId::from(id.vm);
        b.control(owner, Control::Started { id });
        b.ingress(owner, frame(2, owner as u8, &[id]));
    }
    let u = b.usage(2).unwrap();
    assert_eq!((u.queued, u.ids), (IDS_PER_PORT, IDS_PER_PORT));
    assert_eq!(
        b.counters(2).unwrap().dropped_ids,
        300 - IDS_PER_PORT as u64
    );
    // Joining what it got keeps the count; a decision frees room.
    b.control(2, Control::Joined { ids: vec![ids[0]] });
    assert_eq!(b.usage(2).unwrap().ids, IDS_PER_PORT);
    decide(&mut b, 1, ids[0], Outcome::Commit);
    assert_eq!(b.usage(2).unwrap().ids, IDS_PER_PORT - 1);
    assert_eq!(b.ingress(7, frame(2, 7, &[ids[299]])), vec![2]);
    // Its own ids and ids it holds already cost nothing more.
    b.control(2, Control::Started { id: Id::new(2, 1) });
    assert_eq!(b.counters(2).unwrap().refused, 1, "no room to start");
    assert_eq!(b.ingress(1, frame(2, 1, &[ids[1]])), vec![2]);
    b.remove_port(1);
    b.remove_port(7);
    assert_eq!((b.open_ids(), b.usage(2).unwrap().ids), (0, 0));
}

#[test]
fn unacknowledged_outcomes_are_bounded() {
    let mut b = started();
    decide(&mut b, 1, S, Outcome::Abort);
    for _ in 0..3 {
        let ids = vec![S; UNACKED_MAX];
        b.control(2, Control::Joined { ids });
    }
    assert_eq!(b.unacked(2), UNACKED_MAX);
    assert_eq!(b.counters(2).unwrap().refused, 2 * UNACKED_MAX as u64);
    b.control(2, Control::Ack { seq: 1 });
    let (sends, _) = b.control(2, Control::Joined { ids: vec![S] });
    assert_eq!(sends.len(), 1, "room for one more");
}

#[test]
fn the_mac_table_is_bounded_per_port() {
    let mut b = bridge();
    let from = |n: usize| {
        let mut f = frame(9, 1, &[]);
        f[6..12].copy_from_slice(&[2, 1, 0, 0, (n >> 8) as u8, n as u8]);
        f
    };
    for n in 0..MACS_PER_PORT + 10 {
        b.ingress(1, from(n));
    }
    assert_eq!(b.macs.len(), MACS_PER_PORT);
    while b.pop(3).is_some() {} // the floods filled its queue
    let to = |n: usize| {
        let mut f = frame(0, 2, &[]);
        f[0..6].copy_from_slice(&from(n)[6..12]);
        f
    };
    assert_eq!(b.ingress(2, to(0)), vec![1], "learned");
    assert_eq!(b.ingress(2, to(MACS_PER_PORT + 5)), vec![1, 3], "flooded");
    // A MAC that moves to another port is counted there.
    b.ingress(3, from(0));
    assert_eq!((b.ports[&1].macs, b.ports[&3].macs), (MACS_PER_PORT - 1, 1));
    b.remove_port(1);
    assert_eq!(b.macs.len(), 2);
}

/// A frame of `len` bytes: `frame`'s, padded with empty list entries.
fn big(dst: u8, src: u8, tags: &[Id], len: usize) -> Vec<u8> {
    let mut f = frame(dst, src, tags);
    f.resize(len, b',');
    f
}

#[test]
fn queues_and_hold_buffers_are_bounded_in_bytes() {
    let mut b = started();
    b.ingress(2, frame(1, 2, &[])); // learn 2's MAC
    b.ingress(3, frame(1, 3, &[])); // and the uplink's
    while b.pop(2).is_some() {}
    let sixty_four_k = 64 << 10;
    for _ in 0..100 {
        b.ingress(1, big(2, 1, &[], sixty_four_k));
    }
    let u = b.usage(2).unwrap();
    assert_eq!(u.queued, QUEUE_BYTES_MAX / sixty_four_k);
    assert_eq!(u.queued_bytes, u.queued * sixty_four_k);
    assert_eq!(b.counters(2).unwrap().dropped_full, 100 - u.queued as u64);
    // Held for output commit: bounded in bytes too.
    for _ in 0..200 {
        b.ingress(1, big(3, 1, &[S], sixty_four_k));
    }
    let u = b.usage(3).unwrap();
    assert_eq!(u.held, HELD_BYTES_MAX / sixty_four_k);
    assert_eq!(u.held_bytes, u.held * sixty_four_k);
    assert_eq!(b.counters(3).unwrap().dropped_full, 200 - u.held as u64);
    // Popping frees room; a commit moves held frames into the queue,
    // as far as its byte budget goes.
    while b.pop(2).is_some() {}
    assert_eq!(b.usage(2).unwrap(), Usage::default());
    b.control(
        1,
        Control::Resolved {
            id: S,
            outcome: Outcome::Commit,
        },
    );
    let u = b.usage(3).unwrap();
    assert_eq!((u.held, u.held_bytes), (0, 0));
    // The test's strip() shortens frames to their header.
    assert_eq!(u.queued, u.queued_bytes / 14);
    assert_eq!(b.counters(3).unwrap().released, 128);
}

#[test]
fn purging_an_aborted_id_frees_its_bytes() {
    let mut b = started();
    b.ingress(3, frame(1, 3, &[]));
    b.ingress(1, big(3, 1, &[S], 1000));
    b.ingress(1, big(3, 1, &[], 500));
    let u = b.usage(3).unwrap();
    assert_eq!((u.held_bytes, u.queued_bytes), (1000, 500));
    b.control(
        1,
        Control::Resolved {
            id: S,
            outcome: Outcome::Abort,
        },
    );
    let u = b.usage(3).unwrap();
    assert_eq!((u.held_bytes, u.queued_bytes), (0, 500));
}

#[test]
fn malformed_frames_are_counted() {
    let mut b = bridge();
    let mut f = frame(9, 1, &[]);
    f.truncate(12);
    assert!(b.ingress(1, f).is_empty());
    assert_eq!(b.counters(1).unwrap().dropped_malformed, 1);
}

/// A restarted bridge: VM 2 resumes its membership of S before VM 1
/// comes back; a frame VM 2 sends tagged S is carried (held for the
/// uplink). VM 1 resumes with the commit it decided while the bridge was
/// away: VM 2 is told once, the held frame goes out.
#[test]
fn a_restarted_bridge_delivers_an_outcome_decided_while_it_was_away() {
    let mut b = Bridge::new(read, strip).with_tag_writer(write);
    b.add_port(2, 2, true).unwrap();
    b.add_port(3, 3, false).unwrap();
    let (sends, _) = b.control(
        2,
        Control::Resume {
            started: vec![],
            joined: vec![S],
            outcomes: vec![],
        },
    );
    assert!(sends.is_empty(), "nothing guessed: {sends:?}");
    b.ingress(3, frame(3, 3, &[]));
    assert!(
        b.ingress(2, frame(3, 2, &[S])).is_empty(),
        "held, not forged"
    );
    assert_eq!(b.counters(2).unwrap().forged, 0);
    b.add_port(1, 1, true).unwrap();
    let commit = crate::protocol::Decision {
        id: S,
        outcome: Outcome::Commit,
    };
    let resume = Control::Resume {
        started: vec![],
        joined: vec![],
        outcomes: vec![commit],
    };
    let (sends, woke) = b.control(1, resume.clone());
    assert_eq!(sends, vec![decided(2, S, Outcome::Commit, 1)]);
    assert_eq!(woke, vec![3]);
    assert_eq!(b.pop(3), Some(strip(&frame(3, 2, &[S])).unwrap()));
    assert!(b.end_recovery().is_empty());
    // Said again (a resume on a later connection): told nobody again.
    b.remove_port(1);
    b.add_port(4, 1, true).unwrap();
    assert_eq!(b.control(4, resume), (vec![], vec![]));
}

/// After the recovery, what a member kept open for an owner that never
/// came back is aborted, and the member told.
#[test]
fn the_end_of_recovery_aborts_what_absent_owners_left() {
    let mut b = Bridge::new(read, strip).with_tag_writer(write);
    b.add_port(2, 2, true).unwrap();
    b.control(
        2,
        Control::Resume {
            started: vec![],
            joined: vec![S],
            outcomes: vec![],
        },
    );
    assert_eq!(b.end_recovery(), vec![decided(2, S, Outcome::Abort, 1)]);
    assert_eq!(b.open_ids(), 0);
}
