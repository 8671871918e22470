//! The mock backend: records every call with batch boundaries and every
//! guest store, and fails chosen calls with chosen errnos. Plus
//! [`NullBackend`], which accepts everything and does nothing (the floor for
//! benchmarks).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pagepin_engine::{
    uvmf, Backend, Call, CallResult, Calls, ExtCmd, MmuExtOp, MmuUpdate, StoreFault,
};
use pagepin_engine::{EntryFlags, PageTableEntry};
use pagepin_engine::{Mfn, Pfn, TableMemory};
use parking_lot::Mutex;

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// `update_va_mapping(va, pte, flags)`.
    UpdateVaMapping {
        /// Virtual address.
        va: u64,
        /// New entry.
        pte: u64,
        /// UVMF flags.
        flags: u64,
    },
    /// `mmu_update` with its requests.
    MmuUpdate(Vec<MmuUpdate>),
    /// `mmuext_op` with its operations.
    MmuExtOp(Vec<MmuExtOp>),
}

/// One recorded batch: its calls and the results returned.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecordedBatch {
    /// The calls, in order.
    pub calls: Vec<Recorded>,
    /// The result given for each call.
    pub results: Vec<CallResult>,
}

/// The net effect of the calls a mock accepted, replayed on a tiny model of
/// a hypervisor: what a pin or unpin left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetEffect {
    /// For every frame whose direct-map mapping was changed: whether the
    /// last accepted change made it read-only. Keyed by the frame the
    /// remapped entry maps (the mock's p2m is the identity).
    pub remapped: BTreeMap<u64, bool>,
    /// Pin balance (pins minus unpins accepted) of every frame whose
    /// balance is not 0.
    pub pins: BTreeMap<u64, i64>,
    /// Accepted remaps that requested a full TLB flush.
    pub flushes: usize,
}

