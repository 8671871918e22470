//! The hot paths do not touch the heap once warm: a pin or unpin reuses
//! its batch's journal buffer, a flush hands the backend the batch's own
//! queue, and a per-call `map`, `translate` or `unmap` into an existing PTE
//! page allocates nothing. A shape that carries speed (BENCHMARKS.md):
//! this test keeps a refactor from quietly adding an allocation per flush
//! or per call.
//!
//! Allocations are counted per thread (the test harness runs tests on
//! several threads, each counting only its own).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use pagepin::backends::mock::NullBackend;
use pagepin::{
    AddressSpace, Batch, EntryFlags, FrameStore, Global, LockPolicy, PageSize, SpaceOptions, Split,
    X86_64,
};

struct Counting;

thread_local! {
    // Const-initialised, no destructor: safe to touch from the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is a thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const BASE_VA: u64 = 0x10_0000_0000;
/// 64 MiB of 4 KiB pages: 32 PTE pages.
const PAGES: u64 = 16 * 1024;
const RW: EntryFlags = EntryFlags::PRESENT.union(EntryFlags::WRITABLE);

fn space<P: LockPolicy<Lock = pagepin::DefaultRawLock>>() -> AddressSpace<X86_64, P, NullBackend> {
    let store = Arc::new(FrameStore::new(64, 0x100));
    let s = AddressSpace::new(store, Arc::new(NullBackend), SpaceOptions::default()).unwrap();
    for i in 0..PAGES {
        s.map(
            BASE_VA + (i << 12),
            (0x10_0000 + i) << 12,
            PageSize::Size4K,
            RW,
        )
        .unwrap();
    }
    s
}

fn pin_and_unpin_allocate_only_while_cold<P: LockPolicy<Lock = pagepin::DefaultRawLock>>() {
    let s = space::<P>();
    let mut b: Batch<32> = Batch::new();
    // The control: the first pin grows the batch's journal buffer (and,
    // under split, its list of PTE pages to lock), so the counter sees it.
    let cold = allocations(|| {
        s.pin(&mut b).unwrap();
        s.unpin(&mut b).unwrap();
    });
    assert!(
        cold > 0,
        "{}: the counter saw no allocation at all",
        P::NAME
    );
    let warm = allocations(|| {
        for _ in 0..10 {
            s.pin(&mut b).unwrap();
            s.unpin(&mut b).unwrap();
        }
    });
    assert_eq!(warm, 0, "{}: a warm pin + unpin allocated", P::NAME);
}

#[test]
fn warm_pin_and_unpin_do_not_allocate() {
    pin_and_unpin_allocate_only_while_cold::<Split>();
    pin_and_unpin_allocate_only_while_cold::<Global>();
}

fn per_call_writers_do_not_allocate<P: LockPolicy<Lock = pagepin::DefaultRawLock>>() {
    let s = space::<P>();
    let va = |i: u64| BASE_VA + (i << 12);
    // Warm this thread's read-section handle.
    assert!(s.translate(va(0)).is_some());
    let n = allocations(|| {
        for i in 0..PAGES {
            let t = s.translate(va(i) + 8).unwrap();
            assert_eq!(t.phys, ((0x10_0000 + i) << 12) + 8);
        }
        for i in 0..64 {
            s.unmap(va(i)).unwrap();
            s.map(va(i), (0x20_0000 + i) << 12, PageSize::Size4K, RW)
                .unwrap();
            s.protect(va(i), EntryFlags::PRESENT).unwrap();
        }
    });
    assert_eq!(n, 0, "{}: per-call writers allocated", P::NAME);
}

#[test]
fn per_call_map_translate_unmap_do_not_allocate() {
    per_call_writers_do_not_allocate::<Split>();
    per_call_writers_do_not_allocate::<Global>();
}
