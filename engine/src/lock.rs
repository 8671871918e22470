//! Raw locks, lock policies and the preempt-count model.
//!
//! A kernel plugs its own spinlock in by implementing [`RawLock`] (the shape
//! of `lock_api::RawMutex`, kept local so the engine does not tie itself to
//! one `lock_api` major version).

use core::marker::PhantomData;

use crate::sync::{spin_hint, AtomicBool, Ordering};

/// A raw mutual-exclusion lock with no guard and no data.
///
/// # Safety
/// Implementors must provide mutual exclusion: between a `lock` (or a
/// successful `try_lock`) returning and the matching `unlock`, no other
/// `lock` may return and no other `try_lock` may succeed. Lock acquisition
/// must have acquire and unlock release ordering.
pub unsafe trait RawLock: Send + Sync + 'static {
    /// An unlocked lock as a constant, so a kernel can keep one in a
    /// `static` (as lock_api's `RawMutex::INIT`). Absent under the model
    /// checkers, whose atomics cannot be built in a constant.
    #[cfg(not(any(loom, shuttle)))]
    const INIT: Self;
    /// A new, unlocked lock.
    #[cfg(not(any(loom, shuttle)))]
    #[inline]
    fn new() -> Self
    where
        Self: Sized,
    {
        Self::INIT
    }
    /// A new, unlocked lock.
    #[cfg(any(loom, shuttle))]
    fn new() -> Self;
    /// Acquire the lock, spinning or blocking until it is free.
    fn lock(&self);
    /// Try to acquire the lock without waiting.
    fn try_lock(&self) -> bool;
    /// Release the lock.
    ///
    /// # Safety
    /// The lock must be held, by this context or one it handed ownership to.
    unsafe fn unlock(&self);
    /// Whether the lock is held by anyone (diagnostics and tests only).
    fn is_locked(&self) -> bool;
}

/// A one-byte test-and-test-and-set spinlock: the no_std default.
#[derive(Debug)]
pub struct SpinLock(AtomicBool);

// SAFETY: the compare-exchange from false to true with Acquire succeeds for
// one context at a time, and `unlock` stores false with Release.
unsafe impl RawLock for SpinLock {
    #[cfg(not(any(loom, shuttle)))]
    const INIT: Self = SpinLock(AtomicBool::new(false));
    #[cfg(any(loom, shuttle))]
    fn new() -> Self {
        SpinLock(AtomicBool::new(false))
    }
    #[inline]
    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                spin_hint();
            }
        }
    }
    #[inline]
    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
    #[inline]
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
    fn is_locked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// parking_lot's one-byte mutex: the std default (parks instead of spinning
/// when contended, which matters with more threads than cores).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub struct ParkingLock(parking_lot::RawMutex);

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
impl core::fmt::Debug for ParkingLock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("ParkingLock")
            .field(&self.is_locked())
            .finish()
    }
}

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
// SAFETY: delegates to parking_lot's RawMutex, which upholds the contract.
unsafe impl RawLock for ParkingLock {
    const INIT: Self = {
        use parking_lot::lock_api::RawMutex as _;
        ParkingLock(parking_lot::RawMutex::INIT)
    };
    #[inline]
    fn lock(&self) {
        use parking_lot::lock_api::RawMutex as _;
        // The guard token is stateless; unlock makes a fresh one.
        let _ = self.0.lock();
    }
    #[inline]
    fn try_lock(&self) -> bool {
        use parking_lot::lock_api::RawMutex as _;
        self.0.try_lock().is_some()
    }
    #[inline]
    unsafe fn unlock(&self) {
        use parking_lot::lock_api::RawMutex as _;
        // SAFETY: forwarded contract: the caller holds the lock.
        unsafe { self.0.unlock(Default::default()) }
    }
    fn is_locked(&self) -> bool {
        use parking_lot::lock_api::RawMutex as _;
        self.0.is_locked()
    }
}

/// Busy-wait rounds a PTE-lock waiter spends before it starts yielding the
/// CPU between attempts (see [`crate::frame::PteLock`]): such locks are held
/// for one entry write, or from a page's read-only remap until its batch is
/// flushed, so a waiter normally gets the lock while spinning, as with
/// Linux's PTE spinlocks.
pub const SPIN_ROUNDS: u32 = 4096;

/// The default raw lock: parking_lot's with `std`, [`SpinLock`] without.
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub type DefaultRawLock = ParkingLock;
/// The default raw lock: parking_lot's with `std`, [`SpinLock`] without.
#[cfg(any(not(feature = "std"), loom, shuttle))]
pub type DefaultRawLock = SpinLock;

