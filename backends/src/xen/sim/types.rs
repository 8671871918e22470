//! The per-frame state Xen keeps: the `type_info` word of every machine
//! frame (type, count, validated, pinned, partial) in a hot array, the
//! cold state beside it (stale TLB, page lock, linear and partial counts),
//! the direct-map slots, and taking and dropping type references.

use pagepin_engine::errno;
use pagepin_engine::Level;
use pagepin_engine::PageTableEntry;
use pagepin_engine::{Mfn, Pfn};

use crate::sync::{backoff, AtomicBool, AtomicU64, Ordering};

use super::stats::Local;
use super::{XenSim, R};

pub(super) const COUNT_MASK: u64 = 0xffff_ffff;
const TYPE_SHIFT: u32 = 32;
pub(super) const TYPE_MASK: u64 = 0x7 << TYPE_SHIFT;
pub(super) const VALIDATED: u64 = 1 << 40;
pub(super) const PINNED: u64 = 1 << 41;
/// Xen's `PGT_partial`: a validation failed partway and the entries before
/// the failing one still hold their references (count 1, not validated),
/// until the request ends (Xen's `old_guest_table`) or, if Xen lost track
/// of the frame, until a later request of the same type resumes it.
pub(super) const PARTIAL: u64 = 1 << 42;

/// A frame's type (Xen's `PGT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// No type (count 0).
    None = 0,
    /// Mapped writable somewhere.
    Writable = 1,
    /// An L1 page table.
    L1 = 2,
    /// An L2 page table.
    L2 = 3,
    /// An L3 page table.
    L3 = 4,
    /// An L4 page table.
    L4 = 5,
}

impl FrameType {
    pub(super) fn from_bits(x: u64) -> FrameType {
        match (x & TYPE_MASK) >> TYPE_SHIFT {
            1 => FrameType::Writable,
            2 => FrameType::L1,
            3 => FrameType::L2,
            4 => FrameType::L3,
            5 => FrameType::L4,
            _ => FrameType::None,
        }
    }
    pub(super) fn bits(self) -> u64 {
        (self as u64) << TYPE_SHIFT
    }
    /// The page-table type of `level`.
    pub fn table(level: Level) -> FrameType {
        match level {
            Level::L1 => FrameType::L1,
            Level::L2 => FrameType::L2,
            Level::L3 => FrameType::L3,
            // Xen has no 5-level type; a 5-level space never reaches a Xen
            // backend (refused at compile time).
            Level::L4 | Level::L5 => FrameType::L4,
        }
    }
    /// The level, if this is a page-table type.
    pub fn level(self) -> Option<Level> {
        match self {
            FrameType::L1 => Some(Level::L1),
            FrameType::L2 => Some(Level::L2),
            FrameType::L3 => Some(Level::L3),
            FrameType::L4 => Some(Level::L4),
            _ => None,
        }
    }
    /// Whether this is a page-table type.
    pub fn is_table(self) -> bool {
        self.level().is_some()
    }
}

/// What a frame looks like to the hypervisor (see [`XenSim::frame_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// The guest frame.
    pub pfn: Pfn,
    /// The machine frame.
    pub mfn: Mfn,
    /// The frame's type.
    pub ty: FrameType,
    /// Its type count.
    pub count: u32,
    /// Whether it is validated (always, for a typed frame outside an update).
    pub validated: bool,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Whether a failed validation left it partially validated (Xen's
    /// `PGT_partial`).
    pub partial: bool,
    /// Its direct-map mapping: `Some(true)` writable, `Some(false)` read-only,
    /// `None` not mapped.
    pub direct_map_writable: Option<bool>,
    /// Whether a stale writable TLB entry for it survives.
    pub stale_tlb: bool,
}

/// The `type_info` words, one per machine frame. Outside the model
/// checkers the array is 2 MiB-aligned and, on Linux, advised for
/// transparent huge pages: a validation reads and writes it at the machine
/// frames the entries map, and with 4 KiB pages each of those accesses in
/// a large domain would also miss the TLB.
#[cfg(not(any(loom, shuttle)))]
pub(super) struct TypeInfoTable {
    ptr: core::ptr::NonNull<AtomicU64>,
    len: usize,
    layout: std::alloc::Layout,
}

#[cfg(not(any(loom, shuttle)))]
// SAFETY: the table owns its words, which are atomics.
unsafe impl Send for TypeInfoTable {}
#[cfg(not(any(loom, shuttle)))]
// SAFETY: as above: shared access goes through `&[AtomicU64]`.
unsafe impl Sync for TypeInfoTable {}

