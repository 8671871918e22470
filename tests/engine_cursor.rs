//! `AddressSpace::cursor_mut` and `AddressSpace::reader` against the
//! per-call `map` and `translate`: the same tables, entries, hypercalls and
//! errors (mock backend, Xen simulator, pinned and unpinned, split and
//! global, x86-64 and PAE), failures that change nothing, a PTE writer on
//! other PTE pages while a cursor maps, and readers that see releases.

#[path = "support/mock.rs"]
mod common;
#[path = "support/xen.rs"]
mod xen_common;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use common::new_store;
use pagepin::backends::mock::{MockBackend, NullBackend};
use pagepin::{
    AddressSpace, Backend, Batch, DefaultRawLock, EntryFlags, Error, FrameStore, Global, La57,
    Level, LockPolicy, Pae, PageSize, PageTableEntry, PagingMode, Pfn, RawLock, SpaceOptions,
    Split, WritePath, X86_64,
};

const RW: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER);

/// Everything a map can change in a store (the tests' one snapshot).
use common::{snapshot as image, Snapshot as Image};

/// [`image`] without the lock bits: what a failed call must leave alone
/// (the cursor's own PTE lock is its state, not the space's).
fn unlocked<L: RawLock>(store: &FrameStore<L>) -> Image {
    let mut i = image(store);
    for m in i.meta.iter_mut() {
        m.3 = false;
    }
    i
}

/// One map request.
#[derive(Clone, Copy, Debug)]
struct Op {
    va: u64,
    pa: u64,
    size: PageSize,
    flags: EntryFlags,
}

fn op(va: u64, pa: u64, size: PageSize, flags: EntryFlags) -> Op {
    Op {
        va,
        pa,
        size,
        flags,
    }
}

/// Map requests for mode `M`: runs of consecutive 4 KiB pages across PTE
/// pages, L2s and (x86-64) L3s and root slots; 2 MiB and 1 GiB pages; and
/// requests that must fail: already mapped (a page, a large page in the
/// way, a large page over a table), misaligned va and pa, bad flags, a
/// 1 GiB page on PAE, the PAE kernel-PMD slot.
fn ops<M: PagingMode>(seed: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed | 1);
    let pae = M::ROOT_ENTRIES == 4;
    let base: u64 = if pae { 0x4000_0000 } else { 0x10_0000_0000 };
    let mut v = Vec::new();
    let mut pfn = 0x1000u64;
    let mut page = |va: u64, v: &mut Vec<Op>| {
        pfn += 1;
        v.push(op(va, pfn << 12, PageSize::Size4K, RW));
    };
    // A run over three PTE pages (crosses two PTE-page boundaries).
    for i in 0..1100u64 {
        page(base + (i << 12), &mut v);
    }
    // The same pages again: already mapped.
    for i in [0u64, 511, 512, 1099] {
        page(base + (i << 12), &mut v);
    }
    // Across an L2 boundary (1 GiB), and (x86-64) a root-slot boundary.
    let l2_edge = base + (1 << 30) - (3 << 12);
    for i in 0..6u64 {
        page(l2_edge + (i << 12), &mut v);
    }
    if !pae {
        let slot_edge = (2u64 << 39) - (2 << 12);
        for i in 0..4u64 {
            page(slot_edge + (i << 12), &mut v);
        }
    }
    // Large pages: a free 2 MiB slot, one over an existing PTE page, a
    // 4 KiB page inside a mapped 2 MiB one.
    let big = base + (8 << 21);
    v.push(op(big, 0x4000_0000, PageSize::Size2M, RW));
    v.push(op(base, 0x4020_0000, PageSize::Size2M, RW));
    v.push(op(big + (5 << 12), 0x5000, PageSize::Size4K, RW));
    // 2 MiB with PAT (bit 12 of a large leaf) is allowed.
    v.push(op(
        big + (1 << 21),
        0x4040_0000,
        PageSize::Size2M,
        RW | EntryFlags::PAT_LARGE,
    ));
    // 1 GiB (an error on PAE).
    let giga = if pae { 0x8000_0000 } else { 0x40_0000_0000 };
    v.push(op(giga, 0x8000_0000, PageSize::Size1G, RW));
    v.push(op(giga + (7 << 12), 0x9000, PageSize::Size4K, RW));
    // Bad arguments.
    v.push(op(base + (600 << 12) + 8, 0x7000, PageSize::Size4K, RW));
    v.push(op(base + (2000 << 12), 0x7001, PageSize::Size4K, RW));
    v.push(op(
        base + (2000 << 12),
        0x7000,
        PageSize::Size4K,
        EntryFlags::WRITABLE,
    ));
    v.push(op(
        base + (2000 << 12),
        0x7000,
        PageSize::Size4K,
        EntryFlags::from_bits_truncate(1) | EntryFlags::PAT_LARGE,
    ));
    v.push(op(base + (16 << 21) + (1 << 12), 0, PageSize::Size2M, RW));
    if pae {
        // The kernel-PMD slot.
        v.push(op(0xc000_0000, 0x7000, PageSize::Size4K, RW));
    }
    // Random pages in a few PTE pages, some repeats.
    for _ in 0..300 {
        let pte_page = rng.below(6);
        let i = rng.below(512);
        page(base + (40 << 21) + (pte_page << 21) + (i << 12), &mut v);
    }
    v
}

