//! Lock-free readers: `translate` takes no lock, and a released table frame
//! is reused only once no reader can still be walking it.

#[path = "support/mock.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use common::*;
use pagepin::backends::mock::MockBackend;
use pagepin::read_guard;
use pagepin::{
    AddressSpace, EntryFlags, Level, PageSize, Pfn, RawLock, SpaceOptions, Split, X86_64,
};

const RW: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER);

fn space(frames: usize) -> AddressSpace<X86_64, Split, MockBackend> {
    let store = new_store(frames);
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    AddressSpace::new(store, backend, SpaceOptions::default()).unwrap()
}

/// Grab every free frame; return them (to be freed again by the caller).
fn drain<L: RawLock>(store: &pagepin::FrameStore<L>) -> BTreeSet<Pfn> {
    let mut got = BTreeSet::new();
    while let Some(p) = store.alloc_data() {
        got.insert(p);
    }
    got
}

fn give_back<L: RawLock>(store: &pagepin::FrameStore<L>, frames: &BTreeSet<Pfn>) {
    for p in frames {
        // SAFETY: the test unlinked these frames and no reader is left.
        assert!(unsafe { store.free_now(*p) });
    }
}

/// Release a PTE page while another thread is inside a read section: the
/// frame must not be handed out again until that reader has left.
/// `immediate` is the negative control: the frame freed at once (the
/// mechanism switched off), which the same check catches.
fn reuse_while_reading(immediate: bool) -> bool {
    let s = space(32);
    s.map(0x20_0000, 0x1000, PageSize::Size4K, RW).unwrap();
    let l1 = *s
        .table_frames()
        .unwrap()
        .iter()
        .find(|t| t.1 == Level::L1)
        .unwrap();
    s.unmap(0x20_0000).unwrap();

    let (entered_tx, entered_rx) = mpsc::channel();
    let (leave_tx, leave_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _guard = read_guard();
        entered_tx.send(()).unwrap();
        leave_rx.recv().unwrap();
    });
    entered_rx.recv().unwrap();

    if immediate {
        // What a naive release would do: unlink and free at once.
        let l2 = s
            .table_frames()
            .unwrap()
            .into_iter()
            .find(|t| t.1 == Level::L2)
            .unwrap()
            .0;
        s.store()
            .frame(l2)
            .unwrap()
            .entry(1)
            .store(0, Ordering::Release);
        // SAFETY: broken on purpose (the negative control): a reader may
        // still be on the frame; the test checks that it notices.
        assert!(unsafe { s.store().free_now(l1.0) });
    } else {
        s.release_table(0x20_0000, Level::L1).unwrap();
    }
    let store = s.store().clone();
    store.quiesce();
    let during = drain(&store);
    let reused_during_read = during.contains(&l1.0);
    give_back(&store, &during);

    leave_tx.send(()).unwrap();
    reader.join().unwrap();
    // After the reader left, a bounded number of grace-period attempts
    // must make the frame available again.
    let mut reusable_after = false;
    for _ in 0..1000 {
        store.quiesce();
        let got = drain(&store);
        reusable_after = got.contains(&l1.0);
        give_back(&store, &got);
        if reusable_after {
            break;
        }
    }
    assert!(reusable_after, "a retired frame never came back");
    reused_during_read
}

#[test]
fn released_frames_wait_for_readers() {
    assert!(
        !reuse_while_reading(false),
        "frame reused while a reader could still walk it"
    );
}

#[test]
fn negative_control_immediate_free_is_caught() {
    assert!(
        reuse_while_reading(true),
        "the check did not see an immediate reuse"
    );
}

/// Translators run against a thread that maps, unmaps and releases PTE
/// pages (whose frames get reused by other regions). Returns the
/// translations seen and how many of them were wrong (a stale or foreign
/// frame's content). `unchecked` is the negative control: `translate`
/// trusts its walk without a read section even when a frame was retired
/// meanwhile.
fn translate_during_release(unchecked: bool, rounds: u64) -> (u64, u64) {
    const REGIONS: u64 = 16;
    // Room for retired frames: a reader preempted inside its read section
    // holds reclamation back for a while (as RCU readers do).
    let mut s = space(8192);
    s.set_sabotage(pagepin::Sabotage {
        translate_unchecked: unchecked,
        ..pagepin::Sabotage::NONE
    });
    let s = Arc::new(s);
    // Region r maps its page to a physical address that names the region.
    let phys = |r: u64| (0x4_0000 + r) << 12;
    let va = |r: u64| r << 21;
    // Keep one mapping in the L2 so it is never emptied.
    s.map(0x4000_0000, 0x1000, PageSize::Size4K, RW).unwrap();
    let stop = AtomicBool::new(false);
    let (seen, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
    /// Stops the readers however the writer leaves, a failed assertion
    /// included, so the scope can join them and the failure is reported.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    std::thread::scope(|sc| {
        let _stop = Stop(&stop);
        for t in 0..2 {
            let (s, stop, seen, wrong) = (&s, &stop, &seen, &wrong);
            sc.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Acquire) {
                    let r = i % REGIONS;
                    if let Some(tr) = s.translate(va(r) + 0x123) {
                        seen.fetch_add(1, Ordering::Relaxed);
                        if tr.phys != phys(r) + 0x123 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            });
        }
        for round in 0..rounds {
            for r in 0..REGIONS {
                if (r + round) % 2 == 0 {
                    s.map(va(r), phys(r), PageSize::Size4K, RW)
                        .unwrap_or_else(|e| {
                            panic!(
                                "round {round} region {r}: {e:?}, {} frames allocated",
                                s.store().allocated()
                            )
                        });
                } else if s.translate(va(r)).is_some() {
                    s.unmap(va(r)).unwrap();
                    s.release_table(va(r), Level::L1).unwrap();
                }
            }
            s.store().quiesce();
        }
        stop.store(true, Ordering::Release);
    });
    (seen.into_inner(), wrong.into_inner())
}

/// Every translation is either absent or exactly right, never a stale
/// frame's content: `translate` walks without a read section and keeps
/// the walk only if no frame was retired meanwhile.
#[test]
fn translate_races_map_unmap_release() {
    let (seen, wrong) = translate_during_release(false, 300);
    assert!(seen > 0, "the readers saw no mapping at all");
    assert_eq!(wrong, 0, "{wrong} of {seen} translations were wrong");
}

/// The negative control: trusting the walk regardless lets a translation
/// read a frame reused for another region. Rounds until one is caught,
/// bounded.
#[test]
fn negative_control_unchecked_translate_is_caught() {
    let mut total = (0, 0);
    for _ in 0..20 {
        let (seen, wrong) = translate_during_release(true, 300);
        total = (total.0 + seen, total.1 + wrong);
        if wrong > 0 {
            return;
        }
    }
    panic!("no wrong translation in {} unchecked ones", total.0);
}
