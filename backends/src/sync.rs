//! Crate-private synchronisation facade for the simulated Xen hypervisor:
//! the one place [`crate::xen::sim::XenSim`]'s shared state (atomics,
//! locks, spin waits, per-thread data) comes from, so a model checker's
//! types can be swapped in: loom's under `cfg(loom)`, shuttle's under
//! `cfg(shuttle)`, std's (and parking_lot's mutex) otherwise. It mirrors
//! the engine's own facade (`pagepin-engine`'s `sync` module).
//!
//! Table entries stay `core` atomics in every build: they are the engine's
//! table memory, read by the simulator through the `TableMemory` trait,
//! as the engine's facade documents.

#[cfg(not(any(loom, shuttle)))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

pub(crate) use core::sync::atomic::Ordering;

/// A mutex with parking_lot's interface (`lock()` returns the guard): the
/// real parking_lot mutex, or a model checker's std-like one whose poison
/// result is unwrapped (the simulator never panics while holding it).
#[cfg(not(any(loom, shuttle)))]
pub(crate) use parking_lot::Mutex;

#[cfg(loom)]
use loom::sync::{Mutex as CheckerMutex, MutexGuard};
#[cfg(all(shuttle, not(loom)))]
use shuttle::sync::{Mutex as CheckerMutex, MutexGuard};

/// The model checker's mutex behind parking_lot's interface.
#[cfg(any(loom, shuttle))]
pub(crate) struct Mutex<T>(CheckerMutex<T>);

#[cfg(any(loom, shuttle))]
impl<T> Mutex<T> {
    pub(crate) fn new(v: T) -> Self {
        Mutex(CheckerMutex::new(v))
    }
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One round of a spin wait that has already spun `spins` times (the
/// caller's counter, incremented here): a CPU pause for the first rounds,
/// then a yield to the OS scheduler. Under a model checker every round is
/// a yield, so the checker schedules the thread the waiter waits for
/// instead of exploring each spin.
#[inline]
pub(crate) fn backoff(spins: &mut u32) {
    *spins += 1;
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, shuttle)))]
    {
        if *spins < 64 {
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// `thread_local!` from std, or the model checker's (whose values are per
/// model thread: a checker runs its threads on one OS thread, where a std
/// thread-local would be shared between them). Takes one `const`-initialised
/// declaration (the checkers' macros get the initialiser without `const`).
macro_rules! sim_thread_local {
    ($(#[$attr:meta])* $vis:vis static $name:ident: $t:ty = const { $init:expr };) => {
        #[cfg(not(any(loom, shuttle)))]
        std::thread_local!($(#[$attr])* $vis static $name: $t = const { $init };);
        #[cfg(loom)]
        loom::thread_local!($(#[$attr])* $vis static $name: $t = $init;);
        #[cfg(all(shuttle, not(loom)))]
        shuttle::thread_local!($(#[$attr])* $vis static $name: $t = $init;);
    };
}
pub(crate) use sim_thread_local as thread_local;