/// The range a cursor covering every op of `M` gets.
fn whole_range<M: PagingMode>() -> std::ops::Range<u64> {
    if M::ROOT_ENTRIES == 4 {
        0..1 << 32
    } else {
        0..1 << 47
    }
}

/// Apply `ops` per call on `a` and through one cursor on `b`; every result
/// must be equal. The cursor stays where it was after a failure (checked),
/// and is moved with `jump` before each op.
fn apply_both<M: PagingMode, P: LockPolicy, B: Backend>(
    a: &AddressSpace<M, P, B>,
    b: &AddressSpace<M, P, B>,
    ops: &[Op],
) -> Vec<Result<(), Error>> {
    let mut out = Vec::new();
    let mut c = b.cursor_mut(whole_range::<M>()).unwrap();
    for o in ops {
        let want = a.map(o.va, o.pa, o.size, o.flags);
        // Misaligned starts cannot be jumped to: the cursor refuses them
        // with the same error map gives.
        let got = match c.jump(o.va) {
            Ok(()) => {
                let r = c.map(o.pa, o.size, o.flags);
                let expect_va = if r.is_ok() {
                    o.va + o.size.bytes()
                } else {
                    o.va
                };
                assert_eq!(c.va(), expect_va, "{o:x?}");
                r
            }
            Err(e) => Err(e),
        };
        assert_eq!(got, want, "{o:x?}");
        out.push(want);
    }
    out
}

fn mock_space<M: PagingMode, P: LockPolicy>(frames: usize) -> AddressSpace<M, P, MockBackend> {
    let store = new_store(frames);
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    AddressSpace::new(store, backend, SpaceOptions { user_root: true }).unwrap()
}

fn check_mock<M: PagingMode, P: LockPolicy>(pinned: bool, frames: usize) {
    // Out of frames, every later map retries the allocation: one seed.
    let seeds: &[u64] = if frames >= 64 { &[1, 7, 99] } else { &[5] };
    for &seed in seeds {
        let a = mock_space::<M, P>(frames);
        let b = mock_space::<M, P>(frames);
        if pinned {
            a.pin(&mut Batch::<32>::new()).unwrap();
            b.pin(&mut Batch::<32>::new()).unwrap();
        }
        let ops = ops::<M>(seed);
        let results = apply_both(&a, &b, &ops);
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if frames >= 64 {
            assert!(ok > 1000, "{ok} maps succeeded");
        } else {
            assert!(results.contains(&Err(Error::OutOfFrames)));
        }
        assert!(results.iter().any(|r| r.is_err()));
        assert_eq!(image(a.store()), image(b.store()), "seed {seed}");
        // The same hypercalls and guest stores, in the same batches.
        assert_eq!(a.backend().batches(), b.backend().batches());
        assert_eq!(a.backend().calls(), b.backend().calls());
        assert_eq!(a.backend().stores(), b.backend().stores());
        if pinned {
            assert!(
                !a.backend().batches().is_empty(),
                "pinned: new tables must be prepared through the backend"
            );
        }
        for s in [&a, &b] {
            assert!(!s.space_lock().is_locked());
            if pinned {
                s.unpin(&mut Batch::<32>::new()).unwrap();
            }
            common::assert_clean(s);
        }
    }
}

/// [`check_mock`] under both policies, unpinned then pinned.
fn check_mock_all<M: PagingMode>() {
    for pinned in [false, true] {
        check_mock::<M, Split>(pinned, 64);
        check_mock::<M, Global>(pinned, 64);
    }
}

#[test]
fn cursor_equals_map_mock_x86_64() {
    check_mock_all::<X86_64>();
}

#[test]
fn cursor_equals_map_mock_la57() {
    check_mock_all::<La57>();
}

#[test]
fn cursor_equals_map_mock_pae() {
    check_mock_all::<Pae>();
}

#[test]
fn cursor_equals_map_out_of_frames() {
    // Too few frames: some maps fail with OutOfFrames, at different depths.
    for frames in [3usize, 5, 7, 9] {
        check_mock::<X86_64, Split>(false, frames);
        check_mock::<X86_64, Global>(true, frames);
        check_mock::<Pae, Split>(true, frames);
    }
}

