//! Issue 12, findings 2 and 5: a port may carry, start and join only the
//! speculation ids it has a right to (`docs/netbridge.md`, "Which ids a
//! port may use"). Each test reproduces one finding on the bridge core
//! (`netbridge::bridge`, no I/O), with real IPv4 frames and the codec.

use netbridge::bridge::{Bridge, Send, UNACKED_MAX};
use netbridge::registry::IDS_PER_PORT;
use netbridge::tags;
use specwire::codec;
use specwire::protocol::{Control, Id, Outcome};

fn id(vm: u32, seq: u32) -> Id {
    Id::new(vm, seq)
}

/// A UDP/IPv4 broadcast from host `src`, tagged with `tags`.
fn udp(src: u8, tags: &[Id]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, src], [0xff; 6])
        .ipv4([10, 0, 0, src], [10, 0, 0, 255], 64)
        .udp(1000, 2000);
    let mut f = Vec::new();
    b.write(&mut f, b"is this tag yours?")
        .expect("building a frame");
    codec::retag(&f, tags).expect("tagging")
}

/// The ids a frame is tagged with.
fn tags_of(f: &[u8]) -> Vec<Id> {
    tags::read(f).expect("a frame the bridge queued parses")
}

fn bridge(vms: &[(u64, u32)]) -> Bridge {
    let mut b = Bridge::new(tags::read, tags::strip);
    for &(port, vm) in vms {
        b.add_port(port, vm, true).expect("a fresh VM id");
    }
    b
}

fn started(b: &mut Bridge, port: u64, id: Id) {
    b.control(port, Control::Started { id });
}

fn abort(b: &mut Bridge, port: u64, id: Id) -> Vec<Send> {
    b.control(
        port,
        Control::Resolved {
            id,
            outcome: Outcome::Abort,
        },
    )
    .0
}

fn decided(port: u64, id: Id, outcome: Outcome, seq: u64) -> Send {
    Send::Control(port, Control::decided(id, outcome, seq))
}

// Finding: a client said hello as VM 77 and sent frames tagged 99:1; the
// receiver joined, and VM 99's abort rolled it back.
#[test]
fn a_port_cannot_carry_an_id_its_vm_neither_started_nor_joined() {
    let mut b = bridge(&[(1, 77), (2, 99), (3, 5)]);
    let theirs = id(99, 1);
    started(&mut b, 2, theirs);
    let forged = udp(77, &[theirs]);
    b.ingress(1, forged.clone());
    assert_eq!(
        b.pop(3),
        Some(codec::strip(&forged).unwrap()),
        "the receiver got 99:1 from VM 77"
    );
    assert_eq!(b.counters(1).unwrap().forged, 1);
    assert!(b.pop(2).is_some(), "flooded to VM 99 too");
    // It never saw 99:1, so it cannot join it, and 99's abort is not its.
    let (sends, _) = b.control(3, Control::Joined { ids: vec![theirs] });
    assert!(sends.is_empty(), "{sends:?}");
    assert!(abort(&mut b, 2, theirs).is_empty());
    // A tag with the sender's own id beside a forged one keeps the own id.
    let ours = id(77, 1);
    started(&mut b, 1, ours);
    let other = id(99, 2);
    started(&mut b, 2, other);
    b.ingress(1, udp(77, &[ours, other]));
    assert_eq!(tags_of(&b.pop(3).unwrap()), vec![ours]);
    assert_eq!(tags_of(&b.pop(2).unwrap()), vec![ours]);
    assert_eq!(b.counters(1).unwrap().forged, 2);
}

// Finding: a frame tagged 4242:1, with no VM 4242 anywhere, made two VMs
// join for ever.
#[test]
fn an_id_whose_owner_is_not_connected_counts_as_aborted() {
    let mut b = bridge(&[(1, 1), (2, 2), (3, 3)]);
    let ghost = id(4242, 1);
    let forged = udp(1, &[ghost]);
    b.ingress(1, forged.clone());
    assert_eq!(b.pop(2), Some(codec::strip(&forged).unwrap()));
    assert_eq!(b.pop(3), Some(codec::strip(&forged).unwrap()));
    // Joining it anyway hears at once that it aborted; nothing is kept.
    for port in [2, 3] {
        let (sends, _) = b.control(port, Control::Joined { ids: vec![ghost] });
        assert_eq!(sends, vec![decided(port, ghost, Outcome::Abort, 1)]);
    }
    assert_eq!(b.speculations(), vec![]);
    // A fake port that claims VM 4242 later decides nothing of it.
    b.add_port(9, 4242, true).unwrap();
    let (sends, _) = b.control(
        9,
        Control::Resolved {
            id: ghost,
            outcome: Outcome::Commit,
        },
    );
    assert!(sends.is_empty(), "{sends:?}");
}

