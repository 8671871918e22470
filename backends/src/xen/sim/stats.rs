//! The simulator's counters: per-request local counts merged into
//! per-thread shards, summed into a [`SimStats`] snapshot.

#[cfg(not(any(loom, shuttle)))]
use crate::sync::AtomicUsize;
use crate::sync::{AtomicU64, Ordering};

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
        pub(super) struct Local {
            $( pub(super) $name: u64, )*
            pub(super) ext_cmds: [u64; 16],
            pub(super) pins: [u64; 4],
            /// Xen's `old_guest_table` of the request in progress: the
            /// table a failed validation left [`PARTIAL`], torn down when
            /// the request ends.
            ///
            /// [`PARTIAL`]: super::types::PARTIAL
            pub(super) ogt: Option<u64>,
        }

        #[derive(Default)]
        pub(super) struct Counters {
            $( pub(super) $name: AtomicU64, )*
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
    ///
    /// [`SimConfig::exact_tlb`]: super::SimConfig::exact_tlb
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
pub(super) struct Padded<T>(pub(super) T);

#[derive(Default)]
pub(super) struct Stats {
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
    pub(super) fn shard(&self) -> &Counters {
        &self.shards[SHARD.with(|s| *s)].0
    }
    #[cfg(any(loom, shuttle))]
    pub(super) fn shard(&self) -> &Counters {
        &self.shards[0].0
    }
    pub(super) fn merge(&self, l: &Local) {
        self.shard().merge(l);
    }
    pub(super) fn snapshot(&self) -> SimStats {
        let mut t = SimStats::default();
        for sh in &self.shards {
            t.add(&sh.0.snapshot());
        }
        t
    }
    pub(super) fn reset(&self) {
        for sh in &self.shards {
            sh.0.reset();
        }
    }
}
