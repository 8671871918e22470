//! The trap entry: a trap's cost, log and failure injection, decoding the
//! guest's request arrays, and the [`XenHypercalls`] implementation
//! (hypercall dispatch and `multicall`).

use std::time::{Duration, Instant};

use pagepin_engine::Mfn;
use pagepin_engine::{errno, StoreFault};

use crate::sync::Ordering;
use core::sync::atomic::AtomicU64 as EntryWord;

use crate::xen::abi::{hypercall, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, DOMID_SELF};
use crate::xen::XenHypercalls;

use super::stats::Local;
use super::{XenSim, R};

/// What `xen_version(XENVER_version)` answers: the Xen the simulator
/// models (4.17).
pub const XEN_VERSION: i64 = (4 << 16) | 17;

#[derive(Clone, Copy, Debug)]
pub(super) struct Injection {
    pub(super) trap: u64,
    pub(super) entry: usize,
    pub(super) item: usize,
    pub(super) errno: i32,
}

impl XenSim {
    fn trap_begin(&self) -> u64 {
        let cost = self.trap_cost_ns.load(Ordering::Relaxed);
        if cost != 0 {
            let until = Instant::now() + Duration::from_nanos(cost);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        self.traps.0.fetch_add(1, Ordering::AcqRel)
    }

    /// One direct (non-multicall) hypercall: a trap with its cost, log
    /// entry, injection and counters around `op`.
    fn direct_trap(&self, op: impl FnOnce(Option<Injection>, &mut Local) -> i64) -> i64 {
        let trap = self.trap_begin();
        self.log_trap(1);
        let mut l = Local {
            hypercalls: 1,
            ..Local::default()
        };
        let rc = op(self.injection(trap, 0), &mut l);
        self.stats.merge(&l);
        rc
    }

    pub(super) fn injection(&self, trap: u64, entry: usize) -> Option<Injection> {
        if self.has_injections.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut g = self.injections.lock();
        let i = g.iter().position(|j| j.trap == trap && j.entry == entry)?;
        self.has_injections.fetch_sub(1, Ordering::Release);
        Some(g.swap_remove(i))
    }
}

impl XenSim {
    /// Run `count` requests through `one`, stopping at the first failure;
    /// with an injection, `item` requests run and then the call fails.
    fn run_many<T: Copy>(
        &self,
        reqs: &[T],
        inj: Option<Injection>,
        l: &mut Local,
        mut one: impl FnMut(&Self, T, &mut Local) -> R,
    ) -> (i64, u32) {
        let limit = inj.map_or(reqs.len(), |j| j.item.min(reqs.len()));
        for (i, &r) in reqs.iter().enumerate().take(limit) {
            let res = one(self, r, l);
            // Xen tears down a failed validation's table before the next
            // request (or the return to the guest).
            self.put_old_guest_table(l);
            if let Err(e) = res {
                l.errors += 1;
                return (-(e as i64), i as u32);
            }
        }
        match inj {
            Some(j) => {
                l.injected += 1;
                l.errors += 1;
                (-(j.errno as i64), limit as u32)
            }
            None => (0, reqs.len() as u32),
        }
    }

    /// # Safety
    /// `reqs`/`count`/`done` as for [`XenHypercalls::mmu_update`].
    unsafe fn mmu_update_inner(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
        inj: Option<Injection>,
        l: &mut Local,
    ) -> i64 {
        let before = l.table_entry_updates;
        // SAFETY: forwarded contract.
        let rc = unsafe {
            self.run_array(reqs, count, done, domid, inj, l, |s, r, l| {
                s.do_mmu_update(r, l)
            })
        };
        // Xen flushes the TLB after a call that changed an L2..L4 entry
        // (linear page tables may map it).
        if self.cfg.exact_tlb && l.table_entry_updates != before {
            self.flush_all(l);
        }
        rc
    }

    /// # Safety
    /// `ops`/`count`/`done` as for [`XenHypercalls::mmuext_op`].
    unsafe fn mmuext_inner(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
        inj: Option<Injection>,
        l: &mut Local,
    ) -> i64 {
        // SAFETY: forwarded contract.
        unsafe { self.run_array(ops, count, done, domid, inj, l, |s, o, l| s.do_mmuext(o, l)) }
    }