fn check_xen<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(pinned: bool, tables: usize) {
    let ea = xen_common::env_sized::<M>(tables, 4096, 5, 0);
    let eb = xen_common::env_sized::<M>(tables, 4096, 5, 0);
    let a = xen_common::space::<M, P>(&ea, true);
    let b = xen_common::space::<M, P>(&eb, true);
    if pinned {
        a.pin(&mut Batch::<32>::new()).unwrap();
        b.pin(&mut Batch::<32>::new()).unwrap();
    }
    // Data frames must be the guest's own: below the table memory.
    let ops: Vec<Op> = ops::<M>(3)
        .into_iter()
        .map(|mut o| {
            o.pa &= (1 << 22) - 1;
            o.pa &= !(o.size.bytes() - 1);
            o
        })
        .collect();
    let results = apply_both(&a, &b, &ops);
    assert!(results.iter().any(|r| r.is_ok()));
    assert_eq!(image(&ea.store), image(&eb.store));
    assert_eq!(xen_common::snap(&ea, &a), xen_common::snap(&eb, &b));
    assert!(!xen_common::any_lock_held(&eb, &b));
    // A reader on the simulator's p2m (machine frames in the entries).
    let mut r = b.reader();
    for o in &ops {
        for va in [o.va, o.va + 0x123, o.va + o.size.bytes() - 1] {
            assert_eq!(r.translate(va), b.translate(va), "{va:#x}");
        }
    }
    drop(r);
    if pinned {
        b.unpin(&mut Batch::<32>::new()).unwrap();
        a.unpin(&mut Batch::<32>::new()).unwrap();
    }
    drop((a, b));
    xen_common::assert_quiet(&eb.sim);
}

#[test]
fn cursor_equals_map_xen() {
    check_xen::<X86_64, Split>(false, 64);
    check_xen::<X86_64, Split>(true, 64);
    check_xen::<X86_64, Global>(true, 64);
    check_xen::<Pae, Split>(true, 64);
    check_xen::<Pae, Global>(false, 64);
    // Out of table frames while pinned.
    check_xen::<X86_64, Split>(true, 6);
    check_xen::<Pae, Global>(true, 5);
}

/// Every failing cursor call leaves the store, the backend's record and the
/// cursor's position as they were.
fn failures_change_nothing<P: LockPolicy>(pinned: bool) {
    let s = mock_space::<X86_64, P>(8);
    if pinned {
        s.pin(&mut Batch::<32>::new()).unwrap();
    }
    let base = 0x10_0000_0000u64;
    let range = base..base + (4 << 21);
    s.map(base + (2 << 21), 0x20_0000, PageSize::Size2M, RW)
        .unwrap();
    s.map(base + (1 << 12), 0x1000, PageSize::Size4K, RW)
        .unwrap();
    let mut c = s.cursor_mut(range.clone()).unwrap();
    let cases: Vec<(u64, u64, PageSize, EntryFlags, Error)> = vec![
        (
            base + (1 << 12),
            0x2000,
            PageSize::Size4K,
            RW,
            Error::AlreadyMapped {
                va: base + (1 << 12),
            },
        ),
        (
            base + (2 << 21) + (3 << 12),
            0x2000,
            PageSize::Size4K,
            RW,
            Error::AlreadyMapped {
                va: base + (2 << 21) + (3 << 12),
            },
        ),
        (
            base,
            0x20_0000,
            PageSize::Size2M,
            RW,
            Error::AlreadyMapped { va: base },
        ),
        (
            base + (5 << 12),
            0x2008,
            PageSize::Size4K,
            RW,
            Error::Misaligned { addr: 0x2008 },
        ),
        (
            base + (5 << 12),
            0x2000,
            PageSize::Size4K,
            EntryFlags::WRITABLE,
            Error::BadFlags {
                bits: EntryFlags::WRITABLE.bits(),
            },
        ),
        (
            base + (5 << 12),
            0x2000,
            PageSize::Size2M,
            RW,
            Error::Misaligned {
                addr: base + (5 << 12),
            },
        ),
        (
            base + (3 << 21) + (511 << 12),
            0x20_0000,
            PageSize::Size2M,
            RW,
            Error::Misaligned {
                addr: base + (3 << 21) + (511 << 12),
            },
        ),
        // Aligned, but it does not end inside the range.
        (
            base,
            0,
            PageSize::Size1G,
            RW,
            Error::OutOfRange { va: base },
        ),
        (
            base + (3 << 21),
            0x4000_0000,
            PageSize::Size1G,
            RW,
            Error::Misaligned {
                addr: base + (3 << 21),
            },
        ),
    ];
    for (va, pa, size, flags, want) in cases {
        c.jump(va).unwrap();
        let before = (unlocked(s.store()), s.backend().calls());
        assert_eq!(c.map(pa, size, flags), Err(want), "{va:#x}");
        assert_eq!(c.va(), va);
        assert_eq!(
            (unlocked(s.store()), s.backend().calls()),
            before,
            "{va:#x}"
        );
    }
    // Out of the range, and jumps that are refused.
    c.jump(range.end).unwrap();
    let before = (unlocked(s.store()), s.backend().calls());
    assert_eq!(
        c.map(0x3000, PageSize::Size4K, RW),
        Err(Error::OutOfRange { va: range.end })
    );
    c.jump(base + (3 << 21) + (1 << 12)).unwrap();
    assert_eq!(
        c.map(0x20_0000, PageSize::Size2M, RW),
        Err(Error::Misaligned {
            addr: base + (3 << 21) + (1 << 12)
        })
    );
    c.jump(range.end - (1 << 21)).unwrap();
    // 1 GiB would end past the range (and is misaligned for the va).
    assert!(c.map(0x4000_0000, PageSize::Size1G, RW).is_err());
    assert_eq!(
        c.jump(range.end + 4096),
        Err(Error::OutOfRange {
            va: range.end + 4096
        })
    );
    assert_eq!(
        c.jump(base - 4096),
        Err(Error::OutOfRange { va: base - 4096 })
    );
    assert_eq!(c.jump(base + 1), Err(Error::Misaligned { addr: base + 1 }));
    assert_eq!((unlocked(s.store()), s.backend().calls()), before);
    // A page that fits, to show the cursor still works.
    c.jump(range.end - 4096).unwrap();
    c.map(0x3000, PageSize::Size4K, RW).unwrap();
    assert_eq!(c.va(), range.end);
    drop(c);
    assert_eq!(s.translate(range.end - 4096).map(|t| t.phys), Some(0x3000));
    assert!(!s.space_lock().is_locked());
    if pinned {
        s.unpin(&mut Batch::<32>::new()).unwrap();
    }
    common::assert_clean(&s);
}

