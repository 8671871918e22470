//! The frame store: the memory that holds page tables, with per-frame metadata.
//!
//! Entries are `AtomicU64`s so the walker, translators and writers on other
//! threads are sound without locks; per-frame metadata is a few bytes.

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
extern crate std;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::lock::RawLock;
use crate::mode::Level;
use crate::sync::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// A guest (pseudo-)physical frame number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);
/// A machine frame number: what the hypervisor and the entries use.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mfn(pub u64);

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn:{:#x}", self.0)
    }
}
impl fmt::Debug for Mfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mfn:{:#x}", self.0)
    }
}

/// How often an allocation that finds no free frame tries to advance the
/// epoch and collect retired frames before reporting the store full.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
const RECLAIM_ATTEMPTS: usize = 64;

/// Entries in one table frame.
pub const ENTRIES_PER_FRAME: usize = 512;
/// Bytes in one frame.
pub const FRAME_SIZE: usize = 4096;

/// One 4 KiB page-table frame.
#[repr(C, align(4096))]
pub struct Frame {
    entries: [AtomicU64; ENTRIES_PER_FRAME],
}

const _: () = assert!(core::mem::size_of::<Frame>() == FRAME_SIZE);

impl Frame {
    /// A zeroed frame.
    pub fn zeroed() -> Self {
        Frame {
            entries: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
    /// The entry at `index`.
    ///
    /// # Panics
    /// If `index >= 512`.
    #[inline]
    pub fn entry(&self, index: usize) -> &AtomicU64 {
        &self.entries[index]
    }
    /// All entries.
    #[inline]
    pub fn entries(&self) -> &[AtomicU64; ENTRIES_PER_FRAME] {
        &self.entries
    }
}

/// Per-frame state bits.
mod state {
    /// The frame is handed out (as a table or a data page).
    pub const ALLOCATED: u8 = 1 << 0;
    /// The frame is pinned (Linux's PG_pinned): tested-and-set by pin.
    pub const PINNED: u8 = 1 << 1;
    /// The frame is a data page, not a table.
    pub const DATA: u8 = 1 << 2;
}

/// The metadata of one frame (see [`FrameStore::meta_size`]): its PTE-page
/// lock, its level and its state bits.
///
/// The store keeps each kind in its own array, so the levels that lock-free
/// walkers and writers read every time are not on the cache lines that a
/// pinner on another CPU keeps writing (pinned flags, PTE locks). This is a
/// handle onto the three.
pub struct FrameMeta<'a, L: RawLock> {
    /// The PTE-page lock (used under the split policy).
    lock: &'a L,
    /// Level the frame serves at (0: none).
    level: &'a AtomicU8,
    /// `state::*` bits.
    state: &'a AtomicU8,
}

impl<'a, L: RawLock> FrameMeta<'a, L> {
    /// The PTE-page lock.
    #[inline]
    pub fn lock(&self) -> &'a L {
        self.lock
    }
    /// The level this frame serves at, if it is an allocated table.
    #[inline]
    pub fn level(&self) -> Option<Level> {
        Level::from_u8(self.level.load(Ordering::Acquire))
    }
    /// Whether the pinned flag is set.
    #[inline]
    pub fn is_pinned(&self) -> bool {
        self.state.load(Ordering::Acquire) & state::PINNED != 0
    }
    /// Set the pinned flag; returns whether it was already set.
    #[inline]
    pub fn test_and_set_pinned(&self) -> bool {
        self.state.fetch_or(state::PINNED, Ordering::AcqRel) & state::PINNED != 0
    }
    /// Clear the pinned flag; returns whether it was set.
    #[inline]
    pub fn test_and_clear_pinned(&self) -> bool {
        self.state.fetch_and(!state::PINNED, Ordering::AcqRel) & state::PINNED != 0
    }
    /// Whether the frame is allocated.
    #[inline]
    pub fn is_allocated(&self) -> bool {
        self.state.load(Ordering::Acquire) & state::ALLOCATED != 0
    }
    /// Whether the frame is an allocated data page.
    #[inline]
    pub fn is_data(&self) -> bool {
        self.state.load(Ordering::Acquire) & state::DATA != 0
    }
}

