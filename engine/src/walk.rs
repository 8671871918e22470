//! The page-table walk in protocol order (docs/PROTOCOL.md §2).
//!
//! Depth-first over root slots in increasing order, each table before its
//! children, the root itself last. Entries are read atomically; validation
//! turns malformed tables (cycles, frames at two levels, frames outside the
//! store, reserved bits) into typed errors, so a walk always terminates.

use crate::backend::Backend;
use crate::entry::{EntryFlags, PageTableEntry};
use crate::error::Error;
use crate::frame::{FrameMeta, FrameStore, Owner, Pfn};
use crate::lock::RawLock;
use crate::mode::{Level, PagingMode};
use crate::sync::Ordering;

/// Which root slots a walk covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Slots below the user limit (what pin and unpin walk).
    User,
    /// Every slot except the hypervisor's hole (256..=271 on x86-64) and the
    /// PAE kernel-PMD slot, which pin and unpin handle explicitly.
    Full,
}

/// Whether the walk should descend into a visited table's children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descend {
    /// Visit the children.
    Yes,
    /// Skip them (e.g. the frame was already processed).
    No,
    /// End the walk here, successfully, without visiting anything else
    /// (the root included): the visitor has what it needs, or recorded a
    /// failure of its own.
    Stop,
}

/// A table a walk reached, with what the walk already read of it (so the
/// visitor does not look its metadata up again: speed).
#[derive(Clone, Copy)]
pub(crate) struct Table<'s> {
    /// The frame.
    pub(crate) pfn: Pfn,
    /// Its owner, read with its level.
    pub(crate) owner: Owner,
    /// Its metadata.
    pub(crate) meta: FrameMeta<'s>,
}

/// Check an entry that is present and not a leaf, and return the table it
/// points to, with its owner (from the same load as its level) and
/// metadata.
#[inline(always)]
fn child_table<'s, L: RawLock, B: Backend>(
    store: &'s FrameStore<L>,
    backend: &B,
    level: Level,
    index: usize,
    entry: PageTableEntry,
) -> Result<Table<'s>, Error> {
    let child = match level.child() {
        Some(c) => c,
        None => unreachable_l1(),
    };
    if entry.bits() & PageTableEntry::RESERVED_ADDR_BITS != 0 {
        return Err(Error::ReservedBits {
            level,
            index,
            entry: entry.bits(),
        });
    }
    let mfn = crate::frame::Mfn(entry.frame());
    let Some(pfn) = backend.mfn_to_pfn(mfn) else {
        return Err(Error::FrameOutOfRange { level, index, mfn });
    };
    let Some(meta) = store.meta(pfn) else {
        return Err(Error::FrameOutOfRange { level, index, mfn });
    };
    let (is_child, owner) = meta.is_table_at(child);
    if !is_child {
        return Err(Error::LevelMismatch {
            level,
            index,
            pfn,
            found: meta.level(),
        });
    }
    Ok(Table { pfn, owner, meta })
}

#[cold]
fn unreachable_l1() -> ! {
    // Callers never ask for the child of an L1 entry; reaching this is a bug
    // in the engine, not bad input.
    panic!("walk asked for the child table of an L1 entry")
}

/// What one entry of a table leads to: the descent primitive every lookup,
/// writer, cursor and reader of the engine steps with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Not present.
    Empty,
    /// A present leaf (an L1 entry, or a large page at L2/L3).
    Leaf(PageTableEntry),
    /// A present entry naming a validated table of the next level.
    Table(Pfn),
}

/// Step through entry `e` (index `index`) of a table at `level`: empty,
/// leaf, or a validated child table; a malformed entry is a typed error.
#[inline]
pub fn next<M: PagingMode, L: RawLock, B: Backend>(
    store: &FrameStore<L>,
    backend: &B,
    level: Level,
    index: usize,
    e: PageTableEntry,
) -> Result<Next, Error> {
    if !e.is_present() {
        return Ok(Next::Empty);
    }
    Ok(
        match classify::<M, L, B>(store, backend, level, index, e)? {
            Some(child) => Next::Table(child.pfn),
            None => Next::Leaf(e),
        },
    )
}

/// Where a [`descend`] stopped: the table at `level`, the index `va` selects
/// in it, and what that entry leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// The table the descent stopped in.
    pub pfn: Pfn,
    /// Its level.
    pub level: Level,
    /// The index of `va` in it.
    pub index: usize,
    /// What the entry there leads to.
    pub next: Next,
}

