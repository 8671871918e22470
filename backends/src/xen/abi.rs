//! The Xen PV MMU hypercall ABI (x86-64), as `#[repr(C)]` structs and
//! constants (docs/PROTOCOL.md §5; public headers `xen/include/public/xen.h`,
//! `errno.h`).
//!
//! Layouts are checked at compile time: a mismatch is a build error, not a
//! guest that corrupts hypervisor arguments.

use core::mem::{offset_of, size_of};

/// Hypercall numbers.
pub mod hypercall {
    /// `mmu_update(reqs, count, pdone, domid)`.
    pub const MMU_UPDATE: u64 = 1;
    /// `multicall(entries, count)`.
    pub const MULTICALL: u64 = 13;
    /// `update_va_mapping(va, pte, flags)`.
    pub const UPDATE_VA_MAPPING: u64 = 14;
    /// `xen_version(cmd, arg)`.
    pub const XEN_VERSION: u64 = 17;
    /// `vm_assist(cmd, type)`.
    pub const VM_ASSIST: u64 = 21;
    /// `mmuext_op(ops, count, pdone, domid)`.
    pub const MMUEXT_OP: u64 = 26;
}

/// The calling domain, as a `domid` argument.
pub const DOMID_SELF: u16 = 0x7FF0;

/// Xen's errno values (returned negated).
pub use pagepin_engine::errno;

/// One entry of a `multicall` hypercall: the hypercall number, its result
/// (written by Xen: 0 or a negated errno), and up to six arguments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MulticallEntry {
    /// Hypercall number ([`hypercall`]).
    pub op: u64,
    /// Result, written by the hypervisor.
    pub result: u64,
    /// Arguments, as the direct hypercall would take them.
    pub args: [u64; 6],
}

/// One `mmu_update` request: machine address of the entry with the
/// sub-command in its low two bits, and the new value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuUpdateAbi {
    /// Machine address of the entry | sub-command.
    pub ptr: u64,
    /// New value.
    pub val: u64,
}

/// One `mmuext_op` (x86-64 layout: `cmd` is a 32-bit field, padded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmuExtOpAbi {
    /// Command number (`MMUEXT_*`).
    pub cmd: u32,
    /// Padding to the 8-byte alignment of `arg1`; always 0.
    pub _pad: u32,
    /// An mfn or a linear address.
    pub arg1: u64,
    /// A count, a CPU-mask pointer or a source mfn.
    pub arg2: u64,
}

const _: () = assert!(size_of::<MulticallEntry>() == 64);
const _: () = assert!(offset_of!(MulticallEntry, op) == 0);
const _: () = assert!(offset_of!(MulticallEntry, result) == 8);
const _: () = assert!(offset_of!(MulticallEntry, args) == 16);
const _: () = assert!(size_of::<MmuUpdateAbi>() == 16);
const _: () = assert!(offset_of!(MmuUpdateAbi, ptr) == 0);
const _: () = assert!(offset_of!(MmuUpdateAbi, val) == 8);
const _: () = assert!(size_of::<MmuExtOpAbi>() == 24);
const _: () = assert!(offset_of!(MmuExtOpAbi, cmd) == 0);
const _: () = assert!(offset_of!(MmuExtOpAbi, arg1) == 8);
const _: () = assert!(offset_of!(MmuExtOpAbi, arg2) == 16);

impl From<pagepin_engine::MmuUpdate> for MmuUpdateAbi {
    #[inline]
    fn from(u: pagepin_engine::MmuUpdate) -> Self {
        MmuUpdateAbi {
            ptr: u.ptr,
            val: u.val,
        }
    }
}

impl From<pagepin_engine::MmuExtOp> for MmuExtOpAbi {
    #[inline]
    fn from(o: pagepin_engine::MmuExtOp) -> Self {
        MmuExtOpAbi {
            cmd: o.cmd as u32,
            _pad: 0,
            arg1: o.arg1,
            arg2: o.arg2,
        }
    }
}

/// A hypercall result (`long`, 0 or `-errno`) as the engine's `i32`;
/// values outside `i32` (never produced by Xen) become `-EINVAL`.
#[inline]
pub fn rc_of(raw: i64) -> i32 {
    i32::try_from(raw).unwrap_or(-errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_offsets() {
        assert_eq!(size_of::<MulticallEntry>(), 64);
        assert_eq!(offset_of!(MulticallEntry, args), 16);
        assert_eq!(size_of::<MmuUpdateAbi>(), 16);
        assert_eq!(size_of::<MmuExtOpAbi>(), 24);
        assert_eq!(offset_of!(MmuExtOpAbi, arg1), 8);
        assert_eq!(offset_of!(MmuExtOpAbi, arg2), 16);
        assert_eq!(rc_of(-22), -22);
        assert_eq!(rc_of(i64::MIN), -errno::EINVAL);
    }
}
