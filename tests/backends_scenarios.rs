//! One scenario suite, run on every backend: mock, native and (with the
//! `xen` feature) the simulated Xen hypervisor; mock and native also in
//! 5-level mode (`La57`; Xen PV is 4-level only).
//!
//! Each scenario is a generic function over a [`Platform`]: how to build a
//! space on that backend, and the backend's [`PinObserver`], which says
//! whether the tables are pinned; [`check_tables`] and [`check_quiet`] hold
//! every platform to the same answers. The `scenarios!` macro instantiates
//! all of them for one platform, so swapping backends in your own tests is
//! one line:
//!
//! ```text
//! scenarios!(my_backend, MyPlatform);
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pagepin::backends::mock::{MockBackend, Recorded};
use pagepin::backends::native::NativeBackend;
use pagepin::backends::{check_frame, Expected, PinObserver};
use pagepin::ExtCmd;
use pagepin::{
    AddressSpace, Backend, Batch, DefaultRawLock, EntryFlags, Error, FrameStore, La57, Level,
    PageSize, PageTableEntry, PagingMode, Pfn, SpaceOptions, Split, WritePath, X86_64,
};
use std::marker::PhantomData;

/// Table frames and domain pages of every platform: tables at the top
/// (pfns 768..1024), data pages below.
const TABLES: usize = 256;
const PAGES: usize = 1024;
const TABLE_BASE: u64 = (PAGES - TABLES) as u64;

/// A space on platform `P`.
type Space<P> = AddressSpace<<P as Platform>::M, Split, <P as Platform>::B>;

/// What a scenario needs from a backend.
trait Platform: Sized {
    /// The paging mode.
    type M: PagingMode;
    /// The backend.
    type B: Backend;
    /// What the platform thinks is pinned, read-only or leaked.
    type O: PinObserver;
    /// Whether the platform takes 2 MiB leaves (Xen PV does not).
    const LARGE_PAGES: bool;
    /// A fresh platform (store + backend).
    fn new(seed: u64) -> Self;
    /// A new space on it.
    fn space(&self) -> Space<Self>;
    /// Traps / batches issued so far (to show that a refusal issued none).
    fn traps(&self) -> u64;
    /// Unpin operations issued so far.
    fn unpins(&self) -> u64;
    /// Its observer.
    fn observer(&self) -> &Self::O;
    /// The backend's own consistency checks, beside the observer's answers
    /// (none by default).
    fn check_backend(&self) {}
}

/// A space over `store` and `backend`.
fn space_on<M: PagingMode, B: Backend>(
    store: &Arc<FrameStore<DefaultRawLock>>,
    backend: &Arc<B>,
) -> AddressSpace<M, Split, B> {
    AddressSpace::new(store.clone(), backend.clone(), SpaceOptions::default()).unwrap()
}

/// Check, from the backend's side, that `tables` are pinned (read-only,
/// validated, the root and each L1 pinned itself) or all back to normal.
/// A platform without pinning leaves them at rest either way: pin is
/// bookkeeping only there, and no batch is ever issued.
fn check_tables<P: Platform>(p: &P, space: &Space<P>, tables: &[(Pfn, Level)], pinned: bool) {
    let pinned = pinned && P::B::PINNING;
    let root = <P::M as PagingMode>::ROOT_LEVEL;
    for &(pfn, level) in tables {
        let own_pin = level == Level::L1 || level == root;
        let want = Expected::table(pinned, level, own_pin);
        if let Err(what) = check_frame(p.observer(), pfn, want) {
            let o = p.observer();
            panic!(
                "{}: {pfn:?} ({level:?}) {what}: want {want:?}, read-only {:?}, type {:?}, pin {:?}",
                P::B::NAME,
                o.read_only(pfn),
                o.table_level(pfn),
                o.pinned(pfn)
            );
        }
        assert_eq!(
            space.store().meta(pfn).unwrap().is_pinned(),
            pinned,
            "{}: {pfn:?} ({level:?}) flagged",
            P::B::NAME
        );
    }
    if !P::B::PINNING {
        assert_eq!((p.traps(), p.unpins()), (0, 0), "{}", P::B::NAME);
    }
    p.check_backend();
}

/// Check that nothing is left typed, read-only or pinned (after teardown).
fn check_quiet<P: Platform>(p: &P) {
    let leaked = p.observer().leaked(Pfn(0)..Pfn(PAGES as u64));
    assert_eq!(leaked, 0, "{}: frames left as tables", P::B::NAME);
    if !P::B::PINNING {
        assert_eq!(p.traps(), 0, "{}", P::B::NAME);
    }
    p.check_backend();
}

