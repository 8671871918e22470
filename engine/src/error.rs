//! Typed errors. Every error leaves the space as it was before the call.

use core::fmt;

use crate::backend::{CallKind, StoreFault};
use crate::frame::{Mfn, Pfn};
use crate::mode::Level;

/// What a failed hypercall request was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Remap a table page read-only in the direct map.
    RemapReadOnly,
    /// Remap a table page writable in the direct map.
    RemapWritable,
    /// Pin a table at a level.
    Pin(Level),
    /// Unpin a table.
    Unpin,
    /// Update a table entry through the hypervisor.
    EntryUpdate,
    /// Load a base pointer.
    BasePointer,
}

/// A hypercall request that failed, named precisely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallFailure {
    /// Flush sequence number within the operation's batch.
    pub flush: u64,
    /// Call (multicall entry) index within that flush.
    pub call: usize,
    /// Request index within the call.
    pub item: usize,
    /// The call's kind.
    pub kind: CallKind,
    /// Positive errno.
    pub errno: i32,
    /// The table frame concerned, when known.
    pub pfn: Option<Pfn>,
    /// What the request did, when known.
    pub step: Option<StepKind>,
}

/// Errors of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// An address not aligned to the page size asked for.
    Misaligned {
        /// The address.
        addr: u64,
    },
    /// A virtual address that is not canonical (or beyond the mode's range).
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// Flags with address bits, or flags the operation does not allow.
    BadFlags {
        /// The flag bits.
        bits: u64,
    },
    /// A page size the mode does not support.
    UnsupportedPageSize,
    /// Nothing is mapped at the address.
    NotMapped {
        /// The address.
        va: u64,
    },
    /// Something is already mapped at the address (or a large page is in the way).
    AlreadyMapped {
        /// The address.
        va: u64,
    },
    /// The table covering the address at this level does not exist.
    NoTable {
        /// The address.
        va: u64,
        /// The level.
        level: Level,
    },
    /// A table to be released still has present entries.
    TableNotEmpty {
        /// The table.
        pfn: Pfn,
    },
    /// The frame store has no free frame.
    OutOfFrames,
    /// An entry points outside the frame store (or the guest's memory).
    FrameOutOfRange {
        /// Level of the table holding the entry.
        level: Level,
        /// Entry index.
        index: usize,
        /// The frame it points to.
        mfn: Mfn,
    },
    /// An entry points to a frame that is not a table of the next level:
    /// a cycle, a frame reachable at two levels, or a data page.
    LevelMismatch {
        /// Level of the table holding the entry.
        level: Level,
        /// Entry index.
        index: usize,
        /// The frame pointed to.
        pfn: Pfn,
        /// Its level (None: not a table).
        found: Option<Level>,
    },
    /// A pin or unpin walk met a table that belongs to another space (see
    /// [`crate::frame::Owner`]): page tables are not shared between spaces.
    ForeignTable {
        /// Level of the table holding the entry.
        level: Level,
        /// Entry index.
        index: usize,
        /// The frame pointed to.
        pfn: Pfn,
    },
    /// An entry with reserved bits set (address bits above MAXPHYADDR, or
    /// PS where it is reserved).
    ReservedBits {
        /// Level of the table holding the entry.
        level: Level,
        /// Entry index.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// The space is already pinned.
    AlreadyPinned,
    /// The space is not pinned.
    NotPinned,
    /// Taking one more lock would exceed the preempt-count limit (255).
    PreemptOverflow {
        /// Locks held when refused.
        held: u32,
    },
    /// A hypercall failed; everything the operation did was undone.
    Hypercall(HypercallFailure),
    /// A hypercall failed and undoing the operation failed too: the space's
    /// state is no longer known.
    RollbackFailed {
        /// The first failure.
        first: HypercallFailure,
        /// The failure while rolling back.
        rollback: HypercallFailure,
    },
    /// A guest store into a table entry faulted.
    Fault(StoreFault),
    /// A virtual address in root slots a space never maps: the hypervisor's
    /// hole of the kernel half (x86-64 root slots 256..271, Xen's own).
    HypervisorHole {
        /// The address.
        va: u64,
    },
    /// A physical address beyond what an entry can hold (the mode's
    /// physical-address width), or a guest frame the backend cannot
    /// translate (outside the guest's memory).
    PhysicalOutOfRange {
        /// The physical address.
        pa: u64,
    },
    /// An address outside the virtual-address range a cursor was made for
    /// (or a range that is empty or crosses a non-canonical hole).
    OutOfRange {
        /// The address.
        va: u64,
    },
}

impl From<crate::lock::PreemptOverflow> for Error {
    #[inline]
    fn from(e: crate::lock::PreemptOverflow) -> Self {
        Error::PreemptOverflow { held: e.held }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Hypercall(h) => write!(
                f,
                "hypercall failed: flush {} call {} item {} ({:?}) errno {} on {:?} ({:?})",
                h.flush, h.call, h.item, h.kind, h.errno, h.pfn, h.step
            ),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

#[cfg(feature = "std")]
extern crate std;
#[cfg(feature = "std")]
impl std::error::Error for Error {}
