//! Protocol properties on the mock backend: lock bounds, failure rollback,
//! bad input.

#[path = "support/mock.rs"]
mod common;

use std::sync::Arc;

use common::*;
use pagepin::backends::mock::{MockBackend, Recorded};
use pagepin::{
    AddressSpace, Batch, EntryFlags, Error, ExtCmd, Global, Level, LockPolicy, Pae, PageSize,
    PageTableEntry, PagingMode, Sabotage, SpaceOptions, Split, X86_64,
};

const RW: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER);

fn space<M: PagingMode, P: LockPolicy>(frames: usize) -> AddressSpace<M, P, MockBackend> {
    let store = new_store(frames);
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    AddressSpace::new(store, backend, SpaceOptions::default()).unwrap()
}

/// One 4 KiB page in each of `n` 2 MiB regions: `n` PTE pages.
fn spread<M: PagingMode, P: LockPolicy>(s: &AddressSpace<M, P, MockBackend>, n: u64) {
    for i in 0..n {
        s.map(i << 21, (0x10_0000 + i) << 12, PageSize::Size4K, RW)
            .unwrap();
    }
}

fn max_locks<const N: usize>(s: &AddressSpace<X86_64, Split, MockBackend>) -> u32 {
    let mut b: Batch<N> = Batch::new();
    let pin = s.pin(&mut b).unwrap();
    assert_eq!(b.preempt().held(), 0, "every lock released after pin");
    let unpin = s.unpin(&mut b).unwrap();
    assert_eq!(b.preempt().held(), 0);
    assert_eq!(pin.l1_ops, 2048);
    assert_eq!(unpin.l1_ops, 2048);
    assert_clean(s);
    eprintln!(
        "batch {N}: max locks held pin {} unpin {}",
        pin.max_locks_held, unpin.max_locks_held
    );
    pin.max_locks_held.max(unpin.max_locks_held)
}

#[test]
fn locks_held_are_bounded_by_the_batch_not_the_table() {
    let s = space::<X86_64, Split>(2100);
    spread(&s, 2048);
    // Each PTE page takes two calls (remap, pin), so at most N/2 PTE locks
    // wait for a flush; plus the space lock, plus one page whose pin is
    // queued after a flush-on-full.
    let m1 = max_locks::<1>(&s);
    let m32 = max_locks::<32>(&s);
    let m256 = max_locks::<256>(&s);
    assert!(m1 <= 3, "{m1}");
    assert!((16..=18).contains(&m32), "{m32}");
    assert!((128..=130).contains(&m256), "{m256}");
}

#[test]
fn global_policy_takes_only_the_space_lock() {
    let s = space::<X86_64, Global>(2100);
    spread(&s, 300);
    let mut b: Batch<256> = Batch::new();
    let st = s.pin(&mut b).unwrap();
    assert_eq!(st.max_locks_held, 1);
    assert_eq!(st.l1_ops, 0);
    s.unpin(&mut b).unwrap();
    assert_clean(&s);
}

#[test]
fn exceeding_the_preempt_limit_is_an_error_that_changes_nothing() {
    let s = space::<X86_64, Split>(700);
    spread(&s, 600);
    let before = snapshot(s.store());
    // 1024 calls per batch would hold 512 PTE locks: refused at 255.
    let mut b: Batch<1024> = Batch::new();
    let err = s.pin(&mut b).unwrap_err();
    assert_eq!(err, Error::PreemptOverflow { held: 255 });
    assert_eq!(b.preempt().held(), 0);
    assert!(!s.is_pinned());
    assert_eq!(snapshot(s.store()), before);
    assert_clean(&s);
    // A sane batch still works afterwards.
    let mut b: Batch<32> = Batch::new();
    s.pin(&mut b).unwrap();
    s.unpin(&mut b).unwrap();
    assert_clean(&s);
}

