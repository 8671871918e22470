//! The lock protocol in one place (docs/PROTOCOL.md §1, §3): the space
//! lock and PTE-lock guards writers hold, the flush target through which a
//! batch takes a held PTE page's lock right before the flush that issues
//! its first request, and the deferred callback that releases it after
//! the flush that issues its last. Lock order: the space lock, then PTE
//! locks; a writer holds one PTE lock at a time.

use crate::backend::{Backend, CallResult, Calls};
use crate::batch::{Deferred, FlushTarget, Tag};
use crate::frame::{FrameStore, Pfn, PteLock};
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
    fn lock_pte(&self, pfn: Pfn) {
        if let Some(m) = self.store.meta(pfn) {
            m.lock().lock();
        }
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
    fn drop(&mut self) {
        // SAFETY: as for the space lock guard.
        unsafe { self.lock.unlock() }
    }
}

/// Deferred unlock of a PTE lock, with its watched tag.
#[inline]
pub(crate) fn unlock_after(pfn: Pfn, watch: Tag) -> Deferred {
    Deferred::UnlockPte { pfn, watch }
}

/// The PTE page the last one-page writer (`map`, `unmap`, `protect`)
/// wrote into, so the next one in the same 2 MiB goes straight to it
/// instead of walking every level (speed: the per-call writers' walk; keep
/// it). It is a table of the space only while the space lock is held:
/// read and written under that lock (a held guard is the proof), and
/// cleared by every write of an entry above L1, the only writes that can
/// unlink a table (and they happen under that lock too). Only a page whose
/// tables above all belong to the space is remembered: another space
/// reaches a table only through a shared one, and would unlink it under
/// its own lock.
pub(crate) struct PteHint {
    /// The 2 MiB region (`va >> 21`), or `u64::MAX` for none.
    region: AtomicU64,
    pfn: AtomicU64,
}

impl PteHint {
    /// No page remembered.
    pub(crate) fn new() -> Self {
        PteHint {
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

    /// Remember `pfn` as the PTE page of `region`.
    #[inline]
    pub(crate) fn set<L: RawLock>(&self, _held: &SpaceLockGuard<'_, L>, region: u64, pfn: Pfn) {
        self.pfn.store(pfn.0, Ordering::Relaxed);
        self.region.store(region, Ordering::Relaxed);
    }

    /// Forget it (an entry above L1 is about to change).
    #[inline]
    pub(crate) fn clear(&self) {
        self.region.store(u64::MAX, Ordering::Relaxed);
    }
}
