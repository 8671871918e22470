//! Cursors over an address space: a writer that holds the locks of a
//! virtual-address range while it maps many pages, and a reader that
//! translates many addresses in one read section.
//!
//! [`CursorMut`] (after asterinas' `ostd::mm::page_table::CursorMut`) takes
//! the space lock once, for its whole life. Under the split policy it also
//! holds the lock of the PTE page it is writing into, and trades it for the
//! next page's lock when it moves on (lock order: space lock, then one PTE
//! lock at a time). It remembers the tables of the path it last walked, so
//! mapping consecutive pages walks and validates the upper levels once per
//! table instead of once per page. Every page goes through the same argument
//! checks, table allocation (made read-only and pinned first when the space
//! is pinned) and entry write path as [`AddressSpace::map`], so a cursor
//! produces the same tables and entries and the same typed errors.
//!
//! Why the remembered path stays valid: entries above L1 change only with
//! the space lock held (map links new tables into empty slots; only
//! [`AddressSpace::release_table`] unlinks one), and the cursor holds that
//! lock. PTE writers ([`AddressSpace::set_pte`]) change L1 entries only, and
//! under split they take the PTE lock, which the cursor holds for the page
//! it writes. The one-page cursors of `map`, `unmap` and `protect` hand the
//! PTE page they used to the next one through the space (`PteHint`,
//! docs/PROTOCOL.md §7): remembered under the space lock, forgotten by every
//! write above L1.
//!
//! [`Reader`] enters one lock-free read section (as an RCU reader would) and
//! remembers the last L1 it reached with the path to it. The next address
//! in the same 2 MiB re-reads each entry of that path and the level of each
//! table on it and uses the remembered L1 only if they are all unchanged;
//! anything else is a full, validated walk, exactly as
//! [`AddressSpace::translate`] does. Frames released meanwhile are not
//! reused while the reader lives, so an unchanged entry still names the
//! same table.

use core::marker::PhantomData;
use core::ops::Range;

use crate::backend::Backend;
use crate::entry::{EntryFlags, PageTableEntry};
use crate::error::Error;
use crate::frame::{read_guard, Frame, FrameMeta, Pfn, ReadGuard};
use crate::lock::LockPolicy;
use crate::locking::{PteLockGuard, SpaceLockGuard};
use crate::mode::{Level, PageSize, PagingMode};
use crate::space::{AddressSpace, Translation, WritePath};
use crate::sync::{AtomicU64, Ordering};
use crate::walk::{self, Next};

/// No table remembered at this level.
const NO_TAG: u64 = u64::MAX;

/// Tables below the root on the longest path of any mode (5-level: L4..L1).
const MAX_PATH: usize = Level::MAX as usize - 1;

/// The tag of the table at `level` that covers `va`: the address bits above
/// what that table spans (never [`NO_TAG`]: `va >> 21` is at most 2^43).
#[inline]
fn tag(va: u64, level: Level) -> u64 {
    va >> (level.shift() + 9)
}

/// A remembered table of the cursor's path.
#[derive(Clone, Copy)]
struct Cached {
    tag: u64,
    pfn: Pfn,
}

const EMPTY: Cached = Cached {
    tag: NO_TAG,
    pfn: Pfn(0),
};

