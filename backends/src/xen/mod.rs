//! The Xen PV backend: the hypercall ABI, the [`XenHypercalls`] trap
//! interface a kernel implements with its hypercall page, the
//! [`XenBackend`] that encodes the engine's batches into multicalls, and
//! (with `std`) [`sim::XenSim`], a simulated hypervisor that enforces Xen's
//! PV MMU rules (docs/PROTOCOL.md §6) so the engine can be tested without Xen.
//!
//! The ABI and the backend use only `core` and `alloc`, so the same code
//! can run inside a `no_std` PV guest.

pub mod abi;
pub mod backend;
#[cfg(feature = "std")]
mod env;
#[cfg(feature = "std")]
pub mod sim;

use pagepin_engine::Mfn;
use pagepin_engine::StoreFault;

use core::sync::atomic::AtomicU64;

pub use abi::{MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, DOMID_SELF};
pub use backend::{FrameMap, P2m, Scratch, XenBackend};
#[cfg(feature = "std")]
pub use env::{xen_env, xen_env_with, XenEnv};
#[cfg(feature = "std")]
pub use sim::{
    p2m_permutation, FrameInfo, FrameType, SimConfig, SimStats, XenSim, MIN_P2M_EXTENTS, P2M_EXTENT,
};

/// The hypervisor's trap interface: what a PV kernel reaches through its
/// hypercall page (or `syscall` on 64-bit PV), and what the simulator
/// implements.
///
/// Results are Xen's: 0 or a negated errno.
pub trait XenHypercalls: Send + Sync {
    /// `multicall(entries, count)`: run each entry in order, writing its
    /// `result`; a failing entry does not stop the others.
    ///
    /// # Safety
    /// `entries` must point to `count` initialised [`MulticallEntry`]s that
    /// stay valid and are not accessed by anyone else for the duration of
    /// the call. Every pointer argument inside an entry must satisfy the
    /// `# Safety` contract of the direct hypercall it encodes.
    unsafe fn multicall(&self, entries: *mut MulticallEntry, count: usize) -> i64;

    /// `mmu_update(reqs, count, pdone, domid)`: checked entry updates,
    /// stopping at the first failure; `*pdone` receives how many succeeded.
    ///
    /// # Safety
    /// `reqs` must point to `count` readable [`MmuUpdateAbi`]s; `done` must
    /// be null or point to a writable `u32`; neither may be accessed by
    /// anyone else during the call.
    unsafe fn mmu_update(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64;

    /// `mmuext_op(ops, count, pdone, domid)`: extended MMU operations,
    /// stopping at the first failure; `*pdone` receives how many succeeded.
    ///
    /// # Safety
    /// As for [`Self::mmu_update`], with `ops` pointing to `count`
    /// [`MmuExtOpAbi`]s.
    unsafe fn mmuext_op(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64;

    /// `update_va_mapping(va, pte, flags)`: change the mapping of one
    /// virtual address; flush flags apply only if it succeeded.
    fn update_va_mapping(&self, va: u64, pte: u64, flags: u64) -> i64;

    /// A plain guest store of `value` into entry `index` of table frame
    /// `mfn`, whose memory is `slot`. A real kernel just stores (Xen traps a
    /// store to a read-only page and emulates it if the page is a typed L1,
    /// or delivers a page fault); the simulator decides which.
    fn guest_store(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault>;
}

impl<T: XenHypercalls + ?Sized> XenHypercalls for alloc::sync::Arc<T> {
    unsafe fn multicall(&self, entries: *mut MulticallEntry, count: usize) -> i64 {
        // SAFETY: forwarded: the caller upholds the same contract.
        unsafe { (**self).multicall(entries, count) }
    }
    unsafe fn mmu_update(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: forwarded: the caller upholds the same contract.
        unsafe { (**self).mmu_update(reqs, count, done, domid) }
    }
    unsafe fn mmuext_op(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: forwarded: the caller upholds the same contract.
        unsafe { (**self).mmuext_op(ops, count, done, domid) }
    }
    fn update_va_mapping(&self, va: u64, pte: u64, flags: u64) -> i64 {
        (**self).update_va_mapping(va, pte, flags)
    }
    fn guest_store(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        (**self).guest_store(slot, mfn, index, value)
    }
}