/// Descend from `root` along `va`, lock-free, until the table at `target`
/// (or an empty entry or a leaf above it): the one walk of lookups.
/// Entries are read once each, atomically; the caller holds whatever makes
/// the tables it reaches stay tables (a read section, the space lock).
#[inline]
pub fn descend<M: PagingMode, L: RawLock, B: Backend>(
    store: &FrameStore<L>,
    backend: &B,
    root: Pfn,
    va: u64,
    target: Level,
) -> Result<Stop, Error> {
    if !store.contains(root) {
        return Err(Error::FrameOutOfRange {
            level: M::ROOT_LEVEL,
            index: M::index(va, M::ROOT_LEVEL),
            mfn: backend.pfn_to_mfn(root),
        });
    }
    // SAFETY: checked just above.
    unsafe { descend_from::<M, L, B>(store, backend, root, va, target) }
}

/// [`descend`] from a root known to be in the store (an address space's
/// own root, allocated from it: speed, no check per lookup).
///
/// # Safety
/// `root` is a frame of `store`.
#[inline(always)]
pub(crate) unsafe fn descend_from<M: PagingMode, L: RawLock, B: Backend>(
    store: &FrameStore<L>,
    backend: &B,
    root: Pfn,
    va: u64,
    target: Level,
) -> Result<Stop, Error> {
    let mut pfn = root;
    let mut level = M::ROOT_LEVEL;
    loop {
        let index = M::index(va, level);
        // SAFETY: `pfn` is the root (in the store: the caller's promise)
        // or a child `next` validated (in the store). Speed: one bounds
        // check per level, the child's (keep it).
        let slot = &unsafe { store.frame_unchecked(pfn) }.entries()[index];
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        let next = next::<M, L, B>(store, backend, level, index, e)?;
        match next {
            Next::Table(child) if level > target => {
                pfn = child;
                // A table entry exists only above L1.
                level = match level.child() {
                    Some(l) => l,
                    None => unreachable_l1(),
                };
            }
            _ => {
                return Ok(Stop {
                    pfn,
                    level,
                    index,
                    next,
                })
            }
        }
    }
}

/// Classify a present entry at `level`: a leaf (`Ok(None)`), a validated
/// child table with its owner and metadata (`Ok(Some(..))`), or malformed.
#[inline(always)]
fn classify<'s, M: PagingMode, L: RawLock, B: Backend>(
    store: &'s FrameStore<L>,
    backend: &B,
    level: Level,
    index: usize,
    entry: PageTableEntry,
) -> Result<Option<Table<'s>>, Error> {
    if level == Level::L1 {
        return Ok(None);
    }
    if entry.is_huge() {
        let allowed = match level {
            Level::L2 => true,
            Level::L3 => M::HAS_1G_PAGES && level != M::ROOT_LEVEL,
            _ => false,
        };
        if !allowed {
            return Err(Error::ReservedBits {
                level,
                index,
                entry: entry.bits(),
            });
        }
        return Ok(None);
    }
    child_table(store, backend, level, index, entry).map(Some)
}

/// The tables a walk admits: those of one owner and unowned ones, or any
/// (a visitor that sorts owners itself, and the negative control of the
/// ownership check).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Admit {
    owner: u64,
    /// All ones, or 0 to admit any owner (speed: the check per table is
    /// branch-free, no `Option` to test; keep it).
    mask: u64,
}

impl Admit {
    /// Tables of `owner`, and unowned ones.
    #[inline]
    pub(crate) fn owner(owner: Owner) -> Self {
        Admit {
            owner: owner.0,
            mask: u64::MAX,
        }
    }

    /// Any table.
    #[inline]
    pub(crate) fn any() -> Self {
        Admit { owner: 0, mask: 0 }
    }

    #[inline(always)]
    fn admits(self, owner: Owner) -> bool {
        owner == Owner::NONE || (owner.0 ^ self.owner) & self.mask == 0
    }
}

/// The child table a present, non-huge entry at `level` (above L1) links,
/// if it is a well-formed one of an admitted owner; none otherwise,
/// without saying why ([`walk_child_checked`] does). Speed: the walk's
/// common case with no error value built on its way (building one made
/// five stack stores per PTE page in the pin walk; keep it).
#[inline(always)]
fn child_of_admitted<'s, L: RawLock, B: Backend>(
    store: &'s FrameStore<L>,
    backend: &B,
    admit: Admit,
    level: Level,
    entry: PageTableEntry,
) -> Option<Table<'s>> {
    if entry.is_huge() || entry.bits() & PageTableEntry::RESERVED_ADDR_BITS != 0 {
        return None;
    }
    let pfn = backend.mfn_to_pfn(crate::frame::Mfn(entry.frame()))?;
    let meta = store.meta(pfn)?;
    let (is_child, owner) = meta.is_table_at(level.child()?);
    (is_child && admit.admits(owner)).then_some(Table { pfn, owner, meta })
}

