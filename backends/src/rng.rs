//! [`SplitMix64`]: the project's one seeded pseudo-random generator.

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit state that advances
/// by a constant, mixed by two multiply-xorshift rounds. Small, fast,
/// `no_std`, and good enough to pick addresses, operations and shuffles;
/// not for anything secret.
///
/// Written by hand, not taken from `rand`: a seed must replay the same
/// sequence whatever dependency versions Cargo resolves (`rand`'s
/// generators and its helpers have changed their outputs between
/// releases), because a failing run is reproduced from its seed. The
/// simulator's p2m shuffle, the KVM checker's sampled addresses, the tests,
/// the dump fuzzer, the `simulate` example and the PV test guest
/// (`no_std`) all draw from this one type.
///
/// ```
/// use pagepin_backends::SplitMix64;
///
/// let mut rng = SplitMix64::new(0);
/// assert_eq!(rng.next(), 0xe220_a839_7b1d_cdaf);
/// let die = rng.below(6) + 1;
/// assert!((1..=6).contains(&die));
/// // The same seed, the same numbers.
/// assert_eq!(SplitMix64::new(0).next(), 0xe220_a839_7b1d_cdaf);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator of `seed`. Every seed is fine, 0 included; the
    /// seed is the state, so a caller that wants its own stream mixes its
    /// seed first (`seed ^ CONSTANT`).
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    // An endless stream: `u64`, never `None`, so not `Iterator::next`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`next() % n`: the modulo bias is negligible for
    /// the small `n` it is used with); 0 for `n == 0`, without advancing.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.odds(percent, 100)
    }

    /// True with probability `num` / `den` (`den` > 0; `num` >= `den` is
    /// always true).
    pub fn odds(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One of `items`, uniformly.
    ///
    /// # Panics
    ///
    /// If `items` is empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    /// The first outputs for seed 0, from the algorithm's definition
    /// (computed apart from this code, in Python); they match Vigna's
    /// reference `splitmix64.c`.
    #[test]
    fn known_answers() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next(), 0x06c4_5d18_8009_454f);
        assert_eq!(r.next(), 0xf88b_b8a8_724c_81ec);
        let mut r = SplitMix64::new(0x5eed_f00d);
        assert_eq!(r.next(), 0x48f0_4efc_d891_b5ed);
        assert_eq!(r.next(), 0x9455_2dd5_153e_ff37);
    }

    #[test]
    fn a_seed_replays_its_sequence() {
        let (mut a, mut b) = (SplitMix64::new(42), SplitMix64::new(42));
        for _ in 0..1000 {
            assert_eq!(a.next(), b.next());
        }
        let mut c = SplitMix64::new(43);
        assert_ne!(SplitMix64::new(42).next(), c.next());
    }

    #[test]
    fn below_is_in_range_and_derived_from_next() {
        let mut r = SplitMix64::new(7);
        for n in 1..200u64 {
            let mut copy = r.clone();
            let v = r.below(n);
            assert!(v < n);
            assert_eq!(v, copy.next() % n);
        }
        // `below(0)` is 0 and draws nothing.
        let before = r.clone();
        assert_eq!(r.below(0), 0);
        assert_eq!(r, before);
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn chance_and_odds() {
        let mut r = SplitMix64::new(1);
        for _ in 0..1000 {
            assert!(!r.chance(0));
            assert!(r.chance(100));
            assert!(!r.odds(0, 7));
            assert!(r.odds(7, 7));
        }
        // Roughly the asked probability.
        let hits = (0..10_000).filter(|_| r.chance(30)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        let hits = (0..10_000).filter(|_| r.odds(1, 4)).count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
        // `chance(p)` is `odds(p, 100)`, draw for draw.
        let (mut a, mut b) = (SplitMix64::new(9), SplitMix64::new(9));
        for p in 0..=100 {
            assert_eq!(a.chance(p), b.odds(p, 100));
        }
    }

    #[test]
    fn pick_reaches_every_item() {
        let mut r = SplitMix64::new(3);
        let items = [10u8, 20, 30, 40];
        let mut seen = [false; 4];
        for _ in 0..200 {
            let v = r.pick(&items);
            let i = items.iter().position(|&x| x == v).expect("an item");
            seen[i] = true;
        }
        assert_eq!(seen, [true; 4]);
        assert_eq!(r.pick(&[5u32]), 5);
    }
}
