//! # pagepin-backends
//!
//! Backends for the pagepin engine, each behind a feature.
//!
//! Without the `std` feature the crate is `no_std` + `alloc`: only the Xen
//! backend's ABI and `xen::XenBackend` are built, for a PV guest kernel
//! (`--no-default-features --features xen`); the simulator, mock and
//! native backends need `std`.
//!
//! # Cargo features
//!
//! - `std` (default): the simulated hypervisor (`xen::XenSim`), parking_lot
//!   locks, `libc` (madvise for the simulator's type table on Linux).
//! - `mock` (default, needs `std`): `mock::MockBackend`, which records every
//!   call and injects failures, and `mock::NullBackend`.
//! - `xen`: the Xen PV backend (`no_std` + `alloc`); with `std` also the
//!   simulator.
//! - `native` (needs `std`): x86-64 without pinning.
//! - `kvm`: the KVM checker of native tables (Linux; rust-vmm crates).
//!
//! # Observing a platform
//!
//! [`PinObserver`] asks any platform (the mock, the simulator, bare
//! hardware, a guest's view of real Xen) what it thinks of a frame:
//! read-only, typed as a page table, pinned; [`check_frame`] holds the
//! answers to what a table of a pinned (or unpinned) space must look like.
//! Always built, `no_std` included.
//!
//! # Seeded randomness
//!
//! [`SplitMix64`] is the one seeded generator of the project (the
//! simulator, the KVM checker, the tests and the PV test guest): a seed
//! replays the same sequence whatever dependency versions are resolved.
//! Always built, `no_std` included.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(feature = "mock")]
pub mod mock;
#[cfg(feature = "native")]
pub mod native;
mod observe;
mod rng;
#[cfg(all(feature = "xen", feature = "std"))]
mod sync;
#[cfg(feature = "xen")]
pub mod xen;

pub use observe::{check_frame, Expected, PinObserver};
pub use rng::SplitMix64;
