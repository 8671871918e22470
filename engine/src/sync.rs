//! Crate-private synchronisation facade: the one place the engine's atomics
//! come from, so a model checker's types can be swapped in: loom's under
//! `cfg(loom)`, shuttle's under `cfg(shuttle)`, core's otherwise.
//!
//! Table entries themselves stay `core` atomics in every build (they are
//! the `Backend` ABI's memory, and the protocol under test is about the
//! locks, flags and hypervisor calls around them, which the checkers do see).

#[cfg(not(any(loom, shuttle)))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};
#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle::sync::{Condvar, Mutex};

/// `core`'s in every build: it orders the table memory (`core` atomics)
/// for walkers without a read section, which run outside the model
/// checkers only.
pub(crate) use core::sync::atomic::fence;
pub(crate) use core::sync::atomic::{AtomicU64, Ordering};

/// Spin-wait hint; under a model checker, a yield so other threads run.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, shuttle)))]
    core::hint::spin_loop();
}