#[test]
fn double_pin_and_unpin_of_unpinned_are_errors_without_calls() {
    let s = space::<X86_64, Split>(32);
    spread(&s, 3);
    let mut b: Batch<32> = Batch::new();
    assert_eq!(s.unpin(&mut b), Err(Error::NotPinned));
    assert_eq!(s.backend().batch_count(), 0);
    s.pin(&mut b).unwrap();
    let n = s.backend().batch_count();
    assert_eq!(s.pin(&mut b), Err(Error::AlreadyPinned));
    assert_eq!(s.backend().batch_count(), n, "a second pin issues nothing");
    s.unpin(&mut b).unwrap();
    assert_eq!(s.unpin(&mut b), Err(Error::NotPinned));
    assert_clean(&s);
}

#[test]
fn bad_addresses_are_typed_errors_that_change_nothing() {
    let s = space::<X86_64, Split>(32);
    spread(&s, 2);
    let before = snapshot(s.store());
    assert_eq!(
        s.map(0x1001, 0, PageSize::Size4K, RW),
        Err(Error::Misaligned { addr: 0x1001 })
    );
    assert_eq!(
        s.map(0x1000, 0x123, PageSize::Size4K, RW),
        Err(Error::Misaligned { addr: 0x123 })
    );
    assert_eq!(
        s.map(0x20_1000, 0, PageSize::Size2M, RW),
        Err(Error::Misaligned { addr: 0x20_1000 })
    );
    let nc = 0x0000_8000_0000_0000;
    assert_eq!(
        s.map(nc, 0, PageSize::Size4K, RW),
        Err(Error::NonCanonical { va: nc })
    );
    assert_eq!(s.translate(nc), None);
    assert_eq!(
        s.set_pte(nc, PageTableEntry::EMPTY, Default::default()),
        Err(Error::NonCanonical { va: nc })
    );
    assert!(matches!(
        s.map(0x5000, 0, PageSize::Size4K, EntryFlags::WRITABLE),
        Err(Error::BadFlags { .. })
    ));
    assert_eq!(
        s.map(0, 0, PageSize::Size4K, RW),
        Err(Error::AlreadyMapped { va: 0 })
    );
    assert_eq!(
        s.unmap(0x7000_0000),
        Err(Error::NotMapped { va: 0x7000_0000 })
    );
    assert_eq!(snapshot(s.store()), before);
    assert_eq!(s.backend().batch_count(), 0);
    let p = space::<Pae, Split>(32);
    assert_eq!(
        p.map(1 << 32, 0, PageSize::Size4K, RW),
        Err(Error::NonCanonical { va: 1 << 32 })
    );
    assert_eq!(
        p.map(0, 0, PageSize::Size1G, RW),
        Err(Error::UnsupportedPageSize)
    );
}

#[test]
fn store_exhaustion_is_an_error() {
    let s = space::<X86_64, Split>(3);
    // Root + L3 + L2 fit; the L1 does not.
    assert_eq!(
        s.map(0x1000, 0, PageSize::Size4K, RW),
        Err(Error::OutOfFrames)
    );
}