/// The table frames and a backend over them, in mode `M` (mock, native).
struct OnStore<M, B> {
    store: Arc<FrameStore<DefaultRawLock>>,
    backend: Arc<B>,
    _mode: PhantomData<M>,
}

impl<M, B> OnStore<M, B> {
    /// The table frames and the backend `with` builds over them.
    fn with_backend(with: impl FnOnce(Arc<FrameStore<DefaultRawLock>>) -> B) -> Self {
        let store = Arc::new(FrameStore::new(TABLES, TABLE_BASE));
        OnStore {
            backend: Arc::new(with(store.clone())),
            store,
            _mode: PhantomData,
        }
    }
}

// ---------------------------------------------------------------- mock

type MockPlatform<M> = OnStore<M, MockBackend>;

impl<M: PagingMode> Platform for MockPlatform<M> {
    type M = M;
    type B = MockBackend;
    type O = MockBackend;
    const LARGE_PAGES: bool = true;
    fn new(_seed: u64) -> Self {
        // With memory, accepted mmu_updates are applied (pinned upper tables
        // stay writable through the "hypervisor").
        OnStore::with_backend(|store| MockBackend::with_memory(store))
    }
    fn space(&self) -> Space<Self> {
        space_on(&self.store, &self.backend)
    }
    fn traps(&self) -> u64 {
        self.backend.batch_count() as u64
    }
    fn unpins(&self) -> u64 {
        self.backend
            .calls()
            .iter()
            .map(|c| match c {
                Recorded::MmuExtOp(ops) => {
                    ops.iter().filter(|o| o.cmd == ExtCmd::UnpinTable).count() as u64
                }
                _ => 0,
            })
            .sum()
    }
    fn observer(&self) -> &MockBackend {
        &self.backend
    }
    fn check_backend(&self) {
        // The observer says "pinned" for any unbalanced frame: a frame is
        // pinned once or not at all.
        let pins = self.backend.net_effect().pins;
        assert!(
            pins.values().all(|n| *n == 1),
            "mock: pin balance {pins:x?}"
        );
    }
}

// ---------------------------------------------------------------- native

type NativePlatform<M> = OnStore<M, NativeBackend>;

impl<M: PagingMode> Platform for NativePlatform<M> {
    type M = M;
    type B = NativeBackend;
    type O = NativeBackend;
    const LARGE_PAGES: bool = true;
    fn new(_seed: u64) -> Self {
        OnStore::with_backend(|store| NativeBackend::with_memory(store))
    }
    fn space(&self) -> Space<Self> {
        space_on(&self.store, &self.backend)
    }
    fn traps(&self) -> u64 {
        self.backend.counters().batches
    }
    fn unpins(&self) -> u64 {
        self.backend.counters().pin_ops
    }
    fn observer(&self) -> &NativeBackend {
        &self.backend
    }
    fn check_backend(&self) {
        let c = self.backend.counters();
        assert_eq!(
            c.invalidations,
            c.stores - c.unchanged_stores,
            "native: one invalidation per changed entry"
        );
    }
}

// ---------------------------------------------------------------- xen

#[cfg(feature = "xen")]
mod xen_platform {
    use super::*;
    use pagepin::backends::xen::{xen_env, XenBackend, XenEnv, XenSim};

    pub struct XenPlatform(XenEnv<DefaultRawLock>);

    impl Platform for XenPlatform {
        type M = X86_64;
        type B = XenBackend<Arc<XenSim>>;
        type O = XenSim;
        const LARGE_PAGES: bool = false;
        fn new(seed: u64) -> Self {
            XenPlatform(xen_env::<X86_64, DefaultRawLock>(TABLES, PAGES, seed, 0).expect("xen env"))
        }
        fn space(&self) -> Space<Self> {
            space_on(&self.0.store, &self.0.backend)
        }
        fn traps(&self) -> u64 {
            self.0.sim.trap_count()
        }
        fn unpins(&self) -> u64 {
            self.0.sim.stats().ext_cmds[ExtCmd::UnpinTable as usize]
        }
        fn observer(&self) -> &XenSim {
            &self.0.sim
        }
        fn check_backend(&self) {
            assert!(
                self.0.sim.check_all().is_empty(),
                "xen: a typed table is writable"
            );
        }
    }
}
#[cfg(feature = "xen")]
use xen_platform::XenPlatform;

