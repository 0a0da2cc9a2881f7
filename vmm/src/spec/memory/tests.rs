//! The tracker over real memfd-backed guest memory, written through
//! vm-memory (so its dirty bitmap sees the writes). Tests of the public
//! API need KVM's dirty log, so a KVM VM with the memory slots; without
//! `/dev/kvm` they are skipped (`test_util::kvm_vm_or_skip`).

use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::spec::stack::Fold;
use crate::test_util::kvm_vm_or_skip;
use crate::vstate::memory::create_guest_memory;

const MIB: u64 = 1 << 20;

/// A tracker over `ram` with verification off, whatever the environment.
/// Without a VM it reads no KVM log (the tests that use it name pages).
fn tracker(ram: &GuestRam, strategy: Strategy) -> MemoryTracker {
    let mut t = MemoryTracker::new(ram, strategy).unwrap();
    t.verify = None;
    t
}

/// A tracker reading `vm`'s dirty tracking, whichever method it chose.
fn tracker_for(ram: &GuestRam, vm: &crate::vstate::vm::Vm, strategy: Strategy) -> MemoryTracker {
    let mut t = tracker(ram, strategy);
    let (log, _rings) = vm.dirty_log(&[], &ram.layout).unwrap();
    t.set_kvm_log(log);
    t
}

/// Fills the file's page `page` with `byte`, as the VMM writes guest memory.
fn put(ram: &GuestRam, page: u64, byte: u8) {
    let gpa = ram.layout.page_to_gpa(page).unwrap();
    ram.mem
        .write_slice(&[byte; PAGE_SIZE], GuestAddress(gpa))
        .unwrap();
}

/// The byte that fills the file's page `page` as the guest reads it
/// (asserting that the whole page holds it).
fn at(ram: &GuestRam, page: u64) -> u8 {
    let gpa = ram.layout.page_to_gpa(page).unwrap();
    let mut b = [0u8; PAGE_SIZE];
    ram.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    assert!(b.iter().all(|&x| x == b[0]), "page {page} is mixed");
    b[0]
}

/// The first byte of the memory file's page `page`.
fn in_file(ram: &GuestRam, page: u64) -> u8 {
    let mut b = [0u8; 1];
    ram.file.read_exact_at(&mut b, page * PAGE).unwrap();
    b[0]
}

#[test]
fn runs_of_pages() {
    assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![1..4, 7..8, 9..11]);
    assert!(runs(&[]).is_empty());
}

#[test]
fn the_verifier_finds_exactly_the_unreported_writes() {
    let ram = create_guest_memory(64 * MIB).unwrap();
    let t = tracker(&ram, Strategy::CopyOnWrite);
    // Page 5 is written as the VMM writes (reported through the bitmap),
    // page 9 behind the tracker's back, page 12 is only read.
    ram.mem
        .write_obj(0x1111u64, GuestAddress(5 * PAGE))
        .unwrap();
    let host = ram.mem.get_host_address(GuestAddress(9 * PAGE)).unwrap();
    // SAFETY: a page inside the guest mapping, which `ram` keeps alive.
    unsafe { host.cast::<u64>().write(0x2222) };
    let _: u64 = ram.mem.read_obj(GuestAddress(12 * PAGE)).unwrap();
    t.flush(&[5], None).unwrap();
    assert_eq!(t.unreported_pages().unwrap(), vec![9]);
    t.drop_pages(&[9]).unwrap();
    assert!(t.unreported_pages().unwrap().is_empty());
    let v: u64 = ram.mem.read_obj(GuestAddress(9 * PAGE)).unwrap();
    assert_eq!(v, 0, "the dropped page reads the file again");
    let v: u64 = ram.mem.read_obj(GuestAddress(5 * PAGE)).unwrap();
    assert_eq!(v, 0x1111, "the flushed page keeps its content");
}

/// Flush and copy-back on their own (no KVM: the pages are named), across
/// the MMIO gap: the last page below it and the first above it.
#[test]
fn flush_and_copy_back_move_pages_across_the_gap() {
    let ram = create_guest_memory(3 * 1024 * MIB + 64 * MIB).unwrap();
    let t = tracker(&ram, Strategy::CopyOnWrite);
    let (lo, hi) = (3 * 1024 * MIB / PAGE - 1, 3 * 1024 * MIB / PAGE);
    assert_eq!(ram.layout.page_to_gpa(hi), Some(4 << 30));
    put(&ram, lo, 1);
    t.flush(&[lo], None).unwrap();
    assert_eq!(in_file(&ram, lo), 1);
    // Checkpoint c1 is taken here: its log gets the pre-images of what
    // the next flush overwrites.
    let mut c1 = UndoLog::default();
    put(&ram, lo, 2);
    put(&ram, hi, 3);
    t.flush(&[lo, hi], Some(&mut c1)).unwrap();
    assert_eq!((in_file(&ram, lo), in_file(&ram, hi)), (2, 3));
    assert_eq!(c1.len(), 2);
    let c2 = UndoLog::default();
    put(&ram, hi, 4);
    t.copy_back([&c2, &c1], &[hi]).unwrap();
    assert_eq!((at(&ram, lo), at(&ram, hi)), (1, 0));
    assert_eq!((in_file(&ram, lo), in_file(&ram, hi)), (1, 0));
}

