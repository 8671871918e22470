//! A blocking `RawLock` for the engine under a model checker (loom or
//! shuttle): waiters sleep on the checker's condition variable instead of
//! spinning, so the checker need not explore every spin of a busy-wait.
//! This is the lock a kernel would plug in, swapped for the checker's
//! primitives. Shared by the engine's models and the backends' loom test
//! (included with `#[path]`).

#[cfg(loom)]
use loom::sync::{Condvar, Mutex};
#[cfg(all(shuttle, not(loom)))]
use shuttle::sync::{Condvar, Mutex};

use pagepin_engine::RawLock;

/// The blocking lock.
pub struct ModelLock {
    held: Mutex<bool>,
    freed: Condvar,
}

// SAFETY: `held` is only changed under the model checker's mutex; `lock`
// waits until it is false and sets it, `unlock` clears it, so there is one
// holder at a time.
unsafe impl RawLock for ModelLock {
    fn new() -> Self {
        ModelLock {
            held: Mutex::new(false),
            freed: Condvar::new(),
        }
    }
    fn lock(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.freed.wait(held).unwrap();
        }
        *held = true;
    }
    fn try_lock(&self) -> bool {
        let mut held = self.held.lock().unwrap();
        !std::mem::replace(&mut *held, true)
    }
    unsafe fn unlock(&self) {
        *self.held.lock().unwrap() = false;
        self.freed.notify_one();
    }
    fn is_locked(&self) -> bool {
        *self.held.lock().unwrap()
    }
}

/// The split policy over the model lock.
pub type SplitM = pagepin_engine::Split<ModelLock>;
/// The global policy over the model lock.
pub type GlobalM = pagepin_engine::Global<ModelLock>;