// ---------------------------------------------------------------- scenarios

/// Data page `i` (below the table frames on every platform).
fn data_pa(i: u64) -> u64 {
    (16 + i) << 12
}

/// Virtual address of page `k` of region `r` (regions 1 GiB apart in two
/// root slots).
fn va(r: u64, k: u64) -> u64 {
    0x10_0000_0000 + ((r % 2) << 39) + ((r / 2) << 30) + (k << 12)
}

fn map_some<P: Platform>(space: &Space<P>, regions: u64, per_region: u64) -> Vec<u64> {
    let mut vas = Vec::new();
    for r in 0..regions {
        for k in 0..per_region {
            let v = va(r, k * 3);
            let flags = if k % 3 == 0 {
                EntryFlags::PRESENT | EntryFlags::USER
            } else {
                EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::NO_EXECUTE
            };
            space
                .map(v, data_pa(r * 64 + k), PageSize::Size4K, flags)
                .unwrap();
            vas.push(v);
        }
    }
    if P::M::LEVELS == 5 {
        // Above the 4-level range: root slots 1 and 255 of the L5 (the top
        // of the 57-bit user half).
        for v in [1u64 << 48, (1 << 56) - (1 << 30)] {
            space
                .map(v, data_pa(200), PageSize::Size4K, EntryFlags::PRESENT)
                .unwrap();
            assert_eq!(space.translate(v + 8).unwrap().phys, data_pa(200) + 8);
            vas.push(v);
        }
    }
    if P::LARGE_PAGES {
        // 2 MiB leaves next to the 4 KiB ones (pa 2 MiB-aligned, below tables).
        space
            .map(
                va(0, 0) + (4 << 21),
                1 << 21,
                PageSize::Size2M,
                EntryFlags::PRESENT,
            )
            .unwrap();
        assert_eq!(
            space.translate(va(0, 0) + (4 << 21) + 0x1234).unwrap().phys,
            (1 << 21) + 0x1234
        );
    }
    vas
}

/// Map, pin, write through both paths, grow and shrink the pinned space,
/// unpin, pin again and tear down.
fn lifecycle<P: Platform>() {
    let p = P::new(1);
    let space = p.space();
    let vas = map_some::<P>(&space, 3, 12);
    let tables = space.table_frames().unwrap();
    assert!(tables.len() >= 1 + 2 + 2 + 3, "{tables:?}");
    check_tables(&p, &space, &tables, false);

    let mut b: Batch = Batch::new();
    space.pin(&mut b).unwrap();
    assert!(space.is_pinned());
    check_tables(&p, &space, &tables, true);

    // Writers: the store path (Xen traps and emulates on a pinned L1) and
    // the hypercall path.
    for (i, &v) in vas.iter().enumerate().take(6) {
        let path = if i % 2 == 0 {
            WritePath::Store
        } else {
            WritePath::Hypercall
        };
        // Entries hold *machine* frames: on Xen the p2m is not the identity.
        let mfn = space
            .backend()
            .pfn_to_mfn(Pfn(data_pa(500 + i as u64) >> 12));
        let new = PageTableEntry::new(
            mfn.0,
            EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::ACCESSED,
        );
        let old = space.set_pte(v, new, path).unwrap();
        assert!(old.is_present());
        assert_eq!(
            space.translate(v).unwrap().phys,
            data_pa(500 + i as u64),
            "{path:?}"
        );
    }
    // Grow: a new region needs new L3/L2/L1 tables, made read-only (and
    // pinned) before they are linked.
    let far = va(5, 7);
    space
        .map(far, data_pa(600), PageSize::Size4K, EntryFlags::PRESENT)
        .unwrap();
    let grown = space.table_frames().unwrap();
    assert!(grown.len() > tables.len());
    check_tables(&p, &space, &grown, true);
    // Shrink: unmap the page, release its L1 (unlinked, unpinned, writable).
    assert_eq!(space.unmap(far).unwrap().phys, data_pa(600));
    assert_eq!(space.translate(far), None);
    let l1 = grown
        .iter()
        .copied()
        .find(|t| !tables.contains(t) && t.1 == Level::L1)
        .unwrap();
    space.release_table(far, Level::L1).unwrap();
    check_tables(&p, &space, &[l1], false);
    let now = space.table_frames().unwrap();
    assert_eq!(now.len(), grown.len() - 1);

    space.unpin(&mut b).unwrap();
    assert!(!space.is_pinned());
    check_tables(&p, &space, &now, false);
    for (i, &v) in vas.iter().enumerate().take(6) {
        assert_eq!(
            space.translate(v).unwrap().phys,
            data_pa(500 + i as u64),
            "writes survive unpin"
        );
    }

    space.pin(&mut b).unwrap();
    let unpins = p.unpins();
    space.teardown().unwrap();
    assert!(
        p.unpins() > unpins || !P::B::PINNING,
        "teardown of a pinned space unpins"
    );
    check_quiet(&p);
}

