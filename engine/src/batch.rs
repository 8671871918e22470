//! The multicall batch: queue calls, flush them together, run deferred
//! callbacks after the flush.
//!
//! Rules (docs/PROTOCOL.md §4): at most `N` calls, `N` callbacks and `16 * N` bytes of
//! request space per batch; adding to a full batch flushes first; a flush
//! of one call is a direct hypercall, of more a multicall; consecutive
//! `mmu_update` / `mmuext_op` requests extend the previous call. Unlike
//! Linux, every failed call is recorded for the caller.

use alloc::vec::Vec;
use arrayvec::ArrayVec;

use crate::backend::{CallKind, CallResult, Calls, MmuExtOp, MmuUpdate, Queued};
use crate::frame::Pfn;
use crate::lock::PreemptCount;

/// A caller-chosen label for a queued request, reported back when the request
/// did not take effect. The engine uses journal indices.
pub type Tag = u32;
/// No label: the request's outcome is only counted.
pub const NO_TAG: Tag = u32::MAX;

/// Bytes of request space one `mmu_update` takes.
pub const MMU_UPDATE_BYTES: usize = 16;
/// Bytes of request space one `mmuext_op` takes.
pub const MMUEXT_OP_BYTES: usize = 24;
/// Request space per batch entry (Linux: 512 bytes for 32 entries).
pub const ARG_BYTES_PER_ENTRY: usize = 16;
/// The default batch capacity (Linux's `MC_BATCH`).
pub const DEFAULT_BATCH: usize = 32;

/// What a flush needs from its surroundings: the backend to issue calls and
/// the PTE locks to release. Crate-private: only the engine's pin and
/// writers queue requests (a user drives a batch through them).
pub(crate) trait FlushTarget {
    /// Issue the calls: `Backend::issue`, results arriving as success.
    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]);
    /// Release the PTE-page lock of `pfn`.
    ///
    /// # Safety
    /// The lock must be held by the context that queued the callback.
    unsafe fn unlock_pte(&self, pfn: Pfn);
    /// Whether a queueing call that flushed answers that a failure is
    /// recorded (so its caller stops); only the negative control
    /// `Sabotage::walk_on_after_failure` says no.
    #[inline]
    fn stop_on_failure(&self) -> bool {
        true
    }
}

/// A callback run after the batch it was registered with has been issued.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deferred {
    /// Release `pfn`'s PTE lock, unless the request labelled `watch` did not
    /// take effect: then the lock stays held (reported by
    /// [`Batch::take_kept_locks`]) so the caller can restore the page before
    /// any writer sees it half-done.
    UnlockPte {
        /// The PTE page.
        pfn: Pfn,
        /// The request whose failure keeps the lock.
        watch: Tag,
    },
    /// Call `f(data)` (Linux's `xen_mc_callback`; the batch's own tests
    /// record callback order with it).
    #[cfg(test)]
    Call {
        /// The function.
        f: fn(usize),
        /// Its argument.
        data: usize,
    },
}

/// A request that did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Sequence number of the flush (0-based, per batch object).
    pub flush: u64,
    /// Index of the call in that flush.
    pub call: usize,
    /// Index of the failing request within the call.
    pub item: usize,
    /// The call's kind.
    pub kind: CallKind,
    /// The positive errno.
    pub errno: i32,
    /// The failing request's tag.
    pub tag: Tag,
}

/// Counters of what a batch issued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Flushes that issued at least one call (= hypercall traps).
    pub flushes: u64,
    /// Flushes issued as one `multicall` (2+ calls).
    pub multicalls: u64,
    /// Flushes issued as a direct hypercall (1 call).
    pub direct_calls: u64,
    /// Calls (multicall entries) issued.
    pub calls: u64,
    /// `update_va_mapping` calls.
    pub update_va_mappings: u64,
    /// `mmu_update` requests.
    pub mmu_updates: u64,
    /// `mmuext_op` requests.
    pub mmuext_ops: u64,
    /// Calls that returned an error.
    pub failed_calls: u64,
    /// Callbacks run.
    pub callbacks: u64,
}

