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
/// Then how many 1 ms naps it takes for a reader that was descheduled
/// inside its read section (which holds the epoch back) to run again:
/// bounded, so a store that is really full still says so within ~20 ms.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
const RECLAIM_NAPS: usize = 20;

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

/// A PTE page's lock: a byte of its own next to the frame's state byte, on
/// the frame's cache line (as Linux keeps the split ptlock in the page's
/// `struct page`). Taking it is one compare-exchange; releasing it is a
/// store, as a spinlock's release is (nobody else writes a held lock).
///
/// Waiters spin (with a spin-loop hint) for [`crate::lock::SPIN_ROUNDS`]
/// rounds, then, with `std`, yield the CPU between attempts: the lock is
/// only ever held for one entry write, or by a pinner across the flush
/// that issues a page's read-only remap and L1 pin.
#[derive(Clone, Copy)]
pub struct PteLock<'a> {
    lock: &'a AtomicU8,
    /// Under a model checker, waiters block here instead of spinning (a
    /// checker would otherwise explore every spin).
    #[cfg(any(loom, shuttle))]
    unlocked: &'a UnlockSignal,
}

/// Under a model checker: PTE-lock waiters sleep on a condition variable
/// that every PTE unlock signals.
#[cfg(any(loom, shuttle))]
#[derive(Default)]
pub(crate) struct UnlockSignal {
    lock: crate::sync::Mutex<()>,
    cv: crate::sync::Condvar,
}

impl fmt::Debug for PteLock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PteLock").field(&self.is_locked()).finish()
    }
}

/// One round of waiting for a held PTE lock.
#[inline]
#[cfg(not(any(loom, shuttle)))]
fn wait_round(rounds: &mut u32) {
    if *rounds < crate::lock::SPIN_ROUNDS {
        *rounds += 1;
        crate::sync::spin_hint();
    } else {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        std::thread::yield_now();
        #[cfg(not(feature = "std"))]
        crate::sync::spin_hint();
    }
}

impl<'a> PteLock<'a> {
    /// Take the lock, waiting while it is held.
    #[inline]
    pub fn lock(&self) {
        let mut rounds = 0;
        while !self.try_lock() {
            self.wait_free(&mut rounds);
        }
    }

    /// Wait until the lock is seen free.
    #[inline]
    fn wait_free(&self, rounds: &mut u32) {
        #[cfg(not(any(loom, shuttle)))]
        while self.is_locked() {
            wait_round(rounds);
        }
        #[cfg(any(loom, shuttle))]
        {
            let _ = rounds;
            let mut g = self.unlocked.lock.lock().unwrap();
            while self.is_locked() {
                g = self.unlocked.cv.wait(g).unwrap();
            }
        }
    }

    /// Take the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> bool {
        self.lock
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Release the lock.
    ///
    /// # Safety
    /// The lock must be held by this context or one that handed it over
    /// (the engine releases PTE locks from batch callbacks).
    #[inline]
    pub unsafe fn unlock(&self) {
        debug_assert!(self.is_locked(), "unlock of a free PTE lock");
        self.lock.store(0, Ordering::Release);
        #[cfg(any(loom, shuttle))]
        {
            let _g = self.unlocked.lock.lock().unwrap();
            self.unlocked.cv.notify_all();
        }
    }

    /// Whether the lock is held by anyone (diagnostics, tests, waiting).
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.lock.load(Ordering::Relaxed) != 0
    }
}

/// Who a table frame belongs to: the space that allocated it (see
/// [`FrameStore::new_owner`]), or [`Owner::NONE`] for a frame allocated
/// outside any space ([`FrameStore::alloc_table`]).
///
/// A pin walk refuses a table that belongs to another space
/// ([`crate::Error::ForeignTable`]), so a space's own tables are pinned and
/// unpinned only under its space lock: their pinned flags then need no
/// atomic read-modify-write. Unowned tables keep the atomic test-and-set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner(pub(crate) u64);