/// Flushes and copy-backs large enough to be shared with the copy
/// helpers (over `copier::PARALLEL_MIN`), in runs of odd lengths on both
/// sides of the gap below 4 GiB: every page lands whole, with its own
/// content, and the undo log keeps every pre-image.
#[test]
fn large_flushes_and_copy_backs_are_exact() {
    let ram = create_guest_memory(3 * 1024 * MIB + 64 * MIB).unwrap();
    let t = tracker(&ram, Strategy::CopyOnWrite);
    let top = 3 * 1024 * MIB / PAGE;
    let mut pages: Vec<u64> = (100..100 + 300).collect();
    pages.extend(500..517);
    pages.extend(top - 200..top + 250);
    assert!(pages.len() as u64 * PAGE >= 2 * super::copier::PARALLEL_MIN as u64);
    let byte = |p: u64, round: u64| ((p * 7 + round) % 251) as u8 + 1;
    for &p in &pages {
        put(&ram, p, byte(p, 0));
    }
    t.flush(&pages, None).unwrap();
    assert!(pages.iter().all(|&p| in_file(&ram, p) == byte(p, 0)));
    let mut log = UndoLog::default();
    for &p in &pages {
        put(&ram, p, byte(p, 1));
    }
    t.flush(&pages, Some(&mut log)).unwrap();
    assert_eq!(log.len(), pages.len());
    assert!(pages.iter().all(|&p| in_file(&ram, p) == byte(p, 1)));
    for &p in &pages {
        put(&ram, p, byte(p, 2));
    }
    t.copy_back([&log], &pages).unwrap();
    for &p in &pages {
        assert_eq!(
            (at(&ram, p), in_file(&ram, p)),
            (byte(p, 0), byte(p, 0)),
            "page {p}"
        );
    }
}

#[test]
fn checkpoints_roll_back_and_commits_fold() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let Some(vm) = kvm_vm_or_skip(
        "spec::memory::checkpoints_roll_back_and_commits_fold",
        &ram.mem,
    ) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    let (a, b, c) = (3, 4, 700);
    put(&ram, a, 1);
    let mut c1 = t.checkpoint(&vm.fd, None).unwrap();
    put(&ram, a, 2);
    put(&ram, b, 3);
    let mut c2 = t.checkpoint(&vm.fd, Some(&mut c1)).unwrap();
    assert_eq!(c1.undo_pages(), 2);
    put(&ram, a, 4);
    let mut c3 = t.checkpoint(&vm.fd, Some(&mut c2)).unwrap();
    put(&ram, b, 5);
    let c4 = t.checkpoint(&vm.fd, Some(&mut c3)).unwrap();
    put(&ram, c, 6);
    // Commit c4, then c3: their logs fold into c2's.
    c4.fold_into(&mut c3);
    c3.fold_into(&mut c2);
    assert_eq!(c2.undo_pages(), 2);
    t.rollback(&vm.fd, [&c2]).unwrap();
    assert_eq!((at(&ram, a), at(&ram, b), at(&ram, c)), (2, 3, 0));
    put(&ram, a, 7);
    t.rollback(&vm.fd, [&c1]).unwrap();
    assert_eq!((at(&ram, a), at(&ram, b), at(&ram, c)), (1, 0, 0));
    assert!(t.supports_snapshots());
}

#[test]
fn a_rollback_over_several_checkpoints_reaches_the_oldest() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::a_rollback_over_several_checkpoints_reaches_the_oldest";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    put(&ram, 10, 1);
    let mut c1 = t.checkpoint(&vm.fd, None).unwrap();
    put(&ram, 10, 2);
    put(&ram, 11, 2);
    let mut c2 = t.checkpoint(&vm.fd, Some(&mut c1)).unwrap();
    put(&ram, 10, 3);
    let c3 = t.checkpoint(&vm.fd, Some(&mut c2)).unwrap();
    put(&ram, 12, 4);
    // Popped newest first; the last is the target.
    t.rollback(&vm.fd, [&c3, &c2, &c1]).unwrap();
    assert_eq!((at(&ram, 10), at(&ram, 11), at(&ram, 12)), (1, 0, 0));
}

