//! Exact call sequences of pin and unpin on the mock backend (docs/PROTOCOL.md §3, §10).

#[path = "support/mock.rs"]
mod common;

use std::sync::Arc;

use common::*;
use pagepin::backends::mock::{MockBackend, Recorded};
use pagepin::uvmf;
use pagepin::{
    AddressSpace, Batch, EntryFlags, ExtCmd, Global, Level, LockPolicy, MmuExtOp, Pae, PageSize,
    PagingMode, Pfn, SpaceOptions, Split, X86_64,
};

const RW: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER);

fn space<M: PagingMode, P: LockPolicy>(user_root: bool) -> AddressSpace<M, P, MockBackend> {
    let store = new_store(64);
    let backend = Arc::new(MockBackend::with_memory(store.clone()));
    AddressSpace::new(store, backend, SpaceOptions { user_root }).unwrap()
}

fn ro<M: PagingMode>(pfn: Pfn, flush: bool) -> Recorded {
    dm::<M>(pfn, false, flush)
}
fn rw<M: PagingMode>(pfn: Pfn, flush: bool) -> Recorded {
    dm::<M>(pfn, true, flush)
}
fn dm<M: PagingMode>(pfn: Pfn, writable: bool, flush: bool) -> Recorded {
    let mut flags =
        EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY | EntryFlags::NO_EXECUTE;
    if writable {
        flags |= EntryFlags::WRITABLE;
    }
    Recorded::UpdateVaMapping {
        va: M::DIRECT_MAP_BASE + (pfn.0 << 12),
        pte: pagepin::PageTableEntry::new(pfn.0, flags).bits(),
        flags: if flush { uvmf::TLB_FLUSH } else { uvmf::NONE },
    }
}
fn ext(ops: &[(ExtCmd, Pfn)]) -> Recorded {
    Recorded::MmuExtOp(
        ops.iter()
            .map(|&(c, p)| MmuExtOp {
                cmd: c,
                arg1: p.0,
                arg2: 0,
            })
            .collect(),
    )
}

/// x86-64: L3a -> (L2a -> L1a, L1b), (L2b -> L1c); returns tables in walk order.
fn build_x86<P: LockPolicy>(s: &AddressSpace<X86_64, P, MockBackend>) -> Vec<(Pfn, Level)> {
    s.map(0x1000, 0x5000_0000, PageSize::Size4K, RW).unwrap();
    s.map(0x20_0000, 0x5000_1000, PageSize::Size4K, RW).unwrap();
    s.map(0x4000_0000, 0x5000_2000, PageSize::Size4K, RW)
        .unwrap();
    // A 2 MiB leaf is never descended into.
    s.map(0x4060_0000, 0x6000_0000, PageSize::Size2M, RW)
        .unwrap();
    let t = s.table_frames().unwrap();
    let levels: Vec<Level> = t.iter().map(|x| x.1).collect();
    use Level::*;
    assert_eq!(
        levels,
        [L3, L2, L1, L1, L2, L1, L4],
        "walk order: pre-order, root last"
    );
    assert_eq!(t.last().unwrap().0, s.root());
    t
}

fn pin_unpin<M: PagingMode, P: LockPolicy>(
    s: &AddressSpace<M, P, MockBackend>,
) -> (Vec<Recorded>, Vec<Recorded>) {
    s.backend().clear();
    let mut b: Batch<32> = Batch::new();
    s.pin(&mut b).unwrap();
    let pin = s.backend().calls();
    assert_eq!(
        s.backend().batch_count(),
        1,
        "everything fits one batch of 32"
    );
    s.unpin(&mut b).unwrap();
    let unpin = s.backend().calls()[pin.len()..].to_vec();
    (pin, unpin)
}

#[test]
fn x86_64_split_exact_sequence() {
    let s = space::<X86_64, Split>(false);
    let t = build_x86(&s);
    let [l3, l2a, l1a, l1b, l2b, l1c, root] = t.iter().map(|x| x.0).collect::<Vec<_>>()[..] else {
        panic!()
    };
    let (pin, unpin) = pin_unpin(&s);
    type M = X86_64;
    assert_eq!(
        pin,
        [
            ro::<M>(l3, false),
            ro::<M>(l2a, false),
            ro::<M>(l1a, false),
            ext(&[(ExtCmd::PinL1Table, l1a)]),
            ro::<M>(l1b, false),
            ext(&[(ExtCmd::PinL1Table, l1b)]),
            ro::<M>(l2b, false),
            ro::<M>(l1c, false),
            ext(&[(ExtCmd::PinL1Table, l1c)]),
            ro::<M>(root, true),
            ext(&[(ExtCmd::PinL4Table, root)]),
        ]
    );
    assert_eq!(
        unpin,
        [
            ext(&[(ExtCmd::UnpinTable, root)]),
            rw::<M>(l3, false),
            rw::<M>(l2a, false),
            ext(&[(ExtCmd::UnpinTable, l1a)]),
            rw::<M>(l1a, false),
            ext(&[(ExtCmd::UnpinTable, l1b)]),
            rw::<M>(l1b, false),
            rw::<M>(l2b, false),
            ext(&[(ExtCmd::UnpinTable, l1c)]),
            rw::<M>(l1c, false),
            rw::<M>(root, true),
        ]
    );
}

