//! The journal of one pin or unpin: every request the operation queues is
//! a step, tagged with its index, so a failure can be undone exactly
//! (docs/PROTOCOL.md §7). Its step buffer is kept by the per-CPU batch
//! between operations; this module sits below both the batch and the pin
//! operation, so neither names the other.

use alloc::vec::Vec;

use crate::frame::Pfn;
use crate::mode::Level;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    RemapRo,
    RemapRw,
    Pin(Level),
    Unpin(Level),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub(crate) pfn: Pfn,
    pub(crate) action: Action,
    /// The page is an L1 under the split policy: its lock must be held while
    /// its mapping and its own type change together.
    pub(crate) locked_page: bool,
    /// The page's first step: the operation flipped its pinned flag just
    /// before queueing it (pin set it, unpin cleared it). Undoing the step
    /// flips the flag back, whether or not the request took effect.
    pub(crate) flag: bool,
}

/// The journal of one pin or unpin.
///
/// Its step buffer is borrowed from the batch (a per-context object) for
/// the operation and handed back after, so a pin allocates only while the
/// buffer grows to the largest space the context has pinned.
#[derive(Default)]
#[repr(C)] // `counts` kept away from the vector's length (see below)
pub(crate) struct Journal {
    pub(crate) steps: Vec<Step>,
    /// The batch's flush count when the operation started, so failures are
    /// reported relative to the operation.
    pub(crate) flush_base: u64,
    /// Remap steps queued (the operation's `PinStats::tables`) in the low
    /// 32 bits, separate L1 pin / unpin steps (`PinStats::l1_ops`) in the
    /// high 32: one scalar add per step. `repr(C)` puts `flush_base`
    /// between it and the vector's length: LLVM otherwise fused the two
    /// increments into one 16-byte vector add whose load waited on the two
    /// 8-byte stores of the previous push (a store-forwarding stall that
    /// was a third of `pin_page`'s time).
    pub(crate) counts: u64,
}

impl Journal {
    /// A journal over a reusable step buffer (the batch's, see
    /// `Batch::take_journal_buffer`), for an operation that starts at the
    /// batch's flush count `flush_base`.
    #[inline]
    pub(crate) fn over(mut steps: Vec<Step>, flush_base: u64) -> Self {
        steps.clear();
        Journal {
            steps,
            flush_base,
            counts: 0,
        }
    }

    /// Record a step; returns its index, the batch tag of its request.
    #[inline]
    pub(crate) fn push(&mut self, pfn: Pfn, action: Action, locked_page: bool, flag: bool) -> u32 {
        self.counts += match action {
            Action::RemapRo | Action::RemapRw => 1,
            Action::Pin(Level::L1) | Action::Unpin(Level::L1) => 1 << 32,
            _ => 0,
        };
        self.steps.push(Step {
            pfn,
            action,
            locked_page,
            flag,
        });
        (self.steps.len() - 1) as u32
    }
}
