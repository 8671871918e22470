//! The two sides of the `vs_x86_64` comparison, shared by the criterion
//! bench `vs_x86_64` and the interleaved report `vs_x86_64_ratio`: map
//! 1 M 4 KiB pages and translate 1 M addresses with pagepin (no-op
//! backend) or with the `x86_64` crate's `OffsetPageTable`, each over
//! zeroed table memory allocated before the timed part (pagepin's
//! `FrameStore`; a `Vec<PageTable>` with a bump frame allocator for the
//! crate, reached through the physical-memory offset, as in
//! `tests/native_x86_64_diff.rs`).

use std::sync::Arc;

use pagepin::backends::mock::NullBackend;
use pagepin::read_guard;
use pagepin::{
    AddressSpace, DefaultRawLock, EntryFlags, FrameStore, LockPolicy, PageSize, PagingMode,
    SpaceOptions,
};
use x86_64::structures::paging::mapper::{Mapper, Translate};
use x86_64::structures::paging::{
    FrameAllocator, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

pub const PAGES: u64 = 1 << 20;
const BASE_VA: u64 = 0x10_0000_0000;
/// Table frames: 2048 L1s, 4 L2s, an L3, (5-level: an L4,) the root, slack.
pub const FRAMES: usize = 2048 + 4 + 1 + 1 + 8;
/// Table memory's first frame number (both sides).
const TABLE_BASE_PFN: u64 = 0x100;
/// Data pages' first frame number (not backed: never dereferenced).
const DATA_BASE_PFN: u64 = 0x10_0000;

/// How the pagepin rows map and translate.
#[derive(Clone, Copy)]
pub enum Way {
    /// `map` and `translate` per call (a read section per translation).
    PerCall,
    /// `map` per call; translations in one read section (`translate_in`).
    OneSection,
    /// One `cursor_mut` over the range for the maps (space lock taken once,
    /// split: one PTE lock per PTE page), one `reader` for the
    /// translations.
    Cursor,
}

impl Way {
    /// The row-name suffix of this way.
    pub fn suffix(self) -> &'static str {
        match self {
            Way::PerCall => "",
            Way::OneSection => "_one_read_section",
            Way::Cursor => "_cursor",
        }
    }
}

/// Returns the space too, so it is dropped outside the timed part (as
/// the crate's buffer is).
pub fn pagepin_run<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(
    s: AddressSpace<M, P, NullBackend>,
    way: Way,
) -> (u64, AddressSpace<M, P, NullBackend>) {
    let flags = EntryFlags::PRESENT | EntryFlags::WRITABLE;
    if let Way::Cursor = way {
        let mut c = s
            .cursor_mut(BASE_VA..BASE_VA + (PAGES << 12))
            .expect("cursor");
        for i in 0..PAGES {
            c.map((DATA_BASE_PFN + i) << 12, PageSize::Size4K, flags)
                .expect("map");
        }
    } else {
        for i in 0..PAGES {
            s.map(
                BASE_VA + (i << 12),
                (DATA_BASE_PFN + i) << 12,
                PageSize::Size4K,
                flags,
            )
            .expect("map");
        }
    }
    let mut sum = 0u64;
    match way {
        Way::PerCall => {
            for i in 0..PAGES {
                let t = s.translate(BASE_VA + (i << 12) + 8);
                sum = sum.wrapping_add(t.expect("mapped").phys);
            }
        }
        Way::OneSection => {
            let guard = read_guard();
            for i in 0..PAGES {
                let t = s.translate_in(&guard, BASE_VA + (i << 12) + 8);
                sum = sum.wrapping_add(t.expect("mapped").phys);
            }
        }
        Way::Cursor => {
            let mut r = s.reader();
            for i in 0..PAGES {
                let t = r.translate(BASE_VA + (i << 12) + 8);
                sum = sum.wrapping_add(t.expect("mapped").phys);
            }
        }
    }
    (sum, s)
}

/// A fresh space over zeroed table memory.
pub fn pagepin_space<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(
) -> AddressSpace<M, P, NullBackend> {
    let store = Arc::new(FrameStore::new(FRAMES, TABLE_BASE_PFN));
    AddressSpace::new(store, Arc::new(NullBackend), SpaceOptions::default()).expect("space")
}

/// Hands out the frames of the table buffer in order.
struct Bump {
    next: u64,
    end: u64,
}

// SAFETY: every frame handed out is a distinct, zeroed, unused frame of
// the table buffer (frames are never returned).
unsafe impl FrameAllocator<Size4KiB> for Bump {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next == self.end {
            return None;
        }
        let f = PhysFrame::containing_address(PhysAddr::new(self.next << 12));
        self.next += 1;
        Some(f)
    }
}

/// Map and translate with the crate over `buf` (frame 0 is the root).
pub fn x86_64_run(mut buf: Vec<PageTable>) -> (u64, Vec<PageTable>) {
    let base_addr = buf.as_mut_ptr().expose_provenance() as u64;
    let offset = VirtAddr::new(base_addr - TABLE_BASE_PFN * 4096);
    // Frame 0 of the buffer is the root; the allocator hands out the rest.
    let mut alloc = Bump {
        next: TABLE_BASE_PFN + 1,
        end: TABLE_BASE_PFN + buf.len() as u64,
    };
    let root: *mut PageTable = &mut buf[0];
    // SAFETY: every table frame the crate can reach is in `buf` at
    // `offset + phys` (it only follows entries it wrote itself, pointing
    // at frames `alloc` handed out of `buf`); `buf` is not otherwise
    // touched while `mapper` lives.
    let mut mapper = unsafe { OffsetPageTable::new(&mut *root, offset) };
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    for i in 0..PAGES {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(BASE_VA + (i << 12)));
        let frame = PhysFrame::containing_address(PhysAddr::new((DATA_BASE_PFN + i) << 12));
        // SAFETY: the mapped frames are never accessed; the table memory is
        // the buffer above.
        unsafe { mapper.map_to(page, frame, flags, &mut alloc) }
            .expect("map_to")
            .ignore();
    }
    let mut sum = 0u64;
    for i in 0..PAGES {
        let va = VirtAddr::new(BASE_VA + (i << 12) + 8);
        sum = sum.wrapping_add(mapper.translate_addr(va).expect("mapped").as_u64());
    }
    (sum, buf)
}

/// Zeroed table memory for [`x86_64_run`].
pub fn x86_64_tables() -> Vec<PageTable> {
    (0..FRAMES).map(|_| PageTable::new()).collect()
}