#[test]
fn failing_cursor_calls_change_nothing() {
    failures_change_nothing::<Split>(false);
    failures_change_nothing::<Global>(false);
    failures_change_nothing::<Split>(true);
    failures_change_nothing::<Global>(true);
}

#[test]
fn cursor_out_of_frames_is_typed() {
    // Root + L3 + L2 + one L1: the second PTE page has no frame.
    let s = mock_space::<X86_64, Split>(5);
    let base = 0x10_0000_0000u64;
    let mut c = s.cursor_mut(base..base + (2 << 21)).unwrap();
    for i in 0..512u64 {
        c.map(i << 12, PageSize::Size4K, RW).unwrap();
    }
    let before = image(s.store());
    assert_eq!(
        c.map(0x20_0000, PageSize::Size4K, RW),
        Err(Error::OutOfFrames)
    );
    assert_eq!(c.va(), base + (1 << 21));
    // The failed walk released the first PTE page's lock.
    assert_eq!(image(s.store()), {
        let mut b = before;
        for m in b.meta.iter_mut() {
            m.3 = false;
        }
        b
    });
}

#[test]
fn cursor_ranges_are_checked() {
    let s = mock_space::<X86_64, Global>(8);
    assert_eq!(
        s.cursor_mut(0x1000..0x1000).err(),
        Some(Error::OutOfRange { va: 0x1000 })
    );
    assert_eq!(
        s.cursor_mut(std::ops::Range {
            start: 0x2000,
            end: 0x1000
        })
        .err(),
        Some(Error::OutOfRange { va: 0x2000 })
    );
    assert_eq!(
        s.cursor_mut(0x1008..0x3000).err(),
        Some(Error::Misaligned { addr: 0x1008 })
    );
    assert_eq!(
        s.cursor_mut(0x1000..0x3008).err(),
        Some(Error::Misaligned { addr: 0x3008 })
    );
    assert_eq!(
        s.cursor_mut(0x1000..(1 << 47) + 4096).err(),
        Some(Error::NonCanonical {
            va: (1 << 47) + 4095
        })
    );
    assert_eq!(
        s.cursor_mut(0x7fff_ffff_f000..0xffff_8000_0000_1000).err(),
        Some(Error::OutOfRange {
            va: 0xffff_8000_0000_0fff
        })
    );
    // The top of the lower half is fine.
    let c = s.cursor_mut(0x7fff_ffff_f000..1 << 47).unwrap();
    assert!(s.space_lock().is_locked());
    drop(c);
    assert!(!s.space_lock().is_locked());
    let p = mock_space::<Pae, Split>(8);
    assert_eq!(
        p.cursor_mut(0xffff_f000..1 << 32).map(|c| c.va()).ok(),
        Some(0xffff_f000)
    );
    assert_eq!(
        p.cursor_mut(0xffff_f000..(1 << 32) + 4096).err(),
        Some(Error::NonCanonical {
            va: (1 << 32) + 4095
        })
    );
}