/// A multicall batch of capacity `N` (a per-CPU object in a kernel).
///
/// It also carries the context's [`PreemptCount`], since PTE locks taken
/// while queueing are released by its callbacks.
pub struct Batch<const N: usize = DEFAULT_BATCH> {
    slots: ArrayVec<Queued, N>,
    updates: ArrayVec<MmuUpdate, N>,
    update_tags: ArrayVec<Tag, N>,
    ext: ArrayVec<MmuExtOp, N>,
    ext_tags: ArrayVec<Tag, N>,
    arg_bytes: usize,
    /// `mmu_update` and `mmuext_op` calls queued (the rest of `slots` are
    /// `update_va_mapping`s), so a flush need not scan the slots to count.
    mmu_calls: usize,
    deferred: ArrayVec<Deferred, N>,
    /// Per-call results of a flush. Between flushes every `rc` is 0: the
    /// backend receives them as success and writes failures, which the
    /// failure scan resets.
    results: [CallResult; N],
    /// Calls (and callbacks) per flush: `N` unless lowered at run time.
    limit: usize,
    seq: u64,
    preempt: PreemptCount,
    stats: BatchStats,
    failures: Vec<Failure>,
    not_applied: Vec<Tag>,
    kept_locks: Vec<Pfn>,
    /// The pin/unpin journal's step buffer, kept between operations so
    /// its capacity is reused (the engine borrows it per operation).
    pub(crate) journal: Vec<crate::journal::Step>,
}

impl<const N: usize> Default for Batch<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Batch<N> {
    const CAPACITY_OK: () = assert!(
        N >= 1 && N <= u16::MAX as usize,
        "batch capacity must be 1..=65535"
    );

    /// An empty batch.
    pub fn new() -> Self {
        let () = Self::CAPACITY_OK;
        Batch {
            slots: ArrayVec::new(),
            updates: ArrayVec::new(),
            update_tags: ArrayVec::new(),
            ext: ArrayVec::new(),
            ext_tags: ArrayVec::new(),
            arg_bytes: 0,
            mmu_calls: 0,
            deferred: ArrayVec::new(),
            results: [CallResult { rc: 0, done: 0 }; N],
            limit: N,
            seq: 0,
            preempt: PreemptCount::default(),
            stats: BatchStats::default(),
            failures: Vec::new(),
            not_applied: Vec::new(),
            kept_locks: Vec::new(),
            journal: Vec::new(),
        }
    }

    /// A batch that behaves as if its capacity were `limit` (1..=N): it
    /// flushes at `limit` calls or callbacks and `16 * limit` bytes of
    /// requests. Lets one compiled engine sweep batch sizes at run time.
    ///
    /// # Panics
    /// If `limit` is 0 or greater than `N`.
    pub fn with_limit(limit: usize) -> Self {
        assert!(
            (1..=N).contains(&limit),
            "batch limit {limit} outside 1..={N}"
        );
        Batch {
            limit,
            ..Self::new()
        }
    }

    /// The effective capacity (`N`, or the limit given to [`Self::with_limit`]).
    pub const fn capacity(&self) -> usize {
        self.limit
    }

    #[inline]
    fn arg_space(&self) -> usize {
        self.limit * ARG_BYTES_PER_ENTRY
    }

