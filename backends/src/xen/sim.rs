//! A simulated Xen hypervisor for the PV MMU interface.
//!
//! [`XenSim`] implements [`XenHypercalls`] by decoding the ABI structs and
//! enforcing the rules of DESIGN §6 on per-frame state kept the way Xen keeps
//! `page->u.inuse.type_info`: one atomic word per machine frame with a type,
//! a type count, a validated bit and a pinned bit, changed by
//! compare-and-swap. There is no global lock, so threads pinning different
//! address spaces run in parallel.
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
//! - **Types.** Rules 1–9 of DESIGN §6: type changes only at count 0;
//!   writable mappings hold writable references (`-EBUSY` for a page-table
//!   frame, `-EINVAL` for typing a writable frame as a table); recursive
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

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagepin_engine::backend::{errno, mmu_cmd, uvmf, ExtCmd, StoreFault};
use pagepin_engine::entry::{EntryFlags, PageTableEntry};
use pagepin_engine::frame::{FrameStore, Mfn, Pfn, TableMemory, ENTRIES_PER_FRAME};
use pagepin_engine::lock::RawLock;
use pagepin_engine::mode::{Level, PagingMode};

// Shared state comes from the crate's sync facade (model checkers' types
// under cfg(loom) / cfg(shuttle)); table entries are the engine's memory
// and stay core atomics (`EntryWord`).
use crate::sync::{backoff, thread_local, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use core::sync::atomic::AtomicU64 as EntryWord;

use super::abi::{hypercall, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, DOMID_SELF};
use super::backend::{P2m, XenBackend};
use super::XenHypercalls;

// ---------------------------------------------------------------------------
// type_info layout

const COUNT_MASK: u64 = 0xffff_ffff;
const TYPE_SHIFT: u32 = 32;
const TYPE_MASK: u64 = 0x7 << TYPE_SHIFT;
const VALIDATED: u64 = 1 << 40;
const PINNED: u64 = 1 << 41;
/// Xen's `PGT_partial`: a validation failed partway and the entries before
/// the failing one still hold their references (count 1, not validated),
/// until the request ends (Xen's `old_guest_table`) or, if Xen lost track
/// of the frame, until a later request of the same type resumes it.
const PARTIAL: u64 = 1 << 42;

/// How many entries ahead of the one being checked a (de)validation
/// prefetches the referenced frame's `type_info`.
const PREFETCH_AHEAD: usize = 16;

/// A frame's type (Xen's `PGT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// No type (count 0).
    None = 0,
    /// Mapped writable somewhere.
    Writable = 1,
    /// An L1 page table.
    L1 = 2,
    /// An L2 page table.
    L2 = 3,
    /// An L3 page table.
    L3 = 4,
    /// An L4 page table.
    L4 = 5,
}

impl FrameType {
    fn from_bits(x: u64) -> FrameType {
        match (x & TYPE_MASK) >> TYPE_SHIFT {
            1 => FrameType::Writable,
            2 => FrameType::L1,
            3 => FrameType::L2,
            4 => FrameType::L3,
            5 => FrameType::L4,
            _ => FrameType::None,
        }
    }
    fn bits(self) -> u64 {
        (self as u64) << TYPE_SHIFT
    }
    /// The page-table type of `level`.
    pub fn table(level: Level) -> FrameType {
        match level {
            Level::L1 => FrameType::L1,
            Level::L2 => FrameType::L2,
            Level::L3 => FrameType::L3,
            // Xen has no 5-level type; a 5-level space never reaches a Xen
            // backend (refused at compile time).
            Level::L4 | Level::L5 => FrameType::L4,
        }
    }
    /// The level, if this is a page-table type.
    pub fn level(self) -> Option<Level> {
        match self {
            FrameType::L1 => Some(Level::L1),
            FrameType::L2 => Some(Level::L2),
            FrameType::L3 => Some(Level::L3),
            FrameType::L4 => Some(Level::L4),
            _ => None,
        }
    }
    /// Whether this is a page-table type.
    pub fn is_table(self) -> bool {
        self.level().is_some()
    }
}

/// Bits that may change on the `mmu_update` fast path (XSA-182): accessed,
/// dirty, NX, user, global and the software-available bits (9..=11 and
/// all of 52..=62, Xen's `_PAGE_AVAIL_HIGH`).
const FAST_PATH_BITS: u64 = EntryFlags::ACCESSED.bits()
    | EntryFlags::DIRTY.bits()
    | EntryFlags::NO_EXECUTE.bits()
    | EntryFlags::USER.bits()
    | EntryFlags::GLOBAL.bits()
    | EntryFlags::AVAILABLE.bits()
    | (0x7ff << 52);

/// Flags a guest may set in any entry: Xen's `base_disallow_mask`
/// complement (P, RW, U, A, D, available bits 9..=11 and 52..=62, NX).
const BASE_ALLOWED: u64 = EntryFlags::PRESENT.bits()
    | EntryFlags::WRITABLE.bits()
    | EntryFlags::USER.bits()
    | EntryFlags::ACCESSED.bits()
    | EntryFlags::DIRTY.bits()
    | (0b111 << 9)
    | (0x7ff << 52)
    | EntryFlags::NO_EXECUTE.bits();
/// Cache attributes (PWT, PCD, PAT): in L1 entries only for a domain with
/// I/O resources (Xen's `l1_disallow_mask`).
const CACHE_ATTRS: u64 =
    EntryFlags::PWT.bits() | EntryFlags::PCD.bits() | EntryFlags::PAT_4K.bits();
/// Bits an L1 entry may carry besides its frame (Xen's `L1_DISALLOW_MASK`
/// complement: GLOBAL allowed), without I/O resources. Bit 62 included:
/// real Xen 4.17 (64-bit PV) accepts it in an L1 entry (differential
/// programs, `tests/xen_sim_regressions.rs`).
const L1_ALLOWED: u64 = BASE_ALLOWED | EntryFlags::GLOBAL.bits();
/// What `xen_version(XENVER_version)` answers: the Xen the simulator
/// models (4.17).
pub const XEN_VERSION: i64 = (4 << 16) | 17;
/// `EOPNOTSUPP`: Xen 4.17's answer to MMUEXT_MARK_SUPER / UNMARK_SUPER.
const EOPNOTSUPP: i32 = 95;
/// Largest LDT (entries) `MMUEXT_SET_LDT` accepts.
const LDT_ENTRIES_MAX: u64 = 8192;

/// Whether `p` is a canonical x86-64 address (bits 63..47 all equal).
/// The simulator cannot check that a guest pointer is mapped: a vCPU-mask
/// pointer is refused (`-EFAULT`) only when no guest could pass it.
fn canonical(p: u64) -> bool {
    let top = p >> 47;
    top == 0 || top == 0x1_ffff
}
/// Bits an L2..L4 entry may carry besides its frame: no PWT, PCD, PS, G.
const TABLE_ALLOWED: u64 = BASE_ALLOWED;
/// Bits a PAE root (L3) entry may carry: present, PWT, PCD, available.
const PAE_ROOT_ALLOWED: u64 =
    EntryFlags::PRESENT.bits() | EntryFlags::PWT.bits() | EntryFlags::PCD.bits() | ((0b111) << 9);

// ---------------------------------------------------------------------------
// configuration

/// Default frames per p2m extent ([`SimConfig::p2m_extent`]): 2 MiB, a
/// superpage, the unit Xen prefers when it populates a guest.
pub const P2M_EXTENT: usize = 512;

/// Fewest extents a domain's p2m is cut into ([`SimConfig::p2m_extent`]).
pub const MIN_P2M_EXTENTS: usize = 64;

/// The p2m of a domain of `n` frames (`p2m[pfn] = mfn`): extents of
/// `extent` frames (shrunk to a power of two for a small domain, see
/// [`SimConfig::p2m_extent`]), machine-contiguous, placed in the order of
/// a uniformly random single cycle over the extents (Sattolo's algorithm,
/// seeded), so no extent, and hence no frame, is at its own place. With
/// `extent` 1 this is a random single n-cycle over the frames, the same
/// for a seed as the simulator's earlier fully random p2m.
pub fn p2m_permutation(n: usize, seed: u64, extent: usize) -> Vec<u64> {
    let mut e = extent.max(1);
    while e > 1 && n.div_ceil(e) < MIN_P2M_EXTENTS {
        e = (e.next_power_of_two() / 2).max(1);
    }
    let runs = n.div_ceil(e);
    // place[k]: position of extent k in machine memory.
    let mut place: Vec<usize> = (0..runs).collect();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    for i in (1..runs).rev() {
        let j = (splitmix(&mut rng) % i as u64) as usize;
        place.swap(i, j);
    }
    // Machine start of each extent: the lengths of the extents placed
    // before it (only the last extent may be short).
    let len = |k: usize| if k + 1 == runs { n - k * e } else { e };
    let mut at = vec![0usize; runs];
    for (k, &p) in place.iter().enumerate() {
        at[p] = k;
    }
    let mut start = vec![0u64; runs];
    let mut m = 0u64;
    for &k in &at {
        start[k] = m;
        m += len(k) as u64;
    }
    (0..n)
        .map(|pfn| start[pfn / e] + (pfn % e) as u64)
        .collect()
}

