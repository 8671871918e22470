//! The tests' one seeded generator (SplitMix64): small, and a seed replays
//! the same run whatever the dependency versions. Only `core`: the PV test
//! guest's random programs (`xen-guest/src/program.rs`) use it too.
#![allow(dead_code)]

/// SplitMix64: small, seeded, good enough to pick addresses.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.odds(percent, 100)
    }
    /// True with probability `num` / `den` (`den` > 0).
    pub fn odds(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}