enum Storage {
    Owned(Box<[Frame]>),
    Borrowed(&'static [Frame]),
}

impl Storage {
    #[inline]
    fn frames(&self) -> &[Frame] {
        match self {
            Storage::Owned(b) => b,
            Storage::Borrowed(s) => s,
        }
    }
}

/// Read access to table memory by frame number: what a hypervisor model or
/// a hardware checker needs from the store, without its lock type.
pub trait TableMemory: Send + Sync {
    /// The first frame number of the memory.
    fn base_pfn(&self) -> Pfn;
    /// How many frames there are.
    fn frame_count(&self) -> usize;
    /// The frame with pseudo-physical number `pfn`, if it is in this memory.
    fn frame(&self, pfn: Pfn) -> Option<&Frame>;
}

/// The frames that hold page tables (and, optionally, data pages), with an
/// allocator and per-frame metadata.
pub struct FrameStore<L: RawLock> {
    storage: Storage,
    /// Per-frame PTE-page locks.
    locks: Box<[L]>,
    /// Per-frame levels (read by every walk; written on alloc / free).
    levels: Box<[AtomicU8]>,
    /// Per-frame state bits (pinned flag: written by pin and unpin).
    states: Box<[AtomicU8]>,
    base_pfn: u64,
    free_lock: L,
    /// Free frame indices, guarded by `free_lock`.
    free: core::cell::UnsafeCell<Vec<u32>>,
    /// Frames released while a lock-free reader may still walk them.
    retired: core::cell::UnsafeCell<Vec<u32>>,
    allocated: AtomicUsize,
}

// SAFETY: the UnsafeCell'd vectors are only touched with `free_lock` held;
// everything else is atomics or immutable after construction.
unsafe impl<L: RawLock> Sync for FrameStore<L> {}
// SAFETY: as above; the storage is owned or 'static.
unsafe impl<L: RawLock> Send for FrameStore<L> {}

impl<L: RawLock> FrameStore<L> {
    /// A store of `frames` zeroed frames, numbered from `base_pfn`.
    ///
    /// # Panics
    /// If `frames` is 0 or more than `u32::MAX`, or the allocation fails.
    pub fn new(frames: usize, base_pfn: u64) -> Self {
        assert!(
            frames > 0 && frames <= u32::MAX as usize,
            "frame count out of range"
        );
        let layout = core::alloc::Layout::array::<Frame>(frames).expect("frame store too large");
        // SAFETY: the layout is non-zero-sized; all-zero bytes are a valid
        // `[AtomicU64; 512]`, so the zeroed allocation is a valid `[Frame]`
        // of `frames` elements, and Box takes ownership of exactly that
        // allocation with the same layout. Zeroed allocation lets the OS
        // hand out pages lazily.
        let owned = unsafe {
            let ptr = alloc::alloc::alloc_zeroed(layout) as *mut Frame;
            if ptr.is_null() {
                alloc::alloc::handle_alloc_error(layout);
            }
            Box::from_raw(core::ptr::slice_from_raw_parts_mut(ptr, frames))
        };
        Self::with_storage(Storage::Owned(owned), base_pfn)
    }

    /// A store over memory the embedder owns (e.g. a kernel's frame pool).
    /// The frames must be zeroed.
    pub fn from_static(frames: &'static [Frame], base_pfn: u64) -> Self {
        Self::with_storage(Storage::Borrowed(frames), base_pfn)
    }

