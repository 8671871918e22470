//! Regressions of the engine found by review (each failed before its fix):
//!
//! - `unmap` of a large leaf with PAT reported bit 12 as an address bit
//!   (mfn + 1 on Xen) where `translate` said the page base with PAT;
//! - `map` (and the cursor) accepted a physical address an entry cannot
//!   hold, or a guest frame the backend does not have, and truncated it;
//! - kernel-half mappings were accepted but not walked by pin, unpin and
//!   teardown (leaked frames; Xen refused the pin), and the hypervisor's
//!   hole was accepted;
//! - `pin_all` (and `pin_all_par`) claimed a pin another thread made.

#[path = "support/xen.rs"]
mod xen_common;

#[path = "support/mock.rs"]
mod mock_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use pagepin::backends::mock::MockBackend;
use pagepin::{
    pin_all, unpin_all, AddressSpace, Batch, DefaultRawLock, EntryFlags, Error, Global, LockPolicy,
    PageSize, SpaceOptions, Split, X86_64,
};
use xen_common::*;

const RW: EntryFlags = EntryFlags::PRESENT.union(EntryFlags::WRITABLE);
const RO: EntryFlags = EntryFlags::PRESENT;

type MockSpace<P> = AddressSpace<X86_64, P, MockBackend>;

fn mock_space<P: LockPolicy<Lock = DefaultRawLock>>(frames: usize) -> MockSpace<P> {
    AddressSpace::new(
        mock_common::new_store(frames),
        Arc::new(MockBackend::new()),
        SpaceOptions::default(),
    )
    .expect("space")
}

// ---------------------------------------------------------------------------
// 4. unmap of a large leaf with PAT

#[test]
fn unmap_of_a_large_pat_leaf_reports_what_translate_reports() {
    let s = mock_space::<Split>(64);
    for (va, pa, size) in [
        (0x4000_0000u64, 0x8000_0000u64, PageSize::Size2M),
        (0x80_0000_0000, 0x1_4000_0000, PageSize::Size1G),
    ] {
        s.map(va, pa, size, RW | EntryFlags::PAT_LARGE).unwrap();
        let t = s.translate(va).expect("mapped");
        assert_eq!(t.phys, pa, "translate of {va:#x}");
        assert!(t.flags.contains(EntryFlags::PAT_LARGE));
        let u = s.unmap(va).unwrap();
        assert_eq!(u, t, "unmap of {va:#x} must report what translate did");
        assert_eq!(s.translate(va), None);
    }
}

/// Xen PV refuses large leaves: `map` says so whether or not the space is
/// pinned (before, a 2 MiB map succeeded unpinned and failed pinned, and a
/// pin over one failed).
#[test]
fn large_leaves_on_xen_are_refused_pinned_or_not() {
    let e = env::<X86_64>(41);
    let s: Space<X86_64, Split> = space(&e, false);
    populate(&s, 1);
    let before = snap(&e, &s);
    for pinned in [false, true] {
        if pinned {
            s.pin(&mut Batch::<8>::new()).unwrap();
        }
        for (va, size) in [
            (0x4000_0000u64, PageSize::Size2M),
            (0x80_0000_0000, PageSize::Size1G),
        ] {
            assert_eq!(
                s.map(va, 0, size, RO | EntryFlags::PAT_LARGE),
                Err(Error::UnsupportedPageSize),
                "pinned: {pinned}"
            );
            let mut c = s.cursor_mut(va..va + size.bytes()).unwrap();
            assert_eq!(c.map(0, size, RO), Err(Error::UnsupportedPageSize));
        }
    }
    s.unpin(&mut Batch::<8>::new()).unwrap();
    assert_eq!(snap(&e, &s), before);
}

// ---------------------------------------------------------------------------
// 5. physical addresses an entry cannot hold

