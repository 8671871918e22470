//! An address space: its tables, its lock, and the operations writers use.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::marker::PhantomData;

use crate::backend::{Backend, MmuUpdate};
use crate::batch::{Batch, NO_TAG};
use crate::entry::{EntryFlags, PageTableEntry};
use crate::error::{Error, HypercallFailure, StepKind};
use crate::frame::{read_guard, FrameStore, Mfn, Owner, Pfn, ReadGuard};
use crate::lock::{LockPolicy, RawLock};
use crate::locking::{PteHint, PteLockGuard, SpaceLockGuard, Target};
use crate::mode::{Level, PageSize, PagingMode};
use crate::sync::{AtomicBool, Ordering};
use crate::walk::{self, Descend, Next, Scope};

/// How a PTE write reaches a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WritePath {
    /// A plain store into the entry. On Xen, a store into a pinned
    /// (read-only) L1 traps and is emulated; into an unpinned one it is a
    /// normal write. This is Linux's `set_pte` path.
    #[default]
    Store,
    /// An `mmu_update` hypercall: always checked by the hypervisor, works
    /// whether or not the table is pinned (Linux's lazy-MMU/`set_pte_at`
    /// hypercall path).
    Hypercall,
}

/// What a virtual address translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address (page base plus offset).
    pub phys: u64,
    /// The page size of the leaf.
    pub size: PageSize,
    /// The leaf entry's flags.
    pub flags: EntryFlags,
}

/// Options for a new space.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpaceOptions {
    /// Give the space a separate user root (64-bit PV keeps one; ignored on
    /// modes without one).
    pub user_root: bool,
}

/// Test-only breakages of the protocol, used by negative controls to show
/// that the tests guarding each rule can fail. Public only with the
/// `sabotage` feature (tests enable it); without it every field reads
/// `false` from a constant and the broken branches are compiled out.
#[cfg_attr(not(feature = "sabotage"), doc(hidden))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sabotage {
    /// Release a PTE page's lock between its read-only remap and its L1 pin.
    pub unlock_before_pin: bool,
    /// Skip the separate L1 pin (and its lock) under the split policy.
    pub skip_l1_pin: bool,
    /// Visit the root first instead of last.
    pub root_first: bool,
    /// Call the pin routine on the PAE kernel PMD during unpin (the pre-2008 bug).
    pub pae_kpmd_pin_on_unpin: bool,
    /// Let pin and unpin walk into tables that belong to another space.
    pub admit_foreign_tables: bool,
    /// Publish the space's pinned state after releasing the space lock
    /// instead of before (a writer then links or releases a table by the
    /// state before the walk).
    pub publish_pin_state_unlocked: bool,
    /// Let `translate` trust a walk without a read section even when a
    /// frame was retired meanwhile (it may have read a reused frame).
    pub translate_unchecked: bool,
    /// Go on walking and queueing after a flush recorded a failure (the
    /// rest of the pin or unpin reaches the hypervisor and is undone).
    pub walk_on_after_failure: bool,
    /// Let a one-page writer (split) use the remembered PTE page without
    /// checking, under its lock, that no entry above L1 was written since
    /// it read the hint (the page may have been unlinked meanwhile).
    pub pte_hint_unchecked: bool,
    /// Release a split PTE page's lock after the flush that issues its
    /// first request even when its second did not take effect (the page is
    /// left read-only but unpinned, and unlocked, until the rollback takes
    /// the lock again).
    pub release_on_failed_second: bool,
}

impl Sabotage {
    /// Nothing broken.
    pub const NONE: Sabotage = Sabotage {
        unlock_before_pin: false,
        skip_l1_pin: false,
        root_first: false,
        pae_kpmd_pin_on_unpin: false,
        admit_foreign_tables: false,
        publish_pin_state_unlocked: false,
        translate_unchecked: false,
        walk_on_after_failure: false,
        pte_hint_unchecked: false,
        release_on_failed_second: false,
    };
}

/// Walks `try_translate` tries without a read section before it enters
/// one (each retry means a frame was retired during the walk before).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
const OPTIMISTIC_WALKS: usize = 3;