/// The child of a present walked entry (none for a leaf), refused if it
/// belongs to a space other than the root's (unowned tables are
/// accepted).
#[inline(always)]
fn walk_child<'s, M: PagingMode, L: RawLock, B: Backend>(
    store: &'s FrameStore<L>,
    backend: &B,
    admit: Admit,
    level: Level,
    index: usize,
    entry: PageTableEntry,
) -> Result<Option<Table<'s>>, Error> {
    match child_of_admitted(store, backend, admit, level, entry) {
        Some(t) => Ok(Some(t)),
        None => walk_child_checked::<M, L, B>(store, backend, admit, level, index, entry),
    }
}

/// [`walk_child`] for an entry its fast path did not accept: a leaf, or
/// a malformed or foreign child, named in the error.
#[inline(always)]
fn walk_child_checked<'s, M: PagingMode, L: RawLock, B: Backend>(
    store: &'s FrameStore<L>,
    backend: &B,
    admit: Admit,
    level: Level,
    index: usize,
    entry: PageTableEntry,
) -> Result<Option<Table<'s>>, Error> {
    match classify::<M, L, B>(store, backend, level, index, entry)? {
        Some(t) if !admit.admits(t.owner) => Err(Error::ForeignTable {
            level,
            index,
            pfn: t.pfn,
        }),
        c => Ok(c),
    }
}

/// What a walk calls for each table it reaches: `visit(table, level,
/// is_root)`. Closures are visitors; the pin and unpin walks implement it
/// on their own types so the call inlines into the walk's loop (speed:
/// keep it inlined).
pub(crate) trait Visitor<'s> {
    /// Visit one table.
    fn visit(&mut self, table: Table<'s>, level: Level, is_root: bool) -> Result<Descend, Error>;
}

impl<'s, F: FnMut(Table<'s>, Level, bool) -> Result<Descend, Error>> Visitor<'s> for F {
    #[inline(always)]
    fn visit(&mut self, table: Table<'s>, level: Level, is_root: bool) -> Result<Descend, Error> {
        self(table, level, is_root)
    }
}

/// Walk the tables under `root` in protocol order, calling `visit(pfn, level,
/// is_root)` for each table frame. The root is visited last. An error from
/// `visit` or from validation stops the walk and is returned.
///
/// Tables must belong to the root's owner or to none
/// ([`Error::ForeignTable`] otherwise).
pub fn walk<M, L, B, F>(
    store: &FrameStore<L>,
    backend: &B,
    root: Pfn,
    scope: Scope,
    visit: &mut F,
) -> Result<(), Error>
where
    M: PagingMode,
    L: RawLock,
    B: Backend,
    F: FnMut(Pfn, Level, bool) -> Result<Descend, Error>,
{
    let owner = store.meta(root).map_or(Owner::NONE, |m| m.owner());
    walk_as::<M, L, B, _>(
        store,
        backend,
        root,
        Admit::owner(owner),
        scope,
        &mut |t: Table<'_>, l, r| visit(t.pfn, l, r),
    )
}

