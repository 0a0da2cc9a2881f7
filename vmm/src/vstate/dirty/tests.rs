//! Harvesting logic on rings and bitmaps held in ordinary memory (no KVM
//! needed), and the method choice on a real VM where `/dev/kvm` exists.

use super::*;
use crate::vstate::memory::RamLayout;

/// A ring of `entries` entries in a plain allocation, standing in for a
/// vCPU's mapping; KVM's side is played by [`publish`].
fn ring(entries: u32) -> (Vec<kvm_dirty_gfn>, RingMem) {
    let mut v = vec![kvm_dirty_gfn::default(); entries as usize];
    let r = RingMem {
        base: v.as_mut_ptr(),
        entries,
        mapped: false,
    };
    (v, r)
}

/// What KVM does when a vCPU writes a page: fills the next entry and
/// publishes it.
fn publish(v: &mut [kvm_dirty_gfn], index: &mut u32, slot: u32, offset: u64) {
    let n = v.len() as u32;
    let e = &mut v[(*index % n) as usize];
    assert_eq!(
        e.flags & GFN_DIRTY,
        0,
        "KVM never overwrites an unreset entry"
    );
    e.slot = slot;
    e.offset = offset;
    e.flags = GFN_DIRTY;
    *index += 1;
}

/// What `KVM_RESET_DIRTY_RINGS` does to harvested entries.
fn kvm_reset(v: &mut [kvm_dirty_gfn]) {
    for e in v.iter_mut().filter(|e| e.flags & GFN_RESET != 0) {
        e.flags = 0;
    }
}

fn collect(r: &RingMem, cursor: &mut u32) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    r.harvest(cursor, |s, o| out.push((s, o)));
    out
}

#[test]
fn a_harvest_takes_published_entries_once_marks_them_and_wraps_around() {
    let (mut v, r) = ring(4);
    let (mut kvm, mut cursor) = (0u32, 0u32);
    assert!(collect(&r, &mut cursor).is_empty(), "an empty ring");
    publish(&mut v, &mut kvm, 0, 10);
    publish(&mut v, &mut kvm, 1, 3);
    publish(&mut v, &mut kvm, 0, 11);
    assert_eq!(collect(&r, &mut cursor), vec![(0, 10), (1, 3), (0, 11)]);
    assert_eq!(cursor, 3);
    assert!(
        v[..3].iter().all(|e| e.flags == GFN_RESET),
        "harvested entries are marked"
    );
    assert_eq!(v[3].flags, 0);
    assert!(
        collect(&r, &mut cursor).is_empty(),
        "nothing is taken twice"
    );
    kvm_reset(&mut v);
    // Three more: the ring wraps to entries 0 and 1.
    publish(&mut v, &mut kvm, 0, 12);
    publish(&mut v, &mut kvm, 0, 13);
    publish(&mut v, &mut kvm, 0, 14);
    assert_eq!(collect(&r, &mut cursor), vec![(0, 12), (0, 13), (0, 14)]);
    assert_eq!(cursor, 6);
}

#[test]
fn a_harvest_stops_after_one_lap_of_a_full_ring() {
    let (mut v, r) = ring(4);
    let mut kvm = 0;
    for o in 0..4 {
        publish(&mut v, &mut kvm, 0, o);
    }
    let mut cursor = 0;
    assert_eq!(r.harvest(&mut cursor, |_, _| ()), 4);
    // Without a reset the entries stay marked, never dirty: no second lap.
    assert_eq!(r.harvest(&mut cursor, |_, _| ()), 0);
}

/// A layout of two ranges (guest RAM split around the PCI hole) for a
/// guest of `mib` MiB.
fn layout(mib: u64) -> RamLayout {
    RamLayout::new(mib << 20)
}

/// Rings in memory for `vcpus` vCPUs of a VM with `layout`; reset is not
/// called in these tests (it needs KVM), so the fd is /dev/null.
fn rings(vcpus: usize, entries: u32, layout: &RamLayout) -> (Vec<Vec<kvm_dirty_gfn>>, DirtyRings) {
    let mut mems = Vec::new();
    let mut rs = Vec::new();
    for _ in 0..vcpus {
        let (v, r) = ring(entries);
        mems.push(v);
        rs.push((r, Mutex::new(0)));
    }
    let d = DirtyRings {
        rings: rs,
        overflow: Mutex::default(),
        slot_pages: layout
            .ranges()
            .iter()
            .map(|r| r.size / PAGE_SIZE as u64)
            .collect(),
        vm: File::open("/dev/null").unwrap(),
    };
    (mems, d)
}