/// How the simulated hypervisor is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Guest frames the domain owns (pfns `0..nr_pages`).
    pub nr_pages: usize,
    /// Seed of the p2m permutation.
    pub seed: u64,
    /// Level of a root table (L4 on x86-64, L3 on PAE).
    pub root_level: Level,
    /// Entries of a root table that Xen validates (512, or 4 on PAE).
    pub root_entries: usize,
    /// Root slots that belong to the hypervisor (x86-64: 256..272): not
    /// validated, not writable by the guest.
    pub hypervisor_hole: Range<usize>,
    /// Virtual address of pfn 0 in the guest's direct map.
    pub direct_map_base: u64,
    /// Busy-wait per trap, in nanoseconds (0: none).
    pub trap_cost_ns: u64,
    /// Virtual CPUs (each has a base pointer and a user base pointer).
    pub vcpus: usize,
    /// Frames per p2m extent: guest frames `k * p2m_extent..` are one
    /// machine-contiguous run, and the runs are placed in machine memory
    /// in a seeded random order with no run at its own place (so no pfn is
    /// its own mfn). 1: every frame placed at random (a uniformly random
    /// single cycle). A domain of fewer than [`MIN_P2M_EXTENTS`] extents
    /// uses the largest power-of-two extent that gives it that many, so a
    /// small (test) domain stays finely scrambled.
    pub p2m_extent: usize,
    /// Identity p2m (pfn = mfn) instead of the seeded permutation: for
    /// tables whose frame numbers come from elsewhere (a memory dump).
    pub identity_p2m: bool,
    /// The domain has I/O resources (dom0, passthrough): cache attributes
    /// are allowed in L1 entries and L1 entries may map [`Self::io_frames`].
    pub io_privileged: bool,
    /// Machine frames below `nr_pages` that are not the domain's RAM (MMIO,
    /// holes): an L1 entry mapping one is `-EPERM` without
    /// [`Self::io_privileged`] and takes no reference with it.
    pub io_frames: Vec<Range<u64>>,
    /// Xen's TLB exactly, as the differential programs see it on real Xen
    /// (`tests/real_xen_diff.rs`): a guest store through a stale writable
    /// TLB entry is a plain write; every type change flushes the TLB when
    /// the frame's last use is newer than the last flush (Xen's
    /// `tlbflush_filter`), at any depth of a validation; `NEW_BASEPTR`
    /// and an `mmu_update` that changed an L2..L4 entry flush. Off (the
    /// default), the model is stricter than Xen for the protocol's sake: a
    /// store into a read-only frame that is not an L1 faults even with a
    /// stale TLB entry, and a frame typed deep inside a validation while
    /// a stale writable TLB entry survives counts as an invariant break.
    pub exact_tlb: bool,
    /// What validating an L4 writes into its hypervisor slots (Xen's
    /// `init_xen_l4_slots`): `Some(list)` rewrites every slot of
    /// [`Self::hypervisor_hole`], with `(slot, frame, flags)` for those
    /// that are present (`frame` `None`: the L4 itself, the linear slot)
    /// and 0 for the others; `None` leaves them.
    pub l4_xen_slots: Option<Vec<(usize, Option<u64>, u64)>>,
}

impl SimConfig {
    /// The configuration for paging mode `M`.
    pub fn for_mode<M: PagingMode>(nr_pages: usize, seed: u64) -> Self {
        SimConfig {
            nr_pages,
            seed,
            root_level: M::ROOT_LEVEL,
            root_entries: M::ROOT_ENTRIES,
            hypervisor_hole: M::HYPERVISOR_HOLE,
            direct_map_base: M::DIRECT_MAP_BASE,
            trap_cost_ns: 0,
            vcpus: 4,
            p2m_extent: P2M_EXTENT,
            identity_p2m: false,
            io_privileged: false,
            io_frames: Vec::new(),
            exact_tlb: false,
            l4_xen_slots: None,
        }
    }
}

// ---------------------------------------------------------------------------
// statistics