#[test]
fn pages_since_the_snapshot_are_noted_by_checkpoints_and_rollbacks() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::pages_since_the_snapshot_are_noted_by_checkpoints_and_rollbacks";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    put(&ram, 5, 1);
    let cp = t.checkpoint(&vm.fd, None).unwrap();
    put(&ram, 9, 2);
    t.rollback(&vm.fd, [&cp]).unwrap();
    assert_eq!(at(&ram, 9), 0, "rolled back");
    // Page 9 is the snapshot's concern too: its file page may differ from
    // the last snapshot's (it does not here, but the tracker cannot tell).
    assert_eq!(t.take_since_snapshot(), vec![5, 9]);
    assert!(t.take_since_snapshot().is_empty());
    put(&ram, 6, 3);
    t.checkpoint(&vm.fd, None).unwrap();
    assert_eq!(t.take_since_snapshot(), vec![6]);
}

#[test]
fn the_full_copy_strategy_restores_all_of_memory() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::the_full_copy_strategy_restores_all_of_memory";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::FullCopy);
    assert!(!t.supports_snapshots());
    put(&ram, 1, 1);
    let mut c1 = t.checkpoint(&vm.fd, None).unwrap();
    assert_eq!(c1.undo_pages(), 0);
    put(&ram, 1, 2);
    put(&ram, 2, 2);
    let c2 = t.checkpoint(&vm.fd, Some(&mut c1)).unwrap();
    put(&ram, 3, 3);
    t.rollback(&vm.fd, [&c2]).unwrap();
    assert_eq!((at(&ram, 1), at(&ram, 2), at(&ram, 3)), (2, 2, 0));
    t.rollback(&vm.fd, [&c1]).unwrap();
    assert_eq!((at(&ram, 1), at(&ram, 2), at(&ram, 3)), (1, 0, 0));
    assert!(matches!(t.rollback(&vm.fd, []), Err(CowError::NoFullCopy)));
}

#[test]
fn a_restored_vm_materializes_its_memory_at_the_first_checkpoint() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::a_restored_vm_materializes_its_memory_at_the_first_checkpoint";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    // The snapshot's base layer, which guest memory maps as a restore does.
    let base = create_guest_memory(32 * MIB).unwrap().file;
    base.write_all_at(&[0x33; PAGE_SIZE], 3 * PAGE).unwrap();
    base.write_all_at(&[0x44; PAGE_SIZE], 4 * PAGE).unwrap();
    crate::snapshot::memory::remap(&ram.mem, &ram.layout, &base).unwrap();
    t.set_lazy_base(
        base.try_clone().unwrap(),
        crate::snapshot::verify::MemoryChecked::passed(),
    );
    put(&ram, 4, 0x55);
    t.checkpoint(&vm.fd, None).unwrap();
    assert!(t.take_materialize_time().is_some());
    assert!(t.take_materialize_time().is_none(), "reported once");
    assert_eq!((in_file(&ram, 3), in_file(&ram, 4)), (0x33, 0x55));
    // Memory maps the own file now, not the snapshot's.
    base.write_all_at(&[0x77; PAGE_SIZE], 3 * PAGE).unwrap();
    assert_eq!((at(&ram, 3), at(&ram, 4)), (0x33, 0x55));
    assert_eq!(t.take_since_snapshot(), vec![4]);
    t.checkpoint(&vm.fd, None).unwrap();
    assert!(
        t.take_materialize_time().is_none(),
        "materialized only once"
    );
}

