//! What the engine asks of a hypervisor or of hardware.
//!
//! The operations mirror Xen's PV MMU interface (the protocol pagepin
//! implements); a backend encodes them into its own ABI (the Xen backend into
//! `multicall_entry` structs), executes them natively, or records them.

use crate::frame::{Mfn, Pfn};
use crate::sync::{AtomicU64, Ordering};

/// `update_va_mapping` flags (Xen's `UVMF_*`).
pub mod uvmf {
    /// No flush.
    pub const NONE: u64 = 0;
    /// Flush the whole TLB after the update.
    pub const TLB_FLUSH: u64 = 1;
    /// Invalidate the one page after the update.
    pub const INVLPG: u64 = 2;
    /// Mask of the flush kind.
    pub const FLUSHTYPE_MASK: u64 = 3;
    /// Flush on the local CPU only.
    pub const LOCAL: u64 = 0;
    /// Flush on all CPUs.
    pub const ALL: u64 = 4;
}

/// `mmu_update` sub-commands in the low two bits of `ptr`.
pub mod mmu_cmd {
    /// Checked update of a page-table entry.
    pub const NORMAL_PT_UPDATE: u64 = 0;
    /// Update the machine-to-physical table.
    pub const MACHPHYS_UPDATE: u64 = 1;
    /// As NORMAL, preserving the accessed and dirty bits.
    pub const PT_UPDATE_PRESERVE_AD: u64 = 2;
}

/// One `mmu_update` request: `ptr` is the machine address of the entry with
/// the sub-command in its low bits, `val` the new entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MmuUpdate {
    /// Machine address of the entry | sub-command.
    pub ptr: u64,
    /// New value.
    pub val: u64,
}

/// `mmuext_op` commands, with Xen's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ExtCmd {
    /// Pin an L1 table (validate and take a pinned type reference).
    PinL1Table = 0,
    /// Pin an L2 table.
    PinL2Table = 1,
    /// Pin an L3 table (the PAE root).
    PinL3Table = 2,
    /// Pin an L4 table (the x86-64 root).
    PinL4Table = 3,
    /// Drop a pin.
    UnpinTable = 4,
    /// Load a new kernel base pointer (CR3).
    NewBaseptr = 5,
    /// Flush this CPU's TLB.
    TlbFlushLocal = 6,
    /// Invalidate one address on this CPU.
    InvlpgLocal = 7,
    /// Flush the TLBs of a CPU set.
    TlbFlushMulti = 8,
    /// Invalidate one address on a CPU set.
    InvlpgMulti = 9,
    /// Flush every CPU's TLB.
    TlbFlushAll = 10,
    /// Invalidate one address on every CPU.
    InvlpgAll = 11,
    /// Load a new user base pointer (64-bit PV).
    NewUserBaseptr = 15,
    /// Pin a 5-level root. Not a Xen command (Xen PV has no 5-level
    /// tables, and a Xen backend refuses 5-level spaces at compile time):
    /// the number is outside Xen's range, for hypervisor models that have
    /// 5-level tables (the mock backend).
    PinL5Table = 0x8000_0004,
}

impl ExtCmd {
    /// The command from its number.
    pub fn from_u32(n: u32) -> Option<ExtCmd> {
        use ExtCmd::*;
        Some(match n {
            0 => PinL1Table,
            1 => PinL2Table,
            2 => PinL3Table,
            3 => PinL4Table,
            4 => UnpinTable,
            5 => NewBaseptr,
            6 => TlbFlushLocal,
            7 => InvlpgLocal,
            8 => TlbFlushMulti,
            9 => InvlpgMulti,
            10 => TlbFlushAll,
            11 => InvlpgAll,
            15 => NewUserBaseptr,
            0x8000_0004 => PinL5Table,
            _ => return None,
        })
    }
    /// The pin command for a table of `level`.
    pub fn pin(level: crate::Level) -> ExtCmd {
        match level {
            crate::Level::L1 => ExtCmd::PinL1Table,
            crate::Level::L2 => ExtCmd::PinL2Table,
            crate::Level::L3 => ExtCmd::PinL3Table,
            crate::Level::L4 => ExtCmd::PinL4Table,
            crate::Level::L5 => ExtCmd::PinL5Table,
        }
    }
    /// The level a pin command pins at.
    pub fn pin_level(self) -> Option<crate::Level> {
        match self {
            ExtCmd::PinL1Table => Some(crate::Level::L1),
            ExtCmd::PinL2Table => Some(crate::Level::L2),
            ExtCmd::PinL3Table => Some(crate::Level::L3),
            ExtCmd::PinL4Table => Some(crate::Level::L4),
            ExtCmd::PinL5Table => Some(crate::Level::L5),
            _ => None,
        }
    }
}

/// One `mmuext_op`: `arg1` is an mfn or a linear address, `arg2` a count,
/// CPU-mask pointer or source mfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuExtOp {
    /// The command.
    pub cmd: ExtCmd,
    /// First argument.
    pub arg1: u64,
    /// Second argument.
    pub arg2: u64,
}

