//! A simulated Xen hypervisor for the PV MMU interface.
//!
//! [`XenSim`] implements [`XenHypercalls`] by decoding the ABI structs and
//! enforcing the rules of docs/PROTOCOL.md §6 on per-frame state kept the
//! way Xen keeps `page->u.inuse.type_info`: one atomic word per machine
//! frame with a type, a type count, a validated bit and a pinned bit,
//! changed by compare-and-swap. There is no global lock, so threads
//! pinning different address spaces run in parallel.
//!
//! # Model
//!
//! - **Frames.** The domain owns `nr_pages` guest frames; the p2m is a seeded
//!   permutation with no fixed point (no pfn is its own mfn), so a pfn
//!   passed where an mfn belongs is caught. As Xen gives a guest its memory,
//!   it is made of contiguous extents ([`SimConfig::p2m_extent`] frames,
//!   2 MiB by default) placed in machine memory in a random order; extents
//!   of 1 frame give a fully random permutation. Table contents are read
//!   through the engine's [`TableMemory`] (pfn-indexed); frames outside it
//!   are data pages with metadata only, and cannot become page tables.
//! - **Direct map.** Each guest frame has one kernel mapping at
//!   `direct_map_base + pfn * 4096`, initially writable (so every frame
//!   starts with one writable type reference). `update_va_mapping` on it
//!   changes it, with Xen's checks; the direct map is linear, so slot `pfn`
//!   may only map `p2m[pfn]`. Other virtual addresses are not modelled
//!   (`-EINVAL`).
//! - **Types.** Rules 1–9 of docs/PROTOCOL.md §6: type changes only at
//!   count 0; writable mappings hold writable references (`-EBUSY` for a
//!   page-table frame, `-EINVAL` for typing a writable frame as a table);
//!   recursive
//!   validation with rollback (an L1 at once; an L2..L4 that fails at
//!   entry i > 0 stays partially validated until the request ends, and
//!   stays so, as in Xen 4.17, if a failed nested validation lost track of
//!   it, until a request of its type resumes it); pin/unpin/base
//!   pointers; checked
//!   `mmu_update`; the XSA-182 fast path only for A/D/NX/U/G/available bits.
//!   Large (PS) entries in L2..L4 are refused, as Xen PV does by default.
//! - **Guest stores** (rule 10): a store through a writable mapping is
//!   plain; to a read-only frame typed L1 it is emulated (validated like an
//!   `mmu_update`); to any other read-only frame it is a page fault, returned
//!   to the storing thread as `Err(StoreFault)` and counted.
//! - **TLB.** A read-only remap without a flush leaves a *stale writable TLB
//!   entry* for the frame until the next flush (`UVMF_TLB_FLUSH`,
//!   `UVMF_INVLPG` of that address, `MMUEXT_TLB_FLUSH_*`, `MMUEXT_INVLPG_*`).
//!   Like Xen's type-change TLB filter, a frame that a request names
//!   directly (the frame pinned, the base pointer loaded, the child a new
//!   entry points to) is flushed when it changes type. Frames typed deeper
//!   inside a recursive validation are not: typing one that still has a stale
//!   writable TLB entry breaks the invariant. That is exactly the case the
//!   protocol's "root remapped last, carrying the one flush" rule prevents.
//! - **Invariant**: no frame typed as a page table has a writable mapping or
//!   a stale writable TLB entry. Checked incrementally after every
//!   operation on the frames it touched; breaks are counted.
//!
//! Extras for tests: failure injection (entry `k` of trap `m` fails with an
//! errno), a busy-wait cost per trap, statistics, and queries on frames.
//!
//! # Layout
//!
//! One file per concept (loom's `src/rt/` is the model): `config` and
//! `p2m`, `stats` (the counters), `types` (the per-frame type table and
//! type references), `validate` (validation and devalidation), the PV MMU
//! operations `mmu` (`mmu_update`), `mmuext` (`mmuext_op`) and `uvm`
//! (`update_va_mapping`), `trap` (the trap entry: hypercall dispatch and
//! `multicall`) and `store` (guest stores). This file holds [`XenSim`],
//! its constructor and its queries.
//!
//! [`XenHypercalls`]: super::XenHypercalls

