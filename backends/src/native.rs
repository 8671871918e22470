//! The native x86-64 backend: page tables the CPU walks directly.
//!
//! Bare hardware has no pinning: [`NativeBackend::PINNING`] is `false`, so
//! the engine compiles `pin` and `unpin` down to the space's bookkeeping (no
//! walk, no batch). Entry writes are plain atomic stores, and the TLB
//! maintenance a kernel would have to do is *accounted*, not performed:
//!
//! - every store that changes an entry counts one invalidation (`invlpg`);
//! - a batch that asks for a full flush (`UVMF_TLB_FLUSH`, or an
//!   `MMUEXT_TLB_FLUSH_*` / `NEW_BASEPTR` operation) counts one full flush,
//!   and an `UVMF_INVLPG` / `MMUEXT_INVLPG_*` counts one invalidation.
//!
//! [`NativeBackend::counters`] reads the counters, so tests can assert that
//! an operation did exactly the TLB work it should.
//!
//! With the `kvm` feature (Linux only), `native::kvm` checks a space's tables
//! against the CPU's own page walk inside a KVM virtual machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pagepin_engine::{
    errno, uvmf, Backend, Call, CallResult, Calls, ExtCmd, MmuUpdate, StoreFault,
};
use pagepin_engine::{Mfn, Pfn, TableMemory, ENTRIES_PER_FRAME};

#[cfg(all(feature = "kvm", target_os = "linux"))]
pub mod kvm;

/// A snapshot of the native backend's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbCounters {
    /// Single-address invalidations (one per changed entry, plus explicit
    /// `INVLPG` requests).
    pub invalidations: u64,
    /// Full TLB flushes requested by a batch.
    pub full_flushes: u64,
    /// Entry stores (changed or not) through [`Backend::store_entry`] or
    /// an `mmu_update`.
    pub stores: u64,
    /// Stores that left the entry unchanged (no invalidation needed).
    pub unchanged_stores: u64,
    /// Batches received by [`Backend::issue`].
    pub batches: u64,
    /// Calls received by [`Backend::issue`].
    pub calls: u64,
    /// Pin / unpin operations received (accepted as no-ops: hardware has no
    /// pinning; the engine never sends them to this backend).
    pub pin_ops: u64,
}

#[derive(Default)]
struct Counters {
    invalidations: AtomicU64,
    full_flushes: AtomicU64,
    stores: AtomicU64,
    unchanged_stores: AtomicU64,
    batches: AtomicU64,
    calls: AtomicU64,
    pin_ops: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The native x86-64 backend (see the [module docs](self)).
///
/// `mmu_update` requests can be executed only when the backend knows the
/// table memory ([`NativeBackend::with_memory`]); without it they fail
/// with `-ENOSYS`. The engine itself never sends them here, since with
/// `PINNING = false` every write is a plain store.
#[derive(Default)]
pub struct NativeBackend {
    counters: Counters,
    memory: Option<Arc<dyn TableMemory>>,
}

impl std::fmt::Debug for NativeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeBackend")
            .field("counters", &self.counters())
            .field("memory", &self.memory.is_some())
            .finish()
    }
}

impl NativeBackend {
    /// A backend with zeroed counters and no table memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend that can also execute `mmu_update` requests on `memory`
    /// (machine address = pfn * 4096: the native p2m is the identity).
    pub fn with_memory(memory: Arc<dyn TableMemory>) -> Self {
        NativeBackend {
            counters: Counters::default(),
            memory: Some(memory),
        }
    }

    /// The counters now.
    pub fn counters(&self) -> TlbCounters {
        let c = &self.counters;
        TlbCounters {
            invalidations: c.invalidations.load(Ordering::Relaxed),
            full_flushes: c.full_flushes.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
            unchanged_stores: c.unchanged_stores.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            calls: c.calls.load(Ordering::Relaxed),
            pin_ops: c.pin_ops.load(Ordering::Relaxed),
        }
    }

