//! Differential test: pagepin's `translate` against the `x86_64` crate's
//! `OffsetPageTable` over the same table bytes, on random spaces with
//! 4 KiB, 2 MiB and 1 GiB pages.
//!
//! The store is copied into a buffer of `x86_64` `PageTable`s and the
//! crate's walker reads it with physical-memory offset = the buffer's
//! address minus `base_pfn * 4096`. Every mapped page (its base, an inner
//! address and its last byte), its neighbours, and thousands of random
//! canonical addresses must translate identically (frame, offset, size,
//! flags); non-canonical addresses are refused by both. A `Reader` kept
//! across all the addresses must agree with `translate` on every one.

#[path = "support/native.rs"]
mod native_support;

use std::sync::Arc;

use native_support::{random_space, Rng, Shape, STORE_BASE_PFN};
use pagepin::backends::mock::NullBackend;
use pagepin::backends::native::NativeBackend;
use pagepin::{
    AddressSpace, Backend, EntryFlags, Global, LockPolicy, PageSize, Split, Translation, X86_64,
};
use x86_64::structures::paging::mapper::{MappedFrame, Translate, TranslateResult};
use x86_64::structures::paging::{OffsetPageTable, PageTable, PageTableFlags};
use x86_64::{PhysAddr, VirtAddr};

/// pagepin's view and the crate's view of one address.
#[derive(Debug, PartialEq, Eq)]
struct View {
    phys: u64,
    size: PageSize,
    flags: u64,
}

fn pagepin_view(t: Option<Translation>) -> Option<View> {
    t.map(|t| View {
        phys: t.phys,
        size: t.size,
        // The crate's flags carry no PAT bit 12 for large leaves.
        flags: t.flags.bits() & !EntryFlags::PAT_LARGE.bits(),
    })
}

fn crate_view(r: TranslateResult) -> Option<View> {
    match r {
        TranslateResult::Mapped {
            frame,
            offset,
            flags,
        } => {
            let (start, size) = match frame {
                MappedFrame::Size4KiB(f) => (f.start_address().as_u64(), PageSize::Size4K),
                MappedFrame::Size2MiB(f) => (f.start_address().as_u64(), PageSize::Size2M),
                MappedFrame::Size1GiB(f) => (f.start_address().as_u64(), PageSize::Size1G),
            };
            Some(View {
                phys: start + offset,
                size,
                flags: flags.bits(),
            })
        }
        TranslateResult::NotMapped => None,
        TranslateResult::InvalidFrameAddress(a) => panic!("x86_64: invalid frame address {a:?}"),
    }
}

/// Compare every interesting address of one random space; returns how
/// many addresses were compared (mapped, unmapped).
fn compare_space<P: LockPolicy, B: Backend>(backend: Arc<B>, seed: u64) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let shape = Shape {
        pages_4k: 300,
        pages_2m: 40,
        pages_1g: 6,
        regions: 6,
    };
    let (space, mapped): (AddressSpace<X86_64, P, B>, _) =
        random_space(backend, 1024, shape, &mut rng);
    assert!(
        mapped.iter().any(|m| m.size == PageSize::Size1G),
        "seed {seed}: no 1 GiB page"
    );

    // Copy the store into the crate's page-table type.
    let store = space.store();
    let mut buf: Vec<PageTable> = (0..store.len()).map(|_| PageTable::new()).collect();
    for (i, table) in buf.iter_mut().enumerate() {
        let frame = store
            .frame(pagepin::Pfn(STORE_BASE_PFN + i as u64))
            .unwrap();
        for (dst, src) in table.iter_mut().zip(frame.entries()) {
            let bits = src.load(std::sync::atomic::Ordering::Acquire);
            let addr = bits & pagepin::PageTableEntry::ADDR_MASK;
            dst.set_addr(
                PhysAddr::new(addr),
                PageTableFlags::from_bits_retain(bits & !addr),
            );
        }
    }
    let base_addr = buf.as_mut_ptr().expose_provenance() as u64;
    let offset = VirtAddr::new(base_addr - STORE_BASE_PFN * 4096);
    let root_index = (space.root().0 - STORE_BASE_PFN) as usize;
    let root_ptr: *mut PageTable = &mut buf[root_index];
    // SAFETY: every table frame the walk can reach is in `buf`, at
    // `offset + pfn * 4096` (valid spaces only point at store frames);
    // `buf` is not touched otherwise while `table` lives, and the walker
    // only reads (translate never writes).
    let table = unsafe { OffsetPageTable::new(&mut *root_ptr, offset) };

    let (mut n_mapped, mut n_unmapped) = (0, 0);
    // One reader for all the addresses: its remembered path must give what
    // a fresh walk gives.
    let mut reader = space.reader();
    let mut check = |va: u64| {
        let ours = pagepin_view(space.translate(va));
        assert_eq!(
            pagepin_view(reader.translate(va)),
            ours,
            "seed {seed}: reader at {va:#x}"
        );
        let Ok(v) = VirtAddr::try_new(va) else {
            assert_eq!(ours, None, "non-canonical {va:#x} must not translate");
            n_unmapped += 1;
            return;
        };
        let theirs = crate_view(table.translate(v));
        assert_eq!(ours, theirs, "seed {seed}: {va:#x}");
        if ours.is_some() {
            n_mapped += 1;
        } else {
            n_unmapped += 1;
        }
    };
    for m in &mapped {
        let inner = m.va + rng.below(m.size.bytes());
        for va in [
            m.va,
            inner,
            m.va + m.size.bytes() - 1,
            m.va.wrapping_sub(1),
            m.va.wrapping_add(m.size.bytes()),
        ] {
            check(va);
        }
    }
    for _ in 0..4000 {
        let r = rng.next();
        check(native_support::slot_va(r >> 55, r));
    }
    // Non-canonical addresses: refused by both.
    for _ in 0..200 {
        let r = rng.next() | (1 << 47);
        check(r & !(1 << 63));
    }
    assert!(
        n_mapped >= 3 * mapped.len(),
        "seed {seed}: {n_mapped} mapped compared"
    );
    (n_mapped, n_unmapped)
}

#[test]
fn translate_matches_the_x86_64_crate() {
    let mut totals = (0, 0);
    for seed in 1..=3u64 {
        let (m, u) = compare_space::<Split, NullBackend>(Arc::new(NullBackend), seed);
        totals = (totals.0 + m, totals.1 + u);
    }
    for seed in 10..=11u64 {
        let (m, u) = compare_space::<Global, NativeBackend>(Arc::new(NativeBackend::new()), seed);
        totals = (totals.0 + m, totals.1 + u);
    }
    println!(
        "x86_64 differential: {} mapped, {} unmapped addresses compared",
        totals.0, totals.1
    );
    assert!(totals.1 > 10_000);
}
