//! How the simulated hypervisor is set up.

use std::ops::Range;

use pagepin_engine::{Level, PagingMode};

use super::p2m::P2M_EXTENT;

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
    ///
    /// [`MIN_P2M_EXTENTS`]: super::MIN_P2M_EXTENTS
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
