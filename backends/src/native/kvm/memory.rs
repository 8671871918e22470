//! Guest-physical memory: host allocations handed to KVM as memory slots,
//! and where things live in it (the store's frames at their machine
//! addresses, the checker's private region).

use std::alloc::Layout;
use std::ptr::NonNull;

use pagepin_engine::FRAME_SIZE;
use pagepin_engine::{Backend, PagingMode, Pfn, X86_64};

/// Host memory backing guest-physical ranges: heap allocations handed to
/// KVM as memory slots.
pub(super) struct GuestMemory {
    regions: Vec<Region>,
}

/// One backed guest-physical range (one KVM memory slot).
pub(super) struct Region {
    pub(super) gpa: u64,
    pub(super) size: u64,
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Region {
    /// The host address KVM maps the range from.
    pub(super) fn host_address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(layout)` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl GuestMemory {
    /// Back the page-aligned ranges `ranges` (merged where they touch).
    pub(super) fn new(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let regions = merged
            .into_iter()
            .map(|(start, end)| {
                let size = end - start;
                let layout = Layout::from_size_align(size as usize, FRAME_SIZE)
                    .expect("guest region layout");
                // SAFETY: `size` is non-zero (ranges are whole pages).
                let raw = unsafe { std::alloc::alloc_zeroed(layout) };
                let ptr =
                    NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
                Region {
                    gpa: start,
                    size,
                    ptr,
                    layout,
                }
            })
            .collect();
        GuestMemory { regions }
    }

    /// The backed ranges, in increasing guest-physical order.
    pub(super) fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The host pointer of `len` bytes at `gpa`, if backed.
    fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.size)?;
        // SAFETY: the offset is inside the region's allocation (checked above).
        Some(unsafe { r.ptr.as_ptr().add((gpa - r.gpa) as usize) })
    }

    /// Copy `bytes` to `gpa`; the range must be backed.
    pub(super) fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self
            .host(gpa, bytes.len())
            .expect("write to unbacked guest memory");
        // SAFETY: `p..p+len` is inside one region we own; no vCPU runs
        // while the host touches guest memory, and no Rust reference into
        // the region exists.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }

    /// Store a little-endian `u64` at `gpa`; the range must be backed.
    pub(super) fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    /// The little-endian `u64` at `gpa`, if backed.
    pub(super) fn read_u64(&self, gpa: u64) -> Option<u64> {
        let p = self.host(gpa, 8)?;
        let mut b = [0u8; 8];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), 8) };
        Some(u64::from_le_bytes(b))
    }
}

/// The guest-physical address of a store frame: its machine address, so
/// the entries' frame numbers mean the same to the CPU as to pagepin.
pub(super) fn frame_gpa<B: Backend>(backend: &B, pfn: Pfn) -> u64 {
    backend.pfn_to_mfn(pfn).0 * FRAME_SIZE as u64
}

/// The guest-physical (machine) address of a pagepin physical address.
pub(super) fn machine_address<B: Backend>(backend: &B, phys: u64) -> u64 {
    frame_gpa(backend, Pfn(phys >> 12)) + (phys & 0xfff)
}

/// The checker's private pages: their tables, GDT, IDT, code and stack,
/// at `gpa` and mapped at `va`, the base of root slot `slot` (one the
/// space leaves free, so no address the space maps is shadowed).
#[derive(Clone, Copy, Debug)]
pub(super) struct CheckerRegion {
    /// Guest-physical address of the first page.
    pub(super) gpa: u64,
    /// The root slot the region is mapped through.
    pub(super) slot: usize,
    /// Virtual address of the first page.
    pub(super) va: u64,
}

impl CheckerRegion {
    // The region's pages, in order.
    pub(super) const L3: u64 = 0;
    pub(super) const L2: u64 = 1;
    pub(super) const L1: u64 = 2;
    pub(super) const GDT: u64 = 3;
    pub(super) const IDT: u64 = 4;
    pub(super) const CODE: u64 = 5;
    pub(super) const STACK: u64 = 6;
    /// Pages in the region (the stack takes two).
    pub(super) const PAGES: u64 = Self::STACK + 2;
    /// Bytes in the region.
    pub(super) const BYTES: u64 = Self::PAGES * FRAME_SIZE as u64;

    /// The region at `gpa`, mapped through root slot `slot`.
    pub(super) fn new(gpa: u64, slot: usize) -> Self {
        CheckerRegion {
            gpa,
            slot,
            va: X86_64::root_slot_base(slot),
        }
    }

    /// Guest-physical address of page `n`.
    pub(super) fn page_gpa(&self, n: u64) -> u64 {
        self.gpa + n * FRAME_SIZE as u64
    }

    /// Virtual address of page `n`.
    pub(super) fn page_va(&self, n: u64) -> u64 {
        self.va + n * FRAME_SIZE as u64
    }

    /// The initial stack pointer: near the top of the stack, below the
    /// region's end.
    pub(super) fn stack_top(&self) -> u64 {
        self.page_va(Self::PAGES) - 64
    }
}