impl Owner {
    /// No owner.
    pub const NONE: Owner = Owner(0);
    /// The owner's number (0 for none).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Bits of a frame's tag word below the owner: the level.
const TAG_LEVEL_BITS: u32 = 8;

#[inline]
const fn tag(level: u8, owner: Owner) -> u64 {
    (owner.0 << TAG_LEVEL_BITS) | level as u64
}

/// The metadata of one frame (see [`FrameStore::meta_size`]): its tag
/// (level and owner), its state byte (allocated, data, pinned flag) and
/// its PTE-page lock.
///
/// The store keeps the three in separate arrays. Tags and states are dense
/// (a pin walk reads and writes them for every table, in order); writers
/// never write either. Each PTE lock is alone on its cache line, the one
/// line a writer and a pinner on other CPUs both write: a writer locking
/// one PTE page never contends for a line with a pinner working on others.
/// This is a handle onto the three.
#[derive(Clone, Copy)]
pub struct FrameMeta<'a> {
    /// Level the frame serves at (0: none) and its owner.
    tag: &'a AtomicU64,
    #[cfg(any(loom, shuttle))]
    unlocked: &'a UnlockSignal,
    /// `state::*` bits.
    state: &'a AtomicU8,
    /// The PTE-page lock byte.
    lock: &'a AtomicU8,
}