/// A writer holding the locks of a virtual-address range (after asterinas'
/// `CursorMut`). Made by [`AddressSpace::cursor_mut`].
///
/// It remembers the tables of the path it last walked, so consecutive
/// pages walk and validate the upper levels once per table. The
/// remembered path stays valid because entries above L1 change only under
/// the space lock, which the cursor holds, and (split) L1 entries of the
/// page it writes only under that page's lock, which it holds too.
///
/// The cursor is at an address ([`Self::va`]); [`Self::map`] maps a page
/// there and moves past it, [`Self::jump`] moves it anywhere in its range.
/// While it lives, other writers of this space wait: [`AddressSpace::map`],
/// pin and unpin on the space lock, and (split) [`AddressSpace::set_pte`]
/// and one-page writers on the PTE page the cursor is writing into. PTE writers on other PTE
/// pages (split) and lock-free readers go on. Dropping it releases the
/// locks.
///
/// It holds at most two locks (the space lock and one PTE lock), so it adds
/// at most two to the preempt count. Like a spinlock guard it stays on the
/// thread that made it (it is neither `Send` nor `Sync`), and that thread
/// must not call the space's locking operations (`map`, `pin`, ...) while
/// it lives: the space lock is not recursive.
///
/// ```compile_fail
/// use pagepin_engine::{AddressSpace, Backend, Global, X86_64};
/// fn send<T: Send>(_: T) {}
/// fn f<B: Backend>(s: &AddressSpace<X86_64, Global, B>) {
///     send(s.cursor_mut(0..4096).unwrap());
/// }
/// ```
#[must_use = "a cursor holds the space lock until dropped; an unused one only blocks writers"]
pub struct CursorMut<'a, M: PagingMode, P: LockPolicy, B: Backend> {
    space: &'a AddressSpace<M, P, B>,
    /// Split: the lock of the PTE page `path[0]` names, held while the
    /// cursor writes into that page. Declared before `held_space` so that it
    /// is released first.
    pte: Option<PteLockGuard<'a>>,
    /// The space lock. `None` only for a one-page cursor that started,
    /// under split, at the remembered PTE page with just its lock (see
    /// [`AddressSpace::cursor_at`]); it takes the space lock before it
    /// walks.
    held_space: Option<SpaceLockGuard<'a, P::Lock>>,
    range: Range<u64>,
    va: u64,
    /// `path[l - 1]`: the table at level `l` (below the root) the cursor
    /// last walked through. All are linked tables of this space while the
    /// space lock is held (without it, only `path[0]` is set, checked
    /// linked under its PTE lock). Under split, `path[0]` is set only while
    /// `pte` holds its lock.
    path: [Cached; MAX_PATH],
    /// Whether pages must end inside `range` (false for the one-page
    /// cursors `map`, `unmap` and `protect` make for themselves).
    bounded: bool,
    /// Lock guards stay on their thread.
    _not_send: PhantomData<*mut ()>,
}

impl<M: PagingMode, P: LockPolicy, B: Backend> AddressSpace<M, P, B> {
    /// A writer for the virtual addresses in `range`, positioned at its
    /// start. Takes the space lock (waiting for it) and keeps it until the
    /// cursor is dropped.
    ///
    /// `range` must be non-empty, 4 KiB aligned at both ends and canonical
    /// throughout: [`Error::OutOfRange`] if it is empty or crosses the
    /// non-canonical hole, [`Error::NonCanonical`], [`Error::Misaligned`].
    pub fn cursor_mut(&self, range: Range<u64>) -> Result<CursorMut<'_, M, P, B>, Error> {
        if range.start >= range.end {
            return Err(Error::OutOfRange { va: range.start });
        }
        let last = range.end - 1;
        for va in [range.start, last] {
            if !M::is_canonical(va) {
                return Err(Error::NonCanonical { va });
            }
        }
        // Both ends canonical: the range crosses the hole iff they are in
        // different halves.
        if (range.start ^ last) >> 63 != 0 {
            return Err(Error::OutOfRange { va: last });
        }
        for addr in [range.start, range.end] {
            if addr & (PageSize::Size4K.bytes() - 1) != 0 {
                return Err(Error::Misaligned { addr });
            }
        }
        let guard = self.lock_space();
        Ok(CursorMut {
            space: self,
            pte: None,
            held_space: Some(guard),
            va: range.start,
            range,
            path: [EMPTY; MAX_PATH],
            bounded: true,
            _not_send: PhantomData,
        })
    }

    /// A cursor for one page at `va` (canonical, checked by the caller):
    /// what [`Self::map`], [`Self::unmap`] and [`Self::protect`] write
    /// through, so every write of a space goes through the cursor.
    ///
    /// It starts at the PTE page the previous one-page cursor used when
    /// `va` is in the same 2 MiB ([`PteHint`]), with (split) that page's
    /// lock, and [`CursorMut::remember_pte_page`] hands its own on.
    ///
    /// [`PteHint`]: crate::locking::PteHint
    #[inline]
    pub(crate) fn cursor_at(&self, va: u64) -> CursorMut<'_, M, P, B> {
        let mut path = [EMPTY; MAX_PATH];
        let region = tag(va, Level::L1);
        if P::SPLIT_PTE_LOCKS {
            // A write into the remembered PTE page needs only its lock, as
            // `set_pte` does (speed: two atomics fewer per call; keep it).
            // The page is still linked if no entry above L1 was written
            // between reading the hint and holding the lock: an unlink
            // holds the page's lock and empties the hint first.
            if let Some((pfn, seq)) = self.pte_hint.peek(region) {
                if let Some(meta) = self.store.meta(pfn) {
                    let pte = PteLockGuard::acquire(meta.lock());
                    if self.pte_hint.unchanged(seq) || self.sabotage().pte_hint_unchecked {
                        path[0] = Cached { tag: region, pfn };
                        return CursorMut {
                            space: self,
                            pte: Some(pte),
                            held_space: None,
                            va,
                            range: va..va,
                            path,
                            bounded: false,
                            _not_send: PhantomData,
                        };
                    }
                }
            }
        }
        let guard = self.lock_space();
        let mut pte = None;
        if let Some(pfn) = self.pte_hint.get(&guard, region) {
            // Split: the page is remembered only with its lock held.
            pte = self.lock_pte(pfn, Level::L1);
            if !P::SPLIT_PTE_LOCKS || pte.is_some() {
                path[0] = Cached { tag: region, pfn };
            }
        }
        CursorMut {
            space: self,
            pte,
            held_space: Some(guard),
            va,
            range: va..va,
            path,
            bounded: false,
            _not_send: PhantomData,
        }
    }

    /// A reader: one lock-free read section for many translations (see
    /// [`Reader`]).
    pub fn reader(&self) -> Reader<'_, M, P, B> {
        Reader {
            space: self,
            _guard: read_guard(),
            tag: NO_TAG,
            l1: None,
            path: [const { None }; MAX_PATH],
        }
    }
}