/// A writer thread rewrites entries of other PTE pages with `set_pte`
/// while a cursor maps many pages (under split, concurrently; under
/// global, it waits for the cursor). One of its PTE pages is also one the
/// cursor maps into, so the two take turns on that lock. Bounded by
/// iteration counts; every write must be in the final tables.
fn writer_during_cursor<P: LockPolicy<Lock = DefaultRawLock>>() {
    const WRITES: u64 = 20_000;
    // A backend that applies `mmu_update`s, so both write paths land.
    let store: Arc<FrameStore<DefaultRawLock>> = Arc::new(FrameStore::new(64, 0x100));
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    backend.set_store_log(false);
    let s = Arc::new(
        AddressSpace::<X86_64, P, MockBackend>::new(store, backend, SpaceOptions::default())
            .unwrap(),
    );
    let base = 0x10_0000_0000u64;
    // The writer's PTE pages: 0..4 (page 0 of each mapped now). The cursor
    // maps pages 1..512 of PTE page 3, then PTE pages 8..16.
    for j in 0..4u64 {
        s.map(base + (j << 21), 0x1000, PageSize::Size4K, RW)
            .unwrap();
    }
    let start = Arc::new(Barrier::new(2));
    let writer = {
        let s = s.clone();
        let start = start.clone();
        std::thread::spawn(move || {
            start.wait();
            let mut last = [0u64; 4];
            for n in 1..=WRITES {
                let j = n % 4;
                let v = PageTableEntry::new(0x10_0000 + n, RW);
                let path = if n % 3 == 0 {
                    WritePath::Hypercall
                } else {
                    WritePath::Store
                };
                s.set_pte(base + (j << 21), v, path).unwrap();
                last[j as usize] = v.bits();
            }
            last
        })
    };
    let mut c = s.cursor_mut(base + (3 << 21)..base + (16 << 21)).unwrap();
    start.wait();
    let mut pa = 0x80_0000u64;
    for i in 1..512u64 {
        c.jump(base + (3 << 21) + (i << 12)).unwrap();
        c.map(pa, PageSize::Size4K, RW).unwrap();
        pa += 4096;
    }
    c.jump(base + (8 << 21)).unwrap();
    for _ in 0..(8 * 512) {
        c.map(pa, PageSize::Size4K, RW).unwrap();
        pa += 4096;
    }
    drop(c);
    let last = writer.join().unwrap();
    for (j, &want) in last.iter().enumerate() {
        assert_eq!(
            s.read_pte(base + ((j as u64) << 21)).unwrap().bits(),
            want,
            "PTE page {j}: lost update"
        );
    }
    let mut pa = 0x80_0000u64;
    for i in 1..512u64 {
        assert_eq!(s.translate(base + (3 << 21) + (i << 12)).unwrap().phys, pa);
        pa += 4096;
    }
    for i in 0..(8 * 512u64) {
        assert_eq!(s.translate(base + (8 << 21) + (i << 12)).unwrap().phys, pa);
        pa += 4096;
    }
    // Again, the cursor protecting and unmapping (PTE page 3 shares its
    // lock with the writer's slot there).
    let start = Arc::new(Barrier::new(2));
    let writer = {
        let s = s.clone();
        let start = start.clone();
        std::thread::spawn(move || {
            start.wait();
            let mut last = [0u64; 4];
            for n in 1..=WRITES {
                let j = n % 4;
                let v = PageTableEntry::new(0x20_0000 + n, RW);
                s.set_pte(base + (j << 21), v, WritePath::Store).unwrap();
                last[j as usize] = v.bits();
            }
            last
        })
    };
    let ro = EntryFlags::PRESENT | EntryFlags::USER;
    let mut c = s.cursor_mut(base + (3 << 21)..base + (16 << 21)).unwrap();
    start.wait();
    c.jump(base + (3 << 21) + 4096).unwrap();
    for _ in 1..256u64 {
        c.protect(ro).unwrap();
    }
    for _ in 256..512u64 {
        c.unmap().unwrap();
    }
    c.jump(base + (8 << 21)).unwrap();
    for _ in 0..(8 * 512) {
        c.unmap().unwrap();
    }
    drop(c);
    let last = writer.join().unwrap();
    for (j, &want) in last.iter().enumerate() {
        assert_eq!(
            s.read_pte(base + ((j as u64) << 21)).unwrap().bits(),
            want,
            "PTE page {j}: lost update beside the cursor's unmaps"
        );
    }
    for i in 1..512u64 {
        let t = s.translate(base + (3 << 21) + (i << 12));
        if i < 256 {
            assert_eq!(t.map(|t| t.flags), Some(ro), "page {i} protected");
        } else {
            assert_eq!(t, None, "page {i} unmapped");
        }
    }
    assert_eq!(s.translate(base + (8 << 21)), None);
    let st = s.store();
    for i in 0..st.len() as u64 {
        assert!(!st.meta(Pfn(0x100 + i)).unwrap().lock().is_locked());
    }
    assert!(!s.space_lock().is_locked());
}

#[test]
fn set_pte_writer_while_cursor_maps_unmaps_split() {
    for _ in 0..3 {
        writer_during_cursor::<Split>();
    }
}

#[test]
fn set_pte_writer_while_cursor_maps_unmaps_global() {
    writer_during_cursor::<Global>();
}

/// Under split, the PTE lock of the page the cursor writes into is held
/// while it is there, and traded when it moves on.
#[test]
fn cursor_holds_one_pte_lock() {
    let s = mock_space::<X86_64, Split>(16);
    let base = 0x10_0000_0000u64;
    let mut c = s.cursor_mut(base..base + (2 << 21)).unwrap();
    c.map(0x1000, PageSize::Size4K, RW).unwrap();
    let locked = |s: &AddressSpace<X86_64, Split, MockBackend>| -> Vec<Pfn> {
        let st = s.store();
        (0..st.len() as u64)
            .map(|i| Pfn(st.base().0 + i))
            .filter(|&p| st.meta(p).unwrap().lock().is_locked())
            .collect()
    };
    let l1_a = s.table_frames().unwrap()[2].0;
    assert_eq!(locked(&s), vec![l1_a]);
    // A jump inside the page keeps the lock; to another page lets it go.
    c.jump(base + (7 << 12)).unwrap();
    assert_eq!(locked(&s), vec![l1_a]);
    c.jump(base + (1 << 21)).unwrap();
    assert!(locked(&s).is_empty());
    c.map(0x2000, PageSize::Size4K, RW).unwrap();
    let l1s: Vec<Pfn> = s
        .table_frames()
        .unwrap()
        .into_iter()
        .filter(|(_, l)| *l == Level::L1)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(l1s.len(), 2);
    assert_eq!(locked(&s), vec![l1s[1]]);
    drop(c);
    assert!(locked(&s).is_empty());
    assert!(!s.space_lock().is_locked());
}