/// The copy of a restored VM's base layer runs ahead of the first
/// checkpoint, but not before the check that the guest's output waits for.
#[test]
fn the_base_layer_is_copied_ahead_once_the_check_lets_output_flow() {
    use crate::snapshot::verify::MemoryChecked;
    let ram = create_guest_memory(32 * MIB).unwrap();
    let mut t = tracker(&ram, Strategy::CopyOnWrite);
    let base = create_guest_memory(32 * MIB).unwrap().file;
    base.write_all_at(&[0x33; PAGE_SIZE], 3 * PAGE).unwrap();
    base.write_all_at(&[0x44; PAGE_SIZE], 31 * MIB).unwrap();
    let checked = std::sync::Arc::new(MemoryChecked::new(false, true));
    t.set_lazy_base(base, checked.clone());
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(in_file(&ram, 3), 0, "copied before the check passed");
    checked.open();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while in_file(&ram, 31 * MIB / PAGE) != 0x44 {
        assert!(std::time::Instant::now() < until, "the copy never ran");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(in_file(&ram, 3), 0x33);
}

/// A first checkpoint that comes before the copy ahead is done (here,
/// before the check it waits for has even passed) waits for the check,
/// then copies beside the copying thread: every chunk lands once.
#[test]
fn an_early_first_checkpoint_finishes_the_copy_after_the_check() {
    use crate::snapshot::verify::MemoryChecked;
    let ram = create_guest_memory(64 * MIB).unwrap();
    let test = "spec::memory::an_early_first_checkpoint_finishes_the_copy_after_the_check";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    let base = create_guest_memory(64 * MIB).unwrap().file;
    // 40 MiB of data in runs of odd lengths, then holes.
    let byte = |p: u64| (p % 253) as u8 + 1;
    let pages: Vec<u64> = (0..40 * MIB / PAGE).filter(|p| p % 97 != 5).collect();
    for &p in &pages {
        base.write_all_at(&[byte(p); PAGE_SIZE], p * PAGE).unwrap();
    }
    crate::snapshot::memory::remap(&ram.mem, &ram.layout, &base).unwrap();
    let checked = std::sync::Arc::new(MemoryChecked::new(false, true));
    t.set_lazy_base(base, checked.clone());
    let opener = {
        let c = checked.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            c.open();
        })
    };
    let started = std::time::Instant::now();
    t.checkpoint(&vm.fd, None).unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "the checkpoint copied before the check passed"
    );
    opener.join().unwrap();
    for p in 0..40 * MIB / PAGE {
        let want = if p % 97 == 5 { 0 } else { byte(p) };
        assert_eq!(in_file(&ram, p), want, "page {p}");
    }
}

#[test]
fn a_snapshot_reads_unflushed_pages_where_they_are() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::a_snapshot_reads_unflushed_pages_where_they_are";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    put(&ram, 2, 1);
    t.checkpoint(&vm.fd, None).unwrap();
    assert!(t.take_since_snapshot().contains(&2));
    put(&ram, 2, 2);
    put(&ram, 7, 7);
    t.prepare_snapshot(&vm.fd).unwrap();
    // Not flushed: the file keeps the checkpoint's bytes...
    assert_eq!((in_file(&ram, 2), in_file(&ram, 7)), (1, 0));
    // ...the snapshot reads the guest's, and knows where data is.
    {
        let src = t.snapshot_source();
        let mut b = vec![0u8; 8 * PAGE_SIZE];
        src.read_exact_at(&mut b, 0).unwrap();
        let firsts: Vec<u8> = b.chunks(PAGE_SIZE).map(|p| p[0]).collect();
        assert_eq!(firsts, [0, 0, 2, 0, 0, 0, 0, 7]);
        let ext = src.extents(32 * MIB).unwrap();
        for p in [2, 7] {
            assert!(
                ext.iter()
                    .any(|&(o, n)| o <= p * PAGE && (p + 1) * PAGE <= o + n),
                "page {p} missing from {ext:?}"
            );
        }
    }
    assert_eq!(t.take_since_snapshot(), vec![2, 7]);
    // The next checkpoint flushes them; they are not noted again for
    // the next snapshot, which already has them.
    let cp = t.checkpoint(&vm.fd, None).unwrap();
    assert_eq!((in_file(&ram, 2), in_file(&ram, 7)), (2, 7));
    assert!(t.take_since_snapshot().is_empty());
    put(&ram, 7, 9);
    t.rollback(&vm.fd, [&cp]).unwrap();
    assert_eq!((at(&ram, 2), at(&ram, 7)), (2, 7));
}

#[test]
fn a_rollback_after_a_snapshot_puts_back_unflushed_pages() {
    let ram = create_guest_memory(32 * MIB).unwrap();
    let test = "spec::memory::a_rollback_after_a_snapshot_puts_back_unflushed_pages";
    let Some(vm) = kvm_vm_or_skip(test, &ram.mem) else {
        return;
    };
    let mut t = tracker_for(&ram, &vm, Strategy::CopyOnWrite);
    put(&ram, 3, 1);
    let cp = t.checkpoint(&vm.fd, None).unwrap();
    // A snapshot cannot be taken inside a speculation, but the tracker
    // must still treat the harvested pages as dirty at a rollback.
    put(&ram, 3, 2);
    t.prepare_snapshot(&vm.fd).unwrap();
    t.rollback(&vm.fd, [&cp]).unwrap();
    assert_eq!(at(&ram, 3), 1);
}