    #[inline]
    fn calls_full(&self) -> bool {
        self.slots.len() >= self.limit
    }
    /// Calls queued now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether nothing is queued (calls or callbacks).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.deferred.is_empty()
    }
    /// Bytes of request space in use.
    pub fn arg_bytes(&self) -> usize {
        self.arg_bytes
    }
    /// Callbacks queued now.
    pub fn deferred_len(&self) -> usize {
        self.deferred.len()
    }
    /// Counters since creation.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }
    /// The preempt-count model of this context.
    pub fn preempt(&self) -> &PreemptCount {
        &self.preempt
    }
    /// The preempt-count model, mutably (the engine counts locks here).
    pub fn preempt_mut(&mut self) -> &mut PreemptCount {
        &mut self.preempt
    }
    /// Every failure recorded since the last [`Self::take_failures`].
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }
    /// Whether any failure is recorded.
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }
    /// Take the recorded failures (and forget which tags did not apply).
    pub fn take_failures(&mut self) -> Vec<Failure> {
        self.not_applied.clear();
        core::mem::take(&mut self.failures)
    }
    /// Tags of requests that did not take effect (failed, or skipped after a
    /// failure in the same call), since the last [`Self::take_failures`].
    pub fn not_applied(&self) -> &[Tag] {
        &self.not_applied
    }
    /// PTE locks kept held because their watched request failed; the caller
    /// now owns them.
    pub fn take_kept_locks(&mut self) -> Vec<Pfn> {
        core::mem::take(&mut self.kept_locks)
    }
    /// The pin/unpin journal's step buffer, lent for one operation.
    #[inline]
    pub(crate) fn take_journal_buffer(&mut self) -> Vec<crate::journal::Step> {
        core::mem::take(&mut self.journal)
    }

    /// The step buffer back, to be reused by the next operation.
    #[inline]
    pub(crate) fn return_journal_buffer(&mut self, steps: Vec<crate::journal::Step>) {
        self.journal = steps;
    }

    /// Queue `update_va_mapping(va, pte, flags)`. Returns whether a flush
    /// it made to make room left a failure recorded (the cheap way for a
    /// caller to stop at the first failure: the answer is a constant
    /// `false` unless the batch was full; speed: keep it so, a check of
    /// [`Self::has_failures`] per queued request cost the pin walk 10 %).
    ///
    /// Inlined into the caller (speed: keep it so), so the request is
    /// written into the queue in place; a copy of one built on the
    /// caller's stack stalls on store forwarding.
    #[inline(always)]
    pub(crate) fn update_va_mapping<T: FlushTarget + ?Sized>(
        &mut self,
        target: &T,
        va: u64,
        pte: u64,
        flags: u64,
        tag: Tag,
    ) -> bool {
        let failed = self.calls_full() && self.flush_full(target);
        let slot = Queued::Uvm {
            va,
            pte,
            flags,
            tag,
        };
        // SAFETY: `calls_full` is false after the check above (a flush
        // empties the queue), so `slots.len() < limit <= N`. Unchecked
        // because the optimizer cannot see `limit <= N` (speed: a second
        // bounds check per queued remap).
        unsafe { self.slots.push_unchecked(slot) };
        failed
    }

    /// Queue one `mmu_update` request, extending the previous call when it is
    /// an `mmu_update` too.
    #[inline]
    pub(crate) fn mmu_update<T: FlushTarget + ?Sized>(
        &mut self,
        target: &T,
        req: MmuUpdate,
        tag: Tag,
    ) {
        let fits = self.updates.len() < self.limit
            && self.arg_bytes + MMU_UPDATE_BYTES <= self.arg_space();
        match self.slots.last_mut() {
            Some(Queued::Mmu { count, .. }) if fits => *count += 1,
            _ => {
                if !fits || self.calls_full() {
                    self.flush(target);
                }
                let start = self.updates.len() as u16;
                self.slots.push(Queued::Mmu { start, count: 1 });
                self.mmu_calls += 1;
            }
        }
        self.updates.push(req);
        self.update_tags.push(tag);
        self.arg_bytes += MMU_UPDATE_BYTES;
    }

    /// Queue one `mmuext_op`, extending the previous call when it is an
    /// `mmuext_op` too. Inlined into the caller, as `update_va_mapping`,
    /// and returns whether a flush it made left a failure recorded, as
    /// that does.
    #[inline(always)]
    pub(crate) fn mmuext<T: FlushTarget + ?Sized>(
        &mut self,
        target: &T,
        op: MmuExtOp,
        tag: Tag,
    ) -> bool {
        let mut failed = false;
        let fits =
            self.ext.len() < self.limit && self.arg_bytes + MMUEXT_OP_BYTES <= self.arg_space();
        match self.slots.last_mut() {
            Some(Queued::Ext { count, .. }) if fits => *count += 1,
            _ => {
                if !fits || self.calls_full() {
                    failed = self.flush_full(target);
                }
                let start = self.ext.len() as u16;
                self.slots.push(Queued::Ext { start, count: 1 });
                self.mmu_calls += 1;
            }
        }
        self.ext.push(op);
        self.ext_tags.push(tag);
        self.arg_bytes += MMUEXT_OP_BYTES;
        failed
    }

    /// Queue a held PTE page's two requests in one go, when both fit
    /// without a flush (speed: one room check for the pair instead of
    /// one per request and callback; keep it): an `update_va_mapping` of
    /// `va` to `pte` (no flags) tagged `uvm_tag` and one `mmuext_op` `op`
    /// tagged `ext_tag`, the `mmuext_op` first when `ext_first`, then the
    /// callback that releases `pfn`'s lock after the flush that issues
    /// them unless the request tagged `watch` did not take effect.
    ///
    /// Returns false, having queued nothing, when they do not all fit or
    /// the `mmuext_op` would extend the previous call: the caller then
    /// queues them one by one, as before this fast path existed, so the
    /// batches issued are the same either way.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn queue_held_pair(
        &mut self,
        pfn: Pfn,
        va: u64,
        pte: u64,
        uvm_tag: Tag,
        op: MmuExtOp,
        ext_tag: Tag,
        ext_first: bool,
        watch: Tag,
    ) -> bool {
        let fits = self.slots.len() + 2 <= self.limit
            && self.ext.len() < self.limit
            && self.arg_bytes + MMUEXT_OP_BYTES <= self.arg_space()
            && self.deferred.len() < self.limit
            && !(ext_first && matches!(self.slots.last(), Some(Queued::Ext { .. })));
        if !fits {
            return false;
        }
        let uvm = Queued::Uvm {
            va,
            pte,
            flags: 0,
            tag: uvm_tag,
        };
        let ext = Queued::Ext {
            start: self.ext.len() as u16,
            count: 1,
        };
        // SAFETY: checked above: two call slots, one `mmuext_op` (and its
        // tag: the two lists grow together) and one callback below the
        // limit, which is at most N.
        unsafe {
            if ext_first {
                self.slots.push_unchecked(ext);
                self.slots.push_unchecked(uvm);
            } else {
                self.slots.push_unchecked(uvm);
                self.slots.push_unchecked(ext);
            }
            self.ext.push_unchecked(op);
            self.ext_tags.push_unchecked(ext_tag);
            self.deferred
                .push_unchecked(Deferred::UnlockPte { pfn, watch });
        }
        self.mmu_calls += 1;
        self.arg_bytes += MMUEXT_OP_BYTES;
        true
    }

    /// Register a callback to run after this batch is issued; flushes first
    /// if the callback list is full. Returns whether that flush left a
    /// failure recorded, as [`Self::update_va_mapping`] does.
    #[inline(always)]
    pub(crate) fn defer<T: FlushTarget + ?Sized>(&mut self, target: &T, d: Deferred) -> bool {
        let failed = self.deferred.len() >= self.limit && self.flush_cold(target);
        // Inlined into the caller, so the callback is written in place (a
        // 16-byte copy of one built on the caller's stack stalled on
        // store forwarding).
        self.deferred.push(d);
        failed
    }

    /// The flush of a full batch, out of the inlined queueing paths;
    /// returns whether a failure is recorded after it.
    #[inline(never)]
    fn flush_full<T: FlushTarget + ?Sized>(&mut self, target: &T) -> bool {
        self.flush(target);
        self.has_failures() && target.stop_on_failure()
    }

    /// [`Self::flush_full`] for a full callback list (rare).
    #[cold]
    #[inline(never)]
    fn flush_cold<T: FlushTarget + ?Sized>(&mut self, target: &T) -> bool {
        self.flush(target);
        self.has_failures() && target.stop_on_failure()
    }

    /// Issue everything queued, record per-request outcomes, then run the
    /// callbacks in the order they were registered. Returns the number of
    /// calls that failed.
    pub(crate) fn flush<T: FlushTarget + ?Sized>(&mut self, target: &T) -> usize {
        let mut failed = 0;
        if !self.slots.is_empty() {
            failed = self.issue_calls(target);
        }
        if !self.deferred.is_empty() {
            self.run_callbacks(target);
        }
        self.slots.clear();
        self.updates.clear();
        self.update_tags.clear();
        self.ext.clear();
        self.ext_tags.clear();
        self.arg_bytes = 0;
        self.mmu_calls = 0;
        failed
    }

    fn issue_calls<T: FlushTarget + ?Sized>(&mut self, target: &T) -> usize {
        let n = self.slots.len();
        // Speed: the backend reads the queue in place (no `Call` array is
        // built per flush), and the results need no reset per flush: every
        // `rc` is 0 here (kept so below), all the backend's contract
        // promises.
        target.issue(
            Calls::queued(&self.slots, &self.updates, &self.ext),
            &mut self.results[..n],
        );
        let seq = self.seq;
        self.seq += 1;
        self.stats.flushes += 1;
        if n == 1 {
            self.stats.direct_calls += 1;
        } else {
            self.stats.multicalls += 1;
        }
        self.stats.calls += n as u64;
        self.stats.mmu_updates += self.updates.len() as u64;
        self.stats.mmuext_ops += self.ext.len() as u64;

        // Every call that is not an `update_va_mapping` holds requests.
        self.stats.update_va_mappings += (n - self.mmu_calls) as u64;
        let mut failed = 0;
        // One OR over every result, without an early exit (speed: the
        // compiler vectorizes it; keep it branch-free).
        if self.results[..n].iter().fold(0, |any, r| any | r.rc) == 0 {
            return 0;
        }
        for (i, s) in self.slots.iter().enumerate() {
            let r = self.results[i];
            if r.rc == 0 {
                continue;
            }
            // Back to success for the next flush (see above).
            self.results[i] = CallResult::default();
            let (kind, tags): (CallKind, &[Tag]) = match s {
                Queued::Uvm { tag, .. } => (CallKind::UpdateVaMapping, core::slice::from_ref(tag)),
                Queued::Mmu { start, count } => (
                    CallKind::MmuUpdate,
                    &self.update_tags[*start as usize..(*start + *count) as usize],
                ),
                Queued::Ext { start, count } => (
                    CallKind::MmuExtOp,
                    &self.ext_tags[*start as usize..(*start + *count) as usize],
                ),
            };
            failed += 1;
            // A backend that reports nonsense (`done` past the end) is
            // clamped: at least the last request is taken to have failed.
            let done = (r.done as usize).min(tags.len() - 1);
            self.failures.push(Failure {
                flush: seq,
                call: i,
                item: done,
                kind,
                errno: r.rc.saturating_neg(),
                tag: tags[done],
            });
            self.not_applied
                .extend(tags[done..].iter().copied().filter(|t| *t != NO_TAG));
        }
        self.stats.failed_calls += failed as u64;
        failed
    }

    fn run_callbacks<T: FlushTarget + ?Sized>(&mut self, target: &T) {
        // By index, then cleared: no copy of the whole callback array.
        self.stats.callbacks += self.deferred.len() as u64;
        // Nothing failed (the usual case): every lock is released, the
        // preempt count once for all (speed: keep this loop this lean).
        if self.not_applied.is_empty() {
            let mut released = 0;
            for d in &self.deferred {
                match *d {
                    Deferred::UnlockPte { pfn, .. } => {
                        // SAFETY: the engine queues this callback only for
                        // a lock it took and still holds.
                        unsafe { target.unlock_pte(pfn) };
                        released += 1;
                    }
                    #[cfg(test)]
                    Deferred::Call { f, data } => f(data),
                }
            }
            self.preempt.release_n(released);
            self.deferred.clear();
            return;
        }
        for i in 0..self.deferred.len() {
            let d = self.deferred[i];
            match d {
                Deferred::UnlockPte { pfn, watch } => {
                    if watch != NO_TAG && self.not_applied.contains(&watch) {
                        self.kept_locks.push(pfn);
                    } else {
                        // SAFETY: the engine queues this callback only for
                        // a lock it took and still holds.
                        unsafe { target.unlock_pte(pfn) };
                        self.preempt.release();
                    }
                }
                #[cfg(test)]
                Deferred::Call { f, data } => f(data),
            }
        }
        self.deferred.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Call, ExtCmd};
    use core::cell::RefCell;

    #[derive(Default)]
    struct Rec {
        issued: RefCell<Vec<Vec<(CallKind, usize)>>>,
        unlocked: RefCell<Vec<u64>>,
        /// (pfn, flushes issued when it was locked / unlocked)
        lock_events: RefCell<Vec<(&'static str, u64, usize)>>,
        fail: Option<(usize, usize, i32, usize)>, // (flush, call, errno, done)
    }
    impl FlushTarget for Rec {
        fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
            let n = self.issued.borrow().len();
            self.issued
                .borrow_mut()
                .push(calls.iter().map(|c| (c.kind(), c.count())).collect());
            for (i, c) in calls.iter().enumerate() {
                results[i] = match self.fail {
                    Some((f, k, e, d)) if f == n && k == i => CallResult::err(e, d),
                    _ => CallResult::ok(c.count()),
                };
            }
        }
        unsafe fn unlock_pte(&self, pfn: Pfn) {
            self.unlocked.borrow_mut().push(pfn.0);
            let n = self.issued.borrow().len();
            self.lock_events.borrow_mut().push(("unlock", pfn.0, n));
        }
    }

    fn ext(n: u64) -> MmuExtOp {
        MmuExtOp {
            cmd: ExtCmd::PinL1Table,
            arg1: n,
            arg2: 0,
        }
    }

    #[test]
    fn merges_consecutive_requests() {
        let t = Rec::default();
        let mut b: Batch<8> = Batch::new();
        b.mmu_update(&t, MmuUpdate { ptr: 8, val: 1 }, 0);
        b.mmu_update(&t, MmuUpdate { ptr: 16, val: 2 }, 1);
        b.mmuext(&t, ext(1), 2);
        b.mmuext(&t, ext(2), 3);
        b.update_va_mapping(&t, 0x1000, 0, 0, 4);
        b.mmuext(&t, ext(3), 5);
        assert_eq!(b.len(), 4);
        b.flush(&t);
        assert_eq!(
            t.issued.borrow()[0],
            [
                (CallKind::MmuUpdate, 2),
                (CallKind::MmuExtOp, 2),
                (CallKind::UpdateVaMapping, 1),
                (CallKind::MmuExtOp, 1)
            ]
        );
        assert_eq!(b.stats().mmu_updates, 2);
        assert_eq!(b.stats().multicalls, 1);
    }

    /// A held page's lock is released after the flush that issues the
    /// request registered last for it, also when its two requests land in
    /// different flushes: never before.
    #[test]
    fn held_pte_is_released_after_the_issue_of_its_last_request() {
        let t = Rec::default();
        let mut b: Batch<8> = Batch::new();
        b.update_va_mapping(&t, 0x1000, 0, 0, 0);
        b.preempt_mut().acquire().unwrap();
        b.mmuext(&t, ext(7), 1);
        b.defer(
            &t,
            Deferred::UnlockPte {
                pfn: Pfn(7),
                watch: 1,
            },
        );
        assert!(t.lock_events.borrow().is_empty(), "released while queued");
        b.flush(&t);
        assert_eq!(*t.lock_events.borrow(), [("unlock", 7, 1)]);
        assert_eq!(b.preempt().held(), 0);
        // Capacity 1: the remap and the pin go out in two flushes, and the
        // lock spans both.
        let t = Rec::default();
        let mut b: Batch<1> = Batch::new();
        b.update_va_mapping(&t, 0x1000, 0, 0, 0);
        b.preempt_mut().acquire().unwrap();
        b.mmuext(&t, ext(9), 1);
        b.defer(
            &t,
            Deferred::UnlockPte {
                pfn: Pfn(9),
                watch: 1,
            },
        );
        b.flush(&t);
        assert_eq!(t.issued.borrow().len(), 2);
        assert_eq!(*t.lock_events.borrow(), [("unlock", 9, 2)]);
    }

    #[test]
    fn full_batch_flushes_first_and_single_call_is_direct() {
        let t = Rec::default();
        let mut b: Batch<2> = Batch::new();
        for i in 0..5 {
            b.update_va_mapping(&t, i, 0, 0, i as Tag);
        }
        assert_eq!(t.issued.borrow().len(), 2);
        b.flush(&t);
        let issued = t.issued.borrow();
        assert_eq!(
            issued.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        assert_eq!(b.stats().multicalls, 2);
        assert_eq!(b.stats().direct_calls, 1);
        assert_eq!(b.stats().flushes, 3);
    }

    #[test]
    fn runtime_limit_behaves_like_a_smaller_capacity() {
        let t = Rec::default();
        let mut b: Batch<256> = Batch::with_limit(3);
        for i in 0..7 {
            b.update_va_mapping(&t, i, 0, 0, i as Tag);
        }
        b.flush(&t);
        let sizes: Vec<usize> = t.issued.borrow().iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
        assert_eq!(b.capacity(), 3);
    }

    #[test]
    fn arg_space_limits_merging() {
        let t = Rec::default();
        // N = 2: 32 bytes of request space, so one 24-byte mmuext_op fits and
        // the second must flush first.
        let mut b: Batch<2> = Batch::new();
        b.mmuext(&t, ext(1), 0);
        assert_eq!(b.arg_bytes(), 24);
        b.mmuext(&t, ext(2), 1);
        assert_eq!(t.issued.borrow().len(), 1);
        assert_eq!(b.arg_bytes(), 24);
        // Two 16-byte mmu_updates fill 32 bytes exactly.
        let mut b: Batch<2> = Batch::new();
        b.mmu_update(&t, MmuUpdate::default(), 0);
        b.mmu_update(&t, MmuUpdate::default(), 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b.arg_bytes(), 32);
    }

    static ORDER: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
    fn record(d: usize) {
        // Shift in each callback's id so the order is visible.
        let _ = ORDER.fetch_update(
            core::sync::atomic::Ordering::SeqCst,
            core::sync::atomic::Ordering::SeqCst,
            |v| Some(v * 10 + d),
        );
    }

    #[test]
    fn callbacks_run_after_issue_in_order_and_flush_when_full() {
        let t = Rec::default();
        let mut b: Batch<2> = Batch::new();
        b.update_va_mapping(&t, 1, 0, 0, 0);
        b.defer(&t, Deferred::Call { f: record, data: 1 });
        b.defer(&t, Deferred::Call { f: record, data: 2 });
        assert_eq!(t.issued.borrow().len(), 0, "callbacks alone do not flush");
        // The third callback does not fit: flush first (issuing the call,
        // then running callbacks 1 and 2 in order).
        b.defer(&t, Deferred::Call { f: record, data: 3 });
        assert_eq!(t.issued.borrow().len(), 1);
        assert_eq!(ORDER.load(core::sync::atomic::Ordering::SeqCst), 12);
        b.flush(&t);
        assert_eq!(ORDER.load(core::sync::atomic::Ordering::SeqCst), 123);
        assert_eq!(b.stats().callbacks, 3);
    }

    /// The backend writes failures only; a result it wrote as a failure
    /// must not leak into the next flush (the batch resets it), and the
    /// backend sees the batch's own queue, in order.
    #[test]
    fn results_arrive_as_success_after_a_failed_flush() {
        struct FailFirstFlush(RefCell<u32>, RefCell<Vec<Vec<Call<'static>>>>);
        impl FlushTarget for FailFirstFlush {
            fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
                assert!(results.iter().all(|r| r.rc == 0), "results not reset");
                self.1.borrow_mut().push(
                    calls
                        .iter()
                        .map(|c| match c {
                            Call::UpdateVaMapping { va, pte, flags } => {
                                Call::UpdateVaMapping { va, pte, flags }
                            }
                            Call::MmuUpdate(r) => Call::MmuUpdate(r.to_vec().leak()),
                            Call::MmuExtOp(o) => Call::MmuExtOp(o.to_vec().leak()),
                        })
                        .collect(),
                );
                let mut n = self.0.borrow_mut();
                if *n == 0 {
                    results[0] = CallResult::err(22, 0);
                    results[2] = CallResult::err(16, 1);
                }
                *n += 1;
            }
            unsafe fn unlock_pte(&self, _: Pfn) {}
        }
        let t = FailFirstFlush(RefCell::new(0), RefCell::new(Vec::new()));
        let mut b: Batch<4> = Batch::new();
        b.update_va_mapping(&t, 0x1000, 7, 0, 0);
        b.mmu_update(&t, MmuUpdate { ptr: 8, val: 1 }, 1);
        b.mmuext(&t, ext(5), 2);
        b.mmuext(&t, ext(6), 3);
        assert_eq!(b.flush(&t), 2);
        assert_eq!(b.not_applied(), [0, 3]);
        let _ = b.take_failures();
        b.update_va_mapping(&t, 0x2000, 8, 0, 4);
        b.mmu_update(&t, MmuUpdate { ptr: 16, val: 2 }, 5);
        b.mmuext(&t, ext(9), 6);
        assert_eq!(b.flush(&t), 0, "a stale failure was reported");
        assert!(b.failures().is_empty());
        let issued = t.1.borrow();
        assert_eq!(
            issued[0],
            [
                Call::UpdateVaMapping {
                    va: 0x1000,
                    pte: 7,
                    flags: 0
                },
                Call::MmuUpdate(&[MmuUpdate { ptr: 8, val: 1 }]),
                Call::MmuExtOp(&[ext(5), ext(6)]),
            ]
        );
        assert_eq!(issued[1].len(), 3);
        // The view and a list of the same calls read the same.
        let list = Calls::list(&issued[0]);
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().collect::<Vec<_>>(), issued[0]);
        assert_eq!(list.get(3), None);
    }

    #[test]
    fn failures_name_entry_and_keep_watched_locks() {
        let t = Rec {
            fail: Some((0, 1, 22, 1)),
            ..Default::default()
        };
        let mut b: Batch<8> = Batch::new();
        b.preempt_mut().acquire().unwrap();
        b.preempt_mut().acquire().unwrap();
        b.update_va_mapping(&t, 1, 0, 0, 10);
        b.mmuext(&t, ext(1), 11);
        b.mmuext(&t, ext(2), 12);
        b.mmuext(&t, ext(3), 13);
        b.defer(
            &t,
            Deferred::UnlockPte {
                pfn: Pfn(7),
                watch: 10,
            },
        );
        b.defer(
            &t,
            Deferred::UnlockPte {
                pfn: Pfn(8),
                watch: 12,
            },
        );
        assert_eq!(b.flush(&t), 1);
        let f = b.failures()[0];
        assert_eq!(
            (f.call, f.item, f.errno, f.tag, f.kind),
            (1, 1, 22, 12, CallKind::MmuExtOp)
        );
        assert_eq!(b.not_applied(), [12, 13]);
        assert_eq!(*t.unlocked.borrow(), [7]);
        assert_eq!(b.take_kept_locks(), [Pfn(8)]);
        assert_eq!(b.preempt().held(), 1);
    }
}