impl NetEffect {
    /// Replay `batches`: a call that failed counts only for the requests
    /// before its failing one (`done`).
    pub fn replay(batches: &[RecordedBatch]) -> Self {
        let mut n = NetEffect::default();
        for b in batches {
            for (call, res) in b.calls.iter().zip(&b.results) {
                let done = if res.rc == 0 {
                    usize::MAX
                } else {
                    res.done as usize
                };
                match call {
                    Recorded::UpdateVaMapping { pte, flags, .. } if done > 0 => {
                        let frame = PageTableEntry::from_bits(*pte).frame();
                        n.remapped
                            .insert(frame, pte & EntryFlags::WRITABLE.bits() == 0);
                        if flags & uvmf::FLUSHTYPE_MASK == uvmf::TLB_FLUSH {
                            n.flushes += 1;
                        }
                    }
                    Recorded::MmuExtOp(ops) => {
                        for op in ops.iter().take(done) {
                            match op.cmd {
                                ExtCmd::UnpinTable => *n.pins.entry(op.arg1).or_default() -= 1,
                                c if c.pin_level().is_some() => {
                                    *n.pins.entry(op.arg1).or_default() += 1
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        n.pins.retain(|_, v| *v != 0);
        n
    }

    /// Frames left read-only.
    pub fn read_only(&self) -> BTreeSet<u64> {
        self.remapped
            .iter()
            .filter(|(_, ro)| **ro)
            .map(|(f, _)| *f)
            .collect()
    }

    /// Nothing left read-only and nothing left pinned.
    pub fn is_neutral(&self) -> bool {
        self.pins.is_empty() && self.remapped.values().all(|ro| !ro)
    }
}

/// One recorded guest store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedStore {
    /// Table frame.
    pub mfn: Mfn,
    /// Entry index.
    pub index: usize,
    /// Value stored.
    pub value: u64,
}

#[derive(Clone, Copy, Debug)]
struct Injection {
    batch: usize,
    call: usize,
    errno: i32,
    /// How many requests of a multi-request call succeed before the failure.
    done: usize,
}

#[derive(Default)]
struct State {
    batches: Vec<RecordedBatch>,
    stores: Vec<RecordedStore>,
    injections: Vec<Injection>,
}

impl Default for MockBackend {
    fn default() -> Self {
        MockBackend {
            state: Mutex::default(),
            memory: None,
            log_stores: std::sync::atomic::AtomicBool::new(true),
            stores_seen: AtomicU64::new(0),
        }
    }
}

/// A backend that records, and fails on request.
///
/// With [`MockBackend::with_memory`] it also applies the `mmu_update`
/// requests it accepts to the table memory (identity p2m), so a space whose
/// upper tables are pinned stays usable; without memory it only records.
pub struct MockBackend {
    state: Mutex<State>,
    memory: Option<Arc<dyn TableMemory>>,
    /// When false, guest stores are counted but not logged (long runs).
    log_stores: std::sync::atomic::AtomicBool,
    stores_seen: AtomicU64,
}

impl MockBackend {
    /// A new, empty recorder that applies nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recorder that applies accepted `mmu_update` requests to `memory`.
    pub fn with_memory(memory: Arc<dyn TableMemory>) -> Self {
        MockBackend {
            memory: Some(memory),
            ..Self::default()
        }
    }

    /// Log every guest store (the default) or only count them.
    pub fn set_store_log(&self, on: bool) {
        self.log_stores.store(on, Ordering::Relaxed);
    }

    /// Guest stores seen, logged or not.
    pub fn store_count(&self) -> u64 {
        self.stores_seen.load(Ordering::Relaxed)
    }

    fn apply(&self, reqs: &[MmuUpdate]) {
        let Some(mem) = &self.memory else { return };
        for r in reqs {
            let (pfn, index) = (Pfn(r.ptr >> 12), ((r.ptr & 0xfff) >> 3) as usize);
            if let Some(slot) = mem.frame(pfn).and_then(|f| f.entries().get(index)) {
                slot.store(r.val, Ordering::Release);
            }
        }
    }

    /// Make call `call` (0-based) of batch `batch` (0-based, counted over the
    /// recorder's life) fail with `errno`; for a multi-request call, request
    /// 0 fails.
    pub fn fail_call(&self, batch: usize, call: usize, errno: i32) {
        self.fail_request(batch, call, 0, errno);
    }

    /// Like [`Self::fail_call`], letting `done` requests of the call succeed first.
    pub fn fail_request(&self, batch: usize, call: usize, done: usize, errno: i32) {
        self.state.lock().injections.push(Injection {
            batch,
            call,
            errno,
            done,
        });
    }

    /// Forget recorded batches, stores and pending injections (the batch
    /// count restarts at 0).
    pub fn clear(&self) {
        *self.state.lock() = State::default();
    }

    /// Every recorded batch.
    pub fn batches(&self) -> Vec<RecordedBatch> {
        self.state.lock().batches.clone()
    }

    /// Every recorded call, batches flattened.
    pub fn calls(&self) -> Vec<Recorded> {
        self.state
            .lock()
            .batches
            .iter()
            .flat_map(|b| b.calls.iter().cloned())
            .collect()
    }

    /// The net effect of everything recorded (see [`NetEffect::replay`]).
    pub fn net_effect(&self) -> NetEffect {
        NetEffect::replay(&self.state.lock().batches)
    }

    /// Number of batches recorded.
    pub fn batch_count(&self) -> usize {
        self.state.lock().batches.len()
    }

    /// Every recorded guest store.
    pub fn stores(&self) -> Vec<RecordedStore> {
        self.state.lock().stores.clone()
    }
}

impl Backend for MockBackend {
    const NAME: &'static str = "mock";
    const PINNING: bool = true;

    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        let mut st = self.state.lock();
        let batch = st.batches.len();
        let mut rec = RecordedBatch::default();
        for (i, c) in calls.iter().enumerate() {
            rec.calls.push(match c {
                Call::UpdateVaMapping { va, pte, flags } => {
                    Recorded::UpdateVaMapping { va, pte, flags }
                }
                Call::MmuUpdate(r) => Recorded::MmuUpdate(r.to_vec()),
                Call::MmuExtOp(o) => Recorded::MmuExtOp(o.to_vec()),
            });
            let inj = st
                .injections
                .iter()
                .find(|j| j.batch == batch && j.call == i)
                .copied();
            results[i] = match inj {
                Some(j) => CallResult::err(j.errno, j.done.min(c.count().saturating_sub(1))),
                None => CallResult::ok(c.count()),
            };
            if let Call::MmuUpdate(reqs) = c {
                self.apply(&reqs[..results[i].done as usize]);
            }
        }
        rec.results = results.to_vec();
        st.batches.push(rec);
    }

    fn store_entry(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        slot.store(value, Ordering::Release);
        self.stores_seen.fetch_add(1, Ordering::Relaxed);
        if self.log_stores.load(Ordering::Relaxed) {
            self.state
                .lock()
                .stores
                .push(RecordedStore { mfn, index, value });
        }
        Ok(())
    }
}

/// A backend that accepts every batch and does nothing: the no-op trap
/// that benchmarks compare against the floor.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullBackend;

impl Backend for NullBackend {
    const NAME: &'static str = "null";
    const PINNING: bool = true;

    /// Every call succeeds: the results arrive as success already.
    #[inline]
    fn issue(&self, _: Calls<'_>, _: &mut [CallResult]) {}
}
