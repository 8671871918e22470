//! The engine's own batch statistics on the no-op backend: a pin or unpin
//! of E multicall entries at batch N issues exactly ceil(E / N) traps, for
//! every N the benches sweep, under split and global; and a
//! `Batch::<256>::with_limit(n)` issues exactly what a `Batch<n>` does
//! (the batch_sweep bench relies on that).

use std::sync::Arc;

use pagepin::backends::mock::NullBackend;
use pagepin::{
    AddressSpace, Batch, BatchStats, EntryFlags, FrameStore, Global, LockPolicy, PageSize,
    SpaceOptions, Split, X86_64,
};

/// PTE pages mapped: spread over two L2s and two L3s.
const L1S: u64 = 40;

fn space<P: LockPolicy>() -> AddressSpace<X86_64, P, NullBackend> {
    let store = Arc::new(FrameStore::new(128, 0));
    let s = AddressSpace::new(store, Arc::new(NullBackend), SpaceOptions::default()).unwrap();
    for j in 0..L1S {
        let va = 0x10_0000_0000 + ((j % 2) << 39) + (((j / 2) % 2) << 30) + ((j / 4) << 21);
        s.map(
            va,
            0x100_0000 + (j << 12),
            PageSize::Size4K,
            EntryFlags::PRESENT,
        )
        .unwrap();
    }
    s
}

/// Table pages of the space: the L1s, 4 L2s, 2 L3s, the root.
const TABLES: u64 = L1S + 4 + 2 + 1;

/// Multicall entries of a pin (= of an unpin): one remap per table, one
/// root pin, and under split one L1 pin per PTE page.
fn entries<P: LockPolicy>() -> u64 {
    TABLES + 1 + if P::SPLIT_PTE_LOCKS { L1S } else { 0 }
}

fn check<P: LockPolicy, const N: usize>() -> (BatchStats, BatchStats) {
    let s = space::<P>();
    let mut b: Batch<N> = Batch::new();
    let pin = s.pin(&mut b).unwrap();
    assert_eq!(pin.tables as u64, TABLES);
    let after_pin = b.stats();
    s.unpin(&mut b).unwrap();
    let total = b.stats();
    let e = entries::<P>();
    let n = N as u64;
    assert_eq!(after_pin.calls, e, "{} N={N} pin", P::NAME);
    assert_eq!(after_pin.flushes, e.div_ceil(n), "{} N={N} pin", P::NAME);
    assert_eq!(total.calls, 2 * e, "{} N={N} unpin", P::NAME);
    assert_eq!(
        total.flushes - after_pin.flushes,
        e.div_ceil(n),
        "{} N={N} unpin",
        P::NAME
    );
    assert_eq!(total.multicalls + total.direct_calls, total.flushes);
    assert_eq!(total.failed_calls, 0);

    // The run-time limit behaves exactly like the capacity.
    let s = space::<P>();
    let mut b: Batch<256> = Batch::with_limit(N);
    s.pin(&mut b).unwrap();
    let lim_pin = b.stats();
    s.unpin(&mut b).unwrap();
    assert_eq!(lim_pin, after_pin, "{} with_limit({N}) pin", P::NAME);
    assert_eq!(b.stats(), total, "{} with_limit({N}) unpin", P::NAME);
    (after_pin, total)
}

fn sweep<P: LockPolicy>() {
    check::<P, 1>();
    check::<P, 2>();
    check::<P, 4>();
    check::<P, 8>();
    check::<P, 16>();
    check::<P, 32>();
    check::<P, 64>();
    check::<P, 128>();
    let (pin, _) = check::<P, 256>();
    assert_eq!(pin.flushes, 1, "everything fits one multicall");
}

#[test]
fn traps_are_ceil_entries_over_n_split() {
    sweep::<Split>();
}

#[test]
fn traps_are_ceil_entries_over_n_global() {
    sweep::<Global>();
}

#[test]
fn split_issues_the_l1_pins_global_does_not() {
    let (s, _) = check::<Split, 32>();
    let (g, _) = check::<Global, 32>();
    assert_eq!(s.mmuext_ops - g.mmuext_ops, L1S);
    assert_eq!(s.update_va_mappings, g.update_va_mappings);
}
