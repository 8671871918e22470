#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use pagepin_engine as engine;
pub use pagepin_engine::*;

/// The backends (mock, Xen, native), each behind its feature.
pub use pagepin_backends as backends;

/// Page tables from memory dumps (the `pagepin-dump` crate; feature
/// `dump`, off by default).
#[cfg(feature = "dump")]
pub use pagepin_dump as dump;
#[cfg(feature = "parallel")]
pub mod parallel;