/// A space with 4 KiB pages (some PTE pages partly filled), 2 MiB and
/// 1 GiB pages, on a backend with a non-identity p2m when `B` has one.
fn reader_space<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(
) -> AddressSpace<M, P, NullBackend> {
    let store = Arc::new(FrameStore::new(64, 0x100));
    let s = AddressSpace::new(store, Arc::new(NullBackend), SpaceOptions::default()).unwrap();
    let base = 0x10_0000_0000u64;
    let mut c = s.cursor_mut(base..base + (1 << 31)).unwrap();
    for i in 0..1500u64 {
        if i % 7 == 3 {
            continue;
        }
        c.jump(base + (i << 12)).unwrap();
        c.map(0x100_0000 + (i << 12), PageSize::Size4K, RW).unwrap();
    }
    c.jump(base + (8 << 21)).unwrap();
    c.map(0x4000_0000, PageSize::Size2M, RW).unwrap();
    c.map(0x4060_0000, PageSize::Size2M, RW | EntryFlags::PAT_LARGE)
        .unwrap();
    c.jump(base + (1 << 30)).unwrap();
    c.map(0x8000_0000, PageSize::Size1G, RW).unwrap();
    drop(c);
    s
}

fn reader_equals_translate<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>() {
    let s = reader_space::<M, P>();
    let base = 0x10_0000_0000u64;
    let mut addrs: Vec<u64> = Vec::new();
    // Sequential: mapped, unmapped holes, the end of the 4 KiB run, the
    // large pages, past them.
    for i in 0..2200u64 {
        addrs.push(base + (i << 12) + (i % 4096));
    }
    for i in 0..64u64 {
        addrs.push(base + (8 << 21) + i * 0x1_0001);
        addrs.push(base + (1 << 30) + i * 0x100_0001);
        addrs.push(base + (2 << 30) + i * 4096);
    }
    // Random order within the area, non-canonical, the hole's edges.
    let mut rng = Rng::new(42);
    for _ in 0..5000 {
        addrs.push(base + rng.below(3 << 30));
    }
    addrs.extend([1 << 47, (1 << 47) - 1, 0xffff_8000_0000_0000, 0, u64::MAX]);
    // The 5-level range's edges (non-canonical in 4-level mode).
    addrs.extend([1 << 48, (1 << 56) - 1, 1 << 56, 0xff00_0000_0000_0000]);
    let mut r = s.reader();
    let mut mapped = 0;
    for &va in &addrs {
        let want = s.translate(va);
        assert_eq!(r.translate(va), want, "{va:#x}");
        mapped += want.is_some() as usize;
    }
    assert!(mapped > 2000);
}

#[test]
fn reader_equals_translate_both_policies() {
    reader_equals_translate::<X86_64, Split>();
    reader_equals_translate::<X86_64, Global>();
    reader_equals_translate::<La57, Split>();
    reader_equals_translate::<La57, Global>();
}

/// A reader that remembered a PTE page sees it unmapped, released,
/// replaced by another, and a corrupted upper entry: each time what
/// `translate` sees.
#[test]
fn reader_revalidates_its_path() {
    let s = reader_space::<X86_64, Split>();
    let base = 0x10_0000_0000u64;
    let va = base + (3 << 21) + 0x123;
    let mut r = s.reader();
    assert!(s.translate(va).is_none());
    assert_eq!(r.translate(va), None);
    s.map(base + (3 << 21), 0x7000, PageSize::Size4K, RW)
        .unwrap();
    assert_eq!(r.translate(va), s.translate(va));
    assert_eq!(r.translate(va).unwrap().phys, 0x7123);
    // Unmap and release the PTE page while the reader remembers it.
    s.unmap(base + (3 << 21)).unwrap();
    assert_eq!(r.translate(va), None);
    s.release_table(base + (3 << 21), Level::L1).unwrap();
    assert_eq!(r.translate(va), None);
    assert_eq!(s.translate(va), None);
    // A new PTE page there (a different frame: the old one is not reused
    // while the reader lives).
    s.map(base + (3 << 21), 0x9000, PageSize::Size4K, RW)
        .unwrap();
    assert_eq!(r.translate(va).unwrap().phys, 0x9123);
    assert_eq!(r.translate(va), s.translate(va));
    // A 2 MiB page replacing... first the remembered path: now corrupt the
    // L2 entry above it so it names a frame at the wrong level (the root).
    let frames = s.table_frames().unwrap();
    let l2 = frames.iter().find(|(_, l)| *l == Level::L2).unwrap().0;
    let slot = s.store().entry(l2, 3).unwrap();
    let good = slot.load(Ordering::Acquire);
    slot.store(
        PageTableEntry::new(s.root().0, RW).bits(),
        Ordering::Release,
    );
    assert_eq!(s.translate(va), None);
    assert_eq!(r.translate(va), None);
    slot.store(good, Ordering::Release);
    assert_eq!(r.translate(va).unwrap().phys, 0x9123);
    // The remembered L1 freed behind the space's back (its level cleared):
    // translate refuses the path, so must the reader.
    let l1 = PageTableEntry::from_bits(good).frame();
    let _ = r.translate(va);
    s.store().retire(Pfn(l1));
    assert_eq!(s.translate(va), None);
    assert_eq!(r.translate(va), None);
}