fn harvested(d: &DirtyRings, layout: &RamLayout) -> Vec<u64> {
    let mut out = Vec::new();
    d.harvest(layout, &mut |p| out.push(p));
    out
}

#[test]
fn ring_entries_become_file_pages_by_slot_and_strays_are_skipped() {
    let l = layout(4096);
    assert!(l.ranges().len() >= 2, "4 GiB is split around the PCI hole");
    let second = l.ranges()[1].pages().start;
    let (mut mems, d) = rings(2, 8, &l);
    let (mut k0, mut k1) = (0, 0);
    publish(&mut mems[0], &mut k0, 0, 5);
    publish(&mut mems[1], &mut k1, 1, 7);
    publish(&mut mems[1], &mut k1, 9, 0); // no such slot
    publish(
        &mut mems[1],
        &mut k1,
        0,
        l.ranges()[0].size / PAGE_SIZE as u64,
    ); // past its end
    publish(&mut mems[0], &mut k0, 1 << 16, 1); // another address space
    assert_eq!(harvested(&d, &l), vec![5, second + 7]);
    assert!(harvested(&d, &l).is_empty());
}

#[test]
fn a_full_ring_moves_to_the_overflow_which_the_next_harvest_returns() {
    let l = layout(256);
    let (mut mems, d) = rings(2, 4, &l);
    let mut k0 = 0;
    for o in [3, 4, 3 + 64, 200] {
        publish(&mut mems[0], &mut k0, 0, o);
    }
    // The vCPU thread's side of KVM_EXIT_DIRTY_RING_FULL (then a reset).
    assert_eq!(d.move_to_overflow(0), 4);
    kvm_reset(&mut mems[0]);
    assert_eq!(d.move_to_overflow(5), 0, "no such vCPU");
    // The guest runs on: the same page again (after the reset) and another.
    publish(&mut mems[0], &mut k0, 0, 4);
    publish(&mut mems[0], &mut k0, 0, 9);
    let mut got = harvested(&d, &l);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, vec![3, 4, 9, 67, 200]);
    assert!(harvested(&d, &l).is_empty(), "the overflow is emptied");
}

#[test]
fn clear_runs_join_nearby_dirty_words_only() {
    assert!(clear_runs(&[]).is_empty());
    assert_eq!(clear_runs(&[3]), vec![3..4]);
    // 3 and 12 are 8 zero words apart: one run; 30 is further.
    assert_eq!(clear_runs(&[3, 12, 30, 31]), vec![3..13, 30..32]);
}

#[test]
fn nonzero_words_and_their_pages() {
    let mut words = vec![0u64; 40];
    words[0] = 1;
    words[9] = 1 << 63 | 2;
    words[39] = 1 << 5;
    let mut pages = Vec::new();
    nonzero_words(&words, |wi, w| {
        word_pages(100, wi, w, 100 + 39 * 64 + 5, &mut |p| pages.push(p))
    });
    // The last bit lies at the end bound: left out.
    assert_eq!(pages, vec![100, 100 + 9 * 64 + 1, 100 + 9 * 64 + 63]);
}

#[test]
fn ring_sizes_are_whole_pages_powers_of_two_and_capped() {
    assert_eq!(ring_bytes(1 << 20), Some(1 << 20));
    assert_eq!(ring_bytes(1 << 24), Some(RING_BYTES));
    assert_eq!(ring_bytes(3 * 4096), Some(2 * 4096));
    assert_eq!(ring_bytes(2048), None);
}

#[test]
fn a_log_asked_for_a_ring_without_rings_falls_back_to_the_bitmap() {
    let log = KvmDirtyLog::new(DirtyMethod::Ring { bytes: 4096 }, None);
    assert_eq!(log.method(), DirtyMethod::Bitmap);
}

/// On a real VM: the method asked for is the one chosen when the host
/// offers it, and `bitmap` is always honoured.
#[test]
fn the_method_follows_the_request_and_what_the_host_offers() {
    let Some(kvm) = crate::test_util::kvm_or_skip("dirty-tracking choice") else {
        return;
    };
    for (wanted, cap) in [
        ("bitmap", None),
        ("manual-protect", Some(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)),
        ("ring", Some(KVM_CAP_DIRTY_LOG_RING)),
    ] {
        let vm = kvm.create_vm().unwrap();
        let offered = cap.is_none_or(|c| vm.check_extension_raw(c.into()) > 0);
        let m = DirtyMethod::choose(&vm, Some(wanted));
        if offered {
            assert_eq!(m.name(), wanted);
        } else {
            assert_ne!(m.name(), wanted);
        }
    }
}