macro_rules! counters {
    ($( $(#[$m:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of the simulator's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct SimStats {
            $( $(#[$m])* pub $name: u64, )*
            /// `mmuext_op` operations by command number (0..16).
            pub ext_cmds: [u64; 16],
            /// `PIN_Lx_TABLE` operations that succeeded, by level (index 0 = L1).
            pub pins: [u64; 4],
        }

        #[derive(Default)]
        struct Local {
            $( $name: u64, )*
            ext_cmds: [u64; 16],
            pins: [u64; 4],
            /// Xen's `old_guest_table` of the request in progress: the
            /// table a failed validation left [`PARTIAL`], torn down when
            /// the request ends.
            ogt: Option<u64>,
        }

        #[derive(Default)]
        struct Counters {
            $( $name: AtomicU64, )*
            ext_cmds: [AtomicU64; 16],
            pins: [AtomicU64; 4],
        }

        impl SimStats {
            fn add(&mut self, o: &SimStats) {
                $( self.$name += o.$name; )*
                for (a, v) in self.ext_cmds.iter_mut().zip(o.ext_cmds) {
                    *a += v;
                }
                for (a, v) in self.pins.iter_mut().zip(o.pins) {
                    *a += v;
                }
            }
        }

        impl Counters {
            fn merge(&self, l: &Local) {
                $( if l.$name != 0 { self.$name.fetch_add(l.$name, Ordering::Relaxed); } )*
                for (a, v) in self.ext_cmds.iter().zip(l.ext_cmds) {
                    if v != 0 { a.fetch_add(v, Ordering::Relaxed); }
                }
                for (a, v) in self.pins.iter().zip(l.pins) {
                    if v != 0 { a.fetch_add(v, Ordering::Relaxed); }
                }
            }
            fn snapshot(&self) -> SimStats {
                SimStats {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    ext_cmds: core::array::from_fn(|i| self.ext_cmds[i].load(Ordering::Relaxed)),
                    pins: core::array::from_fn(|i| self.pins[i].load(Ordering::Relaxed)),
                }
            }
            fn reset(&self) {
                $( self.$name.store(0, Ordering::Relaxed); )*
                for a in &self.ext_cmds { a.store(0, Ordering::Relaxed); }
                for a in &self.pins { a.store(0, Ordering::Relaxed); }
            }
        }
    };
}

counters! {
    /// Traps into the hypervisor by hypercall (direct calls and multicalls).
    hypercalls,
    /// `multicall` hypercalls.
    multicalls,
    /// Entries run inside multicalls.
    multicall_entries,
    /// `update_va_mapping` calls (direct or in a multicall).
    uvm,
    /// `mmu_update` requests.
    mmu_update_reqs,
    /// `mmuext_op` operations.
    mmuext_ops,
    /// `MMUEXT_UNPIN_TABLE` operations that succeeded.
    unpins,
    /// TLB flushes (whole-TLB flushes and single-address invalidations).
    tlb_flushes,
    /// Flushes Xen's type-change filter made for a frame a request named.
    filter_flushes,
    /// Guest stores emulated (read-only L1 frames).
    emulated_stores,
    /// Plain guest stores (writable mappings).
    plain_stores,
    /// Guest stores that faulted.
    faults,
    /// Table validations (a frame becoming a validated page table).
    validations,
    /// Table devalidations (a page table's type count reaching 0).
    devalidations,
    /// Entry updates that took the fast path (only A/D/NX/U/G/avail changed).
    fast_path_updates,
    /// Entry updates that took the full revalidation path.
    full_updates,
    /// L2..L4 entries `mmu_update` changed (Xen flushes the TLB after such
    /// a call, [`SimConfig::exact_tlb`]).
    table_entry_updates,
    /// Linear page-table entries accepted (an L2..L4 entry mapping a table
    /// of its own level read-only).
    linear_entries,
    /// Validations that failed partway and left the table partially
    /// validated (Xen's `PGT_partial`; torn down when the request ends).
    partial_validations,
    /// Partially validated tables Xen 4.17 loses track of (a failed nested
    /// validation overwrote its `old_guest_table`): they keep their
    /// references until a request of their type resumes them.
    lost_partials,
    /// Calls or requests that returned an error.
    errors,
    /// Failures injected.
    injected,
    /// Invariant breaks: a page-table frame with a writable mapping or a
    /// stale writable TLB entry.
    invariant_breaks,
    /// Type references dropped that were never taken (a table whose memory
    /// changed without the hypervisor, or a simulator bug).
    refcount_errors,
}

/// Counter shards: each thread adds to its own (cache-line aligned) shard,
/// so threads trapping in parallel do not contend on the counters.
#[cfg(not(any(loom, shuttle)))]
const SHARDS: usize = 8;
/// Under a model checker: one shard (no thread-local shard index).
#[cfg(any(loom, shuttle))]
const SHARDS: usize = 1;

#[repr(align(128))]
#[derive(Default)]
struct Shard(Counters);

/// A value on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Default)]
struct Stats {
    shards: [Shard; SHARDS],
}

#[cfg(not(any(loom, shuttle)))]
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

#[cfg(not(any(loom, shuttle)))]
std::thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

impl Stats {
    #[cfg(not(any(loom, shuttle)))]
    fn shard(&self) -> &Counters {
        &self.shards[SHARD.with(|s| *s)].0
    }
    #[cfg(any(loom, shuttle))]
    fn shard(&self) -> &Counters {
        &self.shards[0].0
    }
    fn merge(&self, l: &Local) {
        self.shard().merge(l);
    }
    fn snapshot(&self) -> SimStats {
        let mut t = SimStats::default();
        for sh in &self.shards {
            t.add(&sh.0.snapshot());
        }
        t
    }
    fn reset(&self) {
        for sh in &self.shards {
            sh.0.reset();
        }
    }
}

// ---------------------------------------------------------------------------
// per-frame state

/// What a frame looks like to the hypervisor (see [`XenSim::frame_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// The guest frame.
    pub pfn: Pfn,
    /// The machine frame.
    pub mfn: Mfn,
    /// The frame's type.
    pub ty: FrameType,
    /// Its type count.
    pub count: u32,
    /// Whether it is validated (always, for a typed frame outside an update).
    pub validated: bool,
    /// Whether it is pinned.
    pub pinned: bool,
    /// Whether a failed validation left it partially validated (Xen's
    /// `PGT_partial`).
    pub partial: bool,
    /// Its direct-map mapping: `Some(true)` writable, `Some(false)` read-only,
    /// `None` not mapped.
    pub direct_map_writable: Option<bool>,
    /// Whether a stale writable TLB entry for it survives.
    pub stale_tlb: bool,
}

/// The `type_info` words, one per machine frame. Outside the model
/// checkers the array is 2 MiB-aligned and, on Linux, advised for
/// transparent huge pages: a validation reads and writes it at the machine
/// frames the entries map, and with 4 KiB pages each of those accesses in
/// a large domain would also miss the TLB.
#[cfg(not(any(loom, shuttle)))]
struct TypeInfoTable {
    ptr: core::ptr::NonNull<AtomicU64>,
    len: usize,
    layout: std::alloc::Layout,
}

#[cfg(not(any(loom, shuttle)))]
// SAFETY: the table owns its words, which are atomics.
unsafe impl Send for TypeInfoTable {}
#[cfg(not(any(loom, shuttle)))]
// SAFETY: as above: shared access goes through `&[AtomicU64]`.
unsafe impl Sync for TypeInfoTable {}

#[cfg(not(any(loom, shuttle)))]
impl TypeInfoTable {
    /// Arrays at least this large get the huge-page alignment and advice.
    const HUGE: usize = 2 << 20;

    /// `n` words, all 0.
    fn new(n: usize) -> Self {
        let bytes = n.max(1) * core::mem::size_of::<AtomicU64>();
        let (size, align) = if bytes >= Self::HUGE {
            (bytes.next_multiple_of(Self::HUGE), Self::HUGE)
        } else {
            (bytes, core::mem::align_of::<AtomicU64>())
        };
        let layout = std::alloc::Layout::from_size_align(size, align)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u64>()));
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = core::ptr::NonNull::new(raw.cast::<AtomicU64>()) else {
            std::alloc::handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if align == Self::HUGE {
            // SAFETY: the range is this allocation (page-aligned, `size`
            // bytes); the advice only changes how it is backed. Failure
            // (no THP support) is harmless and ignored.
            unsafe { libc::madvise(raw.cast(), size, libc::MADV_HUGEPAGE) };
        }
        for i in 0..n {
            // SAFETY: `i < n` words fit in the allocation.
            unsafe { ptr.as_ptr().add(i).write(AtomicU64::new(0)) };
        }
        TypeInfoTable {
            ptr,
            len: n,
            layout,
        }
    }
}

#[cfg(not(any(loom, shuttle)))]
impl core::ops::Deref for TypeInfoTable {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `len` initialised words live as long as `self`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(not(any(loom, shuttle)))]
impl Drop for TypeInfoTable {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; atomics need no drop.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast(), self.layout) };
    }
}

/// Under a model checker: a plain boxed slice of the checker's atomics.
#[cfg(any(loom, shuttle))]
struct TypeInfoTable(Box<[AtomicU64]>);

#[cfg(any(loom, shuttle))]
impl TypeInfoTable {
    fn new(n: usize) -> Self {
        TypeInfoTable((0..n).map(|_| AtomicU64::new(0)).collect())
    }
}

#[cfg(any(loom, shuttle))]
impl core::ops::Deref for TypeInfoTable {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        &self.0
    }
}

/// A frame's state apart from its `type_info` word: touched only when the
/// frame is (or becomes) a page table, is remapped in the direct map, or
/// is flushed; never by the per-entry reference counting of a validation.
#[derive(Default)]
struct FrameCold {
    /// Flush generation + 1 at which a stale writable TLB entry was left; 0: none.
    stale: AtomicU64,
    /// Xen's page lock: held while a table's entries are validated,
    /// devalidated or updated.
    lock: AtomicBool,
    /// Flush generation + 1 at which the type count last reached 0 (Xen's
    /// `tlbflush_timestamp`); 0: never.
    stamp: AtomicU64,
    /// The type bits the frame had when its count last reached 0 (Xen
    /// keeps them in `type_info`): a later typing to another type is a
    /// type change.
    last_type: AtomicU64,
    /// Xen's `linear_pt_count` as a two's-complement word: > 0, linear
    /// entries this table holds; < 0, linear entries mapping it.
    linear: AtomicU64,
    /// Of a [`PARTIAL`] table: the entries below this index hold
    /// references (Xen's `nr_validated_ptes`); bit 32: so does the entry at
    /// it, on a child left partial itself (`PTF_partial_set`).
    partial: AtomicU64,
}

/// [`FrameCold::partial`]'s flag bit.
const PARTIAL_HELD: u64 = 1 << 32;

/// One machine frame's state: its `type_info` word (the hot array: one
/// `u64` per frame, so validating an L1 touches 8 bytes per data frame)
/// and its cold state (a separate array).
#[derive(Clone, Copy)]
struct FrameRef<'a> {
    type_info: &'a AtomicU64,
    stale: &'a AtomicU64,
    lock: &'a AtomicBool,
    cold: &'a FrameCold,
}

#[derive(Default)]
struct DmSlot {
    pte: AtomicU64,
    lock: AtomicBool,
}

fn spin_lock(l: &AtomicBool) {
    let mut spins = 0u32;
    while l
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        backoff(&mut spins);
    }
}

fn spin_unlock(l: &AtomicBool) {
    l.store(false, Ordering::Release);
}

/// A held spin lock, released on drop.
struct Held<'a>(&'a AtomicBool);
impl Drop for Held<'_> {
    fn drop(&mut self) {
        spin_unlock(self.0);
    }
}
fn hold(l: &AtomicBool) -> Held<'_> {
    spin_lock(l);
    Held(l)
}

#[derive(Clone, Copy, Debug)]
struct Injection {
    trap: u64,
    entry: usize,
    item: usize,
    errno: i32,
}

thread_local! {
    static CURRENT_VCPU: Cell<usize> = const { Cell::new(0) };
}

/// Result type of internal checks: `Err(errno)` (positive).
type R<T = ()> = Result<T, i32>;