// Finding: any port could say `started` or `joined` for 7:4294967295; VM
// 7's next hello got next_seq 4294967295, and its second speculation
// wrapped to 7:1, already decided as aborted.
#[test]
fn only_a_vm_moves_its_own_sequence_numbers_and_they_never_wrap() {
    let mut b = bridge(&[(1, 1), (2, 2)]);
    let last = id(7, u32::MAX);
    started(&mut b, 2, last);
    b.control(2, Control::Joined { ids: vec![last] });
    assert_eq!(b.add_port(7, 7, true), Ok(1), "VM 7's ids were poisoned");
    assert_eq!(b.speculations(), vec![]);
    // VM 7's own ids go forwards only: a repeat or a step back is refused.
    started(&mut b, 7, id(7, 3));
    for (n, stale) in [id(7, 3), id(7, 2), id(7, 0)].into_iter().enumerate() {
        started(&mut b, 7, stale);
        assert_eq!(b.counters(7).unwrap().refused, n as u64 + 1, "{stale:#x}");
    }
    assert_eq!(b.speculations(), vec![("7:3".to_string(), vec![])]);
    // It may use its last number; then it may not wrap.
    started(&mut b, 7, last);
    started(&mut b, 7, id(7, 1));
    assert_eq!(
        b.speculations(),
        vec![
            ("7:3".to_string(), vec![]),
            ("7:4294967295".to_string(), vec![])
        ]
    );
    b.remove_port(7);
    assert!(
        b.add_port(8, 7, true).is_err(),
        "VM 7 has used every number: its hello is refused, not wrapped"
    );
}

// Finding: a VM that joined 5 unowned ids could not send IPv4 any more;
// after 64 its own speculate failed with the stack full.
#[test]
fn forged_ids_never_reach_a_receivers_dependency_set() {
    let mut b = bridge(&[(1, 77), (2, 2)]);
    for vm in 1000..1064 {
        b.ingress(1, udp(77, &[id(vm, 1)]));
        let f = b.pop(2).expect("the frame is switched");
        assert_eq!(tags_of(&f), Vec::<Id>::new(), "VM 2 would join {vm}:1");
    }
    assert_eq!(b.counters(1).unwrap().forged, 64);
    assert_eq!(b.speculations(), vec![]);
}

// Finding: one port joining 1M ids of owners that never connected added
// 178 MB, still held after the port left.
#[test]
fn ids_per_port_are_bounded_and_forgotten_when_the_port_leaves() {
    let mut b = bridge(&[(1, 1), (2, 2)]);
    for batch in 0..100u32 {
        let ids = (0..1000).map(|i| id(5000 + batch, i + 1)).collect();
        b.control(1, Control::Joined { ids });
    }
    let ids = (0..1000).map(|i| id(2, i + 1)).collect();
    b.control(1, Control::Joined { ids });
    for seq in 1..=1000 {
        started(&mut b, 1, id(1, seq));
    }
    let held = b.speculations().len();
    assert!(held <= 256, "the bridge tracks {held} ids for one port");
    assert_eq!(b.usage(1).unwrap().ids, IDS_PER_PORT);
    assert_eq!(b.open_ids(), IDS_PER_PORT);
    // Ids of absent owners are told abort, as far as the port's unacked
    // outcomes go; the rest, ids never sent to it and its own past the
    // limit, are refused and counted.
    assert_eq!(b.unacked(1), UNACKED_MAX);
    let refused = (100_000 - UNACKED_MAX) + 1000 + (1000 - IDS_PER_PORT);
    assert_eq!(b.counters(1).unwrap().refused, refused as u64);
    b.remove_port(1);
    assert_eq!(b.speculations(), vec![], "ids outlived their port");
    assert_eq!((b.open_ids(), b.usage(2).unwrap().ids), (0, 0));
}