#[test]
fn x86_64_global_has_no_l1_pin() {
    let s = space::<X86_64, Global>(false);
    let t = build_x86(&s);
    let (pin, unpin) = pin_unpin(&s);
    type M = X86_64;
    let mut expect: Vec<Recorded> = t.iter().map(|&(p, l)| ro::<M>(p, l == Level::L4)).collect();
    expect.push(ext(&[(ExtCmd::PinL4Table, s.root())]));
    assert_eq!(pin, expect);
    let mut expect = vec![ext(&[(ExtCmd::UnpinTable, s.root())])];
    expect.extend(t.iter().map(|&(p, l)| rw::<M>(p, l == Level::L4)));
    assert_eq!(unpin, expect);
    assert_clean(&s);
}

#[test]
fn x86_64_user_root_pinned_after_root_and_unpinned_first() {
    let s = space::<X86_64, Global>(true);
    let t = build_x86(&s);
    let u = s.user_root().unwrap();
    // The user root mirrors the user half of the root.
    let root_frame = s.store().frame(s.root()).unwrap();
    let user_frame = s.store().frame(u).unwrap();
    let load = |f: &pagepin::Frame, i| f.entry(i).load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(root_frame, 0), load(user_frame, 0));
    let (pin, unpin) = pin_unpin(&s);
    type M = X86_64;
    let mut expect: Vec<Recorded> = t[..t.len() - 1]
        .iter()
        .map(|&(p, _)| ro::<M>(p, false))
        .collect();
    expect.push(ro::<M>(u, false));
    expect.push(ro::<M>(s.root(), true));
    // Consecutive mmuext ops merge into one call.
    expect.push(ext(&[
        (ExtCmd::PinL4Table, s.root()),
        (ExtCmd::PinL4Table, u),
    ]));
    assert_eq!(pin, expect);
    let mut expect = vec![
        ext(&[(ExtCmd::UnpinTable, s.root()), (ExtCmd::UnpinTable, u)]),
        rw::<M>(u, false),
    ];
    expect.extend(t.iter().map(|&(p, l)| rw::<M>(p, l == Level::L4)));
    assert_eq!(unpin, expect);
    assert_clean(&s);
}

fn build_pae<P: LockPolicy>(s: &AddressSpace<Pae, P, MockBackend>) -> Vec<(Pfn, Level)> {
    s.map(0x1000, 0x1000_0000, PageSize::Size4K, RW).unwrap();
    s.map(0x4000_0000, 0x1000_1000, PageSize::Size4K, RW)
        .unwrap();
    // The kernel PMD's slot is not for user mappings.
    assert!(s
        .map(0xc000_0000, 0x1000_2000, PageSize::Size4K, RW)
        .is_err());
    let t = s.table_frames().unwrap();
    let levels: Vec<Level> = t.iter().map(|x| x.1).collect();
    assert_eq!(
        levels,
        [Level::L2, Level::L1, Level::L2, Level::L1, Level::L3]
    );
    t
}

#[test]
fn pae_split_exact_sequence_and_kernel_pmd_unpinned() {
    let s = space::<Pae, Split>(false);
    let t = build_pae(&s);
    let [l2a, l1a, l2b, l1b, root] = t.iter().map(|x| x.0).collect::<Vec<_>>()[..] else {
        panic!()
    };
    let k = s.kernel_pmd().unwrap();
    let (pin, unpin) = pin_unpin(&s);
    type M = Pae;
    assert_eq!(
        pin,
        [
            ro::<M>(l2a, false),
            ro::<M>(l1a, false),
            ext(&[(ExtCmd::PinL1Table, l1a)]),
            ro::<M>(l2b, false),
            ro::<M>(l1b, false),
            ext(&[(ExtCmd::PinL1Table, l1b)]),
            ro::<M>(k, false),
            ro::<M>(root, true),
            ext(&[(ExtCmd::PinL3Table, root)]),
        ]
    );
    assert_eq!(
        unpin,
        [
            ext(&[(ExtCmd::UnpinTable, root)]),
            rw::<M>(k, false),
            rw::<M>(l2a, false),
            ext(&[(ExtCmd::UnpinTable, l1a)]),
            rw::<M>(l1a, false),
            rw::<M>(l2b, false),
            ext(&[(ExtCmd::UnpinTable, l1b)]),
            rw::<M>(l1b, false),
            rw::<M>(root, true),
        ]
    );
    assert_clean(&s);
}

