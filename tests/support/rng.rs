//! The tests' seeded generator: the project's one SplitMix64
//! (`pagepin_backends::SplitMix64`), under the name the tests use. A seed
//! replays the same run whatever the dependency versions.
#![allow(unused_imports)]

pub use pagepin_backends::SplitMix64 as Rng;