/// How writers of page-table entries are serialised, and therefore how PTE
/// pages are pinned.
///
/// The choice is a constant, so the code path of the other policy is not
/// compiled into a monomorphised engine.
pub trait LockPolicy: sealed::Sealed + Send + Sync + 'static {
    /// The raw lock used for the space lock (and the frame store's free
    /// list). PTE-page locks are a bit in each frame's state byte, next to
    /// its pinned flag ([`crate::frame::PteLock`]).
    type Lock: RawLock;
    /// Name for reports ("split" / "global").
    const NAME: &'static str;
    /// Each PTE page has its own lock and writers of PTEs take only that
    /// one. Pinning must then hold a PTE page's lock from its read-only
    /// remap until its L1 pin is issued, and pin it as L1 separately.
    const SPLIT_PTE_LOCKS: bool;
}

/// Split PTE locks: a lock per PTE page (Linux `USE_SPLIT_PTE_PTLOCKS`).
pub struct Split<L: RawLock = DefaultRawLock>(PhantomData<L>);
/// One lock per space: writers of any entry take the space lock, and the
/// separate L1 pin does not exist.
pub struct Global<L: RawLock = DefaultRawLock>(PhantomData<L>);

/// The policies are the engine's: a third one would need its own pin
/// protocol, so the trait is sealed.
mod sealed {
    pub trait Sealed {}
    impl<L: super::RawLock> Sealed for super::Split<L> {}
    impl<L: super::RawLock> Sealed for super::Global<L> {}
}

impl<L: RawLock> LockPolicy for Split<L> {
    type Lock = L;
    const NAME: &'static str = "split";
    const SPLIT_PTE_LOCKS: bool = true;
}

impl<L: RawLock> LockPolicy for Global<L> {
    type Lock = L;
    const NAME: &'static str = "global";
    const SPLIT_PTE_LOCKS: bool = false;
}

/// The most spinlocks a context may hold: Linux's preempt count keeps the
/// nesting depth in 8 bits.
pub const PREEMPT_LIMIT: u32 = 255;

/// Counting one more lock would pass [`PREEMPT_LIMIT`]; converts into
/// [`Error::PreemptOverflow`](crate::Error::PreemptOverflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreemptOverflow {
    /// Locks held when refused.
    pub held: u32,
}

/// A per-context count of locks held, with the maximum reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreemptCount {
    held: u32,
    max: u32,
}

impl PreemptCount {
    /// Count one more lock; refuses (and counts nothing) past [`PREEMPT_LIMIT`].
    #[inline]
    pub fn acquire(&mut self) -> Result<(), PreemptOverflow> {
        if self.held >= PREEMPT_LIMIT {
            return Err(PreemptOverflow { held: self.held });
        }
        self.held += 1;
        if self.held > self.max {
            self.max = self.held;
        }
        Ok(())
    }
    /// Count one lock released.
    #[inline]
    pub fn release(&mut self) {
        debug_assert!(self.held > 0, "preempt count underflow");
        self.held = self.held.saturating_sub(1);
    }
    /// Count `n` locks released.
    #[inline]
    pub fn release_n(&mut self, n: u32) {
        debug_assert!(self.held >= n, "preempt count underflow");
        self.held = self.held.saturating_sub(n);
    }
    /// Locks held now.
    pub fn held(&self) -> u32 {
        self.held
    }
    /// The most locks held at once since creation or [`Self::reset_max`].
    pub fn max(&self) -> u32 {
        self.max
    }
    /// Start a new maximum from the current count.
    pub fn reset_max(&mut self) {
        self.max = self.held;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spinlock_excludes() {
        let l = SpinLock::new();
        assert!(l.try_lock());
        assert!(!l.try_lock());
        assert!(l.is_locked());
        // SAFETY: held above.
        unsafe { l.unlock() };
        assert!(!l.is_locked());
        assert_eq!(core::mem::size_of::<SpinLock>(), 1);
    }

    /// A lock in a `static`, as a kernel keeps its space locks.
    #[test]
    fn lock_in_a_static() {
        static LOCK: SpinLock = <SpinLock as RawLock>::INIT;
        assert!(LOCK.try_lock());
        assert!(LOCK.is_locked());
        // SAFETY: held above.
        unsafe { LOCK.unlock() };
        assert!(!LOCK.is_locked());
    }

    #[test]
    fn preempt_limit() {
        let mut p = PreemptCount::default();
        for _ in 0..PREEMPT_LIMIT {
            p.acquire().unwrap();
        }
        assert!(p.acquire().is_err());
        assert_eq!(p.held(), 255);
        p.release();
        assert_eq!(p.max(), 255);
    }
}