mod config;
mod mmu;
mod mmuext;
mod p2m;
mod stats;
mod store;
mod trap;
mod types;
mod uvm;
mod validate;

use std::cell::Cell;
use std::sync::Arc;

use pagepin_engine::{EntryFlags, PageTableEntry};
use pagepin_engine::{Mfn, Pfn, TableMemory};

// Shared state comes from the crate's sync facade (model checkers' types
// under cfg(loom) / cfg(shuttle)); table entries are the engine's memory
// and stay core atomics (`EntryWord`).
use crate::sync::{thread_local, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

use super::backend::P2m;

pub use config::SimConfig;
pub use p2m::{p2m_permutation, MIN_P2M_EXTENTS, P2M_EXTENT};
pub use stats::SimStats;
pub use trap::XEN_VERSION;
pub use types::{FrameInfo, FrameType};
pub use validate::Refusal;

use stats::{Local, Padded, Stats};
use trap::Injection;
use types::{DmSlot, FrameCold, TypeInfoTable, COUNT_MASK, PARTIAL, PINNED, VALIDATED};

thread_local! {
    static CURRENT_VCPU: Cell<usize> = const { Cell::new(0) };
}

/// Result type of internal checks: `Err(errno)` (positive).
type R<T = ()> = Result<T, i32>;

/// The simulated hypervisor.
pub struct XenSim {
    cfg: SimConfig,
    mem: Arc<dyn TableMemory>,
    p2m: Box<[u64]>,
    m2p: Box<[u64]>,
    /// Per machine frame: Xen's `type_info` (type, count, validated,
    /// pinned), the only per-frame word the per-entry reference counting
    /// of a validation reads and writes.
    type_info: TypeInfoTable,
    /// Per machine frame: stale-TLB generation and page lock.
    cold: Box<[FrameCold]>,
    dm: Box<[DmSlot]>,
    /// Per vCPU: kernel base pointer (mfn + 1, 0 none), user base pointer.
    bases: Box<[[AtomicU64; 2]]>,
    flush_gen: Padded<AtomicU64>,
    traps: Padded<AtomicU64>,
    /// Busy-wait per trap (ns), changeable at run time.
    trap_cost_ns: AtomicU64,
    stats: Stats,
    injections: Mutex<Vec<Injection>>,
    has_injections: AtomicUsize,
    /// Entries per trap, when logging is on.
    trap_log: Mutex<Vec<usize>>,
    log_traps: AtomicBool,
    /// The innermost entry refused by a validation since the last take.
    refusal: Mutex<Option<Refusal>>,
}

/// Errors constructing a simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimError {
    /// `nr_pages` is 0, above 2^32, or the table memory lies outside it.
    BadSize,
}

impl XenSim {
    /// A hypervisor for a domain of `cfg.nr_pages` frames whose table memory
    /// is `mem` (pfn-indexed; it must lie inside `0..nr_pages`).
    pub fn new(cfg: SimConfig, mem: Arc<dyn TableMemory>) -> Result<Self, SimError> {
        let n = cfg.nr_pages;
        let mem_end = mem
            .base_pfn()
            .0
            .checked_add(mem.frame_count() as u64)
            .ok_or(SimError::BadSize)?;
        if n == 0 || n as u64 > u32::MAX as u64 || mem_end > n as u64 {
            return Err(SimError::BadSize);
        }
        let p2m: Vec<u64> = if cfg.identity_p2m {
            (0..n as u64).collect()
        } else {
            p2m_permutation(n, cfg.seed, cfg.p2m_extent)
        };
        let mut m2p = vec![0u64; n];
        for (pfn, &mfn) in p2m.iter().enumerate() {
            m2p[mfn as usize] = pfn as u64;
        }
        let type_info = TypeInfoTable::new(n);
        let cold: Box<[FrameCold]> = (0..n).map(|_| FrameCold::default()).collect();
        let dm: Box<[DmSlot]> = (0..n).map(|_| DmSlot::default()).collect();
        // Every frame starts mapped writable in the direct map.
        for pfn in 0..n {
            let mfn = p2m[pfn];
            dm[pfn]
                .pte
                .store(Self::dm_entry(mfn, true), Ordering::Relaxed);
            type_info[mfn as usize].store(
                FrameType::Writable.bits() | VALIDATED | 1,
                Ordering::Relaxed,
            );
        }
        let bases = (0..cfg.vcpus.max(1))
            .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
            .collect();
        let trap_cost = cfg.trap_cost_ns;
        Ok(XenSim {
            cfg,
            mem,
            p2m: p2m.into_boxed_slice(),
            m2p: m2p.into_boxed_slice(),
            type_info,
            cold,
            dm,
            bases,
            flush_gen: Padded(AtomicU64::new(0)),
            traps: Padded(AtomicU64::new(0)),
            trap_cost_ns: AtomicU64::new(trap_cost),
            stats: Stats::default(),
            injections: Mutex::new(Vec::new()),
            has_injections: AtomicUsize::new(0),
            trap_log: Mutex::new(Vec::new()),
            log_traps: AtomicBool::new(false),
            refusal: Mutex::new(None),
        })
    }