impl<'a> FrameMeta<'a> {
    /// The PTE-page lock (used under the split policy).
    #[inline]
    pub fn lock(&self) -> PteLock<'a> {
        PteLock {
            lock: self.lock,
            #[cfg(any(loom, shuttle))]
            unlocked: self.unlocked,
        }
    }
    /// The level this frame serves at, if it is an allocated table.
    #[inline]
    pub fn level(&self) -> Option<Level> {
        Level::from_u8(self.tag.load(Ordering::Acquire) as u8)
    }
    /// The space this frame belongs to.
    #[inline]
    pub fn owner(&self) -> Owner {
        Owner(self.tag.load(Ordering::Acquire) >> TAG_LEVEL_BITS)
    }
    /// Whether the frame is a table of `level`, and its owner, in one
    /// load and one comparison (a walk's check of every child: speed).
    #[inline(always)]
    pub(crate) fn is_table_at(&self, level: Level) -> (bool, Owner) {
        let t = self.tag.load(Ordering::Acquire);
        (t as u8 == level as u8, Owner(t >> TAG_LEVEL_BITS))
    }
    /// Set or clear the pinned flag without a read-modify-write; returns
    /// whether the flag already had that value (then nothing is written).
    ///
    /// # Safety
    /// No other context may modify this frame's state byte meanwhile: the
    /// caller holds the space lock of the frame's owner (writers never
    /// write the state byte; the PTE lock is a byte of its own).
    #[inline]
    pub(crate) unsafe fn set_pinned_exclusive(&self, pinned: bool) -> bool {
        let cur = self.state.load(Ordering::Relaxed);
        if (cur & state::PINNED != 0) == pinned {
            return true;
        }
        self.state.store(cur ^ state::PINNED, Ordering::Release);
        false
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

/// A frame's PTE lock, alone on its cache line (see [`FrameMeta`]).
#[repr(C, align(64))]
struct LockCell(AtomicU8);

/// The frames that hold page tables (and, optionally, data pages), with an
/// allocator and per-frame metadata.
pub struct FrameStore<L: RawLock> {
    storage: Storage,
    /// Per-frame tags: level and owner (read by every walk; written on
    /// alloc / free).
    tags: Box<[AtomicU64]>,
    /// The last owner number handed out.
    owners: AtomicU64,
    #[cfg(any(loom, shuttle))]
    unlocked: UnlockSignal,
    /// Per-frame state bits (pinned flag: written by pin and unpin).
    states: Box<[AtomicU8]>,
    /// Per-frame PTE locks (split policy: pinners and writers).
    locks: Box<[LockCell]>,
    base_pfn: u64,
    free_lock: L,
    /// Free frame indices, guarded by `free_lock`.
    free: core::cell::UnsafeCell<Vec<u32>>,
    /// Frames released while a lock-free reader may still walk them.
    retired: core::cell::UnsafeCell<Vec<u32>>,
    allocated: AtomicUsize,
    /// With `std`: frames retired to the epoch collector and not yet
    /// freed, so an allocation that finds no free frame knows whether
    /// waiting for a grace period can help at all.
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    awaiting_grace: AtomicUsize,
    /// Frames retired or freed so far. A reader that walks without a read
    /// section (`AddressSpace::translate`) reads it before and after its
    /// walk and trusts the walk only if it did not move: a frame reused
    /// under the walk was retired (this count bumped) before it was zeroed.
    retirements: AtomicU64,
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
        let tags: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        let states: Box<[AtomicU8]> = (0..n).map(|_| AtomicU8::new(0)).collect();
        let locks: Box<[LockCell]> = (0..n).map(|_| LockCell(AtomicU8::new(0))).collect();
        // Hand out low frames first: pop from the end.
        let free: Vec<u32> = (0..n as u32).rev().collect();
        FrameStore {
            storage,
            tags,
            owners: AtomicU64::new(0),
            #[cfg(any(loom, shuttle))]
            unlocked: UnlockSignal::default(),
            states,
            locks,
            base_pfn,
            free_lock: L::new(),
            free: core::cell::UnsafeCell::new(free),
            retired: core::cell::UnsafeCell::new(Vec::new()),
            allocated: AtomicUsize::new(0),
            #[cfg(all(feature = "std", not(any(loom, shuttle))))]
            awaiting_grace: AtomicUsize::new(0),
            retirements: AtomicU64::new(0),
        }
    }

    /// Bytes of metadata per frame.
    pub const fn meta_size() -> usize {
        core::mem::size_of::<AtomicU64>()
            + core::mem::size_of::<AtomicU8>()
            + core::mem::size_of::<LockCell>()
    }

    /// Number of frames.
    #[inline]
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    /// Whether the store has no frames (never true for a constructed store).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
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
        if idx < self.tags.len() as u64 {
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
    pub fn meta(&self, pfn: Pfn) -> Option<FrameMeta<'_>> {
        let i = self.index_of(pfn)?;
        // SAFETY: `index_of` checked `i < tags.len()`, and the three
        // arrays have the same length (made together in `new`, never
        // resized). One bounds check instead of three: every walk step
        // looks a frame up (speed).
        unsafe {
            Some(FrameMeta {
                tag: self.tags.get_unchecked(i),
                #[cfg(any(loom, shuttle))]
                unlocked: &self.unlocked,
                state: self.states.get_unchecked(i),
                lock: &self.locks.get_unchecked(i).0,
            })
        }
    }

    /// The frame `pfn`, with no bounds check (a descent steps into the
    /// child it just validated: speed, one bounds check per level instead
    /// of two; keep it).
    ///
    /// # Safety
    /// `pfn` is in the store ([`Self::meta`] or [`Self::index_of`] said so).
    #[inline(always)]
    pub(crate) unsafe fn frame_unchecked(&self, pfn: Pfn) -> &Frame {
        let i = pfn.0.wrapping_sub(self.base_pfn) as usize;
        // SAFETY: the caller's `pfn` passed `index_of`'s check against
        // `tags.len()`, which is the frames' count (made together, never
        // resized).
        unsafe { self.storage.frames().get_unchecked(i) }
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

    /// A new owner number for a space's tables (never [`Owner::NONE`]; 2^56
    /// of them before it wraps).
    pub fn new_owner(&self) -> Owner {
        Owner(self.owners.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn alloc_with(&self, level: u8, bits: u8, owner: Owner) -> Option<Pfn> {
        let idx = self.pop_free()? as usize;
        // Zero it before it becomes visible at its level. The fence orders
        // the retirement that freed the frame before these stores for a
        // walker without a read section that reads one of them (see
        // `retirements`).
        crate::sync::fence(Ordering::Release);
        for e in self.storage.frames()[idx].entries.iter() {
            e.store(0, Ordering::Relaxed);
        }
        self.tags[idx].store(tag(level, owner), Ordering::Release);
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
        for attempt in 0..RECLAIM_ATTEMPTS + RECLAIM_NAPS {
            // Nothing retired is waiting for its grace period: the store is
            // full, and waiting cannot change that.
            if self.awaiting_grace.load(Ordering::Acquire) == 0 {
                break;
            }
            crossbeam_epoch::pin().flush();
            // Readers on other CPUs must leave their epoch for it to advance;
            // one descheduled inside its read section needs a nap, not a
            // yield.
            if attempt < RECLAIM_ATTEMPTS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if let Some(i) = self.with_free(|free, _| free.pop()) {
                return Some(i);
            }
        }
        None
    }

    /// Allocate a zeroed table frame for `level`; `None` when the store is full.
    pub fn alloc_table(&self, level: Level) -> Option<Pfn> {
        self.alloc_with(level.number(), 0, Owner::NONE)
    }

    /// Allocate a zeroed table frame for `level` belonging to `owner`.
    pub fn alloc_table_owned(&self, level: Level, owner: Owner) -> Option<Pfn> {
        self.alloc_with(level.number(), 0, owner)
    }

    /// Allocate a zeroed data frame (a page that leaves may map).
    pub fn alloc_data(&self) -> Option<Pfn> {
        self.alloc_with(0, state::DATA, Owner::NONE)
    }

    /// How many frames were retired ([`Self::retire`]) or freed
    /// ([`Self::free_now`]) so far, each counted before the frame leaves
    /// its level. A walker without a read section that reads it before
    /// and after its walk (after an acquire fence) and sees the same
    /// number read no reused frame (`AddressSpace::translate` does so).
    #[inline]
    pub fn retirements(&self) -> u64 {
        self.retirements.load(Ordering::Acquire)
    }

    /// Release `pfn` at once; use [`Self::retire`] for a table that
    /// lock-free readers may still be walking.
    ///
    /// Returns false (and changes nothing) if `pfn` is not allocated.
    ///
    /// # Safety
    /// `pfn` must not be linked into any table, and no lock-free reader or
    /// writer may still reach it (a released table's frame is handed out
    /// again at once, zeroed: a walker still on it would read another
    /// table's entries).
    pub unsafe fn free_now(&self, pfn: Pfn) -> bool {
        let Some(idx) = self.index_of(pfn) else {
            return false;
        };
        if self.states[idx].swap(0, Ordering::AcqRel) & state::ALLOCATED == 0 {
            return false;
        }
        self.retirements.fetch_add(1, Ordering::Release);
        self.tags[idx].store(0, Ordering::Release);
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
        // Before the frame leaves its level: a walker without a read
        // section that sees the change sees this count move.
        self.retirements.fetch_add(1, Ordering::Release);
        self.tags[idx].store(0, Ordering::Release);
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        {
            let store = alloc::sync::Arc::clone(self);
            self.awaiting_grace.fetch_add(1, Ordering::AcqRel);
            let guard = crossbeam_epoch::pin();
            guard.defer(move || {
                // SAFETY: the grace period is over: every reader that could
                // reach the retired (already unlinked) frame has left.
                unsafe { store.free_now(pfn) };
                store.awaiting_grace.fetch_sub(1, Ordering::AcqRel);
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
            // SAFETY: the embedder declares the grace period of these
            // retired (unlinked) frames over.
            unsafe { self.free_now(Pfn(self.base_pfn + idx as u64)) };
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

/// A guard held by lock-free readers (`Reader`, `translate_in`, `set_pte`'s
/// search, inspection walks) so that table frames they may be walking are
/// not reused under them. (`translate` walks without one and checks the
/// store's retirement count instead.)
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
        assert_eq!(FrameStore::<SpinLock>::meta_size(), 73);
        let a = s.alloc_table(Level::L1).unwrap();
        assert_eq!(a, Pfn(100));
        assert_eq!(s.meta(a).unwrap().level(), Some(Level::L1));
        assert!(!s.meta(a).unwrap().test_and_set_pinned());
        assert!(s.meta(a).unwrap().test_and_set_pinned());
        // SAFETY: nothing links or reads these frames.
        unsafe {
            assert!(s.free_now(a));
            assert!(!s.free_now(a));
            assert!(!s.free_now(Pfn(5)));
        }
        assert_eq!(s.allocated(), 0);
        for _ in 0..4 {
            s.alloc_data().unwrap();
        }
        assert!(s.alloc_table(Level::L2).is_none());
    }
}