impl MmuExtOp {
    /// A command on an mfn.
    pub fn on(cmd: ExtCmd, mfn: Mfn) -> Self {
        MmuExtOp {
            cmd,
            arg1: mfn.0,
            arg2: 0,
        }
    }
}

/// The kind of a queued call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// `update_va_mapping`.
    UpdateVaMapping,
    /// `mmu_update` (one or more requests).
    MmuUpdate,
    /// `mmuext_op` (one or more operations).
    MmuExtOp,
}

/// One call of a batch (one multicall entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call<'a> {
    /// Change the mapping of one virtual address.
    UpdateVaMapping {
        /// The virtual address.
        va: u64,
        /// The new entry.
        pte: u64,
        /// `uvmf::*` flags.
        flags: u64,
    },
    /// Checked page-table updates.
    MmuUpdate(&'a [MmuUpdate]),
    /// Extended MMU operations.
    MmuExtOp(&'a [MmuExtOp]),
}

impl Call<'_> {
    /// The call's kind.
    pub fn kind(&self) -> CallKind {
        match self {
            Call::UpdateVaMapping { .. } => CallKind::UpdateVaMapping,
            Call::MmuUpdate(_) => CallKind::MmuUpdate,
            Call::MmuExtOp(_) => CallKind::MmuExtOp,
        }
    }
    /// How many requests the call carries.
    pub fn count(&self) -> usize {
        match self {
            Call::UpdateVaMapping { .. } => 1,
            Call::MmuUpdate(r) => r.len(),
            Call::MmuExtOp(o) => o.len(),
        }
    }
}

/// A call as a batch holds it: an `update_va_mapping`'s arguments, or a
/// run of the batch's `mmu_update` / `mmuext_op` requests. The batch keeps
/// these and hands them to [`Backend::issue`] as they are (a [`Calls`]
/// view), so a flush copies nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Queued {
    /// `update_va_mapping(va, pte, flags)`, and the label of its request.
    Uvm {
        va: u64,
        pte: u64,
        flags: u64,
        tag: u32,
    },
    /// `mmu_update` of `updates[start..start + count]`.
    Mmu { start: u16, count: u16 },
    /// `mmuext_op` of `ext[start..start + count]`.
    Ext { start: u16, count: u16 },
}

/// The calls of one batch, in order: what [`Backend::issue`] executes.
///
/// Read in place from the batch's own queue (speed: a flush builds no
/// `Call` array; keep it that way), or from a plain list of [`Call`]s
/// ([`Calls::list`]) when a caller issues calls by hand.
#[derive(Clone, Copy, Debug)]
pub struct Calls<'a> {
    repr: CallsRepr<'a>,
}

#[derive(Clone, Copy, Debug)]
enum CallsRepr<'a> {
    Queued {
        slots: &'a [Queued],
        updates: &'a [MmuUpdate],
        ext: &'a [MmuExtOp],
    },
    List(&'a [Call<'a>]),
}

impl<'a> Calls<'a> {
    /// Calls given as a list (tests, or a caller that bypasses the batch).
    pub fn list(calls: &'a [Call<'a>]) -> Self {
        Calls {
            repr: CallsRepr::List(calls),
        }
    }

    /// A batch's queue.
    #[inline]
    pub(crate) fn queued(
        slots: &'a [Queued],
        updates: &'a [MmuUpdate],
        ext: &'a [MmuExtOp],
    ) -> Self {
        Calls {
            repr: CallsRepr::Queued {
                slots,
                updates,
                ext,
            },
        }
    }

    /// How many calls.
    #[inline]
    pub fn len(&self) -> usize {
        match self.repr {
            CallsRepr::Queued { slots, .. } => slots.len(),
            CallsRepr::List(l) => l.len(),
        }
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Call `i`, if there is one.
    #[inline]
    pub fn get(&self, i: usize) -> Option<Call<'a>> {
        match self.repr {
            CallsRepr::Queued {
                slots,
                updates,
                ext,
            } => slots.get(i).map(|s| match *s {
                Queued::Uvm { va, pte, flags, .. } => Call::UpdateVaMapping { va, pte, flags },
                Queued::Mmu { start, count } => {
                    Call::MmuUpdate(&updates[start as usize..start as usize + count as usize])
                }
                Queued::Ext { start, count } => {
                    Call::MmuExtOp(&ext[start as usize..start as usize + count as usize])
                }
            }),
            CallsRepr::List(l) => l.get(i).copied(),
        }
    }

    /// The calls in order.
    #[inline]
    pub fn iter(&self) -> CallsIter<'a> {
        CallsIter {
            calls: *self,
            next: 0,
        }
    }
}