#[test]
fn map_refuses_physical_addresses_beyond_an_entry_and_changes_nothing() {
    let s = mock_space::<Split>(64);
    s.map(0x1000, 0x2000, PageSize::Size4K, RW).unwrap();
    let before = mock_common::snapshot(s.store());
    for pa in [1u64 << 52, 1 << 47, 1 << 46, !0xfff] {
        assert_eq!(
            s.map(0x7000, pa, PageSize::Size4K, RW),
            Err(Error::PhysicalOutOfRange { pa }),
            "{pa:#x}"
        );
        // A new region: the refusal comes before any table is linked.
        assert_eq!(
            s.map(0x80_0000_0000, pa, PageSize::Size4K, RW),
            Err(Error::PhysicalOutOfRange { pa }),
        );
        let mut c = s.cursor_mut(0x40_0000_0000..0x40_0000_1000).unwrap();
        assert_eq!(
            c.map(pa, PageSize::Size4K, RW),
            Err(Error::PhysicalOutOfRange { pa })
        );
        assert_eq!(c.va(), 0x40_0000_0000, "a refused map does not move");
    }
    assert_eq!(mock_common::snapshot(s.store()), before);
    // The highest frame an entry holds is accepted and translates back.
    let top = (1u64 << 46) - 4096;
    s.map(0x7000, top, PageSize::Size4K, RW).unwrap();
    assert_eq!(s.translate(0x7000).map(|t| t.phys), Some(top));
}

#[test]
fn map_on_xen_refuses_a_frame_outside_the_guest() {
    let e = env::<X86_64>(42);
    let s: Space<X86_64, Split> = space(&e, false);
    let allocated = e.store.allocated();
    let pa = (PAGES as u64) << 12; // one past the domain's last frame
    assert_eq!(
        s.map(0x1000, pa, PageSize::Size4K, RW),
        Err(Error::PhysicalOutOfRange { pa })
    );
    assert_eq!(e.store.allocated(), allocated, "no table was linked");
    let pa = pa - 4096;
    s.map(0x1000, pa, PageSize::Size4K, RO).unwrap();
    assert_eq!(s.translate(0x1000).map(|t| t.phys), Some(pa));
}

// ---------------------------------------------------------------------------
// 6. the kernel half and the hypervisor's hole

#[test]
fn the_hypervisor_hole_is_refused() {
    let s = mock_space::<Split>(64);
    let before = mock_common::snapshot(s.store());
    for va in [
        0xffff_8000_0000_0000u64,
        0xffff_8000_0020_0000,
        0xffff_87ff_ffff_f000,
    ] {
        assert_eq!(
            s.map(va, 0, PageSize::Size4K, RW),
            Err(Error::HypervisorHole { va })
        );
        let mut c = s.cursor_mut(va..va + 4096).unwrap();
        assert_eq!(
            c.map(0, PageSize::Size4K, RW),
            Err(Error::HypervisorHole { va })
        );
    }
    assert_eq!(mock_common::snapshot(s.store()), before);
    // Just past the hole (slot 272) is the kernel's.
    s.map(0xffff_8800_0000_0000, 0, PageSize::Size4K, RW)
        .unwrap();
}

fn kernel_half_on_xen<P: LockPolicy<Lock = DefaultRawLock>>() {
    let e = env::<X86_64>(43);
    let allocated = e.store.allocated();
    let s: Space<X86_64, P> = space(&e, true);
    let kva = 0xffff_c000_0000_0000u64;
    s.map(kva, 0x3000, PageSize::Size4K, RO).unwrap();
    s.map(kva + (1 << 30), 0x6000, PageSize::Size4K, RO)
        .unwrap();
    s.map(0x1000, 0x4000, PageSize::Size4K, RO).unwrap();
    let tables = s.table_frames().unwrap();
    // root; user L3, L2, L1; kernel L3, two L2s, two L1s.
    assert_eq!(tables.len(), 1 + 3 + 5, "kernel-half tables walked");
    let mut b: Batch<8> = Batch::new();
    s.pin(&mut b).expect("pin covers the kernel half");
    // Every table of both halves is typed by the pin.
    let typed = e.sim.typed_tables();
    for (pfn, _) in &tables {
        assert!(typed.iter().any(|t| t.pfn == *pfn), "{pfn:?} not typed");
    }
    // A writer in the kernel half while pinned links a table the
    // hypervisor accepts.
    s.map(kva + (2 << 30), 0x5000, PageSize::Size4K, RO)
        .unwrap();
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    s.pin(&mut b).unwrap();
    s.teardown().unwrap();
    assert_quiet(&e.sim);
    assert_eq!(e.store.quiesce(), 0);
    assert_eq!(e.store.allocated(), allocated, "teardown frees every table");
}

