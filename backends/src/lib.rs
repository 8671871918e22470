//! # pagepin-backends
//!
//! Backends for the pagepin engine, each behind a feature.
#![warn(missing_docs)]

extern crate alloc;

#[cfg(feature = "mock")]
pub mod mock;
#[cfg(feature = "native")]
pub mod native;
#[cfg(feature = "xen")]
pub mod xen;