/// A space never pinned is torn down without a single unpin.
fn never_pinned_teardown<P: Platform>() {
    let p = P::new(2);
    let space = p.space();
    map_some::<P>(&space, 2, 5);
    let (traps, unpins) = (p.traps(), p.unpins());
    space.teardown().unwrap();
    assert_eq!(p.unpins(), unpins, "no unpin for a never-pinned space");
    assert_eq!(p.traps(), traps, "no hypercall at all");
    check_quiet(&p);
}

/// Refusals: double pin, unpin of an unpinned space, bad addresses, a
/// mapping in the way. Each is a typed error, issues nothing and changes
/// nothing.
fn refusals<P: Platform>() {
    let p = P::new(3);
    let space = p.space();
    let vas = map_some::<P>(&space, 2, 4);
    let snapshot = |s: &Space<P>| -> Vec<u64> {
        let st = s.store();
        (0..TABLES as u64)
            .flat_map(|i| {
                st.frame(Pfn(TABLE_BASE + i))
                    .unwrap()
                    .entries()
                    .iter()
                    .map(|e| e.load(Ordering::Acquire))
            })
            .collect()
    };
    let mut b: Batch = Batch::new();
    assert_eq!(space.unpin(&mut b).unwrap_err(), Error::NotPinned);
    space.pin(&mut b).unwrap();
    let (before, traps) = (snapshot(&space), p.traps());
    assert_eq!(space.pin(&mut b).unwrap_err(), Error::AlreadyPinned);
    let f = EntryFlags::PRESENT;
    // The first non-canonical address of the mode (2^47, or 2^56 in 5-level).
    let hole = 1u64 << (<P::M as PagingMode>::VA_BITS - 1);
    assert_eq!(
        space.map(hole, 0, PageSize::Size4K, f),
        Err(Error::NonCanonical { va: hole })
    );
    assert!(matches!(
        space.map(va(0, 1) + 8, 0, PageSize::Size4K, f),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        space.map(vas[0], data_pa(1), PageSize::Size4K, f),
        Err(Error::AlreadyMapped { .. })
    ));
    // A large leaf: in the way of the PTE page there, or refused outright
    // where the platform has none (the backend says so, pinned or not).
    let large = space.map(va(0, 0), 1 << 21, PageSize::Size2M, f);
    if P::LARGE_PAGES {
        assert!(matches!(large, Err(Error::AlreadyMapped { .. })));
    } else {
        assert_eq!(large, Err(Error::UnsupportedPageSize));
    }
    assert_eq!(<P::B as Backend>::LARGE_LEAVES, P::LARGE_PAGES);
    assert!(matches!(
        space.unmap(va(1, 1)),
        Err(Error::NotMapped { .. })
    ));
    assert!(matches!(
        space.release_table(vas[0], Level::L1),
        Err(Error::TableNotEmpty { .. })
    ));
    assert_eq!(snapshot(&space), before, "refusals changed the tables");
    assert_eq!(p.traps(), traps, "refusals issued hypercalls");
    space.unpin(&mut b).unwrap();
    assert_eq!(space.unpin(&mut b).unwrap_err(), Error::NotPinned);
    space.teardown().unwrap();
    check_quiet(&p);
}

macro_rules! scenarios {
    ($name:ident, $platform:ty) => {
        mod $name {
            use super::*;

            #[test]
            fn lifecycle() {
                super::lifecycle::<$platform>();
            }
            #[test]
            fn never_pinned_teardown() {
                super::never_pinned_teardown::<$platform>();
            }
            #[test]
            fn refusals() {
                super::refusals::<$platform>();
            }
        }
    };
}

scenarios!(mock, MockPlatform<X86_64>);
scenarios!(native, NativePlatform<X86_64>);
scenarios!(mock_la57, MockPlatform<La57>);
scenarios!(native_la57, NativePlatform<La57>);
#[cfg(feature = "xen")]
scenarios!(xen, XenPlatform);
