//! One-page writers under split start at the remembered PTE page holding
//! only its lock (no space lock). The hint's sequence count, checked under
//! that lock, is what keeps them out of a page another writer unlinked
//! meanwhile; without it (the negative control) a `map` can land in an
//! unlinked page and be lost.

#[path = "support/mock.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use pagepin::backends::mock::MockBackend;
use pagepin::{AddressSpace, EntryFlags, Level, PageSize, Sabotage, SpaceOptions, Split, X86_64};

const RW: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER);

/// Mapper rounds (bounded by count; each is a map, a translate, an unmap).
const ROUNDS: u64 = 200_000;

/// Two writers share one 2 MiB region: the mapper maps, checks and unmaps
/// its own page at `A`; the releaser releases the region's PTE page
/// whenever it is empty and maps and unmaps its own page at `B`, which
/// makes a new PTE page and leaves it remembered. Returns how many of the
/// mapper's successful maps were not there right after (lost).
fn lost_maps(unchecked: bool) -> u64 {
    const A: u64 = 0x4000_0000;
    const B: u64 = A + 0x1000;
    let store = new_store(4096);
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    let mut s: AddressSpace<X86_64, Split, MockBackend> =
        AddressSpace::new(store, backend, SpaceOptions::default()).unwrap();
    s.set_sabotage(Sabotage {
        pte_hint_unchecked: unchecked,
        ..Sabotage::NONE
    });
    let (done, lost) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|sc| {
        let (s, done, lost) = (&s, &done, &lost);
        sc.spawn(move || {
            while !done.load(Ordering::Acquire) {
                // Refused while the mapper's page is mapped (not empty).
                let _ = s.release_table(B, Level::L1);
                s.map(B, 0x20_0000, PageSize::Size4K, RW).unwrap();
                s.unmap(B).unwrap();
            }
        });
        for _ in 0..ROUNDS {
            s.map(A, 0x10_0000, PageSize::Size4K, RW).unwrap();
            if s.translate(A).map(|t| t.phys) != Some(0x10_0000) {
                lost.fetch_add(1, Ordering::Relaxed);
                // Lost in an unlinked page: nothing to unmap.
                let _ = s.unmap(A);
            } else {
                s.unmap(A).unwrap();
            }
        }
        done.store(true, Ordering::Release);
    });
    lost.into_inner()
}

#[test]
fn a_one_page_writer_never_writes_into_an_unlinked_pte_page() {
    assert_eq!(lost_maps(false), 0, "a map was lost");
}

#[test]
fn negative_control_unchecked_hint_loses_maps() {
    // The race is timing-dependent: up to five runs (one usually loses
    // tens to thousands of maps on two cores).
    let runs = (1..=5).find(|run| {
        let lost = lost_maps(true);
        println!("run {run}: maps lost without the check: {lost} of {ROUNDS}");
        lost > 0
    });
    assert!(
        runs.is_some(),
        "five runs did not see a map lost without the check"
    );
}