    /// Decode a guest request array (`mmu_update` / `mmuext_op`), run it
    /// until the first failure, and write back how many requests were done.
    ///
    /// # Safety
    /// `items` must be valid for reading `count` requests (or `count` 0),
    /// and `done` null or valid for a write, for the call's duration.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_array<T: Copy>(
        &self,
        items: *const T,
        count: usize,
        done: *mut u32,
        domid: u16,
        inj: Option<Injection>,
        l: &mut Local,
        op: impl FnMut(&Self, T, &mut Local) -> R,
    ) -> i64 {
        if domid != DOMID_SELF || (items.is_null() && count != 0) {
            l.errors += 1;
            return -(errno::EINVAL as i64);
        }
        let slice = if count == 0 {
            &[][..]
        } else {
            // SAFETY: the caller guarantees `count` readable requests.
            unsafe { std::slice::from_raw_parts(items, count) }
        };
        let (rc, n) = self.run_many(slice, inj, l, op);
        if !done.is_null() {
            // SAFETY: the caller guarantees `done` is null or writable.
            unsafe { done.write(n) };
        }
        rc
    }

    fn uvm_inner(
        &self,
        va: u64,
        pte: u64,
        flags: u64,
        inj: Option<Injection>,
        l: &mut Local,
    ) -> i64 {
        if let Some(j) = inj {
            l.uvm += 1;
            l.injected += 1;
            l.errors += 1;
            return -(j.errno as i64);
        }
        match self.do_uvm(va, pte, flags, l) {
            Ok(()) => 0,
            Err(e) => {
                l.errors += 1;
                -(e as i64)
            }
        }
    }
}

impl XenHypercalls for XenSim {
    unsafe fn multicall(&self, entries: *mut MulticallEntry, count: usize) -> i64 {
        let trap = self.trap_begin();
        self.log_trap(count);
        let mut l = Local {
            hypercalls: 1,
            multicalls: 1,
            ..Local::default()
        };
        if entries.is_null() && count != 0 {
            l.errors += 1;
            self.stats.merge(&l);
            return -(errno::EFAULT as i64);
        }
        for i in 0..count {
            // SAFETY: the caller guarantees `count` valid entries at
            // `entries`, not accessed by anyone else during the call.
            let e = unsafe { &mut *entries.add(i) };
            l.multicall_entries += 1;
            let inj = self.injection(trap, i);
            let a = e.args;
            let rc = match e.op {
                hypercall::UPDATE_VA_MAPPING => self.uvm_inner(a[0], a[1], a[2], inj, &mut l),
                // SAFETY: the entry's pointer arguments satisfy the direct
                // hypercall's contract (the caller's obligation).
                hypercall::MMU_UPDATE => unsafe {
                    self.mmu_update_inner(
                        a[0] as *const MmuUpdateAbi,
                        a[1] as usize,
                        a[2] as *mut u32,
                        a[3] as u16,
                        inj,
                        &mut l,
                    )
                },
                // SAFETY: as above.
                hypercall::MMUEXT_OP => unsafe {
                    self.mmuext_inner(
                        a[0] as *const MmuExtOpAbi,
                        a[1] as usize,
                        a[2] as *mut u32,
                        a[3] as u16,
                        inj,
                        &mut l,
                    )
                },
                // `xen_version(XENVER_version, NULL)`: the version modelled.
                hypercall::XEN_VERSION if a[0] == 0 => XEN_VERSION,
                // A multicall inside a multicall: refused (real Xen 4.17).
                hypercall::MULTICALL => {
                    l.errors += 1;
                    -(errno::EINVAL as i64)
                }
                _ => {
                    l.errors += 1;
                    -(errno::ENOSYS as i64)
                }
            };
            e.result = rc as u64;
        }
        self.stats.merge(&l);
        0
    }

    unsafe fn mmu_update(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: forwarded contract.
        self.direct_trap(|inj, l| unsafe {
            self.mmu_update_inner(reqs, count, done, domid, inj, l)
        })
    }

    unsafe fn mmuext_op(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: forwarded contract.
        self.direct_trap(|inj, l| unsafe { self.mmuext_inner(ops, count, done, domid, inj, l) })
    }

    fn update_va_mapping(&self, va: u64, pte: u64, flags: u64) -> i64 {
        self.direct_trap(|inj, l| self.uvm_inner(va, pte, flags, inj, l))
    }

    fn guest_store(
        &self,
        slot: &EntryWord,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        let mut l = Local::default();
        let r = self.store(slot, mfn, index, value, &mut l);
        if r.is_err() || l.emulated_stores != 0 {
            self.stats.merge(&l);
        } else {
            // Plain stores are the hot path: count them without touching
            // the other counters.
            self.stats
                .shard()
                .plain_stores
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}