/// A table entry pointing outside the store (bad input written behind the
/// engine's back): pin stops at it, undoes what it did, and says where.
#[test]
fn frame_out_of_range_during_pin_is_rolled_back() {
    for policy_split in [true, false] {
        fn run<P: LockPolicy>() {
            let s = space::<X86_64, P>(64);
            spread(&s, 40);
            let tables = s.table_frames().unwrap();
            // Corrupt the last L2 entry that points to a PTE page.
            let (l2, _) = *tables.iter().find(|t| t.1 == Level::L2).unwrap();
            let f = s.store().frame(l2).unwrap();
            f.entry(39).store(
                PageTableEntry::new(0xdead_beef, RW).bits(),
                std::sync::atomic::Ordering::Relaxed,
            );
            let before = snapshot(s.store());
            let mut b: Batch<8> = Batch::new();
            let err = s.pin(&mut b).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::FrameOutOfRange {
                        level: Level::L2,
                        index: 39,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(
                s.backend().batch_count() > 1,
                "some work was issued before the bad entry"
            );
            assert_eq!(snapshot(s.store()), before);
            assert_clean(&s);
            assert!(!s.is_pinned());
            f.entry(39).store(0, std::sync::atomic::Ordering::Relaxed);
        }
        if policy_split {
            run::<Split>()
        } else {
            run::<Global>()
        }
    }
}

/// How many forward requests (read-only remaps, pins) a pin of 40 PTE
/// pages issued after the batch whose first call failed (the pin's third
/// flush): the pin must be undone exactly, and `walk_on` is the negative
/// control that keeps walking after the failure.
fn pin_requests_after_failure<P: LockPolicy>(walk_on: bool) -> usize {
    let mut s = space::<X86_64, P>(64);
    s.set_sabotage(Sabotage {
        walk_on_after_failure: walk_on,
        ..Sabotage::NONE
    });
    spread(&s, 40);
    let mock = s.backend().clone();
    let before = snapshot(s.store());
    let failing = mock.batch_count() + 2;
    mock.fail_call(failing, 0, 22);
    let mut b: Batch<4> = Batch::new();
    match s.pin(&mut b) {
        Err(Error::Hypercall(h)) => assert_eq!((h.flush, h.call, h.errno), (2, 0, 22), "{h:?}"),
        other => panic!("expected the injected failure, got {other:?}"),
    }
    assert_eq!(snapshot(s.store()), before);
    assert_clean(&s);
    assert!(!s.is_pinned());
    mock.batches()[failing + 1..]
        .iter()
        .flat_map(|b| &b.calls)
        .map(|c| match c {
            Recorded::UpdateVaMapping { pte, .. } => {
                usize::from(pte & EntryFlags::WRITABLE.bits() == 0)
            }
            Recorded::MmuExtOp(ops) => ops
                .iter()
                .filter(|o| {
                    matches!(
                        o.cmd,
                        ExtCmd::PinL1Table
                            | ExtCmd::PinL2Table
                            | ExtCmd::PinL3Table
                            | ExtCmd::PinL4Table
                    )
                })
                .count(),
            Recorded::MmuUpdate(_) => 0,
        })
        .sum()
}

/// A pin stops queueing at the first failure: after the failed batch only
/// the requests of the page whose queueing made that flush reach the
/// hypervisor (one remap, plus its L1 pin under split), then the undo.
#[test]
fn pin_queues_nothing_after_a_failed_flush() {
    let split = pin_requests_after_failure::<Split>(false);
    let global = pin_requests_after_failure::<Global>(false);
    eprintln!("forward requests after the failed batch: split {split}, global {global}");
    assert!(
        split <= 2,
        "split: {split} forward requests after the failure"
    );
    assert!(
        global <= 1,
        "global: {global} forward requests after the failure"
    );
}

/// Negative control of the test above: walking on after the failure
/// issues the rest of the pin (and the test's bound catches it).
#[test]
fn negative_control_walking_on_after_a_failure_is_caught() {
    let split = pin_requests_after_failure::<Split>(true);
    let global = pin_requests_after_failure::<Global>(true);
    eprintln!("walking on: split {split}, global {global}");
    assert!(split > 2, "split: {split}");
    assert!(global > 1, "global: {global}");
}

/// Every call of every batch of a pin and of an unpin, failed in turn: the
/// error names it, and the space is exactly as before.
fn fail_every_call<M: PagingMode, P: LockPolicy>() {
    let s = space::<M, P>(64);
    spread(&s, 5);
    let mock = s.backend().clone();
    let shape = |from: usize| -> Vec<usize> {
        mock.batches()[from..]
            .iter()
            .map(|b| b.calls.len())
            .collect()
    };
    // The reference runs, to count batches and calls.
    let mut b: Batch<4> = Batch::new();
    s.pin(&mut b).unwrap();
    let pin_shape = shape(0);
    let mark = mock.batch_count();
    s.unpin(&mut b).unwrap();
    let unpin_shape = shape(mark);
    assert_clean(&s);
    let mut cases = 0;
    for (phase, shape) in [("pin", &pin_shape), ("unpin", &unpin_shape)] {
        for (m, &calls) in shape.iter().enumerate() {
            for k in 0..calls {
                if phase == "unpin" {
                    s.pin(&mut b).unwrap();
                }
                let before = snapshot(s.store());
                let state = |r: Replay| (r.read_only, r.pins);
                let replay_before = state(replay(&mock.batches()));
                mock.fail_call(mock.batch_count() + m, k, 22);
                let r = if phase == "pin" {
                    s.pin(&mut b)
                } else {
                    s.unpin(&mut b)
                };
                match r {
                    Err(Error::Hypercall(h)) => {
                        assert_eq!(
                            (h.flush as usize, h.call, h.errno),
                            (m, k, 22),
                            "{phase} {m}/{k}"
                        );
                        assert!(h.pfn.is_some() && h.step.is_some());
                    }
                    other => panic!("{phase} batch {m} call {k}: {other:?}"),
                }
                assert_eq!(snapshot(s.store()), before, "{phase} {m}/{k}");
                assert_eq!(
                    state(replay(&mock.batches())),
                    replay_before,
                    "{phase} {m}/{k}: net hypervisor state"
                );
                assert_eq!(s.is_pinned(), phase == "unpin");
                assert_eq!(b.preempt().held(), 0);
                if phase == "unpin" {
                    s.unpin(&mut b).unwrap();
                }
                assert_clean(&s);
                cases += 1;
            }
        }
    }
    assert!(cases > 10, "{cases}");
}

#[test]
fn failure_of_any_call_rolls_back_x86_64_split() {
    fail_every_call::<X86_64, Split>();
}
#[test]
fn failure_of_any_call_rolls_back_x86_64_global() {
    fail_every_call::<X86_64, Global>();
}
#[test]
fn failure_of_any_call_rolls_back_pae_split() {
    fail_every_call::<Pae, Split>();
}
#[test]
fn failure_of_any_call_rolls_back_pae_global() {
    fail_every_call::<Pae, Global>();
}

/// The mock sees a failed pin's calls and the undo calls: replaying all of
/// them leaves nothing read-only and nothing pinned.
#[test]
fn failed_pin_replays_to_nothing() {
    let s = space::<X86_64, Split>(64);
    spread(&s, 6);
    let mut b: Batch<4> = Batch::new();
    s.backend().fail_call(2, 1, 16);
    assert!(s.pin(&mut b).is_err());
    let r = replay(&s.backend().batches());
    assert!(r.read_only.is_empty() && r.pins.is_empty(), "{r:?}");
    assert!(s.backend().batch_count() > 3, "the undo was issued");
}

#[test]
fn allocating_into_a_pinned_space_pins_before_linking() {
    use pagepin::backends::mock::Recorded;
    let s = space::<X86_64, Split>(64);
    spread(&s, 2);
    let mut b: Batch<32> = Batch::new();
    s.pin(&mut b).unwrap();
    // The calls since `mark`, by what they do.
    let kinds_since = |mark: usize| -> Vec<&'static str> {
        s.backend().calls()[mark..]
            .iter()
            .map(|c| match c {
                Recorded::UpdateVaMapping { pte, .. } if pte & 2 == 0 => "ro",
                Recorded::UpdateVaMapping { .. } => "rw",
                Recorded::MmuExtOp(ops) if ops[0].cmd == pagepin::ExtCmd::UnpinTable => "unpin",
                Recorded::MmuExtOp(_) => "pin",
                Recorded::MmuUpdate(reqs) if reqs[0].val == 0 => "unlink",
                Recorded::MmuUpdate(_) => "link",
            })
            .collect()
    };
    let mark = s.backend().calls().len();
    // A fresh 2 MiB region needs a new PTE page.
    s.map(0x4000_0000, 0x9000_0000, PageSize::Size4K, RW)
        .unwrap();
    // New L2 and L1: each remapped RO (L1 pinned) before its parent entry is
    // written through mmu_update.
    assert_eq!(kinds_since(mark), ["ro", "link", "ro", "pin", "link"]);
    // The leaf itself is a plain store into the (pinned) L1: emulated on Xen.
    let stores = s.backend().stores();
    assert_eq!(
        stores.last().map(|st| st.value >> 12),
        Some(0x9000_0000 >> 12)
    );
    // Release it again: unlink, unpin, writable.
    s.unmap(0x4000_0000).unwrap();
    let mark = s.backend().calls().len();
    s.release_table(0x4000_0000, Level::L1).unwrap();
    assert_eq!(kinds_since(mark), ["unlink", "unpin", "rw"]);
    s.unpin(&mut b).unwrap();
    assert_clean(&s);
}

