//! The domain's p2m: machine-contiguous extents in a seeded random order.

use crate::SplitMix64;

/// Default frames per p2m extent ([`SimConfig::p2m_extent`]): 2 MiB, a
/// superpage, the unit Xen prefers when it populates a guest.
///
/// [`SimConfig::p2m_extent`]: super::SimConfig::p2m_extent
pub const P2M_EXTENT: usize = 512;

/// Fewest extents a domain's p2m is cut into ([`SimConfig::p2m_extent`]).
///
/// [`SimConfig::p2m_extent`]: super::SimConfig::p2m_extent
pub const MIN_P2M_EXTENTS: usize = 64;

/// The p2m of a domain of `n` frames (`p2m[pfn] = mfn`): extents of
/// `extent` frames (shrunk to a power of two for a small domain, see
/// [`SimConfig::p2m_extent`]), machine-contiguous, placed in the order of
/// a uniformly random single cycle over the extents (Sattolo's algorithm,
/// seeded), so no extent, and hence no frame, is at its own place. With
/// `extent` 1 this is a random single n-cycle over the frames, the same
/// for a seed as the simulator's earlier fully random p2m.
///
/// [`SimConfig::p2m_extent`]: super::SimConfig::p2m_extent
pub fn p2m_permutation(n: usize, seed: u64, extent: usize) -> Vec<u64> {
    let mut e = extent.max(1);
    while e > 1 && n.div_ceil(e) < MIN_P2M_EXTENTS {
        e = (e.next_power_of_two() / 2).max(1);
    }
    let runs = n.div_ceil(e);
    // place[k]: position of extent k in machine memory.
    let mut place: Vec<usize> = (0..runs).collect();
    let mut rng = SplitMix64::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    for i in (1..runs).rev() {
        let j = rng.below(i as u64) as usize;
        place.swap(i, j);
    }
    // Machine start of each extent: the lengths of the extents placed
    // before it (only the last extent may be short).
    let len = |k: usize| if k + 1 == runs { n - k * e } else { e };
    let mut at = vec![0usize; runs];
    for (k, &p) in place.iter().enumerate() {
        at[p] = k;
    }
    let mut start = vec![0u64; runs];
    let mut m = 0u64;
    for &k in &at {
        start[k] = m;
        m += len(k) as u64;
    }
    (0..n)
        .map(|pfn| start[pfn / e] + (pfn % e) as u64)
        .collect()
}