impl<'a> IntoIterator for Calls<'a> {
    type Item = Call<'a>;
    type IntoIter = CallsIter<'a>;
    fn into_iter(self) -> CallsIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Calls<'a> {
    type Item = Call<'a>;
    type IntoIter = CallsIter<'a>;
    fn into_iter(self) -> CallsIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Calls`].
#[derive(Clone, Debug)]
pub struct CallsIter<'a> {
    calls: Calls<'a>,
    next: usize,
}

impl<'a> Iterator for CallsIter<'a> {
    type Item = Call<'a>;
    #[inline]
    fn next(&mut self) -> Option<Call<'a>> {
        let c = self.calls.get(self.next)?;
        self.next += 1;
        Some(c)
    }
    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.calls.len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for CallsIter<'_> {}

/// The result of one call: `rc` is 0 or a negated errno; `done` is how many
/// of its requests took effect (all of them when `rc == 0`; processing stops
/// at the first failing request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CallResult {
    /// 0 or `-errno`.
    pub rc: i32,
    /// Requests completed.
    pub done: u32,
}

impl CallResult {
    /// Success for a call of `count` requests.
    pub fn ok(count: usize) -> Self {
        CallResult {
            rc: 0,
            done: count as u32,
        }
    }
    /// Failure with `errno` after `done` requests.
    pub fn err(errno: i32, done: usize) -> Self {
        CallResult {
            rc: -errno.abs(),
            done: done as u32,
        }
    }
}

/// Xen's errno values, as the engine reports them.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// No such entry.
    pub const ENOENT: i32 = 2;
    /// Out of memory.
    pub const ENOMEM: i32 = 12;
    /// Permission denied.
    pub const EACCES: i32 = 13;
    /// Bad address.
    pub const EFAULT: i32 = 14;
    /// Busy.
    pub const EBUSY: i32 = 16;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// Not implemented.
    pub const ENOSYS: i32 = 38;
}

/// A guest store into a table entry that the platform refused: on Xen, a
/// write to a read-only frame that is not an L1 table (a page fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreFault {
    /// The machine frame written.
    pub mfn: Mfn,
    /// The entry index.
    pub index: usize,
    /// Why, as a positive errno like every errno the engine reports
    /// (`EFAULT` for a page fault, or the emulator's refusal).
    pub errno: i32,
}

/// A hypervisor or hardware the engine drives.
///
/// `issue` receives one batch at a time (1 call: a direct hypercall; 2 or
/// more: one multicall). Its results arrive as success
/// (`CallResult::default()`, `rc == 0`); it writes the result of every
/// call that failed (writing the others too is allowed).
pub trait Backend: Send + Sync {
    /// Name for reports.
    const NAME: &'static str;
    /// Whether the platform has pinning at all. When false, pin and unpin
    /// are compiled down to the space's bookkeeping: no walk, no batch.
    const PINNING: bool;

    /// Whether the platform accepts large leaves (2 MiB / 1 GiB pages).
    /// Xen PV does not (it refuses PS in a guest's L2 and L3 entries), so
    /// `map` refuses them there with [`Error::UnsupportedPageSize`]
    /// whether or not the space is pinned: the answer must not depend on
    /// what a concurrent pin happens to have done.
    ///
    /// [`Error::UnsupportedPageSize`]: crate::Error::UnsupportedPageSize
    const LARGE_LEAVES: bool = true;

    /// The highest root level the platform can run: a space whose mode's
    /// root is above it does not compile (`AddressSpace::new` asserts it
    /// at compile time). Xen PV says [`Level::L4`](crate::Level::L4): it
    /// has no 5-level tables.
    const MAX_ROOT_LEVEL: crate::Level = crate::Level::L5;

    /// Issue one batch of calls; `results.len() == calls.len()`, every
    /// result `rc == 0` on entry (a call left so succeeded, all of its
    /// requests done).
    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]);

    /// A guest store of `value` into entry `index` of table frame `mfn`,
    /// whose memory is `slot`. On Xen a store to a pinned L1 traps and is
    /// emulated; a store to any other read-only table is a page fault.
    #[inline]
    fn store_entry(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        let _ = (mfn, index);
        slot.store(value, Ordering::Release);
        Ok(())
    }

    /// The machine frame of a guest frame (identity without a p2m).
    #[inline]
    fn pfn_to_mfn(&self, pfn: Pfn) -> Mfn {
        Mfn(pfn.0)
    }

    /// The machine frame of a guest frame, or `None` if the guest has no
    /// such frame (outside its memory, a hole of its p2m): what `map`
    /// checks before it links anything. The default accepts every frame.
    #[inline]
    fn try_pfn_to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        Some(self.pfn_to_mfn(pfn))
    }

    /// The guest frame of a machine frame, if the guest owns it.
    #[inline]
    fn mfn_to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        Some(Pfn(mfn.0))
    }

    /// The kernel virtual address of pseudo-physical frame 0 in the
    /// guest's linear map of its memory (its direct map): pin and unpin
    /// remap table frame `pfn` at `base + pfn * 4096`.
    ///
    /// `None` (the default) means the paging mode's
    /// [`PagingMode::DIRECT_MAP_BASE`](crate::PagingMode::DIRECT_MAP_BASE)
    /// (Linux's layout). A kernel whose layout is decided at run time
    /// (KASLR), or a small PV guest whose virtual addresses equal its
    /// pseudo-physical ones (base 0), returns its own base here.
    #[inline]
    fn direct_map_base(&self) -> Option<u64> {
        None
    }
}