#[test]
fn teardown_of_a_never_pinned_space_sends_nothing() {
    let s = space::<X86_64, Split>(64);
    spread(&s, 4);
    let store = s.store().clone();
    let backend = s.backend().clone();
    assert!(store.allocated() > 4);
    s.teardown().unwrap();
    assert_eq!(backend.batch_count(), 0);
    assert_eq!(store.allocated(), 0);
}

#[test]
fn teardown_of_a_pinned_space_unpins_first() {
    let s = space::<X86_64, Split>(64);
    spread(&s, 4);
    let mut b: Batch<32> = Batch::new();
    s.pin(&mut b).unwrap();
    let backend = s.backend().clone();
    let store = s.store().clone();
    s.teardown().unwrap();
    let r = replay(&backend.batches());
    assert!(r.read_only.is_empty() && r.pins.is_empty());
    assert_eq!(store.allocated(), 0);
}

#[test]
fn pin_all_unpins_only_what_it_pinned() {
    let spaces: Vec<_> = (0..4).map(|_| space::<X86_64, Split>(32)).collect();
    for s in &spaces {
        spread(s, 2);
    }
    let mut b: Batch<32> = Batch::new();
    spaces[1].pin(&mut b).unwrap();
    let refs: Vec<&_> = spaces.iter().collect();
    let set = pagepin::pin_all(&refs, &mut b).unwrap();
    assert_eq!(set.indices, [0, 2, 3]);
    assert!(spaces.iter().all(|s| s.is_pinned()));
    pagepin::unpin_all(&refs, set, &mut b).unwrap();
    assert!(spaces[1].is_pinned());
    assert!(!spaces[0].is_pinned() && !spaces[2].is_pinned() && !spaces[3].is_pinned());
    spaces[1].unpin(&mut b).unwrap();
    for s in &spaces {
        assert_clean(s);
    }
}