impl<'a, M: PagingMode, P: LockPolicy, B: Backend> CursorMut<'a, M, P, B> {
    /// Hand the PTE page this cursor walked to to the next one-page
    /// cursor (see [`AddressSpace::cursor_at`]), if every table above it
    /// belongs to this space. Another space can reach a table only through
    /// a table the two share (unowned), and could then unlink this page
    /// under its own lock, which does not clear this space's hint; a path
    /// of this space's own tables is written only under this space's lock.
    /// (A page that came from the hint has no walked path: nothing to do.)
    #[inline]
    pub(crate) fn remember_pte_page(&self) {
        let c = self.path[0];
        // Without the space lock the page came from the hint: nothing new.
        let Some(held) = &self.held_space else {
            return;
        };
        if c.tag == NO_TAG {
            return;
        }
        let space = self.space;
        let va = c.tag << (Level::L1.shift() + 9);
        let mut level = Level::L2;
        while level < M::ROOT_LEVEL {
            let t = self.path[level as usize - 1];
            let ours = t.tag == tag(va, level)
                && space
                    .store
                    .meta(t.pfn)
                    .is_some_and(|m| m.owner() == space.owner);
            if !ours {
                return;
            }
            level = match level.parent() {
                Some(l) => l,
                None => return,
            };
        }
        space.pte_hint.set(held, c.tag, c.pfn);
    }

    /// The address the next [`Self::map`] maps at.
    #[inline]
    pub fn va(&self) -> u64 {
        self.va
    }

