//! # pagepin-engine
//!
//! The generic engine of pagepin: it walks an address space's page tables
//! and pins or unpins them with a hypervisor, the way Linux's Xen PV MMU
//! code does, while other threads keep updating entries.
//!
//! Layers, each naming only those below it (the asterinas page-table
//! shape: node, then cursor, then page table); the modules are private and
//! their items re-exported here, one path each:
//!
//! 1. `entry` ([`PageTableEntry`], [`EntryFlags`]), `mode` ([`PagingMode`]:
//!    [`X86_64`], [`La57`], [`Pae`]), `lock` ([`RawLock`], the [`Split`] /
//!    [`Global`] policies, the preempt-count model), `error` ([`Error`]),
//!    `backend` ([`Backend`]: what a hypervisor or hardware provides);
//! 2. `frame` ([`FrameStore`]: atomic entries and per-frame metadata); the
//!    pin journal, below `batch` ([`Batch`], the multicall batch, a per-CPU
//!    context);
//! 3. [`walk`]: the one descent primitive ([`walk::next`],
//!    [`walk::descend`]) and the full walk in protocol order; `locking`: the
//!    lock protocol (guards, the flush target, the deferred unlock);
//! 4. `space` ([`AddressSpace`]: its entry writes and lookups) and `cursor`:
//!    every write of a space goes through [`CursorMut`] (`map`, `unmap`,
//!    `protect` are one-page uses of it), and [`Reader`] translates in one
//!    read section;
//! 5. `pin`: [`AddressSpace::pin`] and [`AddressSpace::unpin`], each run as
//!    an operation object that owns the batch and the journal for one call,
//!    with rollback; [`pin_all`] / [`unpin_all`].
//!
//! The protocol the engine implements, and the hypervisor rules it lives
//! by, are in `docs/PROTOCOL.md` of the repository.
//!
//! # Cargo features
//!
//! - `std` (default): parking_lot locks and crossbeam-epoch reclamation.
//!   Without it the engine is `no_std` + `alloc`, depending on `arrayvec`
//!   and `bitflags` only.
//! - `sabotage`: test hooks that break the protocol on purpose
//!   (`Sabotage`, `AddressSpace::set_sabotage`) for negative controls;
//!   never in production (without it the broken branches are compiled
//!   out).
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

// Private modules, flat re-exports: one path to each item. `walk` stays a
// public namespace (the walker API: `walk::next`, `walk::descend`, ...),
// as do the ABI constant namespaces `errno`, `uvmf` and `mmu_cmd`.
mod backend;
mod batch;
mod cursor;
mod entry;
mod error;
mod frame;
mod journal;
mod lock;
mod locking;
mod mode;
mod pin;
mod space;
mod sync;
pub mod walk;

pub use backend::{
    errno, mmu_cmd, uvmf, Backend, Call, CallKind, CallResult, Calls, CallsIter, ExtCmd, MmuExtOp,
    MmuUpdate, StoreFault,
};
pub use batch::{
    Batch, BatchStats, Failure, Tag, ARG_BYTES_PER_ENTRY, DEFAULT_BATCH, MMUEXT_OP_BYTES,
    MMU_UPDATE_BYTES, NO_TAG,
};
pub use cursor::{CursorMut, Reader};
pub use entry::{EntryFlags, PageTableEntry};
pub use error::{Error, HypercallFailure, StepKind};
pub use frame::{
    read_guard, Frame, FrameMeta, FrameStore, Mfn, Owner, Pfn, PteLock, ReadGuard, TableMemory,
    ENTRIES_PER_FRAME, FRAME_SIZE,
};
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub use lock::ParkingLock;
pub use lock::{
    DefaultRawLock, Global, LockPolicy, PreemptCount, PreemptOverflow, RawLock, SpinLock, Split,
    PREEMPT_LIMIT, SPIN_ROUNDS,
};
pub use mode::{La57, Level, Pae, PageSize, PagingMode, X86_64};
pub use pin::{pin_all, unpin_all, PinStats, PinnedSet};
pub use space::{AddressSpace, Sabotage, SpaceOptions, Translation, WritePath};