#[test]
fn kernel_half_mappings_are_pinned_unpinned_and_freed_split() {
    kernel_half_on_xen::<Split>();
}

#[test]
fn kernel_half_mappings_are_pinned_unpinned_and_freed_global() {
    kernel_half_on_xen::<Global>();
}

// ---------------------------------------------------------------------------
// 7. pin_all claims only its own pins

#[test]
fn pin_all_skips_a_space_pinned_by_someone_else() {
    let e = env::<X86_64>(44);
    let a: Space<X86_64, Split> = space(&e, false);
    let b: Space<X86_64, Split> = space(&e, false);
    populate(&a, 2);
    populate(&b, 2);
    let mut batch: Batch = Batch::new();
    a.pin(&mut batch).unwrap();
    let set = pin_all(&[&a, &b], &mut batch).unwrap();
    assert_eq!(set.indices, vec![1], "only b is pin_all's");
    unpin_all(&[&a, &b], set, &mut batch).unwrap();
    assert!(a.is_pinned(), "a's own pin survives unpin_all");
    assert!(!b.is_pinned());
    a.unpin(&mut batch).expect("the owner's unpin");
    assert_quiet(&e.sim);
}

/// One thread pins and unpins space 0 in a loop while another runs
/// `pin_all` / `unpin_all` (or the parallel versions) over spaces 0 and 1:
/// a pin that succeeded is always its caller's to unpin.
fn pin_all_against_an_owner(parallel: bool) {
    // The owner's own pins to complete (each one races the other thread),
    // within a bound of attempts: on a loaded host the other thread may
    // hold the space pinned for long stretches.
    const OWNER_PINS: u64 = 300;
    const ATTEMPTS: usize = 200_000;
    let e = env::<X86_64>(45);
    let a: Space<X86_64, Split> = space(&e, false);
    let b: Space<X86_64, Split> = space(&e, false);
    populate(&a, 4);
    populate(&b, 4);
    let stop = AtomicBool::new(false);
    let stolen = AtomicU64::new(0);
    let owner_pins = AtomicU64::new(0);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut batch: Batch<8> = Batch::new();
            for _ in 0..ATTEMPTS {
                if owner_pins.load(Ordering::Relaxed) >= OWNER_PINS {
                    break;
                }
                if a.pin(&mut batch).is_ok() {
                    owner_pins.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                    match a.unpin(&mut batch) {
                        Ok(_) => {}
                        Err(Error::NotPinned) => {
                            stolen.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => panic!("owner's unpin: {err:?}"),
                    }
                }
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Release);
        });
        sc.spawn(|| {
            let mut batch: Batch<8> = Batch::new();
            let spaces = [&a, &b];
            let mut rounds = 0;
            while !stop.load(Ordering::Acquire) || rounds < 8 {
                rounds += 1;
                if parallel {
                    let set = pagepin::parallel::pin_all_par::<_, _, _, 8>(&spaces).unwrap();
                    pagepin::parallel::unpin_all_par::<_, _, _, 8>(&spaces, set).unwrap();
                } else {
                    let set = pin_all(&spaces, &mut batch).unwrap();
                    unpin_all(&spaces, set, &mut batch).unwrap();
                }
                // Leave the owner a window with the space unpinned.
                std::thread::yield_now();
            }
        });
    });
    eprintln!(
        "owner pins {}, stolen {}",
        owner_pins.load(Ordering::Relaxed),
        stolen.load(Ordering::Relaxed)
    );
    assert_eq!(stolen.into_inner(), 0, "pin_all unpinned the owner's pin");
    assert!(owner_pins.into_inner() > 0);
    assert!(!a.is_pinned() && !b.is_pinned());
    assert_quiet(&e.sim);
}

#[test]
fn pin_all_never_claims_a_concurrent_pin() {
    pin_all_against_an_owner(false);
}