#[cfg(not(any(loom, shuttle)))]
impl TypeInfoTable {
    /// Arrays at least this large get the huge-page alignment and advice.
    const HUGE: usize = 2 << 20;

    /// `n` words, all 0.
    pub(super) fn new(n: usize) -> Self {
        let bytes = n.max(1) * core::mem::size_of::<AtomicU64>();
        let (size, align) = if bytes >= Self::HUGE {
            (bytes.next_multiple_of(Self::HUGE), Self::HUGE)
        } else {
            (bytes, core::mem::align_of::<AtomicU64>())
        };
        let layout = std::alloc::Layout::from_size_align(size, align)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u64>()));
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = core::ptr::NonNull::new(raw.cast::<AtomicU64>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == Self::HUGE {
            // SAFETY: the range is this allocation (page-aligned, `size`
            // bytes); the advice only changes how it is backed. Failure
            // (no THP support) is harmless and ignored.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        for i in 0..n {
            // SAFETY: `i < n` words fit in the allocation.
            unsafe { ptr.as_ptr().add(i).write(AtomicU64::new(0)) };
        }
        TypeInfoTable {
            ptr,
            len: n,
            layout,
        }
    }
}

#[cfg(not(any(loom, shuttle)))]
impl core::ops::Deref for TypeInfoTable {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `len` initialised words live as long as `self`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(not(any(loom, shuttle)))]
impl Drop for TypeInfoTable {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; atomics need no drop.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

/// Under a model checker: a plain boxed slice of the checker's atomics.
#[cfg(any(loom, shuttle))]
pub(super) struct TypeInfoTable(Box<[AtomicU64]>);

#[cfg(any(loom, shuttle))]
impl TypeInfoTable {
    pub(super) fn new(n: usize) -> Self {
        TypeInfoTable((0..n).map(|_| AtomicU64::new(0)).collect())
    }
}

#[cfg(any(loom, shuttle))]
impl core::ops::Deref for TypeInfoTable {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        &self.0
    }
}

/// A frame's state apart from its `type_info` word: touched only when the
/// frame is (or becomes) a page table, is remapped in the direct map, or
/// is flushed; never by the per-entry reference counting of a validation.
#[derive(Default)]
pub(super) struct FrameCold {
    /// Flush generation + 1 at which a stale writable TLB entry was left; 0: none.
    pub(super) stale: AtomicU64,
    /// Xen's page lock: held while a table's entries are validated,
    /// devalidated or updated.
    pub(super) lock: AtomicBool,
    /// Flush generation + 1 at which the type count last reached 0 (Xen's
    /// `tlbflush_timestamp`); 0: never.
    pub(super) stamp: AtomicU64,
    /// The type bits the frame had when its count last reached 0 (Xen
    /// keeps them in `type_info`): a later typing to another type is a
    /// type change.
    pub(super) last_type: AtomicU64,
    /// Xen's `linear_pt_count` as a two's-complement word: > 0, linear
    /// entries this table holds; < 0, linear entries mapping it.
    pub(super) linear: AtomicU64,
    /// Of a [`PARTIAL`] table: the entries below this index hold
    /// references (Xen's `nr_validated_ptes`); bit 32: so does the entry at
    /// it, on a child left partial itself (`PTF_partial_set`).
    pub(super) partial: AtomicU64,
}

/// [`FrameCold::partial`]'s flag bit.
pub(super) const PARTIAL_HELD: u64 = 1 << 32;

/// One machine frame's state: its `type_info` word (the hot array: one
/// `u64` per frame, so validating an L1 touches 8 bytes per data frame)
/// and its cold state (a separate array).
#[derive(Clone, Copy)]
pub(super) struct FrameRef<'a> {
    pub(super) type_info: &'a AtomicU64,
    pub(super) stale: &'a AtomicU64,
    pub(super) lock: &'a AtomicBool,
    pub(super) cold: &'a FrameCold,
}

#[derive(Default)]
pub(super) struct DmSlot {
    pub(super) pte: AtomicU64,
    pub(super) lock: AtomicBool,
}

fn spin_lock(l: &AtomicBool) {
    let mut spins = 0u32;
    while l
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        backoff(&mut spins);
    }
}

fn spin_unlock(l: &AtomicBool) {
    l.store(false, Ordering::Release);
}