/// `CursorMut::unmap` and `CursorMut::protect` over a range give what
/// per-call `unmap` and `protect` give (results, tables, backend calls),
/// move past each page, and refuse a page that does not end in the range
/// or a position not at a page base without moving.
fn unmap_protect_through_the_cursor<P: LockPolicy>(pinned: bool) {
    let a = mock_space::<X86_64, P>(64);
    let b = mock_space::<X86_64, P>(64);
    let base = 0x40_0000_0000u64;
    for s in [&a, &b] {
        if pinned {
            s.pin(&mut Batch::<32>::new()).unwrap();
        }
        for i in 0..600u64 {
            s.map(
                base + (i << 12),
                0x100_0000 + (i << 12),
                PageSize::Size4K,
                RW,
            )
            .unwrap();
        }
        s.map(
            base + (2 << 21),
            0x4000_0000,
            PageSize::Size2M,
            RW | EntryFlags::PAT_LARGE,
        )
        .unwrap();
    }
    let ro = EntryFlags::PRESENT | EntryFlags::USER;
    // Protect every 4 KiB page, then unmap them and the 2 MiB one.
    let mut per_call = Vec::new();
    for i in 0..600u64 {
        per_call.push(a.protect(base + (i << 12), ro).map(|_| None));
    }
    per_call.push(a.protect(base + (2 << 21), ro).map(|_| None));
    for i in 0..600u64 {
        per_call.push(a.unmap(base + (i << 12)).map(Some));
    }
    per_call.push(a.unmap(base + (2 << 21)).map(Some));
    let mut through = Vec::new();
    {
        let mut c = b.cursor_mut(base..base + (3 << 21)).unwrap();
        for _ in 0..600 {
            through.push(c.protect(ro).map(|_| None));
        }
        c.jump(base + (2 << 21)).unwrap();
        through.push(c.protect(ro).map(|_| None));
        assert_eq!(c.va(), base + (3 << 21), "moved past the 2 MiB page");
        c.jump(base).unwrap();
        for _ in 0..600 {
            through.push(c.unmap().map(Some));
        }
        c.jump(base + (2 << 21)).unwrap();
        through.push(c.unmap().map(Some));
        // Nothing left: not mapped, and the cursor stays.
        c.jump(base).unwrap();
        assert_eq!(c.unmap(), Err(Error::NotMapped { va: base }));
        assert_eq!(c.va(), base);
    }
    assert_eq!(through, per_call);
    let pat = per_call.last().unwrap().as_ref().unwrap().unwrap();
    assert_eq!(pat.phys, 0x4000_0000);
    assert_eq!(image(a.store()), image(b.store()));
    assert_eq!(a.backend().calls(), b.backend().calls());
    assert_eq!(a.backend().stores(), b.backend().stores());
    // A 2 MiB page that does not end inside the range, and a position
    // inside a large page: refused, nothing changed, the cursor stays.
    b.map(base + (2 << 21), 0x4000_0000, PageSize::Size2M, RW)
        .unwrap();
    let before = image(b.store());
    let mut c = b
        .cursor_mut(base + (2 << 21)..base + (2 << 21) + 4096)
        .unwrap();
    assert_eq!(
        c.unmap(),
        Err(Error::OutOfRange {
            va: base + (2 << 21)
        })
    );
    assert_eq!(
        c.protect(ro),
        Err(Error::OutOfRange {
            va: base + (2 << 21)
        })
    );
    assert_eq!(c.va(), base + (2 << 21));
    drop(c);
    let mut c = b.cursor_mut(base + (2 << 21)..base + (3 << 21)).unwrap();
    c.jump(base + (2 << 21) + 4096).unwrap();
    assert_eq!(
        c.unmap(),
        Err(Error::Misaligned {
            addr: base + (2 << 21) + 4096
        })
    );
    drop(c);
    assert_eq!(image(b.store()), before);
    for s in [&a, &b] {
        assert!(!s.space_lock().is_locked());
        if pinned {
            s.unpin(&mut Batch::<32>::new()).unwrap();
        }
    }
}

#[test]
fn cursor_unmap_and_protect_equal_per_call() {
    unmap_protect_through_the_cursor::<Split>(false);
    unmap_protect_through_the_cursor::<Global>(false);
    unmap_protect_through_the_cursor::<Split>(true);
    unmap_protect_through_the_cursor::<Global>(true);
}