    /// The range the cursor was made for.
    #[inline]
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// The space the cursor writes.
    #[inline]
    pub fn space(&self) -> &'a AddressSpace<M, P, B> {
        self.space
    }

    /// Move to `va` (4 KiB aligned, inside the range or at its end).
    /// Within the same PTE page this costs nothing; to another one, the
    /// cursor lets go of the current PTE page's lock (it keeps the upper
    /// tables it remembers).
    pub fn jump(&mut self, va: u64) -> Result<(), Error> {
        if va < self.range.start || va > self.range.end {
            return Err(Error::OutOfRange { va });
        }
        if va & (PageSize::Size4K.bytes() - 1) != 0 {
            return Err(Error::Misaligned { addr: va });
        }
        if self.path[0].tag != tag(va, Level::L1) {
            self.path[0] = EMPTY;
            self.pte = None;
        }
        self.va = va;
        Ok(())
    }

    /// Map `size` bytes at the cursor to guest-physical `pa` with `flags`
    /// and move the cursor past them. The same checks, tables, entries and
    /// errors as [`AddressSpace::map`] at [`Self::va`], plus
    /// [`Error::OutOfRange`] if the page does not end inside the range. On
    /// an error the cursor stays where it was.
    #[inline]
    pub fn map(&mut self, pa: u64, size: PageSize, flags: EntryFlags) -> Result<(), Error> {
        let va = self.va;
        let flags = AddressSpace::<M, P, B>::map_args(va, pa, size, flags)?;
        let end = self.end_in_range(va, size)?;
        let mfn = self.space.leaf_mfn(pa)?;
        self.map_leaf(va, mfn, size, flags)?;
        self.va = end;
        Ok(())
    }

    /// Remove the mapping at the cursor (a page base) and move past it;
    /// returns what it mapped. The same checks and errors as
    /// [`AddressSpace::unmap`] at [`Self::va`], plus [`Error::OutOfRange`]
    /// if the page does not end inside the range.
    pub fn unmap(&mut self) -> Result<Translation, Error> {
        let va = self.va;
        let t = self.unmap_at(va)?;
        self.va = va.wrapping_add(t.size.bytes());
        Ok(t)
    }

    /// Change the flags of the mapping at the cursor (a page base), keeping
    /// its frame, and move past it. The same checks and errors as
    /// [`AddressSpace::protect`] at [`Self::va`], plus
    /// [`Error::OutOfRange`] if the page does not end inside the range.
    pub fn protect(&mut self, flags: EntryFlags) -> Result<(), Error> {
        let va = self.va;
        let size = self.protect_at(va, flags)?;
        self.va = va.wrapping_add(size.bytes());
        Ok(())
    }

    /// The end of the page of `size` at `va`, which must lie inside the
    /// range (a bounded cursor).
    #[inline]
    fn end_in_range(&self, va: u64, size: PageSize) -> Result<u64, Error> {
        let end = va.wrapping_add(size.bytes());
        if self.bounded && (end > self.range.end || end < va) {
            return Err(Error::OutOfRange { va });
        }
        Ok(end)
    }

    /// Write the (checked) leaf for `mfn` at `va`, creating tables as
    /// needed: the one place a space maps a page.
    #[inline]
    pub(crate) fn map_leaf(
        &mut self,
        va: u64,
        mfn: crate::frame::Mfn,
        size: PageSize,
        flags: EntryFlags,
    ) -> Result<(), Error> {
        let space = self.space;
        let level = size.level();
        let table = self.table_for(va, level)?;
        let index = M::index(va, level);
        let leaf = PageTableEntry::new(mfn.0, flags);
        let cur = PageTableEntry::from_bits(space.entry_slot(table, index).load(Ordering::Acquire));
        if cur.is_present() {
            return Err(Error::AlreadyMapped { va });
        }
        if level == Level::L1 {
            // The common case, with the level known here so the write path
            // folds to the L1 store it is.
            space.write_entry(table, Level::L1, index, leaf.bits(), WritePath::Store)
        } else {
            space.write_entry(table, level, index, leaf.bits(), WritePath::Store)
        }
    }

    /// The present leaf covering `va` (never creating a table): its table,
    /// level and index, with the PTE lock held for an L1 (split). The
    /// remembered PTE page is tried first.
    fn leaf_for(&mut self, va: u64) -> Result<(Pfn, Level, usize, PageTableEntry), Error> {
        let space = self.space;
        let c = self.path[0];
        let (pfn, level, index) = if c.tag == tag(va, Level::L1) {
            (c.pfn, Level::L1, M::index(va, Level::L1))
        } else {
            self.hold_space_lock();
            let stop = space.descend(va, Level::L1)?;
            let Next::Leaf(_) = stop.next else {
                return Err(Error::NotMapped { va });
            };
            if stop.level == Level::L1 {
                // Another PTE page: one PTE lock at a time.
                self.path[0] = EMPTY;
                self.pte = None;
                self.pte = space.lock_pte(stop.pfn, Level::L1);
                self.path[0] = Cached {
                    tag: tag(va, Level::L1),
                    pfn: stop.pfn,
                };
            }
            (stop.pfn, stop.level, stop.index)
        };
        // Read under the PTE lock: a split PTE writer may have changed it.
        let cur = PageTableEntry::from_bits(space.entry_slot(pfn, index).load(Ordering::Acquire));
        if !cur.is_present() {
            return Err(Error::NotMapped { va });
        }
        Ok((pfn, level, index, cur))
    }

    /// The leaf at `va` (a page base) and its size, range-checked.
    fn leaf_page(
        &mut self,
        va: u64,
    ) -> Result<(Pfn, Level, usize, PageTableEntry, PageSize), Error> {
        let (pfn, level, index, cur) = self.leaf_for(va)?;
        let size = PageSize::of_leaf(level);
        if va & (size.bytes() - 1) != 0 {
            return Err(Error::Misaligned { addr: va });
        }
        self.end_in_range(va, size)?;
        Ok((pfn, level, index, cur, size))
    }

    /// Remove the leaf at `va` (a page base); returns what it mapped.
    pub(crate) fn unmap_at(&mut self, va: u64) -> Result<Translation, Error> {
        let (pfn, level, index, cur, size) = self.leaf_page(va)?;
        let space = self.space;
        space.write_entry(pfn, level, index, 0, WritePath::Store)?;
        let (phys, flags) = space.leaf_parts(cur, size);
        Ok(Translation { phys, size, flags })
    }

    /// Give the leaf at `va` (a page base) `flags`, keeping its frame;
    /// returns its size.
    pub(crate) fn protect_at(&mut self, va: u64, flags: EntryFlags) -> Result<PageSize, Error> {
        let (pfn, level, index, cur, size) = self.leaf_page(va)?;
        let space = self.space;
        let new = AddressSpace::<M, P, B>::reflag_leaf(cur, size, flags)?;
        space.write_entry(pfn, level, index, new.bits(), WritePath::Store)?;
        Ok(size)
    }

    /// The table at `level` covering `va`, walked (and created) from the
    /// lowest remembered table above it; under split, with the PTE lock
    /// held when `level` is L1.
    #[inline]
    fn table_for(&mut self, va: u64, level: Level) -> Result<Pfn, Error> {
        if level < M::ROOT_LEVEL {
            let c = self.path[level as usize - 1];
            if c.tag == tag(va, level) {
                return Ok(c.pfn);
            }
        } else {
            return Ok(self.space.root);
        }
        self.walk_to(va, level)
    }

    /// Take the space lock if this one-page cursor started without it,
    /// before it walks: its PTE page's lock is released first (lock order:
    /// the space lock, then PTE locks), and the page is forgotten.
    #[inline]
    fn hold_space_lock(&mut self) {
        if self.held_space.is_none() {
            self.path[0] = EMPTY;
            self.pte = None;
            self.held_space = Some(self.space.lock_space());
        }
    }

    #[cold]
    #[inline(never)]
    fn walk_to(&mut self, va: u64, target: Level) -> Result<Pfn, Error> {
        self.hold_space_lock();
        if target == Level::L1 {
            // Moving to another PTE page: release this one's lock first (one
            // PTE lock at a time; a new L1 of a pinned space is locked by its
            // own pin while it is prepared).
            self.path[0] = EMPTY;
            self.pte = None;
        }
        let space = self.space;
        // Start from the lowest remembered table above the target.
        let mut pfn = space.root;
        let mut level = M::ROOT_LEVEL;
        let mut l = target as usize + 1;
        while l < M::ROOT_LEVEL as usize {
            let c = self.path[l - 1];
            if let Some(lv) = Level::from_u8(l as u8) {
                if c.tag == tag(va, lv) {
                    pfn = c.pfn;
                    level = lv;
                    break;
                }
            }
            l += 1;
        }
        // The walk of `AddressSpace::map`, remembering each table.
        while level > target {
            (pfn, level) = space.map_step(pfn, level, va)?;
            if level == Level::L1 {
                self.pte = space.lock_pte(pfn, level);
            }
            self.path[level as usize - 1] = Cached {
                tag: tag(va, level),
                pfn,
            };
        }
        Ok(pfn)
    }
}