    fn dm_entry(mfn: u64, writable: bool) -> u64 {
        let mut f =
            EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY | EntryFlags::NO_EXECUTE;
        if writable {
            f |= EntryFlags::WRITABLE;
        }
        PageTableEntry::new(mfn, f).bits()
    }

    // -- configuration and queries ------------------------------------------

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }
    /// The p2m table (`p2m[pfn] = mfn`), for the guest's [`P2m`].
    pub fn p2m_table(&self) -> &[u64] {
        &self.p2m
    }
    /// The guest's frame map, built from the p2m.
    pub fn frame_map(&self) -> P2m {
        P2m::new(self.p2m.to_vec()).unwrap_or_else(|| P2m::identity(0))
    }
    /// The mfn of `pfn`.
    pub fn mfn_of(&self, pfn: Pfn) -> Option<Mfn> {
        self.p2m.get(usize::try_from(pfn.0).ok()?).map(|&m| Mfn(m))
    }
    /// The pfn of `mfn`.
    pub fn pfn_of(&self, mfn: Mfn) -> Option<Pfn> {
        self.m2p.get(usize::try_from(mfn.0).ok()?).map(|&p| Pfn(p))
    }
    /// Set the busy-wait per trap (nanoseconds; 0 disables it), effective
    /// from the next trap. ([`Self::config`] keeps the initial cost.)
    pub fn set_trap_cost_ns(&self, ns: u64) {
        self.trap_cost_ns.store(ns, Ordering::Relaxed);
    }
    /// The busy-wait per trap now (nanoseconds).
    pub fn trap_cost_ns(&self) -> u64 {
        self.trap_cost_ns.load(Ordering::Relaxed)
    }
    /// The vCPU the calling thread runs on (for base pointers).
    pub fn set_current_vcpu(vcpu: usize) {
        CURRENT_VCPU.with(|c| c.set(vcpu));
    }
    /// Traps issued so far (the index the next one gets).
    pub fn trap_count(&self) -> u64 {
        self.traps.0.load(Ordering::Acquire)
    }
    /// Make entry `entry` of trap number `trap` (see [`Self::trap_count`];
    /// a direct hypercall has the single entry 0) fail with `errno` after
    /// `item` of its requests succeeded. The failing part has no effect.
    pub fn fail_entry(&self, trap: u64, entry: usize, item: usize, errno: i32) {
        self.injections.lock().push(Injection {
            trap,
            entry,
            item,
            errno: errno.abs(),
        });
        self.has_injections.fetch_add(1, Ordering::Release);
    }
    /// Drop pending injections.
    pub fn clear_injections(&self) {
        let mut g = self.injections.lock();
        self.has_injections.fetch_sub(g.len(), Ordering::Release);
        g.clear();
    }
    /// Start (or stop) logging how many entries each trap carries; starting
    /// clears the log.
    pub fn log_traps(&self, on: bool) {
        if on {
            self.trap_log.lock().clear();
        }
        self.log_traps.store(on, Ordering::Release);
    }
    /// Entries per trap since logging started (a direct hypercall counts 1).
    pub fn trap_log(&self) -> Vec<usize> {
        self.trap_log.lock().clone()
    }
    fn log_trap(&self, entries: usize) {
        if self.log_traps.load(Ordering::Relaxed) {
            self.trap_log.lock().push(entries);
        }
    }
    /// The first entry a table validation refused since the last call
    /// (the innermost one: a pin's failure propagates up through the
    /// parents, which are not recorded), and forget it.
    pub fn take_refusal(&self) -> Option<Refusal> {
        self.refusal.lock().take()
    }
    /// The counters.
    pub fn stats(&self) -> SimStats {
        self.stats.snapshot()
    }
    /// Reset the counters.
    pub fn reset_stats(&self) {
        self.stats.reset();
    }

    /// What the hypervisor knows about guest frame `pfn`.
    pub fn frame_info(&self, pfn: Pfn) -> Option<FrameInfo> {
        let mfn = *self.p2m.get(usize::try_from(pfn.0).ok()?)?;
        let f = self.frame(mfn).ok()?;
        let x = f.type_info.load(Ordering::Acquire);
        let pte = PageTableEntry::from_bits(self.dm[pfn.0 as usize].pte.load(Ordering::Acquire));
        Some(FrameInfo {
            pfn,
            mfn: Mfn(mfn),
            ty: FrameType::from_bits(x),
            count: (x & COUNT_MASK) as u32,
            validated: x & VALIDATED != 0,
            pinned: x & PINNED != 0,
            partial: x & PARTIAL != 0,
            direct_map_writable: pte.is_present().then_some(pte.is_writable()),
            stale_tlb: self.stale_live(f),
        })
    }

    /// The direct-map entry of guest frame `pfn` (what a guest reads in its
    /// L1 for `direct_map_base + pfn * 4096`).
    pub fn direct_map_entry(&self, pfn: Pfn) -> Option<u64> {
        let slot = self.dm.get(usize::try_from(pfn.0).ok()?)?;
        Some(slot.pte.load(Ordering::Acquire))
    }

    /// Every frame still typed as a page table.
    pub fn typed_tables(&self) -> Vec<FrameInfo> {
        (0..self.cfg.nr_pages as u64)
            .filter_map(|p| self.frame_info(Pfn(p)))
            .filter(|i| i.ty.is_table())
            .collect()
    }

    /// Every frame not at rest: at rest means mapped writable in the direct
    /// map, typed writable with exactly that one reference, not pinned.
    pub fn unquiet_frames(&self) -> Vec<FrameInfo> {
        (0..self.cfg.nr_pages as u64)
            .filter_map(|p| self.frame_info(Pfn(p)))
            .filter(|i| {
                !(i.ty == FrameType::Writable
                    && i.count == 1
                    && !i.pinned
                    && i.direct_map_writable == Some(true))
            })
            .collect()
    }

    /// Check the invariant on every frame now (a full scan, for tests):
    /// returns the frames that break it.
    pub fn check_all(&self) -> Vec<FrameInfo> {
        (0..self.cfg.nr_pages as u64)
            .filter_map(|p| self.frame_info(Pfn(p)))
            .filter(|i| i.ty.is_table() && (i.direct_map_writable == Some(true) || i.stale_tlb))
            .collect()
    }

    /// The kernel base pointer of `vcpu`.
    pub fn base_pointer(&self, vcpu: usize) -> Option<Mfn> {
        let v = self.bases.get(vcpu)?[0].load(Ordering::Acquire);
        (v != 0).then(|| Mfn(v - 1))
    }

    /// Forget every vCPU's base pointers (as if they switched to tables
    /// outside the domain), dropping their type references.
    pub fn drop_base_pointers(&self) {
        let mut l = Local::default();
        for b in self.bases.iter() {
            for slot in b {
                let old = slot.swap(0, Ordering::AcqRel);
                if old != 0 {
                    self.put_type(old - 1, &mut l);
                }
            }
        }
        self.stats.merge(&l);
    }
}