/// The one-page writers remember the PTE page they last used
/// (`PteHint`); a table released since must not be written again, whatever
/// replaced it: a new PTE page, or a 2 MiB leaf in the same region.
fn released_pte_page_is_not_reused<M: PagingMode, P: LockPolicy>(pinned: bool) {
    let s = mock_space::<M, P>(64);
    if pinned {
        s.pin(&mut Batch::<32>::new()).unwrap();
    }
    let region = 0x4000_0000u64;
    let va = region + 0x5000;
    // Remember region's PTE page, then empty and release it.
    s.map(va, 0x7000, PageSize::Size4K, RW).unwrap();
    let old = s.table_frames().unwrap();
    s.protect(va, EntryFlags::PRESENT).unwrap();
    s.unmap(va).unwrap();
    s.release_table(va, Level::L1).unwrap();
    let released: Vec<Pfn> = old
        .iter()
        .filter(|(_, l)| *l == Level::L1)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(released.len(), 1);
    // A new PTE page for the same region: the map must land in it.
    s.map(va + 0x1000, 0x8000, PageSize::Size4K, RW).unwrap();
    assert_eq!(
        s.translate(va + 0x1000).map(|t| t.phys),
        Some(0x8000),
        "{} {}: the map went into the released page",
        M::NAME,
        P::NAME
    );
    assert_eq!(s.translate(va), None);
    // Release it again and put a 2 MiB leaf there (on a backend that takes
    // them): a 4 KiB map into the region now meets the leaf.
    s.unmap(va + 0x1000).unwrap();
    s.release_table(va, Level::L1).unwrap();
    s.map(region, 0x20_0000, PageSize::Size2M, RW).unwrap();
    assert_eq!(
        s.map(va, 0x9000, PageSize::Size4K, RW),
        Err(Error::AlreadyMapped { va }),
        "{} {}",
        M::NAME,
        P::NAME
    );
    assert_eq!(s.translate(va).map(|t| t.phys), Some(0x20_5000));
    s.unmap(region).unwrap();
    if pinned {
        s.unpin(&mut Batch::<32>::new()).unwrap();
    }
    common::assert_clean(&s);
}

#[test]
fn one_page_writers_forget_a_released_pte_page() {
    for pinned in [false, true] {
        released_pte_page_is_not_reused::<X86_64, Split>(pinned);
        released_pte_page_is_not_reused::<X86_64, Global>(pinned);
        released_pte_page_is_not_reused::<Pae, Split>(pinned);
        released_pte_page_is_not_reused::<La57, Global>(pinned);
    }
}

/// Two spaces share an (unowned) L3 and L2; one maps a page (its one-page
/// writers remember the PTE page), the other releases that PTE page
/// through the shared tables under its own lock. The first space's next
/// map must link a new PTE page, not write into the released one: a PTE
/// page is remembered only on a path of the space's own tables.
fn shared_path_is_not_remembered<P: LockPolicy<Lock = DefaultRawLock>>() {
    let store = Arc::new(FrameStore::<DefaultRawLock>::new(64, 0x100));
    let new_space = || -> AddressSpace<X86_64, P, NullBackend> {
        AddressSpace::new(
            store.clone(),
            Arc::new(NullBackend),
            SpaceOptions::default(),
        )
        .unwrap()
    };
    let (a, b) = (new_space(), new_space());
    let l3 = store.alloc_table(Level::L3).unwrap();
    let l2 = store.alloc_table(Level::L2).unwrap();
    let link = |parent: Pfn, slot: usize, child: Pfn, parent_level: Level| {
        let e = (child.0 << 12) | pagepin::walk::table_entry_flags::<X86_64>(parent_level).bits();
        store
            .frame(parent)
            .unwrap()
            .entry(slot)
            .store(e, Ordering::Release);
    };
    link(a.root(), 0, l3, Level::L4);
    link(b.root(), 0, l3, Level::L4);
    link(l3, 1, l2, Level::L3);
    let va = 0x4000_0000 + 0x5000;
    a.map(va, 0x7000, PageSize::Size4K, RW).unwrap();
    a.unmap(va).unwrap();
    b.release_table(va, Level::L1).unwrap();
    a.map(va + 0x1000, 0x8000, PageSize::Size4K, RW).unwrap();
    assert_eq!(
        a.translate(va + 0x1000).map(|t| t.phys),
        Some(0x8000),
        "{}: the map went into the page the other space released",
        P::NAME
    );
    assert_eq!(b.translate(va + 0x1000).map(|t| t.phys), Some(0x8000));
    // Unlink the shared tables again so each space frees only its own.
    a.unmap(va + 0x1000).unwrap();
    a.release_table(va, Level::L1).unwrap();
    for root in [a.root(), b.root()] {
        store
            .frame(root)
            .unwrap()
            .entry(0)
            .store(0, Ordering::Release);
    }
}

#[test]
fn a_pte_page_under_shared_tables_is_not_remembered() {
    shared_path_is_not_remembered::<Split>();
    shared_path_is_not_remembered::<Global>();
}