/// An address space: a root table (and, on x86-64 PV, maybe a user root; on
/// PAE, the kernel PMD), pinned or not.
pub struct AddressSpace<M: PagingMode, P: LockPolicy, B: Backend> {
    pub(crate) store: Arc<FrameStore<P::Lock>>,
    pub(crate) backend: Arc<B>,
    pub(crate) root: Pfn,
    pub(crate) user_root: Option<Pfn>,
    pub(crate) kernel_pmd: Option<Pfn>,
    /// The owner its tables are allocated with.
    pub(crate) owner: Owner,
    pub(crate) lock: P::Lock,
    /// The PTE page of the last one-page writer (under the space lock).
    pub(crate) pte_hint: PteHint,
    pub(crate) pinned: AtomicBool,
    pub(crate) torn_down: bool,
    #[cfg(feature = "sabotage")]
    pub(crate) sabotage: Sabotage,
    _mode: PhantomData<M>,
}

impl<M: PagingMode, P: LockPolicy, B: Backend> AddressSpace<M, P, B> {
    /// A new, empty, unpinned space with tables from `store`.
    pub fn new(
        store: Arc<FrameStore<P::Lock>>,
        backend: Arc<B>,
        options: SpaceOptions,
    ) -> Result<Self, Error> {
        const {
            assert!(
                M::ROOT_LEVEL as u8 <= B::MAX_ROOT_LEVEL as u8,
                "this backend cannot run this paging mode (Xen PV has no 5-level tables)"
            )
        };
        let owner = store.new_owner();
        let root = store
            .alloc_table_owned(M::ROOT_LEVEL, owner)
            .ok_or(Error::OutOfFrames)?;
        let mut space = AddressSpace {
            owner,
            store,
            backend,
            root,
            user_root: None,
            kernel_pmd: None,
            lock: P::Lock::new(),
            pte_hint: PteHint::new(),
            pinned: AtomicBool::new(false),
            torn_down: false,
            #[cfg(feature = "sabotage")]
            sabotage: Sabotage::NONE,
            _mode: PhantomData,
        };
        if M::HAS_USER_ROOT && options.user_root {
            match space.store.alloc_table_owned(M::ROOT_LEVEL, owner) {
                Some(u) => space.user_root = Some(u),
                None => {
                    // SAFETY: the new root is linked nowhere and unpublished.
                    unsafe { space.store.free_now(root) };
                    space.torn_down = true;
                    return Err(Error::OutOfFrames);
                }
            }
        }
        if let Some(slot) = M::KERNEL_PMD_SLOT {
            let Some(kpmd) = space.store.alloc_table_owned(Level::L2, owner) else {
                space.release_frames();
                space.torn_down = true;
                return Err(Error::OutOfFrames);
            };
            space.kernel_pmd = Some(kpmd);
            let mfn = space.backend.pfn_to_mfn(kpmd);
            let e = PageTableEntry::new(mfn.0, walk::table_entry_flags::<M>(M::ROOT_LEVEL));
            space
                .entry_slot(root, slot)
                .store(e.bits(), Ordering::Release);
        }
        Ok(space)
    }

