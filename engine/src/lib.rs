//! # pagepin-engine
//!
//! The generic engine of pagepin: it walks an address space's page tables
//! and pins or unpins them with a hypervisor, the way Linux's Xen PV MMU
//! code does, while other threads keep updating entries.
//!
//! Layers, each naming only those below it (the asterinas page-table
//! shape: node, then cursor, then page table):
//!
//! 1. [`entry`], [`mode`], [`lock`] (raw locks, the [`Split`] / [`Global`]
//!    policies, the preempt-count model), [`error`], [`backend`] (what a
//!    hypervisor or hardware provides);
//! 2. [`frame`]: the frame store with atomic entries and per-frame
//!    metadata; the pin journal (private) below [`batch`], the multicall
//!    batch (a per-CPU context);
//! 3. [`walk`]: the one descent primitive ([`walk::next`], [`walk::descend`])
//!    and the full walk in protocol order; the lock protocol (private
//!    `locking`: guards, the flush target, the deferred unlock);
//! 4. [`space`]: an address space, its entry writes and lookups;
//!    [`cursor`]: every write of a space goes through [`CursorMut`]
//!    (`map`, `unmap`, `protect` are one-page uses of it), and [`Reader`]
//!    translates in one read section;
//! 5. [`pin`]: pin and unpin, each run as an operation object that owns the
//!    batch and the journal for one call, with rollback.
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

pub mod backend;
pub mod batch;
pub mod cursor;
pub mod entry;
pub mod error;
pub mod frame;
pub(crate) mod journal;
pub mod lock;
pub(crate) mod locking;
pub mod mode;
pub mod pin;
pub mod space;
pub(crate) mod sync;
pub mod walk;

pub use backend::{Backend, Call, CallKind, CallResult, ExtCmd, MmuExtOp, MmuUpdate, StoreFault};
pub use batch::{Batch, BatchStats, Deferred, FlushTarget, DEFAULT_BATCH};
pub use cursor::{CursorMut, Reader};
pub use entry::{EntryFlags, PageTableEntry};
pub use error::{Error, HypercallFailure, StepKind};
pub use frame::{Frame, FrameStore, Mfn, Pfn, TableMemory};
pub use lock::{
    DefaultRawLock, Global, LockPolicy, PreemptCount, PreemptOverflow, RawLock, SpinLock, Split,
    PREEMPT_LIMIT,
};
pub use mode::{La57, Level, Pae, PageSize, PagingMode, X86_64};
pub use pin::{pin_all, unpin_all, PinStats, PinnedSet};
pub use space::{AddressSpace, SpaceOptions, Translation, WritePath};