/// One remembered entry of a [`Reader`]'s path: the entry, the value it had
/// when the walk validated it, and the table it points to.
struct PathStep<'a> {
    slot: &'a AtomicU64,
    value: u64,
    child: FrameMeta<'a>,
    child_level: Level,
}

/// Lock-free translations in one read section. Made by
/// [`AddressSpace::reader`].
///
/// It remembers the last L1 it reached with the path to it; the next
/// address in the same 2 MiB re-reads each entry of that path and the level
/// of each table on it, and uses the remembered L1 only if all are
/// unchanged (anything else is a full, validated walk).
///
/// Results are those of [`AddressSpace::translate`]. Keep a reader
/// short-lived, as an RCU read section: with `std`, table frames released
/// while it lives are not reused until it is dropped; without, the
/// embedder's grace period ([`FrameStore::quiesce`](crate::FrameStore::quiesce))
/// must not end while one lives.
#[must_use = "a reader holds a read section (frames are not reused) until dropped"]
pub struct Reader<'a, M: PagingMode, P: LockPolicy, B: Backend> {
    space: &'a AddressSpace<M, P, B>,
    _guard: ReadGuard,
    /// `va >> 21` of the remembered L1, or [`NO_TAG`].
    tag: u64,
    l1: Option<&'a Frame>,
    /// The entries from the root down to the one naming the L1.
    path: [Option<PathStep<'a>>; MAX_PATH],
}

