//! Shared helpers for the mock-backend tests (included with `#[path]`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pagepin::backends::mock::{MockBackend, NetEffect, RecordedBatch};
use pagepin::{AddressSpace, FrameStore, LockPolicy, PagingMode, Pfn, RawLock};

/// The net effect of the calls a mock recorded: which frames are left
/// read-only, how many pins each frame has, how many full TLB flushes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    pub read_only: BTreeSet<u64>,
    pub pins: BTreeMap<u64, i64>,
    pub flushes: usize,
}

pub fn replay(batches: &[RecordedBatch]) -> Replay {
    let n = NetEffect::replay(batches);
    Replay {
        read_only: n.read_only(),
        pins: n.pins,
        flushes: n.flushes,
    }
}

#[path = "snapshot.rs"]
mod store_image;
pub use store_image::StoreImage as Snapshot;

/// Everything about the store that an operation could change (the tests'
/// one snapshot, `support/snapshot.rs`).
pub fn snapshot<L: RawLock>(store: &FrameStore<L>) -> Snapshot {
    store_image::image(store)
}

/// No frame flagged pinned, no lock held, nothing read-only or pinned at
/// the (mock) hypervisor.
pub fn assert_clean<M: PagingMode, P: LockPolicy>(space: &AddressSpace<M, P, MockBackend>) {
    let problems = clean_problems(space);
    assert!(problems.is_empty(), "{problems:?}");
}

pub fn clean_problems<M: PagingMode, P: LockPolicy>(
    space: &AddressSpace<M, P, MockBackend>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let store = space.store();
    for i in 0..store.len() {
        let pfn = Pfn(store.base().0 + i as u64);
        let m = store.meta(pfn).unwrap();
        if m.is_pinned() {
            problems.push(format!("{pfn:?} still flagged pinned"));
        }
        if m.lock().is_locked() {
            problems.push(format!("{pfn:?} lock still held"));
        }
    }
    if space.space_lock().is_locked() {
        problems.push("space lock held".into());
    }
    let r = replay(&space.backend().batches());
    if !r.read_only.is_empty() {
        problems.push(format!("still read-only: {:x?}", r.read_only));
    }
    if !r.pins.is_empty() {
        problems.push(format!("still pinned: {:x?}", r.pins));
    }
    problems
}

pub fn new_store<L: RawLock>(frames: usize) -> Arc<FrameStore<L>> {
    Arc::new(FrameStore::new(frames, 0x100))
}
