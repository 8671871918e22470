//! # pagepin-backends
//!
//! Backends for the pagepin engine, each behind a feature.
#![warn(missing_docs)]

#[cfg(feature = "mock")]
pub mod mock;
#[cfg(feature = "native")]
pub mod native;
