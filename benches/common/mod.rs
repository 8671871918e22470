//! Spaces the benches share: `mib` MiB of 4 KiB pages mapped contiguously,
//! on the Xen simulator or on the no-op backend.
//!
//! The benches are a package of their own so they build the engine without
//! the `sabotage` test hooks (see `Cargo.toml`).

pub mod floor;
pub mod vs_crate;

use std::sync::Arc;

use pagepin::backends::mock::NullBackend;
use pagepin::backends::xen::{xen_env, XenBackend, XenEnv, XenSim};
use pagepin::{
    AddressSpace, Backend, DefaultRawLock, EntryFlags, FrameStore, LockPolicy, PageSize,
    SpaceOptions, X86_64,
};

/// The Xen backend over the simulator.
pub type Xb = XenBackend<Arc<XenSim>>;

/// First mapped address: root slot 0, L3 slot 64 (64 GiB).
pub const BASE_VA: u64 = 0x10_0000_0000;

/// 4 KiB pages in `mib` MiB.
pub fn pages(mib: u64) -> u64 {
    mib * 256
}

/// Table frames a space of `mib` MiB needs (L1s, L2s, L3, root, slack).
pub fn table_frames(mib: u64) -> usize {
    let l1 = pages(mib).div_ceil(512) as usize;
    l1 + l1.div_ceil(512) + 8
}

/// Map `mib` MiB of 4 KiB pages at [`BASE_VA`] to data pages
/// `data_base..`, user read-write.
pub fn populate<P: LockPolicy, B: Backend>(
    s: &AddressSpace<X86_64, P, B>,
    mib: u64,
    data_base: u64,
) {
    let flags = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER;
    for i in 0..pages(mib) {
        s.map(
            BASE_VA + (i << 12),
            (data_base + i) << 12,
            PageSize::Size4K,
            flags,
        )
        .expect("map");
    }
}

/// A Xen-simulator environment holding `spaces` spaces of `mib` MiB each
/// (data pages below the table memory).
pub fn xen_env_for(mib: u64, spaces: usize, trap_ns: u64) -> XenEnv<DefaultRawLock> {
    let tables = table_frames(mib) * spaces;
    let data = pages(mib) as usize * spaces;
    xen_env::<X86_64, DefaultRawLock>(tables, data + tables, 7, trap_ns).expect("xen env")
}

/// One populated space on the Xen simulator.
pub fn xen_space<P: LockPolicy<Lock = DefaultRawLock>>(
    mib: u64,
    trap_ns: u64,
) -> (XenEnv<DefaultRawLock>, AddressSpace<X86_64, P, Xb>) {
    let e = xen_env_for(mib, 1, trap_ns);
    let s = AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default())
        .expect("space");
    populate(&s, mib, 0);
    (e, s)
}

/// One populated space on the no-op backend.
pub fn null_space<P: LockPolicy<Lock = DefaultRawLock>>(
    mib: u64,
) -> AddressSpace<X86_64, P, NullBackend> {
    let frames = table_frames(mib);
    let store = Arc::new(FrameStore::new(frames, 0));
    let s =
        AddressSpace::new(store, Arc::new(NullBackend), SpaceOptions::default()).expect("space");
    populate(&s, mib, frames as u64);
    s
}

/// Table pages one pin of a space of `mib` MiB remaps (L1s, L2s, L3, root).
pub fn table_pages(mib: u64) -> u64 {
    let l1 = pages(mib).div_ceil(512);
    l1 + l1.div_ceil(512) + 2
}

/// The round count of an interleaved report: the first number among the
/// arguments (`cargo bench` passes `--bench` too), else `default`; at
/// least 1.
pub fn rounds_arg(default: u32) -> u32 {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<u32>().ok())
        .unwrap_or(default)
        .max(1)
}
