//! The leaves of a space: the checker's one walk over the engine's tables.
//!
//! Each entry is stepped through with the engine's descent primitive
//! ([`pagepin_engine::walk::next`]), so the checker validates tables
//! exactly as the engine's own lookups do. The walk records, per leaf,
//! what later steps would otherwise descend again for: the table slot
//! holding it (for the negative control) and the rights its path grants
//! (for the probes' predictions).

use std::sync::atomic::Ordering;

use pagepin_engine::walk::{self, Next};
use pagepin_engine::{
    AddressSpace, Backend, EntryFlags, Error, Level, LockPolicy, PageSize, PageTableEntry,
    PagingMode, Pfn, X86_64,
};

/// The rights every entry on the path to a leaf grants together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PathRights {
    /// Every entry on the path is writable.
    pub(super) writable: bool,
    /// Some entry on the path is no-execute.
    pub(super) no_execute: bool,
}

impl PathRights {
    /// Above the root: nothing restricted yet.
    const ALL: PathRights = PathRights {
        writable: true,
        no_execute: false,
    };

    /// The rights left after passing through entry `e`.
    fn through(self, e: PageTableEntry) -> PathRights {
        PathRights {
            writable: self.writable && e.is_writable(),
            no_execute: self.no_execute || e.flags().contains(EntryFlags::NO_EXECUTE),
        }
    }
}

/// A mapped page of the space.
#[derive(Clone, Copy, Debug)]
pub(super) struct Leaf {
    /// Its first virtual address.
    pub(super) va: u64,
    /// Its size.
    pub(super) size: PageSize,
    /// The table holding its entry.
    pub(super) table: Pfn,
    /// The entry's index in that table.
    pub(super) index: usize,
    /// What its path grants.
    pub(super) rights: PathRights,
}

/// Every leaf of `space`, in increasing virtual-address order (root slots
/// in order; the upper half's sign extension keeps it increasing). A
/// malformed table is an error.
pub(super) fn leaves<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
) -> Result<Vec<Leaf>, Error> {
    let mut out = Vec::new();
    collect(
        space,
        space.root(),
        X86_64::ROOT_LEVEL,
        0,
        PathRights::ALL,
        &mut out,
    )?;
    Ok(out)
}

/// The leaf covering `va` in `leaves` (sorted as [`leaves`] returns them).
pub(super) fn leaf_at(leaves: &[Leaf], va: u64) -> Option<&Leaf> {
    let after = leaves.partition_point(|l| l.va <= va);
    leaves[..after]
        .last()
        .filter(|l| va - l.va < l.size.bytes())
}

/// Append the leaves under the table `pfn` at `level`, which maps from
/// `base` with `rights` granted above it.
fn collect<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
    pfn: Pfn,
    level: Level,
    base: u64,
    rights: PathRights,
    out: &mut Vec<Leaf>,
) -> Result<(), Error> {
    let store = space.store();
    let Some(frame) = store.frame(pfn) else {
        return Ok(());
    };
    for (index, slot) in frame.entries().iter().enumerate() {
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        let va = if level == X86_64::ROOT_LEVEL {
            X86_64::root_slot_base(index)
        } else {
            base + ((index as u64) << level.shift())
        };
        match walk::next::<X86_64, P::Lock, B>(store, space.backend(), level, index, e)? {
            Next::Empty => {}
            Next::Leaf(_) => out.push(Leaf {
                va,
                size: PageSize::of_leaf(level),
                table: pfn,
                index,
                rights: rights.through(e),
            }),
            Next::Table(child) => collect(
                space,
                child,
                level.child().expect("a table entry is above L1"),
                va,
                rights.through(e),
                out,
            )?,
        }
    }
    Ok(())
}