impl<'a, M: PagingMode, P: LockPolicy, B: Backend> Reader<'a, M, P, B> {
    /// Translate `va`: the same result as [`AddressSpace::translate`].
    #[inline]
    pub fn translate(&mut self, va: u64) -> Option<Translation> {
        if !M::is_canonical(va) {
            return None;
        }
        if va >> 21 == self.tag && self.path_unchanged() {
            if let Some(l1) = self.l1 {
                let e = PageTableEntry::from_bits(
                    l1.entry(M::index(va, Level::L1)).load(Ordering::Acquire),
                );
                if !e.is_present() {
                    return None;
                }
                return self.space.leaf_translation(e, Level::L1, va);
            }
        }
        self.walk(va)
    }

    /// Whether every remembered entry still has its value and every table
    /// on the path still serves at its level.
    #[inline]
    fn path_unchanged(&self) -> bool {
        self.path.iter().flatten().all(|s| {
            s.slot.load(Ordering::Acquire) == s.value && s.child.level() == Some(s.child_level)
        })
    }

    /// The full walk of [`AddressSpace::translate_in`], remembering the
    /// path when it reaches an L1.
    #[cold]
    #[inline(never)]
    fn walk(&mut self, va: u64) -> Option<Translation> {
        self.tag = NO_TAG;
        self.l1 = None;
        self.path = [const { None }; MAX_PATH];
        let space = self.space;
        let store: &'a _ = &*space.store;
        let mut pfn = space.root;
        let mut level = M::ROOT_LEVEL;
        let mut depth = 0;
        loop {
            let index = M::index(va, level);
            let slot = store.entry(pfn, index)?;
            let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
            match walk::next::<M, P::Lock, B>(store, &space.backend, level, index, e).ok()? {
                Next::Empty => return None,
                Next::Table(c) => {
                    level = level.child()?;
                    pfn = c;
                    if let Some(step) = self.path.get_mut(depth) {
                        *step = Some(PathStep {
                            slot,
                            value: e.bits(),
                            child: store.meta(c)?,
                            child_level: level,
                        });
                    }
                    depth += 1;
                    if level == Level::L1 {
                        self.l1 = store.frame(c);
                        self.tag = va >> 21;
                    }
                }
                Next::Leaf(e) => return space.leaf_translation(e, level, va),
            }
        }
    }
}