    fn with_storage(storage: Storage, base_pfn: u64) -> Self {
        let n = storage.frames().len();
        let locks: Box<[L]> = (0..n).map(|_| L::new()).collect();
        let levels: Box<[AtomicU8]> = (0..n).map(|_| AtomicU8::new(0)).collect();
        let states: Box<[AtomicU8]> = (0..n).map(|_| AtomicU8::new(0)).collect();
        // Hand out low frames first: pop from the end.
        let free: Vec<u32> = (0..n as u32).rev().collect();
        FrameStore {
            storage,
            locks,
            levels,
            states,
            base_pfn,
            free_lock: L::new(),
            free: core::cell::UnsafeCell::new(free),
            retired: core::cell::UnsafeCell::new(Vec::new()),
            allocated: AtomicUsize::new(0),
        }
    }

    /// Bytes of metadata per frame.
    pub const fn meta_size() -> usize {
        core::mem::size_of::<L>() + 2 * core::mem::size_of::<AtomicU8>()
    }

    /// Number of frames.
    #[inline]
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// Whether the store has no frames (never true for a constructed store).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    /// Frames allocated now.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// First pfn.
    #[inline]
    pub fn base(&self) -> Pfn {
        Pfn(self.base_pfn)
    }

    /// The store index of `pfn`, if it is in the store.
    #[inline]
    pub fn index_of(&self, pfn: Pfn) -> Option<usize> {
        let idx = pfn.0.checked_sub(self.base_pfn)?;
        if idx < self.levels.len() as u64 {
            Some(idx as usize)
        } else {
            None
        }
    }

    /// Whether `pfn` is in the store.
    #[inline]
    pub fn contains(&self, pfn: Pfn) -> bool {
        self.index_of(pfn).is_some()
    }

    /// The frame `pfn`.
    #[inline]
    pub fn frame(&self, pfn: Pfn) -> Option<&Frame> {
        self.index_of(pfn).map(|i| &self.storage.frames()[i])
    }

    /// The metadata of `pfn`.
    #[inline]
    pub fn meta(&self, pfn: Pfn) -> Option<FrameMeta<'_, L>> {
        self.index_of(pfn).map(|i| FrameMeta {
            lock: &self.locks[i],
            level: &self.levels[i],
            state: &self.states[i],
        })
    }

    /// The entry `index` of frame `pfn`.
    #[inline]
    pub fn entry(&self, pfn: Pfn, index: usize) -> Option<&AtomicU64> {
        self.frame(pfn).and_then(|f| f.entries.get(index))
    }

    fn with_free<R>(&self, f: impl FnOnce(&mut Vec<u32>, &mut Vec<u32>) -> R) -> R {
        self.free_lock.lock();
        // SAFETY: `free_lock` is held, so this is the only reference to
        // the two vectors.
        let r = unsafe { f(&mut *self.free.get(), &mut *self.retired.get()) };
        // SAFETY: locked just above by this context.
        unsafe { self.free_lock.unlock() };
        r
    }

    fn alloc_with(&self, level: u8, bits: u8) -> Option<Pfn> {
        let idx = self.pop_free()? as usize;
        // Zero it before it becomes visible at its level.
        for e in self.storage.frames()[idx].entries.iter() {
            e.store(0, Ordering::Relaxed);
        }
        self.levels[idx].store(level, Ordering::Release);
        self.states[idx].store(state::ALLOCATED | bits, Ordering::Release);
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Some(Pfn(self.base_pfn + idx as u64))
    }

    /// A free frame index. With `std`, when the free list is empty, nudge
    /// the epoch collector a bounded number of times first: retired frames
    /// whose readers are gone come back without the caller's help.
    fn pop_free(&self) -> Option<u32> {
        if let Some(i) = self.with_free(|free, _| free.pop()) {
            return Some(i);
        }
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        for _ in 0..RECLAIM_ATTEMPTS {
            crossbeam_epoch::pin().flush();
            // Readers on other CPUs must leave their epoch for it to advance.
            std::thread::yield_now();
            if let Some(i) = self.with_free(|free, _| free.pop()) {
                return Some(i);
            }
        }
        None
    }