    /// The root table.
    pub fn root(&self) -> Pfn {
        self.root
    }
    /// The separate user root, if any.
    pub fn user_root(&self) -> Option<Pfn> {
        self.user_root
    }
    /// The PAE kernel PMD, if any.
    pub fn kernel_pmd(&self) -> Option<Pfn> {
        self.kernel_pmd
    }
    /// The owner of the tables this space allocates (a pin walk refuses
    /// tables of other owners).
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// The frame store.
    pub fn store(&self) -> &Arc<FrameStore<P::Lock>> {
        &self.store
    }
    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
    /// Whether the space is pinned.
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(Ordering::Acquire)
    }
    /// The space lock (Linux's `page_table_lock`), for embedders that
    /// coordinate with it. Lock order: space lock, then PTE locks.
    pub fn space_lock(&self) -> &P::Lock {
        &self.lock
    }
    /// Break the protocol on purpose (negative-control tests only; needs
    /// the `sabotage` feature).
    #[cfg(feature = "sabotage")]
    pub fn set_sabotage(&mut self, s: Sabotage) {
        self.sabotage = s;
    }

    /// The breakages in force: a constant [`Sabotage::NONE`] without the
    /// `sabotage` feature, so production builds carry no test branch.
    #[inline(always)]
    pub(crate) fn sabotage(&self) -> Sabotage {
        #[cfg(feature = "sabotage")]
        {
            self.sabotage
        }
        #[cfg(not(feature = "sabotage"))]
        {
            Sabotage::NONE
        }
    }

    /// The kernel virtual address of a table frame in the direct map: the
    /// backend's [`Backend::direct_map_base`] if it has one, else the
    /// mode's `DIRECT_MAP_BASE`, plus `pfn * 4096`.
    #[inline]
    pub fn direct_map_va(&self, pfn: Pfn) -> u64 {
        self.backend
            .direct_map_base()
            .unwrap_or(M::DIRECT_MAP_BASE)
            .wrapping_add(pfn.0 << 12)
    }

    /// The direct-map entry for a table frame, read-only or writable.
    #[inline]
    pub(crate) fn direct_map_pte(&self, pfn: Pfn, writable: bool) -> u64 {
        let mfn = self.backend.pfn_to_mfn(pfn);
        let mut flags =
            EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY | EntryFlags::NO_EXECUTE;
        if writable {
            flags |= EntryFlags::WRITABLE;
        }
        PageTableEntry::new(mfn.0, flags).bits()
    }

    #[inline]
    pub(crate) fn target(&self) -> Target<'_, P::Lock, B> {
        Target {
            store: &self.store,
            backend: &self.backend,
            #[cfg(feature = "sabotage")]
            walk_on_after_failure: self.sabotage().walk_on_after_failure,
        }
    }

    #[inline]
    pub(crate) fn entry_slot(&self, pfn: Pfn, index: usize) -> &crate::sync::AtomicU64 {
        // Table frames of this space are always in the store: they were
        // allocated from it and validated on every walk.
        self.store
            .entry(pfn, index)
            .expect("table frame outside the store")
    }

    pub(crate) fn lock_space(&self) -> SpaceLockGuard<'_, P::Lock> {
        SpaceLockGuard::acquire(&self.lock)
    }

    fn check_va(va: u64, size: PageSize) -> Result<(), Error> {
        if !M::is_canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        if va & (size.bytes() - 1) != 0 {
            return Err(Error::Misaligned { addr: va });
        }
        Ok(())
    }

    /// Refuse the hypervisor's hole: root slots the walks skip and Xen
    /// keeps for itself, so a space never maps there on any backend.
    #[inline]
    pub(crate) fn check_not_hole(va: u64) -> Result<(), Error> {
        if M::HYPERVISOR_HOLE.contains(&M::index(va, M::ROOT_LEVEL)) {
            return Err(Error::HypervisorHole { va });
        }
        Ok(())
    }

    /// The machine frame a leaf for guest-physical `pa` holds; refused
    /// when the backend has no such guest frame (checked before anything
    /// is linked, so a refused map changes nothing).
    #[inline]
    pub(crate) fn leaf_mfn(&self, pa: u64) -> Result<Mfn, Error> {
        self.backend
            .try_pfn_to_mfn(Pfn(pa >> 12))
            .ok_or(Error::PhysicalOutOfRange { pa })
    }

    /// Write one entry of one of this space's tables, by the path its state
    /// requires: a pinned (read-only) table of level 2+ only through
    /// `mmu_update`; an L1 by `path`. Mirrors user-half root writes into the
    /// user root.
    #[inline]
    pub(crate) fn write_entry(
        &self,
        pfn: Pfn,
        level: Level,
        index: usize,
        value: u64,
        path: WritePath,
    ) -> Result<(), Error> {
        // The same condition as "pinned table and (not an L1 or by
        // hypercall), or by hypercall on a pinning platform", ordered so an
        // L1 store (the common write) does not read the pinned flag.
        let hyper = B::PINNING
            && (path == WritePath::Hypercall
                || (level != Level::L1 && self.store.meta(pfn).is_some_and(|m| m.is_pinned())));
        if level != Level::L1 {
            // Only these writes can unlink a table (always under the space
            // lock): the remembered PTE page may be it.
            debug_assert!(self.lock.is_locked(), "entry above L1 written unlocked");
            self.pte_hint.clear();
        }
        let mfn = self.backend.pfn_to_mfn(pfn);
        if hyper {
            let mut b: Batch<1> = Batch::new();
            let t = self.target();
            b.mmu_update(
                &t,
                MmuUpdate {
                    ptr: (mfn.0 << 12) + (index as u64) * 8,
                    val: value,
                },
                NO_TAG,
            );
            b.flush(&t);
            if let Some(f) = b.failures().first() {
                return Err(Error::Hypercall(HypercallFailure {
                    flush: f.flush,
                    call: f.call,
                    item: f.item,
                    kind: f.kind,
                    errno: f.errno,
                    pfn: Some(pfn),
                    step: Some(StepKind::EntryUpdate),
                }));
            }
        } else {
            self.backend
                .store_entry(self.entry_slot(pfn, index), mfn, index, value)
                .map_err(Error::Fault)?;
        }
        if level == M::ROOT_LEVEL && pfn == self.root && index < M::USER_ROOT_SLOTS {
            if let Some(u) = self.user_root {
                self.write_entry(u, level, index, value, path)?;
            }
        }
        Ok(())
    }

    /// Lock-free descent to the table at `level` covering `va`.
    fn find_table(&self, va: u64, level: Level) -> Result<Pfn, Error> {
        let stop = self.descend(va, level)?;
        if stop.level == level {
            return Ok(stop.pfn);
        }
        match stop.next {
            Next::Leaf(_) => Err(Error::AlreadyMapped { va }),
            _ => Err(Error::NoTable { va, level }),
        }
    }

    /// The engine's one lookup walk ([`walk::descend`]) over this space.
    #[inline]
    pub(crate) fn descend(&self, va: u64, target: Level) -> Result<walk::Stop, Error> {
        // SAFETY: the root was allocated from this store (`new`), and a
        // store never shrinks.
        unsafe {
            walk::descend_from::<M, P::Lock, B>(&self.store, &self.backend, self.root, va, target)
        }
    }

    /// Translate `va` without taking any lock: `None` if nothing is
    /// mapped there, the address is not canonical, or the walk meets a
    /// malformed entry ([`Self::try_translate`] tells those apart).
    #[inline]
    pub fn translate(&self, va: u64) -> Option<Translation> {
        // Speed (keep it): the answer is decoded to an `Option` inside the
        // optimistic walk, so it stays in registers; decoded after a
        // `Result` return it went through the stack (+2 ns a call).
        match self.walk_optimistically(va, |r| r.ok().flatten()) {
            Some(answer) => answer,
            None => self.translate_retried(va).ok().flatten(),
        }
    }

    /// Translate `va` inside a read section the caller holds: the same as
    /// [`Self::translate`], without entering a read section per call (a
    /// caller translating many addresses enters one, as an RCU reader
    /// would, and table frames released meanwhile are not reused until it
    /// is dropped).
    #[inline]
    pub fn translate_in(&self, guard: &ReadGuard, va: u64) -> Option<Translation> {
        self.try_translate_in(guard, va).ok().flatten()
    }

    /// Translate `va`, telling "not mapped" (`Ok(None)`: an empty entry, a
    /// non-canonical address, a leaf the CPU would fault on) from a
    /// malformed table on the way (`Err`: a typed error naming the entry).
    ///
    /// With `std`, optimistically, without entering a read section (an
    /// epoch pin, a locked instruction: speed, keep it): the store counts
    /// the frames it retires, and a walk during which the count did not
    /// move read no reused frame (a frame is retired after it is unlinked
    /// and before it is zeroed for reuse), so its answer stands. Otherwise,
    /// after a few tries, the walk is done in a read section.
    #[inline]
    pub fn try_translate(&self, va: u64) -> Result<Option<Translation>, Error> {
        match self.walk_optimistically(va, |r| r) {
            Some(answer) => answer,
            None => self.translate_retried(va),
        }
    }

    /// One translation walk without a read section, its answer decoded by
    /// `decode`: `Some` if it stands (no frame was retired during it),
    /// `None` if the walk must be retried (always `None` without `std`,
    /// where there is no retirement count to trust).
    #[inline(always)]
    fn walk_optimistically<T>(
        &self,
        va: u64,
        decode: impl FnOnce(Result<Option<Translation>, Error>) -> T,
    ) -> Option<T> {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        {
            let before = self.store.retirements();
            let answer = decode(self.translate_walk(va));
            // The walk's loads before the second look at the count.
            crate::sync::fence(Ordering::Acquire);
            if self.store.retirements() == before || self.sabotage().translate_unchecked {
                return Some(answer);
            }
        }
        #[cfg(not(all(feature = "std", not(any(loom, shuttle)))))]
        let _ = (va, decode);
        None
    }

    /// The rare path of [`Self::try_translate`]: a frame was retired during
    /// the first walk. A few more optimistic walks, then one in a read
    /// section.
    #[cold]
    #[inline(never)]
    fn translate_retried(&self, va: u64) -> Result<Option<Translation>, Error> {
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        for _ in 1..OPTIMISTIC_WALKS {
            if let Some(answer) = self.walk_optimistically(va, |r| r) {
                return answer;
            }
        }
        let guard = read_guard();
        self.try_translate_in(&guard, va)
    }

    /// [`Self::try_translate`] inside a read section the caller holds.
    #[inline]
    pub fn try_translate_in(
        &self,
        guard: &ReadGuard,
        va: u64,
    ) -> Result<Option<Translation>, Error> {
        let _ = guard;
        self.translate_walk(va)
    }

    /// The walk of a translation; the caller makes its answer trustworthy
    /// (a read section, or an unchanged retirement count).
    #[inline(always)]
    fn translate_walk(&self, va: u64) -> Result<Option<Translation>, Error> {
        if !M::is_canonical(va) {
            return Ok(None);
        }
        let stop = self.descend(va, Level::L1)?;
        Ok(match stop.next {
            Next::Leaf(e) => self.leaf_translation(e, stop.level, va),
            _ => None,
        })
    }

    /// The translation of `va` by the present leaf `e` found at `level`
    /// (`None` when the CPU would fault on its reserved bits).
    #[inline]
    pub(crate) fn leaf_translation(
        &self,
        e: PageTableEntry,
        level: Level,
        va: u64,
    ) -> Option<Translation> {
        let size = PageSize::of_leaf(level);
        let pat_mask = Self::pat_mask(size);
        // Reserved bits in the leaf (address bits above MAXPHYADDR; in a
        // large leaf, the address bits below its size other than PAT): the
        // CPU faults, so there is no translation.
        let low = e.addr() & !pat_mask & (size.bytes() - 1);
        if e.bits() & PageTableEntry::RESERVED_ADDR_BITS != 0 || low != 0 {
            return None;
        }
        let (base, flags) = self.leaf_parts(e, size);
        let phys = base + (va & (size.bytes() - 1));
        Some(Translation { phys, size, flags })
    }

    /// Bit 12 of a large leaf is PAT, not an address bit.
    #[inline]
    pub(crate) fn pat_mask(size: PageSize) -> u64 {
        if size == PageSize::Size4K {
            0
        } else {
            EntryFlags::PAT_LARGE.bits()
        }
    }

    /// The guest-physical base and the flags of a present leaf of `size`:
    /// in a large leaf bit 12 is taken out of the address and reported as
    /// [`EntryFlags::PAT_LARGE`]. The one decoding `translate` and `unmap`
    /// share, so they cannot disagree.
    #[inline]
    pub(crate) fn leaf_parts(&self, e: PageTableEntry, size: PageSize) -> (u64, EntryFlags) {
        let pat_mask = Self::pat_mask(size);
        let mut flags = e.flags();
        if e.bits() & pat_mask != 0 {
            flags |= EntryFlags::PAT_LARGE;
        }
        let mfn = (e.addr() & !pat_mask) >> 12;
        let pfn = self.backend.mfn_to_pfn(Mfn(mfn)).map_or(mfn, |p| p.0);
        (pfn << 12, flags)
    }

    fn leaf_flags_ok(flags: EntryFlags, size: PageSize) -> Result<(), Error> {
        let mut bad = flags.bits() & PageTableEntry::ADDR_MASK;
        if size != PageSize::Size4K {
            bad &= !EntryFlags::PAT_LARGE.bits();
        }
        if bad != 0 || !flags.contains(EntryFlags::PRESENT) {
            return Err(Error::BadFlags { bits: flags.bits() });
        }
        Ok(())
    }

    /// Allocate and link a table at `level` under `parent[index]`, made
    /// read-only (and pinned, split) first when the space is pinned.
    pub(crate) fn link_new_table(
        &self,
        parent: Pfn,
        parent_level: Level,
        index: usize,
        level: Level,
    ) -> Result<Pfn, Error> {
        let child = self
            .store
            .alloc_table_owned(level, self.owner)
            .ok_or(Error::OutOfFrames)?;
        if B::PINNING && self.is_pinned() {
            if let Err(e) = self.prepare_new_table(child, level) {
                // SAFETY: not linked yet: no walker can reach it.
                unsafe { self.store.free_now(child) };
                return Err(e);
            }
        }
        let mfn = self.backend.pfn_to_mfn(child);
        let e = PageTableEntry::new(mfn.0, walk::table_entry_flags::<M>(parent_level));
        if let Err(err) = self.write_entry(parent, parent_level, index, e.bits(), WritePath::Store)
        {
            if B::PINNING && self.is_pinned() {
                let _ = self.retire_table_pinned(child, level);
            } else {
                // SAFETY: the link failed: no walker can reach it.
                unsafe { self.store.free_now(child) };
            }
            return Err(err);
        }
        Ok(child)
    }

    /// The checks of [`Self::map`]'s arguments (no lock, no table read), in
    /// its order; returns the leaf's flags (HUGE added for a large page).
    /// Shared with the map cursor so both validate alike.
    #[inline]
    pub(crate) fn map_args(
        va: u64,
        pa: u64,
        size: PageSize,
        flags: EntryFlags,
    ) -> Result<EntryFlags, Error> {
        Self::check_va(va, size)?;
        if pa & (size.bytes() - 1) != 0 {
            return Err(Error::Misaligned { addr: pa });
        }
        if (size == PageSize::Size1G && !M::HAS_1G_PAGES)
            || (size != PageSize::Size4K && !B::LARGE_LEAVES)
        {
            return Err(Error::UnsupportedPageSize);
        }
        if M::KERNEL_PMD_SLOT == Some(M::index(va, M::ROOT_LEVEL)) {
            // The PAE kernel PMD belongs to pin/unpin, not to user mappings.
            return Err(Error::NonCanonical { va });
        }
        Self::check_not_hole(va)?;
        // An entry holds MAX_PHYS_BITS of address: anything above would be
        // cut off (or set reserved bits) instead of mapped.
        if pa >> PageTableEntry::MAX_PHYS_BITS != 0 {
            return Err(Error::PhysicalOutOfRange { pa });
        }
        Self::leaf_flags_ok(flags, size)?;
        let mut flags = flags;
        if size != PageSize::Size4K {
            flags |= EntryFlags::HUGE;
        }
        Ok(flags)
    }

    /// One level of a map walk (space lock held): the table under
    /// `pfn[index of va]`, linked first if the entry is empty; a leaf there
    /// is `AlreadyMapped`. Returns the child and its level.
    #[inline]
    pub(crate) fn map_step(&self, pfn: Pfn, level: Level, va: u64) -> Result<(Pfn, Level), Error> {
        let index = M::index(va, level);
        let e = PageTableEntry::from_bits(self.entry_slot(pfn, index).load(Ordering::Acquire));
        let child_level = level.child().ok_or(Error::UnsupportedPageSize)?;
        let child = match walk::next::<M, P::Lock, B>(&self.store, &self.backend, level, index, e)?
        {
            Next::Empty => self.link_new_table(pfn, level, index, child_level)?,
            Next::Table(c) => c,
            Next::Leaf(_) => return Err(Error::AlreadyMapped { va }),
        };
        Ok((child, child_level))
    }

    /// Map `size` bytes at `va` to guest-physical `pa` with `flags`
    /// (PRESENT required), allocating intermediate tables: a one-page use of
    /// the cursor ([`Self::cursor_mut`]).
    pub fn map(&self, va: u64, pa: u64, size: PageSize, flags: EntryFlags) -> Result<(), Error> {
        let flags = Self::map_args(va, pa, size, flags)?;
        let mfn = self.leaf_mfn(pa)?;
        let mut c = self.cursor_at(va);
        let r = c.map_leaf(va, mfn, size, flags);
        c.remember_pte_page();
        r
    }

    /// Under split, the PTE lock of an L1 (taken inside the space lock);
    /// under global the space lock already covers it.
    pub(crate) fn lock_pte(&self, pfn: Pfn, level: Level) -> Option<PteLockGuard<'_>> {
        if P::SPLIT_PTE_LOCKS && level == Level::L1 {
            Some(PteLockGuard::acquire(self.store.meta(pfn)?.lock()))
        } else {
            None
        }
    }

    /// Remove the mapping at `va` (a page base); returns what it mapped.
    /// A one-page use of the cursor ([`CursorMut::unmap`]).
    ///
    /// [`CursorMut::unmap`]: crate::CursorMut::unmap
    pub fn unmap(&self, va: u64) -> Result<Translation, Error> {
        if !M::is_canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        let mut c = self.cursor_at(va);
        let r = c.unmap_at(va);
        c.remember_pte_page();
        r
    }

    /// Change the flags of the mapping at `va` (a page base), keeping its
    /// frame. A one-page use of the cursor ([`CursorMut::protect`]).
    ///
    /// [`CursorMut::protect`]: crate::CursorMut::protect
    pub fn protect(&self, va: u64, flags: EntryFlags) -> Result<(), Error> {
        if !M::is_canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        let mut c = self.cursor_at(va);
        let r = c.protect_at(va, flags).map(|_| ());
        c.remember_pte_page();
        r
    }

    /// The leaf `cur` of `size` with `flags` instead of its own, frame (and
    /// a large leaf's PAT position) kept.
    pub(crate) fn reflag_leaf(
        cur: PageTableEntry,
        size: PageSize,
        flags: EntryFlags,
    ) -> Result<PageTableEntry, Error> {
        Self::leaf_flags_ok(flags, size)?;
        let mut f = flags;
        if size != PageSize::Size4K {
            f |= EntryFlags::HUGE;
        }
        let addr_mask = PageTableEntry::ADDR_MASK & !Self::pat_mask(size);
        Ok(PageTableEntry::from_bits(
            (cur.bits() & addr_mask) | f.bits(),
        ))
    }

    /// Set the L1 entry for `va` to `value` (any bits, present or not),
    /// by `path`: the writer's fast path. The L1 must exist.
    ///
    /// Under split only the PTE page's lock is taken (found lock-free, then
    /// re-checked under the lock); under global the space lock. Returns the
    /// previous entry.
    pub fn set_pte(
        &self,
        va: u64,
        value: PageTableEntry,
        path: WritePath,
    ) -> Result<PageTableEntry, Error> {
        if !M::is_canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        if M::KERNEL_PMD_SLOT == Some(M::index(va, M::ROOT_LEVEL)) {
            return Err(Error::NonCanonical { va });
        }
        let index = M::index(va, Level::L1);
        if P::SPLIT_PTE_LOCKS {
            let _guard = read_guard();
            loop {
                let l1 = self.find_table(va, Level::L1)?;
                let meta = self.store.meta(l1).ok_or(Error::NoTable {
                    va,
                    level: Level::L1,
                })?;
                let _pte = PteLockGuard::acquire(meta.lock());
                // Re-check under the lock: a release unlinks the table while
                // holding this lock, so if it is still linked it stays linked.
                if self.find_table(va, Level::L1) != Ok(l1) {
                    continue;
                }
                let old =
                    PageTableEntry::from_bits(self.entry_slot(l1, index).load(Ordering::Acquire));
                self.write_entry(l1, Level::L1, index, value.bits(), path)?;
                return Ok(old);
            }
        } else {
            let _space = self.lock_space();
            let l1 = self.find_table(va, Level::L1)?;
            let old = PageTableEntry::from_bits(self.entry_slot(l1, index).load(Ordering::Acquire));
            self.write_entry(l1, Level::L1, index, value.bits(), path)?;
            Ok(old)
        }
    }

    /// Read the L1 entry for `va` without locks.
    pub fn read_pte(&self, va: u64) -> Result<PageTableEntry, Error> {
        let _guard = read_guard();
        let l1 = self.find_table(va, Level::L1)?;
        Ok(PageTableEntry::from_bits(
            self.entry_slot(l1, M::index(va, Level::L1))
                .load(Ordering::Acquire),
        ))
    }

    /// Release the (empty) table at `level` that covers `va`: unlink it
    /// first, then (pinned, split) unpin it, then make it writable; the
    /// frame is reused only after lock-free readers are done with it.
    pub fn release_table(&self, va: u64, level: Level) -> Result<(), Error> {
        if !M::is_canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        if level >= M::ROOT_LEVEL {
            return Err(Error::NoTable { va, level });
        }
        let _space = self.lock_space();
        let table = self.find_table(va, level)?;
        let parent_level = level.parent().ok_or(Error::NoTable { va, level })?;
        let parent = self.find_table(va, parent_level)?;
        if Some(table) == self.kernel_pmd {
            return Err(Error::NoTable { va, level });
        }
        let _pte = self.lock_pte(table, level);
        let frame = self
            .store
            .frame(table)
            .ok_or(Error::NoTable { va, level })?;
        if frame
            .entries()
            .iter()
            .any(|e| e.load(Ordering::Acquire) & EntryFlags::PRESENT.bits() != 0)
        {
            return Err(Error::TableNotEmpty { pfn: table });
        }
        self.write_entry(
            parent,
            parent_level,
            M::index(va, parent_level),
            0,
            WritePath::Store,
        )?;
        drop(_pte);
        if B::PINNING && self.store.meta(table).is_some_and(|m| m.is_pinned()) {
            self.retire_table_pinned(table, level)
        } else {
            self.store.retire(table);
            Ok(())
        }
    }

    /// Every table frame of the space, in walk order (root last).
    pub fn table_frames(&self) -> Result<Vec<(Pfn, Level)>, Error> {
        let mut out = Vec::new();
        let _guard = read_guard();
        walk::walk::<M, P::Lock, B, _>(
            &self.store,
            &self.backend,
            self.root,
            Scope::Full,
            &mut |pfn, level, _| {
                out.push((pfn, level));
                Ok(Descend::Yes)
            },
        )?;
        Ok(out)
    }

    /// Free every frame of the space without any hypercall (the space must
    /// not be pinned).
    pub(crate) fn release_frames(&mut self) {
        let mut frames: Vec<Pfn> = Vec::new();
        let (store, owner) = (&self.store, self.owner);
        // Every table linked in, except another space's (not ours to free,
        // and neither is what hangs below it).
        let _ = walk::walk_as::<M, P::Lock, B, _>(
            store,
            &self.backend,
            self.root,
            walk::Admit::any(),
            Scope::Full,
            &mut |t: walk::Table<'_>, _, _| {
                if t.owner != owner && t.owner != Owner::NONE {
                    return Ok(Descend::No);
                }
                frames.push(t.pfn);
                Ok(Descend::Yes)
            },
        );
        // A malformed space may link a table twice.
        frames.sort_unstable();
        frames.dedup();
        if !frames.contains(&self.root) {
            frames.push(self.root);
        }
        frames.extend(self.user_root);
        frames.extend(self.kernel_pmd);
        for f in frames {
            // SAFETY: the space is being dropped or torn down (exclusive
            // access) and unpinned; its tables are reachable only from its
            // own root, which goes with them.
            unsafe { self.store.free_now(f) };
        }
    }

    /// Tear the space down: unpin it if pinned (a never-pinned space sends
    /// no hypercall), then free its frames.
    pub fn teardown(mut self) -> Result<(), Error> {
        if self.is_pinned() {
            let mut b: Batch = Batch::new();
            self.unpin(&mut b)?;
        }
        self.release_frames();
        self.torn_down = true;
        Ok(())
    }
}

impl<M: PagingMode, P: LockPolicy, B: Backend> Drop for AddressSpace<M, P, B> {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if self.is_pinned() {
            let mut b: Batch = Batch::new();
            if self.unpin(&mut b).is_err() {
                // Frames the hypervisor still types must not be reused as
                // ordinary memory: leak them rather than hand them out.
                return;
            }
        }
        self.release_frames();
    }
}
