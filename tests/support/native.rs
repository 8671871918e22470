//! Shared helpers of the native tests: a seeded generator and a builder of
//! random x86-64 spaces (4 KiB, 2 MiB and optionally 1 GiB pages).
#![allow(dead_code)]

use std::sync::Arc;

use pagepin::{
    AddressSpace, Backend, EntryFlags, Error, FrameStore, LockPolicy, PageSize, PagingMode,
    SpaceOptions, X86_64,
};

#[path = "rng.rs"]
mod rng;
pub use rng::Rng;

/// First pfn of the test stores (1 MiB).
pub const STORE_BASE_PFN: u64 = 0x100;
/// Leaves point into [DATA_BASE, DATA_BASE + DATA_SPAN): far from the store.
pub const DATA_BASE: u64 = 1 << 32;
/// Size of the data window (1 GiB-aligned 1 GiB pages fit).
pub const DATA_SPAN: u64 = 64 << 30;

/// One mapping made by [`random_space`].
#[derive(Clone, Copy, Debug)]
pub struct Mapped {
    /// Virtual address (page base).
    pub va: u64,
    /// Physical address (page base).
    pub pa: u64,
    /// Page size.
    pub size: PageSize,
    /// Flags asked for (PS is added by the engine for large pages).
    pub flags: EntryFlags,
}

/// What to build.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// 4 KiB mappings to attempt.
    pub pages_4k: usize,
    /// 2 MiB mappings to attempt.
    pub pages_2m: usize,
    /// 1 GiB mappings to attempt.
    pub pages_1g: usize,
    /// Distinct 1 GiB regions the mappings cluster in.
    pub regions: usize,
}

/// Random leaf flags: always present; writable, NX, user, global,
/// accessed/dirty at random.
pub fn random_flags(rng: &mut Rng) -> EntryFlags {
    let mut f = EntryFlags::PRESENT;
    for (flag, pct) in [
        (EntryFlags::WRITABLE, 60),
        (EntryFlags::NO_EXECUTE, 35),
        (EntryFlags::USER, 50),
        (EntryFlags::GLOBAL, 20),
        (EntryFlags::ACCESSED, 40),
        (EntryFlags::DIRTY, 30),
    ] {
        if rng.chance(pct) {
            f |= flag;
        }
    }
    f
}

/// A canonical address from a root slot and a 39-bit offset.
pub fn slot_va(slot: u64, offset: u64) -> u64 {
    let raw = (slot << 39) | (offset & ((1 << 39) - 1));
    ((raw << 16) as i64 >> 16) as u64
}

/// A random root slot a space may map: not the last one (the KVM checker
/// may use it) and not the hypervisor's hole, which `map` refuses.
fn random_slot(rng: &mut Rng) -> u64 {
    loop {
        let slot = rng.below(511);
        if !X86_64::HYPERVISOR_HOLE.contains(&(slot as usize)) {
            return slot;
        }
    }
}

/// Build a random space in a store of `frames` frames. Mappings cluster in
/// `shape.regions` random 1 GiB regions (both halves of the address space,
/// never the last root slot, which the KVM checker may use); collisions
/// are skipped. Returns the space and what was mapped.
pub fn random_space<P: LockPolicy, B: Backend>(
    backend: Arc<B>,
    frames: usize,
    shape: Shape,
    rng: &mut Rng,
) -> (AddressSpace<X86_64, P, B>, Vec<Mapped>) {
    let store = Arc::new(FrameStore::new(frames, STORE_BASE_PFN));
    let space = AddressSpace::<X86_64, P, B>::new(store, backend, SpaceOptions::default())
        .expect("new space");
    let regions: Vec<u64> = (0..shape.regions.max(1))
        .map(|_| slot_va(random_slot(rng), rng.below(512) << 30))
        .collect();
    let mut mapped = Vec::new();
    let mut attempt = |size: PageSize, rng: &mut Rng| {
        let region = regions[rng.below(regions.len() as u64) as usize];
        let va = match size {
            PageSize::Size4K => region + (rng.below(8) << 21) + (rng.below(512) << 12),
            PageSize::Size2M => region + (rng.below(512) << 21),
            PageSize::Size1G => slot_va(random_slot(rng), rng.below(512) << 30),
        };
        let pa = DATA_BASE + (rng.below(DATA_SPAN / size.bytes()) * size.bytes());
        let flags = random_flags(rng);
        match space.map(va, pa, size, flags) {
            Ok(()) => mapped.push(Mapped {
                va,
                pa,
                size,
                flags,
            }),
            Err(Error::AlreadyMapped { .. }) => {}
            Err(e) => panic!("map {va:#x} {size:?}: {e}"),
        }
    };
    for _ in 0..shape.pages_1g {
        attempt(PageSize::Size1G, rng);
    }
    for _ in 0..shape.pages_2m {
        attempt(PageSize::Size2M, rng);
    }
    for _ in 0..shape.pages_4k {
        attempt(PageSize::Size4K, rng);
    }
    (space, mapped)
}

#[path = "snapshot.rs"]
mod store_image;
pub use store_image::StoreImage;

/// Everything about the store that an operation could change (the tests'
/// one snapshot, `support/snapshot.rs`).
pub fn snapshot<L: pagepin::RawLock>(store: &FrameStore<L>) -> StoreImage {
    store_image::image(store)
}