    /// Allocate a zeroed table frame for `level`; `None` when the store is full.
    pub fn alloc_table(&self, level: Level) -> Option<Pfn> {
        self.alloc_with(level.number(), 0)
    }

    /// Allocate a zeroed data frame (a page that leaves may map).
    pub fn alloc_data(&self) -> Option<Pfn> {
        self.alloc_with(0, state::DATA)
    }

    /// Release `pfn` at once. The caller guarantees that no lock-free reader
    /// can still be walking it; use [`Self::retire`] otherwise.
    ///
    /// Returns false (and changes nothing) if `pfn` is not allocated.
    pub fn free_now(&self, pfn: Pfn) -> bool {
        let Some(idx) = self.index_of(pfn) else {
            return false;
        };
        if self.states[idx].swap(0, Ordering::AcqRel) & state::ALLOCATED == 0 {
            return false;
        }
        self.levels[idx].store(0, Ordering::Release);
        self.allocated.fetch_sub(1, Ordering::Relaxed);
        self.with_free(|free, _| free.push(idx as u32));
        true
    }

    /// Release a table frame that lock-free readers may still be walking.
    ///
    /// The frame leaves its level at once (so a writer that locked it sees it
    /// is gone) but is reused only after a grace period: with `std` the
    /// current crossbeam-epoch guard defers it; without, it waits in a list
    /// until the embedder calls [`Self::quiesce`] from its RCU callback.
    pub fn retire(self: &alloc::sync::Arc<Self>, pfn: Pfn) {
        let Some(idx) = self.index_of(pfn) else {
            return;
        };
        self.levels[idx].store(0, Ordering::Release);
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        {
            let store = alloc::sync::Arc::clone(self);
            let guard = crossbeam_epoch::pin();
            guard.defer(move || {
                store.free_now(pfn);
            });
        }
        #[cfg(any(not(feature = "std"), loom, shuttle))]
        self.with_free(|_, retired| retired.push(idx as u32));
    }

    /// Declare a grace period over: every retired frame becomes free.
    /// Returns how many were freed. (With `std`, also nudges the epoch
    /// collector.)
    pub fn quiesce(&self) -> usize {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        crossbeam_epoch::pin().flush();
        let retired: Vec<u32> = self.with_free(|_, retired| core::mem::take(retired));
        let n = retired.len();
        for idx in retired {
            self.free_now(Pfn(self.base_pfn + idx as u64));
        }
        n
    }
}

impl<L: RawLock> TableMemory for FrameStore<L> {
    fn base_pfn(&self) -> Pfn {
        self.base()
    }
    fn frame_count(&self) -> usize {
        self.len()
    }
    fn frame(&self, pfn: Pfn) -> Option<&Frame> {
        FrameStore::frame(self, pfn)
    }
}

/// A guard held by lock-free readers (translate, inspection walks) so that
/// table frames they may be walking are not reused under them.
pub struct ReadGuard {
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    _guard: crossbeam_epoch::Guard,
}

/// Enter a lock-free read section.
#[inline]
pub fn read_guard() -> ReadGuard {
    ReadGuard {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        _guard: crossbeam_epoch::pin(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::SpinLock;

    #[test]
    fn alloc_free_and_meta() {
        let s: FrameStore<SpinLock> = FrameStore::new(4, 100);
        assert_eq!(FrameStore::<SpinLock>::meta_size(), 3);
        let a = s.alloc_table(Level::L1).unwrap();
        assert_eq!(a, Pfn(100));
        assert_eq!(s.meta(a).unwrap().level(), Some(Level::L1));
        assert!(!s.meta(a).unwrap().test_and_set_pinned());
        assert!(s.meta(a).unwrap().test_and_set_pinned());
        assert!(s.free_now(a));
        assert!(!s.free_now(a));
        assert!(!s.free_now(Pfn(5)));
        assert_eq!(s.allocated(), 0);
        for _ in 0..4 {
            s.alloc_data().unwrap();
        }
        assert!(s.alloc_table(Level::L2).is_none());
    }
}
