//! # pagepin-engine
//!
//! The generic engine of pagepin: it walks an address space's page tables
//! and pins or unpins them with a hypervisor, the way Linux's Xen PV MMU
//! code does, while other threads keep updating entries.
//!
//! - [`mode`]: x86-64 (4- and 5-level) and PAE paging as types with constants;
//! - [`entry`]: 64-bit entries;
//! - [`frame`]: the frame store with atomic entries and per-frame metadata;
//! - [`lock`]: raw locks, the [`Split`] / [`Global`] policies, the
//!   preempt-count model;
//! - [`batch`]: the multicall batch;
//! - [`walk`]: the walk in protocol order;
//! - [`space`]: an address space and its writers;
//! - [`cursor`]: a writer holding a range's locks, a reader in one read
//!   section;
//! - [`pin`]: pin and unpin with rollback;
//! - [`backend`]: what a hypervisor or hardware provides.
//!
//! `no_std` + `alloc`; the default `std` feature brings parking_lot locks
//! and crossbeam-epoch reclamation.
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
