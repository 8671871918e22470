//! Helpers shared by the Xen backend tests: an environment (frame store,
//! simulated hypervisor, backend), spaces with a chosen number of PTE pages,
//! and state snapshots.
#![allow(dead_code)]

use std::sync::Arc;

use pagepin::backends::xen::{xen_env, FrameInfo, XenBackend, XenEnv, XenSim};
use pagepin::{
    AddressSpace, DefaultRawLock, EntryFlags, Level, LockPolicy, PageSize, PageTableEntry,
    PagingMode, Pfn, RawLock, SpaceOptions,
};

/// The backend type of every test space.
pub type Xb = XenBackend<Arc<XenSim>>;
/// A space on the simulated hypervisor.
pub type Space<M, P> = AddressSpace<M, P, Xb>;
/// The environment with the default lock.
pub type Env = XenEnv<DefaultRawLock>;

/// Table frames / domain pages used unless a test says otherwise.
pub const TABLES: usize = 256;
pub const PAGES: usize = 1024;

/// A fresh environment for mode `M`.
pub fn env<M: PagingMode>(seed: u64) -> Env {
    xen_env::<M, DefaultRawLock>(TABLES, PAGES, seed, 0).expect("env")
}

/// A sized environment.
pub fn env_sized<M: PagingMode>(tables: usize, pages: usize, seed: u64, trap_ns: u64) -> Env {
    xen_env::<M, DefaultRawLock>(tables, pages, seed, trap_ns).expect("env")
}

/// A new space.
pub fn space<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(
    e: &Env,
    user_root: bool,
) -> Space<M, P> {
    AddressSpace::new(
        e.store.clone(),
        e.backend.clone(),
        SpaceOptions { user_root },
    )
    .expect("space")
}

/// Virtual address of PTE page `j` (one L1 per 2 MiB), page `k` inside it.
/// Spread over two L2s (1 GiB apart) and two L3s (512 GiB apart) in x86-64.
pub fn va_of<M: PagingMode>(j: usize, k: usize) -> u64 {
    let base: u64 = if M::ROOT_ENTRIES == 4 {
        0x4000_0000
    } else {
        0x10_0000_0000
    };
    let l2 = (j % 2) as u64;
    let (l3, within) = if M::ROOT_ENTRIES == 4 {
        (0, (j / 2) as u64)
    } else {
        (((j / 2) % 2) as u64, (j / 4) as u64)
    };
    base + (l3 << 39) + (l2 << 30) + (within << 21) + ((k as u64) << 12)
}

/// The data pfn a test maps at (PTE page j, page k): below the table memory.
pub fn data_pfn(j: usize, k: usize) -> u64 {
    ((j * 8 + k) % (PAGES - TABLES)) as u64
}

/// Map page 0 of `n` PTE pages (read-only data), creating the L1s.
pub fn populate<M: PagingMode, P: LockPolicy>(s: &Space<M, P>, n: usize) {
    for j in 0..n {
        s.map(
            va_of::<M>(j, 0),
            data_pfn(j, 0) << 12,
            PageSize::Size4K,
            EntryFlags::PRESENT | EntryFlags::USER,
        )
        .expect("map");
    }
}

/// A leaf entry for data pfn `pfn` through `s`'s backend.
pub fn leaf<M: PagingMode, P: LockPolicy>(
    s: &Space<M, P>,
    pfn: u64,
    flags: EntryFlags,
) -> PageTableEntry {
    let mfn = pagepin::Backend::pfn_to_mfn(&**s.backend(), Pfn(pfn));
    PageTableEntry::new(mfn.0, flags)
}

/// What we compare before and after a failed operation: the hypervisor's
/// view of every frame (type, count, pinned, mapping) and the engine's
/// pinned flags and locks.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Snap {
    pub frames: Vec<(u64, String, u32, bool, bool, Option<bool>)>,
    pub engine_pinned: Vec<(u64, bool)>,
    pub space_pinned: bool,
}

pub fn snap<M: PagingMode, P: LockPolicy>(e: &XenEnv<P::Lock>, s: &Space<M, P>) -> Snap {
    let n = e.sim.config().nr_pages as u64;
    let frames = (0..n)
        .map(|p| {
            let i: FrameInfo = e.sim.frame_info(Pfn(p)).expect("frame");
            (
                p,
                format!("{:?}", i.ty),
                i.count,
                i.validated,
                i.pinned,
                i.direct_map_writable,
            )
        })
        .collect();
    let base = e.store.base().0;
    let engine_pinned = (0..e.store.len() as u64)
        .map(|i| {
            (
                base + i,
                e.store.meta(Pfn(base + i)).expect("meta").is_pinned(),
            )
        })
        .collect();
    Snap {
        frames,
        engine_pinned,
        space_pinned: s.is_pinned(),
    }
}

/// Whether any lock of the store (or the space lock) is held.
pub fn any_lock_held<M: PagingMode, P: LockPolicy>(e: &XenEnv<P::Lock>, s: &Space<M, P>) -> bool {
    let base = e.store.base().0;
    s.space_lock().is_locked()
        || (0..e.store.len() as u64).any(|i| {
            e.store
                .meta(Pfn(base + i))
                .expect("meta")
                .lock()
                .is_locked()
        })
}

/// Every frame at rest (untyped tables, everything mapped writable).
pub fn assert_quiet(sim: &XenSim) {
    let bad = sim.unquiet_frames();
    assert!(
        bad.is_empty(),
        "frames not at rest: {:?}",
        &bad[..bad.len().min(8)]
    );
    assert!(sim.typed_tables().is_empty());
}

/// The table frames of a space at `level`.
pub fn tables_at<M: PagingMode, P: LockPolicy>(s: &Space<M, P>, level: Level) -> Vec<Pfn> {
    s.table_frames()
        .expect("walk")
        .into_iter()
        .filter(|(_, l)| *l == level)
        .map(|(p, _)| p)
        .collect()
}

/// Let writer threads make progress: wait until `counter` has grown by
/// `at_least`, yielding at most `yields` times (bounded: on a loaded host
/// the pinner would otherwise finish a phase before any writer ran).
pub fn let_writers_run(counter: &std::sync::atomic::AtomicU64, at_least: u64, yields: usize) {
    let start = counter.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..yields {
        if counter.load(std::sync::atomic::Ordering::Relaxed) >= start + at_least {
            break;
        }
        std::thread::yield_now();
    }
}