/// The entry a table validation refused (see [`XenSim::take_refusal`]):
/// what Xen's log names when a pin fails deep inside a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The table holding the entry.
    pub mfn: Mfn,
    /// Its level.
    pub level: Level,
    /// The entry's index.
    pub index: usize,
    /// The entry.
    pub entry: u64,
    /// The errno (positive).
    pub errno: i32,
}

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

    // -- helpers --------------------------------------------------------------

    #[inline]
    fn frame(&self, mfn: u64) -> R<FrameRef<'_>> {
        let i = usize::try_from(mfn).map_err(|_| errno::EINVAL)?;
        match (self.type_info.get(i), self.cold.get(i)) {
            (Some(type_info), Some(c)) => Ok(FrameRef {
                type_info,
                stale: &c.stale,
                lock: &c.lock,
                cold: c,
            }),
            _ => Err(errno::EINVAL),
        }
    }

    #[inline]
    fn stale_live(&self, f: FrameRef<'_>) -> bool {
        let s = f.stale.load(Ordering::Acquire);
        s != 0 && s == self.flush_gen.0.load(Ordering::Acquire) + 1
    }

    fn flush_all(&self, l: &mut Local) {
        self.flush_gen.0.fetch_add(1, Ordering::AcqRel);
        l.tlb_flushes += 1;
    }

    /// The invariant on one frame; counts a break.
    fn check_frame(&self, mfn: u64, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        let x = f.type_info.load(Ordering::Acquire);
        if !FrameType::from_bits(x).is_table() || x & COUNT_MASK == 0 {
            return;
        }
        let pfn = self.m2p[mfn as usize] as usize;
        let dm_rw = PageTableEntry::from_bits(self.dm[pfn].pte.load(Ordering::Acquire));
        if (dm_rw.is_present() && dm_rw.is_writable()) || self.stale_live(f) {
            l.invariant_breaks += 1;
        }
    }

    fn table_slots(&self, level: Level) -> (usize, Range<usize>) {
        if level == self.cfg.root_level {
            (self.cfg.root_entries, self.cfg.hypervisor_hole.clone())
        } else {
            (ENTRIES_PER_FRAME, 0..0)
        }
    }

    /// Take a type reference of type `ty` on `mfn`, validating it if the
    /// type changes. `direct`: the frame is named by the request itself
    /// (Xen's type-change TLB filter flushes it).
    fn get_type(&self, mfn: u64, ty: FrameType, direct: bool, l: &mut Local) -> R {
        let f = self.frame(mfn)?;
        let mut spins = 0;
        // Resuming a partially validated table (Xen continues its
        // validation from the failing entry): where to start.
        let mut from = (0, false);
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            let cnt = x & COUNT_MASK;
            if cnt == 0 {
                let nx = if ty == FrameType::Writable {
                    ty.bits() | VALIDATED | 1
                } else {
                    ty.bits() | 1
                };
                if f.type_info
                    .compare_exchange_weak(x, nx, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                if self.cfg.exact_tlb {
                    self.type_change_flush(f, ty, l);
                }
                if ty == FrameType::Writable {
                    return Ok(());
                }
                break;
            }
            let cur = FrameType::from_bits(x);
            if cur != ty {
                return Err(if ty == FrameType::Writable {
                    errno::EBUSY
                } else {
                    errno::EINVAL
                });
            }
            if x & PARTIAL != 0 {
                // Partially validated: take over its one reference (others
                // now wait) and go on from the entry that failed.
                if f.type_info
                    .compare_exchange_weak(x, x & !PARTIAL, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let p = f.cold.partial.load(Ordering::Acquire);
                    from = ((p & 0xffff) as usize, p & PARTIAL_HELD != 0);
                    break;
                }
                continue;
            }
            if x & VALIDATED == 0 {
                // Being validated or devalidated by another CPU.
                backoff(&mut spins);
                continue;
            }
            if cnt == COUNT_MASK {
                return Err(errno::EINVAL);
            }
            if f.type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
        // We changed the type to a page-table type (or resume one): validate.
        if from.0 == 0 && self.stale_live(f) {
            if direct {
                f.stale.store(0, Ordering::Release);
                l.filter_flushes += 1;
                l.tlb_flushes += 1;
            } else {
                // Typed (below) while a stale writable TLB entry survives.
                l.invariant_breaks += 1;
            }
        }
        let level = ty.level().ok_or(errno::EINVAL)?;
        let r = {
            let _g = hold(f.lock);
            self.validate(mfn, level, from, l)
        };
        match r {
            Ok(()) => {
                f.type_info.fetch_or(VALIDATED, Ordering::AcqRel);
                l.validations += 1;
                self.check_frame(mfn, l);
                Ok(())
            }
            // Failed partway: the table stays typed with the references
            // its accepted entries took, until the request ends.
            Err(e) if l.ogt == Some(mfn) => {
                f.type_info.fetch_or(PARTIAL, Ordering::AcqRel);
                Err(e)
            }
            Err(e) => {
                f.type_info.store(0, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Take a reference of type `ty` only if the frame already has that type
    /// (count > 0, waiting out a validation in progress). `Ok(false)`: it
    /// does not.
    fn get_existing(&self, mfn: u64, ty: FrameType) -> R<bool> {
        let f = self.frame(mfn)?;
        let mut spins = 0;
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            if x & COUNT_MASK == 0 || FrameType::from_bits(x) != ty {
                return Ok(false);
            }
            if x & PARTIAL != 0 {
                // Not validated: Xen cannot lock it for an update.
                return Err(errno::EINVAL);
            }
            if x & VALIDATED == 0 {
                backoff(&mut spins);
                continue;
            }
            if x & COUNT_MASK == COUNT_MASK {
                return Err(errno::EINVAL);
            }
            if f.type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    /// Xen's check at a type change (count 0 -> 1 to a type other than
    /// the one the frame last had): flush the TLB if the frame was last
    /// used after the last flush, so no stale writable translation of a
    /// frame outlives its becoming a table (or vice versa).
    fn type_change_flush(&self, f: FrameRef<'_>, ty: FrameType, l: &mut Local) {
        if f.cold.last_type.load(Ordering::Acquire) != ty.bits()
            && f.cold.stamp.load(Ordering::Acquire) == self.flush_gen.0.load(Ordering::Acquire) + 1
        {
            self.flush_all(l);
            l.filter_flushes += 1;
        }
    }

    /// The frame's count reached 0 with type bits `x`: remember the type
    /// and when (Xen's `tlbflush_timestamp`).
    fn stamp(&self, f: FrameRef<'_>, x: u64) {
        if self.cfg.exact_tlb {
            f.cold.last_type.store(x & TYPE_MASK, Ordering::Release);
            let gen = self.flush_gen.0.load(Ordering::Acquire);
            f.cold.stamp.store(gen + 1, Ordering::Release);
        }
    }

    /// Drop a type reference; at count 0 a page table is devalidated and
    /// its children's references are dropped.
    fn put_type(&self, mfn: u64, l: &mut Local) {
        self.put_type_from(mfn, None, l);
    }

    /// Undo a linear entry of table `ptpg` mapping `f` if `f` has the
    /// type `x` shows and that is `ptpg`'s type (Xen's check when it drops
    /// a reference a table entry held).
    fn unlink_linear(&self, f: FrameRef<'_>, x: u64, ptpg: Option<u64>) {
        let Some(p) = ptpg.and_then(|p| self.frame(p).ok()) else {
            return;
        };
        if (p.type_info.load(Ordering::Acquire) ^ x) & TYPE_MASK == 0 {
            f.cold.linear.fetch_add(1, Ordering::AcqRel);
            p.cold.linear.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// [`Self::put_type`] of a reference an entry of table `ptpg` held
    /// (linear entries are counted on both frames).
    fn put_type_from(&self, mfn: u64, ptpg: Option<u64>, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        loop {
            let x = f.type_info.load(Ordering::Acquire);
            let cnt = x & COUNT_MASK;
            if cnt == 0 {
                // A reference that was never taken: the table changed behind
                // the hypervisor's back (or a simulator bug). Counted.
                l.refcount_errors += 1;
                return;
            }
            if cnt > 1 {
                if f.type_info
                    .compare_exchange_weak(x, x - 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.unlink_linear(f, x, ptpg);
                    return;
                }
                continue;
            }
            let ty = FrameType::from_bits(x);
            let Some(level) = ty.level() else {
                if f.type_info
                    .compare_exchange_weak(x, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.stamp(f, x);
                    return;
                }
                continue;
            };
            // Last reference of a table: mark it invalid (others now wait),
            // release its children under the page lock, then untype it.
            if f.type_info
                .compare_exchange_weak(
                    x,
                    x & !(VALIDATED | PINNED),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                continue;
            }
            self.unlink_linear(f, x, ptpg);
            {
                let _g = hold(f.lock);
                self.devalidate(mfn, level, l);
            }
            self.stamp(f, x);
            f.type_info.store(0, Ordering::Release);
            l.devalidations += 1;
            return;
        }
    }

    /// Start fetching the `type_info` word of the frame entry `e` maps (for
    /// writing: the reference counting will change it), so the misses of
    /// a table's entries overlap instead of serialising behind each
    /// locked compare-and-swap. Only a hint: no effect on the state.
    #[inline(always)]
    fn prefetch_entry(&self, e: u64) {
        #[cfg(all(target_arch = "x86_64", not(any(loom, shuttle))))]
        if e & EntryFlags::PRESENT.bits() != 0 {
            let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
            if let Some(w) = self.type_info.get(mfn as usize) {
                use core::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
                // SAFETY: a prefetch has no architectural effect; the
                // address is that of a live `AtomicU64`.
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(w.as_ptr().cast::<i8>()) };
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(any(loom, shuttle)))))]
        let _ = e;
    }

    fn table_memory(&self, mfn: u64) -> R<&pagepin_engine::frame::Frame> {
        let pfn = *self
            .m2p
            .get(usize::try_from(mfn).map_err(|_| errno::EINVAL)?)
            .ok_or(errno::EINVAL)?;
        self.mem.frame(Pfn(pfn)).ok_or(errno::EINVAL)
    }

    /// Validate table `mfn` at `level` (its page lock is held): take the
    /// references of every present entry. `from`: the entry to start at and
    /// whether it already holds a partial child (resuming a [`PARTIAL`]
    /// table), else `(0, false)`.
    ///
    /// On failure an L1 undoes its references; an L2..L4 failing at entry
    /// `i > 0` keeps those of entries `0..i` and becomes the request's
    /// `old_guest_table` (`l.ogt`), as Xen 4.17 does, to be torn down when
    /// the request ends. Not inlined: its 4 KiB snapshot would make every
    /// `get_type` (most take a writable reference and never validate)
    /// probe a 4 KiB stack frame.
    #[inline(never)]
    fn validate(&self, mfn: u64, level: Level, from: (usize, bool), l: &mut Local) -> R {
        let frame = self.table_memory(mfn)?;
        let (n, hole) = self.table_slots(level);
        let mut snap = [0u64; ENTRIES_PER_FRAME];
        for (i, s) in snap.iter_mut().enumerate().take(n) {
            *s = frame.entry(i).load(Ordering::Acquire);
        }
        for &e in &snap[..n.min(PREFETCH_AHEAD)] {
            self.prefetch_entry(e);
        }
        // A table being validated starts with no linear entries (Xen
        // resets `linear_pt_count`), unless it resumes.
        let (start, start_held) = from;
        if let (Ok(f), 0) = (self.frame(mfn), start) {
            f.cold.linear.store(0, Ordering::Release);
        }
        for i in start..n {
            if let Some(&ahead) = snap[..n].get(i + PREFETCH_AHEAD) {
                self.prefetch_entry(ahead);
            }
            if hole.contains(&i) {
                continue;
            }
            // Xen rewrites each entry it accepts with the PV adjustment
            // (`adjust_guest_entry`), in place, even when a later entry
            // then fails the validation (real Xen 4.17, differential
            // programs).
            let adj = self.adjust_guest_entry(level, snap[i]);
            let adj = match self.get_entry_refs(level, adj, mfn, false, l) {
                Ok(v) => v,
                Err(e) => {
                    self.refusal.lock().get_or_insert(Refusal {
                        mfn: Mfn(mfn),
                        level,
                        index: i,
                        entry: snap[i],
                        errno: e,
                    });
                    if level == Level::L1 {
                        for j in (0..i).rev() {
                            if !hole.contains(&j) {
                                self.put_entry_refs(level, snap[j], mfn, l);
                            }
                        }
                    } else if i > 0 {
                        self.keep_partial(mfn, i, snap[i], i == start && start_held, l);
                    }
                    return Err(e);
                }
            };
            if adj != snap[i] {
                frame.entry(i).store(adj, Ordering::Release);
                snap[i] = adj;
            }
        }
        // A validated L4 gets the hypervisor's slots (Xen's
        // `init_xen_l4_slots`), whatever the guest left there.
        if let (Level::L4, Some(slots)) = (level, &self.cfg.l4_xen_slots) {
            for i in hole {
                let v = slots
                    .iter()
                    .find(|s| s.0 == i)
                    .map_or(0, |&(_, f, flags)| (f.unwrap_or(mfn) << 12) | flags);
                frame.entry(i).store(v, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Table `mfn` failed its validation at entry `i > 0` (entry `e`):
    /// leave it partially validated, as the request's `old_guest_table`.
    /// `held`: entry `i` already held a partial child when it resumed.
    fn keep_partial(&self, mfn: u64, i: usize, e: u64, held: bool, l: &mut Local) {
        let child = (e & PageTableEntry::ADDR_MASK) >> 12;
        // A child left partial by this failure is the request's
        // `old_guest_table`: entry `i` takes over its reference. Any other
        // one (a grandchild, when the child failed at its first entry) Xen
        // 4.17 overwrites and never tears down: it stays partial, with
        // its references, until a request of its type resumes it.
        let held = match l.ogt {
            Some(g) if g == child && e & EntryFlags::PRESENT.bits() != 0 => true,
            Some(_) => {
                l.lost_partials += 1;
                held
            }
            None => held,
        };
        if let Ok(f) = self.frame(mfn) {
            let flag = if held { PARTIAL_HELD } else { 0 };
            f.cold.partial.store(i as u64 | flag, Ordering::Release);
        }
        l.ogt = Some(mfn);
        l.partial_validations += 1;
    }

    /// Tear down a [`PARTIAL`] table (Xen's `put_old_guest_table`): drop
    /// the references of the entries it had accepted, last first, and of a
    /// partial child it holds; then untype it. Nothing if it is no longer
    /// partial (resumed meanwhile).
    fn put_partial(&self, mfn: u64, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        let x = loop {
            let x = f.type_info.load(Ordering::Acquire);
            if x & PARTIAL == 0 {
                return;
            }
            // Its one reference is the partial state's: clearing the bit
            // makes others wait, as for a validation.
            if f.type_info
                .compare_exchange_weak(x, x & !PARTIAL, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break x;
            }
        };
        let Some(level) = FrameType::from_bits(x).level() else {
            return;
        };
        let p = f.cold.partial.load(Ordering::Acquire);
        let nv = (p & 0xffff) as usize;
        {
            let _g = hold(f.lock);
            if let Ok(frame) = self.table_memory(mfn) {
                let (_, hole) = self.table_slots(level);
                if p & PARTIAL_HELD != 0 {
                    let e = frame.entry(nv).load(Ordering::Acquire);
                    let child = (e & PageTableEntry::ADDR_MASK) >> 12;
                    if e & EntryFlags::PRESENT.bits() != 0 && child != mfn {
                        self.put_partial(child, l);
                    }
                }
                for j in (0..nv).rev() {
                    if !hole.contains(&j) {
                        let e = frame.entry(j).load(Ordering::Acquire);
                        self.put_entry_refs(level, e, mfn, l);
                    }
                }
            }
        }
        self.stamp(f, x);
        f.type_info.store(0, Ordering::Release);
        l.devalidations += 1;
    }

    /// End of a request: tear down the table its failed validation left
    /// partial (Xen does it before the next request, or the guest, runs).
    fn put_old_guest_table(&self, l: &mut Local) {
        if let Some(m) = l.ogt.take() {
            self.put_partial(m, l);
        }
    }

    fn devalidate(&self, mfn: u64, level: Level, l: &mut Local) {
        let Ok(frame) = self.table_memory(mfn) else {
            return;
        };
        let (n, hole) = self.table_slots(level);
        for i in 0..n.min(PREFETCH_AHEAD) {
            self.prefetch_entry(frame.entry(i).load(Ordering::Relaxed));
        }
        for i in 0..n {
            if i + PREFETCH_AHEAD < n {
                self.prefetch_entry(frame.entry(i + PREFETCH_AHEAD).load(Ordering::Relaxed));
            }
            if !hole.contains(&i) {
                self.put_entry_refs(level, frame.entry(i).load(Ordering::Acquire), mfn, l);
            }
        }
    }

    /// Check entry `e` of table `table` (machine frame; `u64::MAX` for the
    /// direct map) at `level` and take the references it needs (rule 3).
    /// Returns the entry as Xen stores it: an L1 entry of I/O memory
    /// mapped cacheable is made uncacheable.
    fn get_entry_refs(
        &self,
        level: Level,
        e: u64,
        table: u64,
        direct: bool,
        l: &mut Local,
    ) -> R<u64> {
        let pte = PageTableEntry::from_bits(e);
        if !pte.is_present() {
            return Ok(e);
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        let flags = e & !PageTableEntry::ADDR_MASK;
        if level == Level::L1 {
            // Flags first, as Xen's get_page_from_l1e.
            self.check_flags_only(level, e)?;
            if self.is_io_frame(mfn) {
                // I/O memory: mapped without references, if permitted,
                // and never cacheable (Xen flips WB/WT/WP to UC).
                return if self.cfg.io_privileged {
                    Ok(e ^ io_cache_flip(e))
                } else {
                    Err(errno::EPERM)
                };
            }
            if !self.owned(mfn) {
                // Dom0 (real Xen 4.17, differential programs): beyond any
                // machine address, I/O memory it is not permitted
                // (-EPERM); below, memory of another owner (the
                // hypervisor's), which Xen cannot reference (-EBUSY),
                // read-only or not. Other domains keep the simulator's
                // plain -EINVAL.
                return Err(if !self.cfg.io_privileged {
                    errno::EINVAL
                } else if e & PageTableEntry::RESERVED_ADDR_BITS != 0 {
                    errno::EPERM
                } else {
                    errno::EBUSY
                });
            }
            if pte.is_writable() {
                self.get_type(mfn, FrameType::Writable, direct, l)
                    .map_err(|_| errno::EBUSY)?;
            }
            return Ok(e);
        }
        let allowed = if level == self.cfg.root_level && self.cfg.root_entries == 4 {
            PAE_ROOT_ALLOWED
        } else {
            TABLE_ALLOWED
        };
        if flags & !allowed != 0 {
            // PS (large pages) included: refused as Xen PV does.
            return Err(errno::EINVAL);
        }
        if !self.owned(mfn) {
            return Err(errno::EINVAL);
        }
        let child = level.child().ok_or(errno::EINVAL)?;
        match self.get_type(mfn, FrameType::table(child), direct, l) {
            // A table of the entry's own level, mapped read-only: a linear
            // page table (Xen's `opt_pv_linear_pt`, on by default).
            Err(errno::EINVAL) if self.get_linear(level, e, table, l) => Ok(e),
            r => r.map(|()| e),
        }
    }

    /// Accept entry `e` of table `table` (at `level` >= L2) as a linear
    /// page-table entry if Xen would: read-only; mapping the table itself
    /// (no reference), or another validated table of the same level that
    /// has no linear entries of its own, from a table nobody maps
    /// linearly (a type reference, counted on both).
    fn get_linear(&self, level: Level, e: u64, table: u64, l: &mut Local) -> bool {
        if e & EntryFlags::WRITABLE.bits() != 0 {
            return false;
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        if mfn == table {
            l.linear_entries += 1;
            return true;
        }
        let (Ok(pt), Ok(pg)) = (self.frame(table), self.frame(mfn)) else {
            return false;
        };
        let bump = |c: &AtomicU64, up: bool| {
            let mut x = c.load(Ordering::Acquire);
            loop {
                let n = (x as i64) + if up { 1 } else { -1 };
                if (up && n <= 0) || (!up && n >= 0) {
                    return false;
                }
                match c.compare_exchange_weak(x, n as u64, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return true,
                    Err(y) => x = y,
                }
            }
        };
        if !bump(&pt.cold.linear, true) {
            return false;
        }
        if !bump(&pg.cold.linear, false) {
            pt.cold.linear.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let want = FrameType::table(level).bits() | VALIDATED;
        loop {
            let x = pg.type_info.load(Ordering::Acquire);
            if x & (TYPE_MASK | VALIDATED) != want || x & COUNT_MASK == COUNT_MASK {
                pg.cold.linear.fetch_add(1, Ordering::AcqRel);
                pt.cold.linear.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            if pg
                .type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                l.linear_entries += 1;
                return true;
            }
        }
    }

    fn put_entry_refs(&self, level: Level, e: u64, table: u64, l: &mut Local) {
        let pte = PageTableEntry::from_bits(e);
        if !pte.is_present() {
            return;
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        match level {
            Level::L1 => {
                if pte.is_writable() && !self.is_io_frame(mfn) && self.owned(mfn) {
                    self.put_type(mfn, l);
                }
            }
            // A table's entry mapping the table itself held nothing.
            _ if mfn == table => {}
            _ => self.put_type_from(mfn, Some(table), l),
        }
    }

    /// Whether the domain owns machine frame `mfn`. The p2m is a bijection
    /// of `0..nr_pages` onto `0..nr_pages`, so this is exactly "the m2p has
    /// an entry for `mfn`", answered without a read of the m2p (a random
    /// access per entry an L1 validation checks).
    #[inline]
    fn owned(&self, mfn: u64) -> bool {
        mfn < self.cfg.nr_pages as u64
    }

    /// Whether `mfn` is I/O memory of the domain's range (not its RAM).
    fn is_io_frame(&self, mfn: u64) -> bool {
        !self.cfg.io_frames.is_empty() && self.cfg.io_frames.iter().any(|r| r.contains(&mfn))
    }

    /// What a 64-bit PV guest's new entry becomes before Xen checks and
    /// writes it (Xen's `adjust_guest_l*e`; the guest kernel runs in ring
    /// 3): a present L1 entry without USER is a kernel page, marked USER
    /// and GUEST_KERNEL (bit 52); one that is not a kernel page is made
    /// USER | GLOBAL; present L2/L3 entries get USER, L4 entries USER and
    /// ACCESSED. Real Xen 4.17 stores `0x167` for a written `0x067`.
    fn adjust_guest_entry(&self, level: Level, new: u64) -> u64 {
        const GUEST_KERNEL: u64 = 1 << 52;
        let user = EntryFlags::USER.bits();
        if self.cfg.root_level != Level::L4 || new & EntryFlags::PRESENT.bits() == 0 {
            return new;
        }
        match level {
            Level::L1 => {
                let mut e = new;
                if e & user == 0 {
                    e |= user | GUEST_KERNEL;
                }
                if e & GUEST_KERNEL == 0 {
                    e |= user | EntryFlags::GLOBAL.bits();
                }
                e
            }
            Level::L2 | Level::L3 => new | user,
            Level::L4 | Level::L5 => new | user | EntryFlags::ACCESSED.bits(),
        }
    }

    /// Replace entry `index` of table `mfn` (level `level`, page lock held,
    /// a type reference held) with `new`, checked (rules 7 and 9).
    /// `preserve_ad`: the old entry's A/D bits are or-ed into the new one
    /// (`MMU_PT_UPDATE_PRESERVE_AD`); `emulated`: a guest store Xen
    /// emulates (no fast path: every present entry is checked in full).
    #[allow(clippy::too_many_arguments)]
    fn update_entry(
        &self,
        mfn: u64,
        level: Level,
        index: usize,
        new: u64,
        slot: &EntryWord,
        preserve_ad: bool,
        emulated: bool,
        l: &mut Local,
    ) -> R {
        let (n, hole) = self.table_slots(level);
        if index >= n || hole.contains(&index) {
            return Err(errno::EINVAL);
        }
        let new = self.adjust_guest_entry(level, new);
        let old = slot.load(Ordering::Acquire);
        let ad = EntryFlags::ACCESSED.bits() | EntryFlags::DIRTY.bits();
        let write = |v: u64| {
            let v = if preserve_ad { v | (old & ad) } else { v };
            slot.store(v, Ordering::Release);
        };
        let (o, nw) = (
            PageTableEntry::from_bits(old),
            PageTableEntry::from_bits(new),
        );
        if !emulated
            && o.is_present()
            && nw.is_present()
            && o.addr() == nw.addr()
            && (old ^ new) & !FAST_PATH_BITS == 0
        {
            // Fast path: nothing the references depend on changed. Still
            // refuse flags the level does not allow.
            self.check_flags_only(level, new)?;
            write(new);
            l.fast_path_updates += 1;
            return Ok(());
        }
        let new = self.get_entry_refs(level, new, mfn, true, l)?;
        write(new);
        self.put_entry_refs(level, old, mfn, l);
        l.full_updates += 1;
        if level != Level::L1 {
            l.table_entry_updates += 1;
        }
        Ok(())
    }

    fn check_flags_only(&self, level: Level, e: u64) -> R {
        let flags = e & !PageTableEntry::ADDR_MASK;
        let allowed = match level {
            Level::L1 if self.cfg.io_privileged => L1_ALLOWED | CACHE_ATTRS,
            Level::L1 => L1_ALLOWED,
            _ if level == self.cfg.root_level && self.cfg.root_entries == 4 => PAE_ROOT_ALLOWED,
            _ => TABLE_ALLOWED,
        };
        if flags & !allowed != 0 {
            Err(errno::EINVAL)
        } else {
            Ok(())
        }
    }

    // -- operations -------------------------------------------------------------

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

    fn injection(&self, trap: u64, entry: usize) -> Option<Injection> {
        if self.has_injections.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut g = self.injections.lock();
        let i = g.iter().position(|j| j.trap == trap && j.entry == entry)?;
        self.has_injections.fetch_sub(1, Ordering::Release);
        Some(g.swap_remove(i))
    }

    /// One `mmu_update` request.
    fn do_mmu_update(&self, req: MmuUpdateAbi, l: &mut Local) -> R {
        l.mmu_update_reqs += 1;
        // The sub-command is the low three bits (Xen masks with the entry
        // size): 0 normal, 1 machphys, 2 preserve A/D, 3 no-translate (the
        // same as 0 for a PV guest); 4..7 are unknown (`-ENOSYS`).
        let cmd = req.ptr & 7;
        if cmd >= 4 {
            return Err(errno::ENOSYS);
        }
        if cmd == mmu_cmd::MACHPHYS_UPDATE {
            // Sets the m2p entry of a frame the domain owns (real Xen
            // 4.17: 0 for the guest's own frame). The simulator keeps its
            // m2p: the guest's view of it is not modelled.
            return if self.owned(req.ptr >> 12) {
                Ok(())
            } else {
                Err(errno::EINVAL)
            };
        }
        let mfn = req.ptr >> 12;
        let index = ((req.ptr & 0xfff) >> 3) as usize;
        let f = self.frame(mfn)?;
        let frame = self.table_memory(mfn)?;
        let slot = frame.entry(index);
        for _ in 0..64 {
            let x = f.type_info.load(Ordering::Acquire);
            let ty = FrameType::from_bits(x);
            if let (Some(level), true) = (ty.level(), x & COUNT_MASK != 0) {
                if !self.get_existing(mfn, ty)? {
                    continue;
                }
                let r = {
                    let _g = hold(f.lock);
                    // PRESERVE_AD ors the old A/D bits in (real Xen 4.17:
                    // 0x67 over 0x00 stays 0x67).
                    let preserve = cmd == mmu_cmd::PT_UPDATE_PRESERVE_AD;
                    self.update_entry(mfn, level, index, req.val, slot, preserve, false, l)
                };
                self.put_type(mfn, l);
                return r;
            }
            // Not a table: a plain write under a transient writable reference.
            match self.get_type(mfn, FrameType::Writable, true, l) {
                Ok(()) => {
                    {
                        let _g = hold(f.lock);
                        slot.store(req.val, Ordering::Release);
                    }
                    self.put_type(mfn, l);
                    return Ok(());
                }
                Err(_) => continue, // became a table meanwhile: retry
            }
        }
        Err(errno::EBUSY)
    }

    /// One `mmuext_op`.
    fn do_mmuext(&self, op: MmuExtOpAbi, l: &mut Local) -> R {
        l.mmuext_ops += 1;
        if let Some(c) = l.ext_cmds.get_mut(op.cmd as usize) {
            *c += 1;
        }
        let Some(cmd) = ExtCmd::from_u32(op.cmd) else {
            return self.do_mmuext_other(op, l);
        };
        match cmd {
            // Not a Xen command: what Xen answers an unknown one.
            ExtCmd::PinL5Table => Err(errno::ENOSYS),
            ExtCmd::PinL1Table | ExtCmd::PinL2Table | ExtCmd::PinL3Table | ExtCmd::PinL4Table => {
                let level = cmd.pin_level().ok_or(errno::EINVAL)?;
                if level > self.cfg.root_level {
                    return Err(errno::EINVAL);
                }
                let mfn = op.arg1;
                let f = self.frame(mfn)?;
                self.get_type(mfn, FrameType::table(level), true, l)?;
                if f.type_info.fetch_or(PINNED, Ordering::AcqRel) & PINNED != 0 {
                    self.put_type(mfn, l);
                    return Err(errno::EINVAL);
                }
                l.pins[level as usize - 1] += 1;
                self.check_frame(mfn, l);
                Ok(())
            }
            ExtCmd::UnpinTable => {
                let mfn = op.arg1;
                let f = self.frame(mfn)?;
                let x = f.type_info.fetch_and(!PINNED, Ordering::AcqRel);
                if x & PINNED == 0 {
                    return Err(errno::EINVAL);
                }
                self.put_type(mfn, l);
                l.unpins += 1;
                Ok(())
            }
            ExtCmd::NewBaseptr | ExtCmd::NewUserBaseptr => {
                let which = usize::from(cmd == ExtCmd::NewUserBaseptr);
                let vcpu = CURRENT_VCPU.with(|c| c.get());
                let slot = &self.bases.get(vcpu).ok_or(errno::EINVAL)?[which];
                let mfn = op.arg1;
                if which == 1 && mfn == 0 {
                    let old = slot.swap(0, Ordering::AcqRel);
                    if old != 0 {
                        self.put_type(old - 1, l);
                    }
                    return Ok(());
                }
                self.get_type(mfn, FrameType::table(self.cfg.root_level), true, l)?;
                let old = slot.swap(mfn + 1, Ordering::AcqRel);
                if old != 0 {
                    self.put_type(old - 1, l);
                }
                // Loading CR3 flushes the TLB (the user base pointer is
                // loaded only on a switch to user mode).
                if self.cfg.exact_tlb && which == 0 {
                    self.flush_all(l);
                }
                self.check_frame(mfn, l);
                Ok(())
            }
            // A vCPU mask that cannot be read: -EINVAL (real Xen 4.17).
            ExtCmd::TlbFlushMulti | ExtCmd::InvlpgMulti if !canonical(op.arg2) => {
                Err(errno::EINVAL)
            }
            ExtCmd::TlbFlushLocal | ExtCmd::TlbFlushMulti | ExtCmd::TlbFlushAll => {
                self.flush_all(l);
                Ok(())
            }
            ExtCmd::InvlpgLocal | ExtCmd::InvlpgMulti | ExtCmd::InvlpgAll => {
                self.invlpg(op.arg1, l);
                Ok(())
            }
        }
    }

    /// The `mmuext_op` commands the engine never sends, answered as real
    /// Xen 4.17 answers a 64-bit PV domain (found by the differential
    /// programs, `tests/real_xen_diff.rs`).
    fn do_mmuext_other(&self, op: MmuExtOpAbi, l: &mut Local) -> R {
        const FLUSH_CACHE: u32 = 12;
        const SET_LDT: u32 = 13;
        const CLEAR_PAGE: u32 = 16;
        const COPY_PAGE: u32 = 17;
        const FLUSH_CACHE_GLOBAL: u32 = 18;
        const MARK_SUPER: u32 = 19;
        const UNMARK_SUPER: u32 = 20;
        match op.cmd {
            // Cache flushes: allowed to a domain with I/O resources.
            FLUSH_CACHE | FLUSH_CACHE_GLOBAL if self.cfg.io_privileged => Ok(()),
            FLUSH_CACHE | FLUSH_CACHE_GLOBAL => Err(errno::EACCES),
            // The LDT is not modelled beyond the argument checks (its
            // pages are mapped lazily, on first use).
            SET_LDT => {
                let (va, ents) = (op.arg1, op.arg2);
                if va & 0xfff != 0 || ents > LDT_ENTRIES_MAX || !canonical(va) {
                    Err(errno::EINVAL)
                } else {
                    Ok(())
                }
            }
            CLEAR_PAGE => self.with_writable(op.arg1, l, |frame| {
                for i in 0..ENTRIES_PER_FRAME {
                    frame.entry(i).store(0, Ordering::Release);
                }
            }),
            COPY_PAGE => {
                if !self.owned(op.arg2) {
                    return Err(errno::EINVAL);
                }
                let src: Option<Vec<u64>> = self.table_memory(op.arg2).ok().map(|f| {
                    (0..ENTRIES_PER_FRAME)
                        .map(|i| f.entry(i).load(Ordering::Acquire))
                        .collect()
                });
                self.with_writable(op.arg1, l, |frame| {
                    for i in 0..ENTRIES_PER_FRAME {
                        let v = src.as_ref().map_or(0, |s| s[i]);
                        frame.entry(i).store(v, Ordering::Release);
                    }
                })
            }
            MARK_SUPER | UNMARK_SUPER => Err(EOPNOTSUPP),
            _ => Err(errno::ENOSYS),
        }
    }

    /// Run `f` on the memory of `mfn` (if it is table memory) under a
    /// transient writable type reference: `-EINVAL` when the domain does
    /// not own it or it is a page table.
    fn with_writable(
        &self,
        mfn: u64,
        l: &mut Local,
        f: impl FnOnce(&pagepin_engine::frame::Frame),
    ) -> R {
        if !self.owned(mfn) {
            return Err(errno::EINVAL);
        }
        self.get_type(mfn, FrameType::Writable, true, l)
            .map_err(|_| errno::EINVAL)?;
        if let Ok(frame) = self.table_memory(mfn) {
            f(frame);
        }
        self.put_type(mfn, l);
        Ok(())
    }

    fn dm_pfn(&self, va: u64) -> Option<usize> {
        let off = va.checked_sub(self.cfg.direct_map_base)?;
        let pfn = usize::try_from(off >> 12).ok()?;
        (pfn < self.cfg.nr_pages).then_some(pfn)
    }

    fn invlpg(&self, va: u64, l: &mut Local) {
        l.tlb_flushes += 1;
        if let Some(pfn) = self.dm_pfn(va) {
            let mfn = self.p2m[pfn] as usize;
            self.cold[mfn].stale.store(0, Ordering::Release);
        }
    }

    fn do_uvm(&self, va: u64, new: u64, flags: u64, l: &mut Local) -> R {
        l.uvm += 1;
        let pfn = self.dm_pfn(va).ok_or(errno::EINVAL)?;
        let own = self.p2m[pfn];
        // Xen adjusts the entry as for `mmu_update` (found by the
        // differential programs: real Xen 4.17 stores 0x61 as USER |
        // GUEST_KERNEL | 0x61).
        let new = self.adjust_guest_entry(Level::L1, new);
        let nw = PageTableEntry::from_bits(new);
        if nw.is_present() && nw.frame() != own {
            // The direct map is linear: slot pfn maps p2m[pfn] only.
            return Err(errno::EINVAL);
        }
        let slot = &self.dm[pfn];
        {
            let _g = hold(&slot.lock);
            let old = slot.pte.load(Ordering::Acquire);
            let o = PageTableEntry::from_bits(old);
            if o.is_present()
                && nw.is_present()
                && o.addr() == nw.addr()
                && (old ^ new) & !FAST_PATH_BITS == 0
            {
                self.check_flags_only(Level::L1, new)?;
                slot.pte.store(new, Ordering::Release);
                l.fast_path_updates += 1;
            } else {
                let new = self.get_entry_refs(Level::L1, new, u64::MAX, true, l)?;
                slot.pte.store(new, Ordering::Release);
                if o.is_present() && o.is_writable() && !(nw.is_present() && nw.is_writable()) {
                    // The old writable translation may linger in TLBs.
                    let gen = self.flush_gen.0.load(Ordering::Acquire);
                    self.cold[o.frame() as usize]
                        .stale
                        .store(gen + 1, Ordering::Release);
                }
                self.put_entry_refs(Level::L1, old, u64::MAX, l);
                l.full_updates += 1;
            }
        }
        // Above the flush type: LOCAL (0), ALL (4) or a vCPU-mask pointer,
        // read only when there is a flush; a bad pointer fails the call
        // after the entry was written (real Xen 4.17).
        let ft = flags & uvmf::FLUSHTYPE_MASK;
        let mask = flags & !uvmf::FLUSHTYPE_MASK;
        // (Flush type 3 is neither flush: nothing is read.)
        let bad_mask = (ft == uvmf::TLB_FLUSH || ft == uvmf::INVLPG)
            && mask != uvmf::LOCAL
            && mask != uvmf::ALL
            && !canonical(mask);
        match ft {
            _ if bad_mask => {}
            uvmf::TLB_FLUSH => self.flush_all(l),
            uvmf::INVLPG => self.invlpg(va, l),
            _ => {}
        }
        self.check_frame(own, l);
        if bad_mask {
            return Err(errno::EFAULT);
        }
        Ok(())
    }

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

    /// The guest store logic (rule 10).
    fn store(
        &self,
        slot: &EntryWord,
        mfn: Mfn,
        index: usize,
        value: u64,
        l: &mut Local,
    ) -> Result<(), StoreFault> {
        let fault = StoreFault {
            mfn,
            index,
            rc: -errno::EFAULT,
        };
        let m = mfn.0;
        let (Ok(f), Some(pfn)) = (self.frame(m), self.pfn_of(mfn)) else {
            return Err(fault);
        };
        let Ok(frame) = self.table_memory(m) else {
            return Err(fault);
        };
        if index >= ENTRIES_PER_FRAME || !std::ptr::eq(slot, frame.entry(index)) {
            return Err(fault);
        }
        let dm = &self.dm[pfn.0 as usize];
        for _ in 0..4 {
            {
                let _g = hold(&dm.lock);
                let pte = PageTableEntry::from_bits(dm.pte.load(Ordering::Acquire));
                // Through a writable mapping, or (exact TLB) a stale
                // writable TLB entry of one: a plain write Xen never sees.
                if (pte.is_present() && pte.is_writable())
                    || (self.cfg.exact_tlb && self.stale_live(f))
                {
                    slot.store(value, Ordering::Release);
                    l.plain_stores += 1;
                    return Ok(());
                }
            }
            // Read-only: Xen emulates the write if the frame is a typed L1.
            match self.get_existing(m, FrameType::L1) {
                Ok(true) => {
                    let r = {
                        let _g = hold(f.lock);
                        self.update_entry(m, Level::L1, index, value, slot, false, false, l)
                    };
                    self.put_type(m, l);
                    l.emulated_stores += 1;
                    return r.map_err(|e| StoreFault { mfn, index, rc: -e });
                }
                Ok(false) => {
                    // Remapped writable meanwhile? Then retry as a plain store.
                    let pte = PageTableEntry::from_bits(dm.pte.load(Ordering::Acquire));
                    if !(pte.is_present() && pte.is_writable()) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        l.faults += 1;
        Err(fault)
    }
}

/// The cache bits Xen flips in an L1 entry of I/O memory: write-back,
/// write-through and write-protect become uncacheable (PCD | PWT);
/// UC-, UC and WC stay.
fn io_cache_flip(e: u64) -> u64 {
    let (pwt, pcd, pat) = (
        EntryFlags::PWT.bits(),
        EntryFlags::PCD.bits(),
        EntryFlags::PAT_4K.bits(),
    );
    match e & (pwt | pcd | pat) {
        0 => pwt | pcd,
        a if a == pwt || a == pwt | pat => pcd | (a & pat),
        _ => 0,
    }
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

// ---------------------------------------------------------------------------
// convenience constructor

/// A ready-made setup: the engine's frame store, the simulator reading it,
/// and a backend trapping into the simulator with the guest's p2m.
pub struct XenEnv<L: RawLock> {
    /// Table memory (pfns `table_base..table_base + table_frames`).
    pub store: Arc<FrameStore<L>>,
    /// The simulated hypervisor.
    pub sim: Arc<XenSim>,
    /// The backend for address spaces.
    pub backend: Arc<XenBackend<Arc<XenSim>>>,
}

/// Build a [`XenEnv`] for paging mode `M`: `table_frames` frames of table
/// memory at the top of a domain of `nr_pages` frames (pfns below are data
/// pages with metadata only), with a p2m permutation from `seed` and a trap
/// cost of `trap_cost_ns`.
pub fn xen_env<M: PagingMode, L: RawLock>(
    table_frames: usize,
    nr_pages: usize,
    seed: u64,
    trap_cost_ns: u64,
) -> Result<XenEnv<L>, SimError> {
    let mut cfg = SimConfig::for_mode::<M>(nr_pages, seed);
    cfg.trap_cost_ns = trap_cost_ns;
    xen_env_with(table_frames, cfg)
}

/// [`xen_env`] with a configuration of one's own (`cfg.nr_pages` frames,
/// the top `table_frames` of them table memory).
pub fn xen_env_with<L: RawLock>(
    table_frames: usize,
    cfg: SimConfig,
) -> Result<XenEnv<L>, SimError> {
    let nr_pages = cfg.nr_pages;
    if table_frames == 0 || table_frames > nr_pages {
        return Err(SimError::BadSize);
    }
    let base = (nr_pages - table_frames) as u64;
    let store: Arc<FrameStore<L>> = Arc::new(FrameStore::new(table_frames, base));
    let mem: Arc<dyn TableMemory> = store.clone();
    let sim = Arc::new(XenSim::new(cfg, mem)?);
    let map = P2m::new(sim.p2m_table().to_vec()).ok_or(SimError::BadSize)?;
    let backend = Arc::new(XenBackend::new(sim.clone(), map));
    Ok(XenEnv {
        store,
        sim,
        backend,
    })
}
