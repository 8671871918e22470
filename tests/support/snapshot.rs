//! The tests' one snapshot of a frame store: everything an operation could
//! change in it (every entry of every frame, and each frame's level,
//! pinned flag, allocation and lock), to show that a refused operation
//! changed nothing.
#![allow(dead_code)]

use pagepin::{FrameStore, Level, Pfn, RawLock};

/// A store's state at one moment.
#[derive(Debug, PartialEq, Eq)]
pub struct StoreImage {
    /// Every entry of every frame, in frame order.
    pub entries: Vec<u64>,
    /// Per frame: level, pinned flag, allocated, PTE lock held.
    pub meta: Vec<(Option<Level>, bool, bool, bool)>,
}

/// The state of `store` now.
pub fn image<L: RawLock>(store: &FrameStore<L>) -> StoreImage {
    let mut entries = Vec::with_capacity(store.len() * 512);
    let mut meta = Vec::with_capacity(store.len());
    for i in 0..store.len() {
        let pfn = Pfn(store.base().0 + i as u64);
        entries.extend(
            store
                .frame(pfn)
                .expect("in store")
                .entries()
                .iter()
                .map(|e| e.load(std::sync::atomic::Ordering::Acquire)),
        );
        let m = store.meta(pfn).expect("in store");
        meta.push((
            m.level(),
            m.is_pinned(),
            m.is_allocated(),
            m.lock().is_locked(),
        ));
    }
    StoreImage { entries, meta }
}