    /// Reset every counter to zero.
    pub fn reset_counters(&self) {
        let c = &self.counters;
        for a in [
            &c.invalidations,
            &c.full_flushes,
            &c.stores,
            &c.unchanged_stores,
            &c.batches,
            &c.calls,
            &c.pin_ops,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    /// Store `value` into `slot` atomically and account the invalidation.
    fn store(&self, slot: &std::sync::atomic::AtomicU64, value: u64) {
        let old = slot.swap(value, Ordering::AcqRel);
        Counters::bump(&self.counters.stores);
        if old != value {
            Counters::bump(&self.counters.invalidations);
        } else {
            Counters::bump(&self.counters.unchanged_stores);
        }
    }

    /// Execute one `mmu_update` request; `Err(errno)` on failure.
    fn mmu_update(&self, req: &MmuUpdate) -> Result<(), i32> {
        let Some(mem) = self.memory.as_deref() else {
            return Err(errno::ENOSYS);
        };
        let cmd = req.ptr & 3;
        if cmd != pagepin_engine::mmu_cmd::NORMAL_PT_UPDATE
            && cmd != pagepin_engine::mmu_cmd::PT_UPDATE_PRESERVE_AD
        {
            return Err(errno::ENOSYS);
        }
        let addr = req.ptr & !3;
        if addr & 7 != 0 {
            return Err(errno::EINVAL);
        }
        let frame = mem.frame(Pfn(addr >> 12)).ok_or(errno::EINVAL)?;
        let index = ((addr & 0xfff) >> 3) as usize;
        debug_assert!(index < ENTRIES_PER_FRAME);
        let slot = frame.entry(index);
        let value = if cmd == pagepin_engine::mmu_cmd::PT_UPDATE_PRESERVE_AD {
            let ad = pagepin_engine::EntryFlags::ACCESSED.bits()
                | pagepin_engine::EntryFlags::DIRTY.bits();
            (req.val & !ad) | (slot.load(Ordering::Acquire) & ad)
        } else {
            req.val
        };
        self.store(slot, value);
        Ok(())
    }

    fn flush_kind(&self, flags: u64) {
        match flags & uvmf::FLUSHTYPE_MASK {
            uvmf::TLB_FLUSH => Counters::bump(&self.counters.full_flushes),
            uvmf::INVLPG => Counters::bump(&self.counters.invalidations),
            _ => {}
        }
    }
}

impl Backend for NativeBackend {
    const NAME: &'static str = "native";
    const PINNING: bool = false;

    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        Counters::bump(&self.counters.batches);
        for (call, result) in calls.iter().zip(results.iter_mut()) {
            Counters::bump(&self.counters.calls);
            *result = match call {
                Call::UpdateVaMapping { flags, .. } => {
                    // The direct map is the kernel's own; natively the
                    // remap itself is a store we do not model, but the
                    // changed translation must leave the TLB.
                    Counters::bump(&self.counters.invalidations);
                    self.flush_kind(flags);
                    CallResult::ok(1)
                }
                Call::MmuUpdate(reqs) => {
                    let mut r = CallResult::ok(reqs.len());
                    for (i, req) in reqs.iter().enumerate() {
                        if let Err(e) = self.mmu_update(req) {
                            r = CallResult::err(e, i);
                            break;
                        }
                    }
                    r
                }
                Call::MmuExtOp(ops) => {
                    for op in ops {
                        match op.cmd {
                            ExtCmd::TlbFlushLocal
                            | ExtCmd::TlbFlushMulti
                            | ExtCmd::TlbFlushAll
                            | ExtCmd::NewBaseptr => Counters::bump(&self.counters.full_flushes),
                            ExtCmd::InvlpgLocal | ExtCmd::InvlpgMulti | ExtCmd::InvlpgAll => {
                                Counters::bump(&self.counters.invalidations)
                            }
                            ExtCmd::PinL1Table
                            | ExtCmd::PinL2Table
                            | ExtCmd::PinL3Table
                            | ExtCmd::PinL4Table
                            | ExtCmd::PinL5Table
                            | ExtCmd::UnpinTable => Counters::bump(&self.counters.pin_ops),
                            ExtCmd::NewUserBaseptr => {}
                        }
                    }
                    CallResult::ok(ops.len())
                }
            };
        }
    }

    #[inline]
    fn store_entry(
        &self,
        slot: &std::sync::atomic::AtomicU64,
        _mfn: Mfn,
        _index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        self.store(slot, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagepin_engine::MmuExtOp;
    use pagepin_engine::{FrameStore, SpinLock};

    #[test]
    fn counts_changed_stores_and_flushes() {
        let b = NativeBackend::new();
        let slot = std::sync::atomic::AtomicU64::new(0);
        b.store_entry(&slot, Mfn(1), 0, 5).unwrap();
        b.store_entry(&slot, Mfn(1), 0, 5).unwrap();
        assert_eq!(slot.load(Ordering::Relaxed), 5);
        let mut res = [CallResult::default(); 3];
        let ops = [MmuExtOp {
            cmd: ExtCmd::TlbFlushAll,
            arg1: 0,
            arg2: 0,
        }];
        b.issue(
            Calls::list(&[
                Call::UpdateVaMapping {
                    va: 0x1000,
                    pte: 0,
                    flags: uvmf::TLB_FLUSH,
                },
                Call::MmuExtOp(&ops),
                Call::MmuUpdate(&[MmuUpdate { ptr: 0, val: 0 }]),
            ]),
            &mut res,
        );
        assert_eq!(res[0], CallResult::ok(1));
        assert_eq!(res[1], CallResult::ok(1));
        assert_eq!(
            res[2].rc,
            -errno::ENOSYS,
            "no memory: mmu_update is refused"
        );
        let c = b.counters();
        assert_eq!(
            (
                c.stores,
                c.unchanged_stores,
                c.invalidations,
                c.full_flushes
            ),
            (2, 1, 2, 2)
        );
        assert_eq!((c.batches, c.calls), (1, 3));
        b.reset_counters();
        assert_eq!(b.counters(), TlbCounters::default());
    }

    #[test]
    fn mmu_update_with_memory() {
        let store: Arc<FrameStore<SpinLock>> = Arc::new(FrameStore::new(2, 0x10));
        let t = store.alloc_table(pagepin_engine::Level::L1).unwrap();
        let b = NativeBackend::with_memory(store.clone());
        let mut res = [CallResult::default(); 1];
        let reqs = [
            MmuUpdate {
                ptr: (t.0 << 12) + 8 * 3,
                val: 0x1234_0063,
            },
            MmuUpdate {
                ptr: 0x5000,
                val: 1,
            },
        ];
        b.issue(Calls::list(&[Call::MmuUpdate(&reqs)]), &mut res);
        assert_eq!(
            res[0],
            CallResult::err(errno::EINVAL, 1),
            "second request is outside the memory"
        );
        assert_eq!(
            store.entry(t, 3).unwrap().load(Ordering::Relaxed),
            0x1234_0063
        );
        // Preserve A/D keeps the hardware-set bits.
        b.issue(
            Calls::list(&[Call::MmuUpdate(&[MmuUpdate {
                ptr: ((t.0 << 12) + 8 * 3) | 2,
                val: 0x1234_0003,
            }])]),
            &mut res,
        );
        assert_eq!(
            store.entry(t, 3).unwrap().load(Ordering::Relaxed),
            0x1234_0063
        );
    }
}