#[test]
fn pin_all_par_never_claims_a_concurrent_pin() {
    pin_all_against_an_owner(true);
}

/// The native backend (no pinning) answers two pins of one space as a
/// pinning backend does: exactly one succeeds.
#[test]
fn native_pin_state_is_exclusive() {
    use pagepin::backends::native::NativeBackend;
    let store = mock_common::new_store::<DefaultRawLock>(16);
    let s: AddressSpace<X86_64, Split, NativeBackend> = AddressSpace::new(
        store,
        Arc::new(NativeBackend::new()),
        SpaceOptions::default(),
    )
    .unwrap();
    const THREADS: usize = 4;
    for _ in 0..200 {
        let wins = AtomicU64::new(0);
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|sc| {
            for _ in 0..THREADS {
                sc.spawn(|| {
                    let mut b: Batch<1> = Batch::new();
                    barrier.wait();
                    match s.pin(&mut b) {
                        Ok(_) => {
                            wins.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Error::AlreadyPinned) => {}
                        Err(err) => panic!("{err:?}"),
                    }
                });
            }
        });
        assert_eq!(wins.into_inner(), 1);
        let mut b: Batch<1> = Batch::new();
        s.unpin(&mut b).unwrap();
        assert_eq!(s.unpin(&mut b), Err(Error::NotPinned));
    }
}

// ---------------------------------------------------------------------------
// translate: "not mapped" and "malformed" are different answers

#[test]
fn try_translate_tells_not_mapped_from_malformed() {
    let s = mock_space::<Split>(64);
    s.map(0x4000_0000, 0x8000, PageSize::Size4K, RW).unwrap();
    assert_eq!(
        s.try_translate(0x4000_0000).unwrap().map(|t| t.phys),
        Some(0x8000)
    );
    assert_eq!(s.try_translate(0x5000_0000), Ok(None), "empty entry");
    assert_eq!(s.try_translate(1 << 47), Ok(None), "non-canonical");
    // Corrupt the L3 entry on the way: it now names a frame outside the store.
    let l3 = s.table_frames().unwrap()[0].0;
    let slot = s.store().entry(l3, 1).unwrap();
    let good = slot.load(Ordering::Acquire);
    slot.store((0xdead_0000u64 << 12) | 0x67, Ordering::Release);
    assert!(matches!(
        s.try_translate(0x4000_0000),
        Err(Error::FrameOutOfRange { .. })
    ));
    assert_eq!(
        s.translate(0x4000_0000),
        None,
        "translate folds it into None"
    );
    slot.store(good, Ordering::Release);
    assert!(s.try_translate(0x4000_0000).unwrap().is_some());
}

/// The edges of the address space: the last page of the kernel half and
/// the last of the user half map, translate, protect and unmap like any
/// other (the one-page cursor has no range end to overflow); the first
/// non-canonical address is refused.
#[test]
fn the_last_pages_of_both_halves() {
    let s = mock_space::<Split>(64);
    for va in [!0xfffu64, (1u64 << 47) - 4096] {
        s.map(va, 0x5000, PageSize::Size4K, RW).unwrap();
        assert_eq!(s.translate(va + 0xfff).map(|t| t.phys), Some(0x5fff));
        s.protect(va, RO).unwrap();
        let t = s.unmap(va).unwrap();
        assert_eq!((t.phys, t.flags), (0x5000, RO));
        assert_eq!(s.translate(va), None);
    }
    // A 1 GiB page with PAT next to the top (the last GiB keeps the
    // tables of the page above).
    let top = !((1u64 << 30) - 1) - (1 << 30);
    s.map(top, 1 << 30, PageSize::Size1G, RW | EntryFlags::PAT_LARGE)
        .unwrap();
    let t = s.unmap(top).unwrap();
    assert_eq!(t.phys, 1 << 30);
    assert!(t.flags.contains(EntryFlags::PAT_LARGE));
    assert_eq!(
        s.map(1 << 47, 0, PageSize::Size4K, RW),
        Err(Error::NonCanonical { va: 1 << 47 })
    );
    s.teardown().unwrap();
}