#[test]
fn pae_global_sequence() {
    let s = space::<Pae, Global>(false);
    let t = build_pae(&s);
    let k = s.kernel_pmd().unwrap();
    let (pin, unpin) = pin_unpin(&s);
    type M = Pae;
    let mut expect: Vec<Recorded> = t[..4].iter().map(|&(p, _)| ro::<M>(p, false)).collect();
    expect.extend([
        ro::<M>(k, false),
        ro::<M>(s.root(), true),
        ext(&[(ExtCmd::PinL3Table, s.root())]),
    ]);
    assert_eq!(pin, expect);
    let mut expect = vec![ext(&[(ExtCmd::UnpinTable, s.root())]), rw::<M>(k, false)];
    expect.extend(t.iter().map(|&(p, l)| rw::<M>(p, l == Level::L3)));
    assert_eq!(unpin, expect);
    assert_clean(&s);
}

/// Negative control for the seed's PAE fix: calling the pin routine on the
/// kernel PMD during unpin (the old bug) leaves it flagged and read-only,
/// and the cleanliness check catches it.
#[test]
fn pae_kernel_pmd_pin_on_unpin_is_caught() {
    let mut s = space::<Pae, Split>(false);
    build_pae(&s);
    s.set_sabotage(pagepin::Sabotage {
        pae_kpmd_pin_on_unpin: true,
        ..Default::default()
    });
    let mut b: Batch<32> = Batch::new();
    s.backend().clear();
    s.pin(&mut b).unwrap();
    s.unpin(&mut b).unwrap();
    let problems = clean_problems(&s);
    let k = s.kernel_pmd().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&format!("{k:?} still flagged"))),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("still read-only")),
        "{problems:?}"
    );
}

/// Negative control for "root visited last": with the root first, the
/// flushing remap is no longer the last remap, which this check detects.
#[test]
fn root_first_is_caught() {
    fn root_flush_is_last_remap(calls: &[Recorded], root_va: u64) -> bool {
        let remaps: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Recorded::UpdateVaMapping { va, flags, .. } => Some((*va, *flags)),
                _ => None,
            })
            .collect();
        let flushing: Vec<_> = remaps
            .iter()
            .filter(|r| r.1 & uvmf::TLB_FLUSH != 0)
            .collect();
        flushing.len() == 1 && remaps.last() == Some(flushing[0]) && flushing[0].0 == root_va
    }
    for sabotage in [false, true] {
        let mut s = space::<X86_64, Split>(false);
        build_x86(&s);
        s.set_sabotage(pagepin::Sabotage {
            root_first: sabotage,
            ..Default::default()
        });
        let (pin, _) = pin_unpin(&s);
        let root_va = X86_64::DIRECT_MAP_BASE + (s.root().0 << 12);
        assert_eq!(root_flush_is_last_remap(&pin, root_va), !sabotage);
    }
}

#[test]
fn full_walk_skips_exactly_the_hypervisor_hole() {
    use pagepin::walk::{walk, Descend, Scope};
    let s = space::<X86_64, Global>(false);
    // Fill every root slot with its own L3 by writing entries directly (the
    // space API keeps user mappings below the user limit).
    let store = s.store().clone();
    let root = store.frame(s.root()).unwrap();
    let mut l3s = Vec::new();
    while let Some(l3) = store.alloc_table(Level::L3) {
        l3s.push(l3);
    }
    assert!(l3s.len() < 512, "store is smaller than 512 frames");
    let slots: Vec<usize> = (0..512)
        .filter(|s| s % 8 == 0 || (250..280).contains(s))
        .collect();
    for (i, &slot) in slots.iter().enumerate().take(l3s.len()) {
        let e = pagepin::PageTableEntry::new(l3s[i].0, EntryFlags::PRESENT | EntryFlags::WRITABLE);
        root.entry(slot)
            .store(e.bits(), std::sync::atomic::Ordering::Relaxed);
    }
    let used: Vec<usize> = slots.iter().copied().take(l3s.len()).collect();
    let mut seen = Vec::new();
    walk::<X86_64, _, _, _>(
        &store,
        &**s.backend(),
        s.root(),
        Scope::Full,
        &mut |pfn, _, is_root| {
            if !is_root {
                seen.push(l3s.iter().position(|p| *p == pfn).unwrap());
            }
            Ok(Descend::Yes)
        },
    )
    .unwrap();
    let seen_slots: Vec<usize> = seen.iter().map(|&i| used[i]).collect();
    let expect: Vec<usize> = used
        .iter()
        .copied()
        .filter(|s| !(256..272).contains(s))
        .collect();
    assert_eq!(seen_slots, expect);
    assert!(
        used.iter().any(|s| (256..272).contains(s)) && used.contains(&255) && used.contains(&272)
    );
    // Clean up the hand-made entries so the space drops quietly.
    for &slot in &used {
        root.entry(slot)
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}