/// A held spin lock, released on drop.
pub(super) struct Held<'a>(&'a AtomicBool);
impl Drop for Held<'_> {
    fn drop(&mut self) {
        spin_unlock(self.0);
    }
}
pub(super) fn hold(l: &AtomicBool) -> Held<'_> {
    spin_lock(l);
    Held(l)
}

impl XenSim {
    #[inline]
    pub(super) fn frame(&self, mfn: u64) -> R<FrameRef<'_>> {
        let i = usize::try_from(mfn).map_err(|_| errno::EINVAL)?;
        match (self.type_info.get(i), self.cold.get(i)) {
            (Some(type_info), Some(c)) => Ok(FrameRef {
                type_info,
                stale: &c.stale,
                lock: &c.lock,
                cold: c,
            }),
            _ => Err(errno::EINVAL),
        }
    }

    #[inline]
    pub(super) fn stale_live(&self, f: FrameRef<'_>) -> bool {
        let s = f.stale.load(Ordering::Acquire);
        s != 0 && s == self.flush_gen.0.load(Ordering::Acquire) + 1
    }

    pub(super) fn flush_all(&self, l: &mut Local) {
        self.flush_gen.0.fetch_add(1, Ordering::AcqRel);
        l.tlb_flushes += 1;
    }

    /// The invariant on one frame; counts a break.
    pub(super) fn check_frame(&self, mfn: u64, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        let x = f.type_info.load(Ordering::Acquire);
        if !FrameType::from_bits(x).is_table() || x & COUNT_MASK == 0 {
            return;
        }
        let pfn = self.m2p[mfn as usize] as usize;
        let dm_rw = PageTableEntry::from_bits(self.dm[pfn].pte.load(Ordering::Acquire));
        if (dm_rw.is_present() && dm_rw.is_writable()) || self.stale_live(f) {
            l.invariant_breaks += 1;
        }
    }
}

