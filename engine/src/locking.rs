//! The lock protocol in one place (docs/PROTOCOL.md §1, §3): the space
//! lock and PTE-lock guards writers hold, the pinner's hold of a PTE page
//! (taken before the page's first request is queued, as Linux's
//! `xen_pin_page` takes it), and the deferred callback that releases it
//! after the flush that issues the page's last request. Lock order: the
//! space lock, then PTE locks; a writer holds one PTE lock at a time.

use crate::backend::{Backend, CallResult, Calls};
use crate::batch::{Deferred, FlushTarget, Tag};
use crate::frame::{FrameMeta, FrameStore, Pfn, PteLock};
use crate::lock::RawLock;
use crate::sync::{AtomicU64, Ordering};

/// The pieces a batch flush needs: issue through the backend, unlock
/// through the store.
pub(crate) struct Target<'a, L: RawLock, B: Backend> {
    pub(crate) store: &'a FrameStore<L>,
    pub(crate) backend: &'a B,
    /// `Sabotage::walk_on_after_failure`, read where a flush answers
    /// (out of the queueing fast path).
    #[cfg(feature = "sabotage")]
    pub(crate) walk_on_after_failure: bool,
}

impl<L: RawLock, B: Backend> FlushTarget for Target<'_, L, B> {
    #[inline]
    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        self.backend.issue(calls, results)
    }
    #[inline]
    unsafe fn unlock_pte(&self, pfn: Pfn) {
        if let Some(m) = self.store.meta(pfn) {
            // SAFETY: forwarded: the caller holds this lock.
            unsafe { m.lock().unlock() }
        }
    }
    #[cfg(feature = "sabotage")]
    fn stop_on_failure(&self) -> bool {
        !self.walk_on_after_failure
    }
}

/// Holds the space lock; releases it (and its preempt count) on drop.
pub(crate) struct SpaceLockGuard<'a, L: RawLock> {
    lock: &'a L,
}

impl<'a, L: RawLock> SpaceLockGuard<'a, L> {
    /// Take the space lock (waiting while it is held).
    #[inline]
    pub(crate) fn acquire(lock: &'a L) -> Self {
        lock.lock();
        SpaceLockGuard { lock }
    }
}

impl<L: RawLock> Drop for SpaceLockGuard<'_, L> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while this context holds the lock.
        unsafe { self.lock.unlock() }
    }
}

/// Holds a PTE-page lock for a writer.
pub(crate) struct PteLockGuard<'a> {
    lock: PteLock<'a>,
}

impl<'a> PteLockGuard<'a> {
    /// Take a PTE page's lock (waiting while it is held).
    #[inline]
    pub(crate) fn acquire(lock: PteLock<'a>) -> Self {
        lock.lock();
        PteLockGuard { lock }
    }
}

impl Drop for PteLockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: as for the space lock guard.
        unsafe { self.lock.unlock() }
    }
}

/// The pinner's hold of a PTE page: its lock, taken (waiting for a writer
/// inside) before the page's first request is queued, so no flush issues
/// that request without it; released by the callback [`unlock_after`]
/// registers after the page's last request. The caller has counted it in
/// its preempt count.
#[inline(always)]
pub(crate) fn hold_pte_for_batch(meta: &FrameMeta<'_>) {
    meta.lock().lock();
}

/// Deferred unlock of a PTE lock, with its watched tag.
#[inline]
pub(crate) fn unlock_after(pfn: Pfn, watch: Tag) -> Deferred {
    Deferred::UnlockPte { pfn, watch }
}

/// The PTE page the last one-page writer (`map`, `unmap`, `protect`)
/// wrote into, so the next one in the same 2 MiB goes straight to it
/// instead of walking every level (speed: the per-call writers' walk; keep
/// it). Written under the space lock only (a held guard is the proof), and
/// cleared by every write of an entry above L1, the only writes that can
/// unlink a table (they happen under that lock too, before the write).
/// Only a page whose tables above all belong to the space is remembered:
/// another space reaches a table only through a shared one, and would
/// unlink it under its own lock.
///
/// A sequence count makes it readable without the space lock (split, see
/// [`Self::peek`]): it is odd while the hint is being changed and moves on
/// every change, so a reader that sees the same even count before and
/// after reading both words read a pair that was set together, and a
/// count still unchanged later means no entry above L1 was written since.
pub(crate) struct PteHint {
    seq: AtomicU64,
    /// The 2 MiB region (`va >> 21`), or `u64::MAX` for none.
    region: AtomicU64,
    pfn: AtomicU64,
}

impl PteHint {
    /// No page remembered.
    pub(crate) fn new() -> Self {
        PteHint {
            seq: AtomicU64::new(0),
            region: AtomicU64::new(u64::MAX),
            pfn: AtomicU64::new(0),
        }
    }

    /// The remembered page, if it covers `region`.
    #[inline]
    pub(crate) fn get<L: RawLock>(
        &self,
        _held: &SpaceLockGuard<'_, L>,
        region: u64,
    ) -> Option<Pfn> {
        // Relaxed: the space lock orders these accesses.
        (self.region.load(Ordering::Relaxed) == region)
            .then(|| Pfn(self.pfn.load(Ordering::Relaxed)))
    }

    /// The remembered page, if it covers `region`, read without the space
    /// lock, with the sequence count it was read at. The page was a linked
    /// PTE page of the space at that count; it still is while
    /// [`Self::unchanged`] answers true for that count (the caller holds
    /// the page's lock, which an unlink of it takes).
    #[inline]
    pub(crate) fn peek(&self, region: u64) -> Option<(Pfn, u64)> {
        let seq = self.seq.load(Ordering::Acquire);
        let r = self.region.load(Ordering::Relaxed);
        let pfn = self.pfn.load(Ordering::Relaxed);
        // The words' loads before the second look at the count.
        crate::sync::fence(Ordering::Acquire);
        (seq & 1 == 0 && r == region && self.seq.load(Ordering::Relaxed) == seq)
            .then_some((Pfn(pfn), seq))
    }

    /// Whether the hint has not changed since [`Self::peek`] returned `seq`.
    #[inline]
    pub(crate) fn unchanged(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Acquire) == seq
    }

    /// Remember `pfn` as the PTE page of `region`.
    #[inline]
    pub(crate) fn set<L: RawLock>(&self, _held: &SpaceLockGuard<'_, L>, region: u64, pfn: Pfn) {
        self.write(region, pfn.0);
    }

    /// Forget it (an entry above L1 is about to change; the caller holds
    /// the space lock).
    #[inline]
    pub(crate) fn clear(&self) {
        // Already empty: no reader holds a count at which it named a page
        // (the count moved when it was emptied), so the count need not move.
        if self.region.load(Ordering::Relaxed) == u64::MAX {
            return;
        }
        self.write(u64::MAX, 0);
    }

    /// A seqlock write; writers are serialised by the space lock.
    #[inline]
    fn write(&self, region: u64, pfn: u64) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // The odd count before the words (a reader seeing a new word sees
        // the count move).
        crate::sync::fence(Ordering::Release);
        self.pfn.store(pfn, Ordering::Relaxed);
        self.region.store(region, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }
}