/// [`walk`], admitting the tables `admit` names. The visitor gets each
/// table's owner and metadata, read with its level.
pub(crate) fn walk_as<'s, M, L, B, F>(
    store: &'s FrameStore<L>,
    backend: &B,
    root: Pfn,
    admit: Admit,
    scope: Scope,
    visit: &mut F,
) -> Result<(), Error>
where
    M: PagingMode,
    L: RawLock,
    B: Backend,
    F: Visitor<'s>,
{
    let (Some(frame), Some(root_meta)) = (store.frame(root), store.meta(root)) else {
        return Err(Error::FrameOutOfRange {
            level: M::ROOT_LEVEL,
            index: 0,
            mfn: backend.pfn_to_mfn(root),
        });
    };
    for range in root_slots::<M>(scope) {
        let first = range.start;
        for (i, entry) in frame.entries()[range].iter().enumerate() {
            let e = PageTableEntry::from_bits(entry.load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            let slot = first + i;
            let Some(child) = walk_child::<M, L, B>(store, backend, admit, M::ROOT_LEVEL, slot, e)?
            else {
                continue;
            };
            let stopped = walk_table::<M, L, B, F>(
                store,
                backend,
                admit,
                child,
                M::ROOT_LEVEL.child().unwrap_or(Level::L1),
                visit,
            )?;
            if stopped {
                return Ok(());
            }
        }
    }
    let root_table = Table {
        pfn: root,
        owner: root_meta.owner(),
        meta: root_meta,
    };
    visit.visit(root_table, M::ROOT_LEVEL, true)?;
    Ok(())
}

/// The root slots a walk of `scope` covers, in increasing order: two
/// ranges around the one slot range a full walk leaves out (the
/// hypervisor's hole, or the PAE kernel-PMD slot), so the loop over the
/// root tests nothing per slot but presence (speed: a per-slot test of
/// both exclusions cost the pin walk about 4 %).
#[inline]
fn root_slots<M: PagingMode>(scope: Scope) -> [core::ops::Range<usize>; 2] {
    const {
        assert!(
            M::KERNEL_PMD_SLOT.is_none() || M::HYPERVISOR_HOLE.start >= M::HYPERVISOR_HOLE.end,
            "a mode has a hypervisor hole or a kernel-PMD slot, not both"
        );
        assert!(M::HYPERVISOR_HOLE.end <= M::ROOT_ENTRIES);
        assert!(M::USER_ROOT_SLOTS <= M::ROOT_ENTRIES);
    }
    let (skip_start, skip_end) = match (scope, M::KERNEL_PMD_SLOT) {
        (Scope::User, _) => (M::USER_ROOT_SLOTS, M::ROOT_ENTRIES),
        (Scope::Full, Some(k)) => (k, k + 1),
        (Scope::Full, None) => (M::HYPERVISOR_HOLE.start, M::HYPERVISOR_HOLE.end),
    };
    [0..skip_start, skip_end..M::ROOT_ENTRIES]
}

fn walk_table<'s, M, L, B, F>(
    store: &'s FrameStore<L>,
    backend: &B,
    admit: Admit,
    table: Table<'s>,
    level: Level,
    visit: &mut F,
) -> Result<bool, Error>
where
    M: PagingMode,
    L: RawLock,
    B: Backend,
    F: Visitor<'s>,
{
    let pfn = table.pfn;
    match visit.visit(table, level, false)? {
        Descend::Stop => return Ok(true),
        Descend::No => return Ok(false),
        Descend::Yes if level == Level::L1 => return Ok(false),
        Descend::Yes => {}
    }
    let Some(frame) = store.frame(pfn) else {
        return Ok(false);
    };
    if level == Level::L2 {
        // PTE pages have no children: visited here rather than through a
        // call per page, in a loop of their own (speed: sharing the loop
        // with the recursion below made every page build the recursive
        // call's arguments on the stack; keep them apart).
        for (index, slot) in frame.entries().iter().enumerate() {
            let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
            // Huge: a 2 MiB leaf, skipped before any check.
            if !e.is_present() || e.is_huge() {
                continue;
            }
            // `walk_child` spelled out: the checked path's `Result` kept
            // out of this loop (speed: matching it here made global's pin
            // 13 % slower; keep it).
            let child = match child_of_admitted(store, backend, admit, level, e) {
                Some(t) => t,
                None => {
                    match walk_child_checked::<M, L, B>(store, backend, admit, level, index, e)? {
                        Some(t) => t,
                        None => continue,
                    }
                }
            };
            if visit.visit(child, Level::L1, false)? == Descend::Stop {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    for (index, slot) in frame.entries().iter().enumerate() {
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        if !e.is_present() {
            continue;
        }
        if let Some(child) = walk_child::<M, L, B>(store, backend, admit, level, index, e)? {
            let child_level = level.child().unwrap_or(Level::L1);
            if walk_table::<M, L, B, F>(store, backend, admit, child, child_level, visit)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Flags a table (non-leaf) entry gets: present, writable, user, accessed,
/// dirty (Linux's `_PAGE_TABLE`). PAE root entries may carry only present.
pub fn table_entry_flags<M: PagingMode>(parent: Level) -> EntryFlags {
    if M::ROOT_LEVEL == Level::L3 && parent == Level::L3 {
        EntryFlags::PRESENT
    } else {
        EntryFlags::PRESENT
            | EntryFlags::WRITABLE
            | EntryFlags::USER
            | EntryFlags::ACCESSED
            | EntryFlags::DIRTY
    }
}