impl XenSim {
    /// Take a type reference of type `ty` on `mfn`, validating it if the
    /// type changes. `direct`: the frame is named by the request itself
    /// (Xen's type-change TLB filter flushes it).
    pub(super) fn get_type(&self, mfn: u64, ty: FrameType, direct: bool, l: &mut Local) -> R {
        let f = self.frame(mfn)?;
        let mut spins = 0;
        // Resuming a partially validated table (Xen continues its
        // validation from the failing entry): where to start.
        let mut from = (0, false);
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            let cnt = x & COUNT_MASK;
            if cnt == 0 {
                let nx = if ty == FrameType::Writable {
                    ty.bits() | VALIDATED | 1
                } else {
                    ty.bits() | 1
                };
                if f.type_info
                    .compare_exchange_weak(x, nx, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                if self.cfg.exact_tlb {
                    self.type_change_flush(f, ty, l);
                }
                if ty == FrameType::Writable {
                    return Ok(());
                }
                break;
            }
            let cur = FrameType::from_bits(x);
            if cur != ty {
                return Err(if ty == FrameType::Writable {
                    errno::EBUSY
                } else {
                    errno::EINVAL
                });
            }
            if x & PARTIAL != 0 {
                // Partially validated: take over its one reference (others
                // now wait) and go on from the entry that failed.
                if f.type_info
                    .compare_exchange_weak(x, x & !PARTIAL, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let p = f.cold.partial.load(Ordering::Acquire);
                    from = ((p & 0xffff) as usize, p & PARTIAL_HELD != 0);
                    break;
                }
                continue;
            }
            if x & VALIDATED == 0 {
                // Being validated or devalidated by another CPU.
                backoff(&mut spins);
                continue;
            }
            if cnt == COUNT_MASK {
                return Err(errno::EINVAL);
            }
            if f.type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
        // We changed the type to a page-table type (or resume one): validate.
        if from.0 == 0 && self.stale_live(f) {
            if direct {
                f.stale.store(0, Ordering::Release);
                l.filter_flushes += 1;
                l.tlb_flushes += 1;
            } else {
                // Typed (below) while a stale writable TLB entry survives.
                l.invariant_breaks += 1;
            }
        }
        let level = ty.level().ok_or(errno::EINVAL)?;
        let r = {
            let _g = hold(f.lock);
            self.validate(mfn, level, from, l)
        };
        match r {
            Ok(()) => {
                f.type_info.fetch_or(VALIDATED, Ordering::AcqRel);
                l.validations += 1;
                self.check_frame(mfn, l);
                Ok(())
            }
            // Failed partway: the table stays typed with the references
            // its accepted entries took, until the request ends.
            Err(e) if l.ogt == Some(mfn) => {
                f.type_info.fetch_or(PARTIAL, Ordering::AcqRel);
                Err(e)
            }
            Err(e) => {
                f.type_info.store(0, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Take a reference of type `ty` only if the frame already has that type
    /// (count > 0, waiting out a validation in progress). `Ok(false)`: it
    /// does not.
    pub(super) fn get_existing(&self, mfn: u64, ty: FrameType) -> R<bool> {
        let f = self.frame(mfn)?;
        let mut spins = 0;
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            if x & COUNT_MASK == 0 || FrameType::from_bits(x) != ty {
                return Ok(false);
            }
            if x & PARTIAL != 0 {
                // Not validated: Xen cannot lock it for an update.
                return Err(errno::EINVAL);
            }
            if x & VALIDATED == 0 {
                backoff(&mut spins);
                continue;
            }
            if x & COUNT_MASK == COUNT_MASK {
                return Err(errno::EINVAL);
            }
            if f.type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    /// Xen's check at a type change (count 0 -> 1 to a type other than
    /// the one the frame last had): flush the TLB if the frame was last
    /// used after the last flush, so no stale writable translation of a
    /// frame outlives its becoming a table (or vice versa).
    fn type_change_flush(&self, f: FrameRef<'_>, ty: FrameType, l: &mut Local) {
        if f.cold.last_type.load(Ordering::Acquire) != ty.bits()
            && f.cold.stamp.load(Ordering::Acquire) == self.flush_gen.0.load(Ordering::Acquire) + 1
        {
            self.flush_all(l);
            l.filter_flushes += 1;
        }
    }

    /// The frame's count reached 0 with type bits `x`: remember the type
    /// and when (Xen's `tlbflush_timestamp`).
    pub(super) fn stamp(&self, f: FrameRef<'_>, x: u64) {
        if self.cfg.exact_tlb {
            f.cold.last_type.store(x & TYPE_MASK, Ordering::Release);
            let gen = self.flush_gen.0.load(Ordering::Acquire);
            f.cold.stamp.store(gen + 1, Ordering::Release);
        }
    }

    /// Drop a type reference; at count 0 a page table is devalidated and
    /// its children's references are dropped.
    pub(super) fn put_type(&self, mfn: u64, l: &mut Local) {
        self.put_type_from(mfn, None, l);
    }

    /// Undo a linear entry of table `ptpg` mapping `f` if `f` has the
    /// type `x` shows and that is `ptpg`'s type (Xen's check when it drops
    /// a reference a table entry held).
    fn unlink_linear(&self, f: FrameRef<'_>, x: u64, ptpg: Option<u64>) {
        let Some(p) = ptpg.and_then(|p| self.frame(p).ok()) else {
            return;
        };
        if (p.type_info.load(Ordering::Acquire) ^ x) & TYPE_MASK == 0 {
            f.cold.linear.fetch_add(1, Ordering::AcqRel);
            p.cold.linear.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// [`Self::put_type`] of a reference an entry of table `ptpg` held
    /// (linear entries are counted on both frames).
    pub(super) fn put_type_from(&self, mfn: u64, ptpg: Option<u64>, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            let cnt = x & COUNT_MASK;
            if cnt == 0 {
                // A reference that was never taken: the table changed behind
                // the hypervisor's back (or a simulator bug). Counted.
                l.refcount_errors += 1;
                return;
            }
            if cnt > 1 {
                if f.type_info
                    .compare_exchange_weak(x, x - 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.unlink_linear(f, x, ptpg);
                    return;
                }
                continue;
            }
            let ty = FrameType::from_bits(x);
            let Some(level) = ty.level() else {
                if f.type_info
                    .compare_exchange_weak(x, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.stamp(f, x);
                    return;
                }
                continue;
            };
            // Last reference of a table: mark it invalid (others now wait),
            // release its children under the page lock, then untype it.
            if f.type_info
                .compare_exchange_weak(
                    x,
                    x & !(VALIDATED | PINNED),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                continue;
            }
            self.unlink_linear(f, x, ptpg);
            {
                let _g = hold(f.lock);
                self.devalidate(mfn, level, l);
            }
            self.stamp(f, x);
            f.type_info.store(0, Ordering::Release);
            l.devalidations += 1;
            return;
        }
    }
}