#[test]
fn translate_and_protect() {
    let s = space::<X86_64, Split>(64);
    s.map(0x7000, 0x1234_5000, PageSize::Size4K, RW).unwrap();
    s.map(
        0x4000_0000,
        0x8000_0000,
        PageSize::Size2M,
        RW | EntryFlags::PAT_LARGE,
    )
    .unwrap();
    s.map(
        0x80_0000_0000,
        0x1_4000_0000,
        PageSize::Size1G,
        RW | EntryFlags::NO_EXECUTE,
    )
    .unwrap();
    let t = s.translate(0x7abc).unwrap();
    assert_eq!((t.phys, t.size), (0x1234_5abc, PageSize::Size4K));
    let t = s.translate(0x4012_3456).unwrap();
    assert_eq!((t.phys, t.size), (0x8012_3456, PageSize::Size2M));
    assert!(t.flags.contains(EntryFlags::PAT_LARGE));
    let t = s.translate(0x80_1234_5678).unwrap();
    assert_eq!((t.phys, t.size), (0x1_5234_5678, PageSize::Size1G));
    assert!(t.flags.contains(EntryFlags::NO_EXECUTE));
    s.protect(0x7000, EntryFlags::PRESENT | EntryFlags::USER)
        .unwrap();
    let t = s.translate(0x7000).unwrap();
    assert!(!t.flags.contains(EntryFlags::WRITABLE));
    assert_eq!(t.phys, 0x1234_5000);
    assert_eq!(s.unmap(0x7000).unwrap().phys, 0x1234_5000);
    assert_eq!(s.translate(0x7000), None);
}

#[test]
fn frame_metadata_is_small() {
    // A tag word (level and owner), a state byte (flags) and the PTE lock
    // alone on a cache line, whatever the space lock type: 73 bytes, under
    // 2 % of a 4 KiB frame (a kernel's `struct page` is 64).
    assert_eq!(pagepin::FrameStore::<pagepin::SpinLock>::meta_size(), 73);
    assert_eq!(
        pagepin::FrameStore::<pagepin::DefaultRawLock>::meta_size(),
        73
    );
}
