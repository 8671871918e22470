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
///
/// Non-exhaustive: new failure kinds may be added without a major release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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

impl fmt::Display for HypercallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} request failed with errno {} (flush {}, call {}, request {})",
            self.kind, self.errno, self.flush, self.call, self.item
        )?;
        if let Some(step) = self.step {
            write!(f, " while it did {step:?}")?;
        }
        if let Some(pfn) = self.pfn {
            write!(f, " on table frame {:#x}", pfn.0)?;
        }
        Ok(())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Misaligned { addr } => write!(f, "address {addr:#x} is not aligned to the page size"),
            Error::NonCanonical { va } => {
                write!(f, "virtual address {va:#x} is not canonical (or outside the mode's range)")
            }
            Error::BadFlags { bits } => write!(f, "flags {bits:#x} are not allowed here"),
            Error::UnsupportedPageSize => write!(f, "this paging mode or backend has no such page size"),
            Error::NotMapped { va } => write!(f, "nothing is mapped at {va:#x}"),
            Error::AlreadyMapped { va } => {
                write!(f, "{va:#x} is already mapped (or a large page covers it)")
            }
            Error::NoTable { va, level } => {
                write!(f, "no {level:?} table covers {va:#x}")
            }
            Error::TableNotEmpty { pfn } => {
                write!(f, "table frame {:#x} still has present entries", pfn.0)
            }
            Error::OutOfFrames => write!(f, "the frame store has no free frame"),
            Error::FrameOutOfRange { level, index, mfn } => write!(
                f,
                "{level:?} entry {index} points at frame {:#x}, outside the store or the guest",
                mfn.0
            ),
            Error::LevelMismatch {
                level,
                index,
                pfn,
                found,
            } => write!(
                f,
                "{level:?} entry {index} points at frame {:#x}, which is not a table of the next level ({})",
                pfn.0,
                match found {
                    Some(l) => match l {
                        Level::L1 => "an L1 table",
                        Level::L2 => "an L2 table",
                        Level::L3 => "an L3 table",
                        Level::L4 => "an L4 table",
                        Level::L5 => "an L5 table",
                    },
                    None => "not a table",
                }
            ),
            Error::ForeignTable { level, index, pfn } => write!(
                f,
                "{level:?} entry {index} points at table frame {:#x} of another space",
                pfn.0
            ),
            Error::ReservedBits {
                level,
                index,
                entry,
            } => write!(f, "{level:?} entry {index} ({entry:#x}) has reserved bits set"),
            Error::AlreadyPinned => write!(f, "the space is already pinned"),
            Error::NotPinned => write!(f, "the space is not pinned"),
            Error::PreemptOverflow { held } => {
                write!(f, "taking another lock would pass the preempt limit ({held} held)")
            }
            Error::Hypercall(h) => write!(f, "{h}; everything the operation did was undone"),
            Error::RollbackFailed { first, rollback } => write!(
                f,
                "{first}, and undoing the operation failed too ({rollback}): the space's state is unknown"
            ),
            Error::Fault(s) => write!(
                f,
                "a store into entry {} of table frame {:#x} faulted ({})",
                s.index, s.mfn.0, s.errno
            ),
            Error::HypervisorHole { va } => {
                write!(f, "{va:#x} is in the hypervisor's hole of the address space")
            }
            Error::PhysicalOutOfRange { pa } => write!(
                f,
                "physical address {pa:#x} cannot be mapped (beyond an entry's width or the guest's memory)"
            ),
            Error::OutOfRange { va } => {
                write!(f, "{va:#x} is outside the cursor's range (or the range is invalid)")
            }
        }
    }
}

#[cfg(feature = "std")]
extern crate std;
#[cfg(feature = "std")]
impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::backend::CallKind;
    use std::format;

    /// Every variant says what happened in words (no `Debug` fallback).
    #[test]
    fn every_error_displays_in_words() {
        let h = HypercallFailure {
            flush: 1,
            call: 2,
            item: 0,
            kind: CallKind::MmuExtOp,
            errno: 22,
            pfn: Some(Pfn(0x300)),
            step: Some(StepKind::Pin(Level::L4)),
        };
        let all = [
            Error::Misaligned { addr: 0x1008 },
            Error::NonCanonical { va: 1 << 47 },
            Error::BadFlags { bits: 0x1000 },
            Error::UnsupportedPageSize,
            Error::NotMapped { va: 0x1000 },
            Error::AlreadyMapped { va: 0x1000 },
            Error::NoTable {
                va: 0x1000,
                level: Level::L1,
            },
            Error::TableNotEmpty { pfn: Pfn(3) },
            Error::OutOfFrames,
            Error::FrameOutOfRange {
                level: Level::L2,
                index: 4,
                mfn: Mfn(0xdead),
            },
            Error::LevelMismatch {
                level: Level::L3,
                index: 1,
                pfn: Pfn(7),
                found: None,
            },
            Error::ForeignTable {
                level: Level::L4,
                index: 0,
                pfn: Pfn(9),
            },
            Error::ReservedBits {
                level: Level::L2,
                index: 3,
                entry: 1 << 51,
            },
            Error::AlreadyPinned,
            Error::NotPinned,
            Error::PreemptOverflow { held: 255 },
            Error::Hypercall(h),
            Error::RollbackFailed {
                first: h,
                rollback: h,
            },
            Error::Fault(StoreFault {
                mfn: Mfn(5),
                index: 1,
                errno: 14,
            }),
            Error::HypervisorHole {
                va: 0xffff_8000_0000_0000,
            },
            Error::PhysicalOutOfRange { pa: 1 << 52 },
            Error::OutOfRange { va: 0x1000 },
        ];
        for e in all {
            let text = format!("{e}");
            assert!(
                !text.is_empty() && !text.contains(" { ") && text != format!("{e:?}"),
                "{e:?} displays as {text:?}"
            );
        }
        assert_eq!(
            format!("{}", Error::Hypercall(h)),
            "MmuExtOp request failed with errno 22 (flush 1, call 2, request 0) while it did \
             Pin(L4) on table frame 0x300; everything the operation did was undone"
        );
    }
}
