//! The Xen backend and its simulated hypervisor: ABI encoding, the PV MMU
//! rules (docs/PROTOCOL.md §6), and the engine's protocol under them (docs/PROTOCOL.md §3, §10).

#[path = "support/xen.rs"]
mod xen_common;

use std::mem::{offset_of, size_of};

use pagepin::backends::xen::abi::hypercall;
use pagepin::backends::xen::{
    p2m_permutation, xen_env_with, FrameType, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, Scratch,
    SimConfig, XenSim, DOMID_SELF, MIN_P2M_EXTENTS, P2M_EXTENT,
};
use pagepin::engine::Sabotage;
use pagepin::engine::{errno, uvmf};
use pagepin::{
    Backend, Batch, Call, CallResult, Calls, EntryFlags, Error, ExtCmd, Global, Level, MmuExtOp,
    MmuUpdate, Pae, PageSize, Pfn, Split, WritePath, X86_64,
};
use xen_common::*;

type SplitX = Split;
type GlobalX = Global;

fn uvm_ro(e: &Env, pfn: Pfn, flags: u64) -> i32 {
    let mfn = e.backend.pfn_to_mfn(pfn);
    let pte = pagepin::PageTableEntry::new(
        mfn.0,
        EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY,
    );
    issue1(
        e,
        Call::UpdateVaMapping {
            va: 0xffff_8880_0000_0000 + (pfn.0 << 12),
            pte: pte.bits(),
            flags,
        },
    )
    .rc
}

fn uvm_rw(e: &Env, pfn: Pfn) -> i32 {
    let mfn = e.backend.pfn_to_mfn(pfn);
    let pte = pagepin::PageTableEntry::new(
        mfn.0,
        EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::ACCESSED | EntryFlags::DIRTY,
    );
    issue1(
        e,
        Call::UpdateVaMapping {
            va: 0xffff_8880_0000_0000 + (pfn.0 << 12),
            pte: pte.bits(),
            flags: 0,
        },
    )
    .rc
}

fn ext(e: &Env, cmd: ExtCmd, pfn: Pfn) -> i32 {
    let mfn = e.backend.pfn_to_mfn(pfn);
    issue1(e, Call::MmuExtOp(&[MmuExtOp::on(cmd, mfn)])).rc
}

fn issue1(e: &Env, c: Call<'_>) -> CallResult {
    let mut r = [CallResult::default()];
    e.backend.issue(Calls::list(&[c]), &mut r);
    r[0]
}

#[test]
fn abi_layout() {
    assert_eq!(size_of::<MulticallEntry>(), 64);
    assert_eq!(offset_of!(MulticallEntry, result), 8);
    assert_eq!(offset_of!(MulticallEntry, args), 16);
    assert_eq!(size_of::<MmuUpdateAbi>(), 16);
    assert_eq!(size_of::<MmuExtOpAbi>(), 24);
    assert_eq!(offset_of!(MmuExtOpAbi, cmd), 0);
    assert_eq!(offset_of!(MmuExtOpAbi, arg1), 8);
    assert_eq!(offset_of!(MmuExtOpAbi, arg2), 16);
    assert_eq!(
        (
            hypercall::MMU_UPDATE,
            hypercall::MULTICALL,
            hypercall::UPDATE_VA_MAPPING,
            hypercall::VM_ASSIST,
            hypercall::MMUEXT_OP
        ),
        (1, 13, 14, 21, 26)
    );
    assert_eq!(DOMID_SELF, 0x7FF0);
    assert_eq!((errno::EBUSY, errno::EINVAL, errno::ENOSYS), (16, 22, 38));
}

#[test]
fn encode_batch_and_decode_results() {
    let ups = [
        MmuUpdate {
            ptr: 0x1000,
            val: 7,
        },
        MmuUpdate {
            ptr: 0x2008,
            val: 9,
        },
    ];
    let ops = [
        MmuExtOp::on(ExtCmd::PinL1Table, pagepin::Mfn(5)),
        MmuExtOp {
            cmd: ExtCmd::TlbFlushLocal,
            arg1: 0,
            arg2: 0,
        },
        MmuExtOp::on(ExtCmd::UnpinTable, pagepin::Mfn(6)),
    ];
    let calls = [
        Call::UpdateVaMapping {
            va: 0xdead_0000,
            pte: 0x1234_0001,
            flags: uvmf::TLB_FLUSH,
        },
        Call::MmuUpdate(&ups),
        Call::MmuExtOp(&ops),
    ];
    let mut s = Scratch::default();
    s.encode(Calls::list(&calls));
    assert_eq!(s.entries.len(), 3);
    assert_eq!(s.entries[0].op, hypercall::UPDATE_VA_MAPPING);
    assert_eq!(&s.entries[0].args[..3], &[0xdead_0000, 0x1234_0001, 1]);
    assert_eq!(s.entries[1].op, hypercall::MMU_UPDATE);
    assert_eq!(s.entries[1].args[1], 2);
    assert_eq!(s.entries[1].args[3], DOMID_SELF as u64);
    // SAFETY: the entry points at the scratch's update array (2 requests).
    let got = unsafe { std::slice::from_raw_parts(s.entries[1].args[0] as *const MmuUpdateAbi, 2) };
    assert_eq!(
        got,
        &[
            MmuUpdateAbi {
                ptr: 0x1000,
                val: 7
            },
            MmuUpdateAbi {
                ptr: 0x2008,
                val: 9
            }
        ]
    );
    assert_eq!(s.entries[2].op, hypercall::MMUEXT_OP);
    assert_eq!(s.entries[2].args[1], 3);
    // SAFETY: as above, 3 operations.
    let got = unsafe { std::slice::from_raw_parts(s.entries[2].args[0] as *const MmuExtOpAbi, 3) };
    assert_eq!(
        (got[0].cmd, got[0].arg1, got[1].cmd, got[2].cmd, got[2].arg1),
        (0, 5, 6, 4, 6)
    );
    assert_eq!(s.entries[2].args[2], s.done.as_ptr().wrapping_add(2) as u64);
    // The hypervisor's answers: uvm ok, mmu_update failed after 1, ext ok.
    s.entries[1].result = (-(errno::EBUSY as i64)) as u64;
    s.done[1] = 1;
    s.done[2] = 3;
    let mut r = [CallResult::default(); 3];
    s.decode(Calls::list(&calls), &mut r);
    assert_eq!(
        r,
        [
            CallResult::ok(1),
            CallResult { rc: -16, done: 1 },
            CallResult::ok(3)
        ]
    );
}

#[test]
fn p2m_is_a_derangement() {
    let e = env::<X86_64>(7);
    let sim = &e.sim;
    let n = sim.config().nr_pages as u64;
    for p in 0..n {
        let m = sim.mfn_of(Pfn(p)).unwrap();
        assert_ne!(m.0, p, "pfn {p} maps to itself");
        assert_eq!(sim.pfn_of(m), Some(Pfn(p)));
    }
    // A pfn where an mfn belongs is caught: pinning "mfn = pfn" of a
    // read-only, valid L1 does not pin that L1.
    let l1 = e.store.alloc_table(Level::L1).unwrap();
    assert_eq!(uvm_ro(&e, l1, 0), 0);
    let rc = issue1(
        &e,
        Call::MmuExtOp(&[MmuExtOp::on(ExtCmd::PinL1Table, pagepin::Mfn(l1.0))]),
    )
    .rc;
    assert_ne!(rc, 0);
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), 0);
}

#[test]
fn pin_rules_on_one_frame() {
    let e = env::<X86_64>(1);
    let l1 = e.store.alloc_table(Level::L1).unwrap();
    // Still mapped writable: -EINVAL (as seen on real Xen 4.17).
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), -errno::EINVAL);
    assert_eq!(uvm_ro(&e, l1, uvmf::TLB_FLUSH), 0);
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), 0);
    let i = e.sim.frame_info(l1).unwrap();
    assert_eq!(
        (i.ty, i.count, i.pinned, i.validated, i.direct_map_writable),
        (FrameType::L1, 1, true, true, Some(false))
    );
    // Double pin: -EINVAL, count unchanged.
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), -errno::EINVAL);
    assert_eq!(e.sim.frame_info(l1).unwrap().count, 1);
    // Pinned table mapped writable: -EBUSY.
    assert_eq!(uvm_rw(&e, l1), -errno::EBUSY);
    // Wrong level while typed: -EINVAL.
    assert_eq!(ext(&e, ExtCmd::PinL2Table, l1), -errno::EINVAL);
    assert_eq!(ext(&e, ExtCmd::UnpinTable, l1), 0);
    assert_eq!(ext(&e, ExtCmd::UnpinTable, l1), -errno::EINVAL);
    assert_eq!(e.sim.frame_info(l1).unwrap().ty, FrameType::None);
    assert_eq!(uvm_rw(&e, l1), 0);
    // Unknown frame.
    let r = issue1(
        &e,
        Call::MmuExtOp(&[MmuExtOp::on(ExtCmd::PinL1Table, pagepin::Mfn(1 << 30))]),
    );
    assert_eq!(r.rc, -errno::EINVAL);
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
}

#[test]
fn multicall_continues_after_failing_entry_and_done_counts() {
    let e = env::<X86_64>(2);
    let a = e.store.alloc_table(Level::L1).unwrap();
    let b = e.store.alloc_table(Level::L1).unwrap();
    let ma = e.backend.pfn_to_mfn(a);
    let mb = e.backend.pfn_to_mfn(b);
    let ro = |m: pagepin::Mfn| pagepin::PageTableEntry::new(m.0, EntryFlags::PRESENT).bits();
    let pins = [
        MmuExtOp::on(ExtCmd::PinL1Table, mb),
        MmuExtOp::on(ExtCmd::PinL1Table, ma),
    ];
    let calls = [
        // a is still writable: this entry fails...
        Call::MmuExtOp(&[MmuExtOp::on(ExtCmd::PinL1Table, ma)]),
        // ...and the rest still run.
        Call::UpdateVaMapping {
            va: 0xffff_8880_0000_0000 + (a.0 << 12),
            pte: ro(ma),
            flags: 0,
        },
        Call::UpdateVaMapping {
            va: 0xffff_8880_0000_0000 + (b.0 << 12),
            pte: ro(mb),
            flags: uvmf::TLB_FLUSH,
        },
        // b pins, then a pins, in one call of two requests.
        Call::MmuExtOp(&pins),
        // Within one call processing stops at the first error: the second
        // unpin (of b again) fails, the third never runs.
        Call::MmuExtOp(&[
            MmuExtOp::on(ExtCmd::UnpinTable, mb),
            MmuExtOp::on(ExtCmd::UnpinTable, mb),
            MmuExtOp::on(ExtCmd::UnpinTable, ma),
        ]),
    ];
    let before = e.sim.stats();
    let mut r = [CallResult::default(); 5];
    e.backend.issue(Calls::list(&calls), &mut r);
    assert_eq!(
        r,
        [
            CallResult {
                rc: -errno::EINVAL,
                done: 0
            },
            CallResult::ok(1),
            CallResult::ok(1),
            CallResult::ok(2),
            CallResult {
                rc: -errno::EINVAL,
                done: 1
            },
        ]
    );
    let s = e.sim.stats();
    assert_eq!(s.hypercalls - before.hypercalls, 1);
    assert_eq!(s.multicalls - before.multicalls, 1);
    assert_eq!(s.multicall_entries - before.multicall_entries, 5);
    assert!(e.sim.frame_info(a).unwrap().pinned);
    assert!(!e.sim.frame_info(b).unwrap().pinned);
}

#[test]
fn injection_fails_the_chosen_entry_without_effect() {
    let e = env::<X86_64>(3);
    let a = e.store.alloc_table(Level::L1).unwrap();
    let t = e.sim.trap_count();
    e.sim.fail_entry(t, 0, 0, errno::ENOMEM);
    assert_eq!(uvm_ro(&e, a, 0), -errno::ENOMEM);
    assert_eq!(e.sim.frame_info(a).unwrap().direct_map_writable, Some(true));
    assert_eq!(uvm_ro(&e, a, 0), 0);
    assert_eq!(e.sim.stats().injected, 1);
}

#[test]
fn xsa182_fast_path_only_for_harmless_bits() {
    let e = env::<X86_64>(4);
    let s: Space<X86_64, SplitX> = space(&e, false);
    populate(&s, 2);
    let va = va_of::<X86_64>(0, 1);
    let data = data_pfn(0, 1);
    s.map(
        va,
        data << 12,
        PageSize::Size4K,
        EntryFlags::PRESENT | EntryFlags::USER,
    )
    .unwrap();
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    let root = s.root();
    for path in [WritePath::Hypercall, WritePath::Store] {
        let before = e.sim.stats();
        // A/D/NX/avail only: fast path.
        let v = leaf(
            &s,
            data,
            EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::ACCESSED | EntryFlags::NO_EXECUTE,
        );
        s.set_pte(va, v, path).unwrap();
        let mid = e.sim.stats();
        assert_eq!(
            mid.fast_path_updates - before.fast_path_updates,
            1,
            "{path:?}"
        );
        assert_eq!(mid.full_updates, before.full_updates);
        // RW on a data frame: full path (a writable reference is taken).
        let w = leaf(
            &s,
            data,
            EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::WRITABLE,
        );
        s.set_pte(va, w, path).unwrap();
        let after = e.sim.stats();
        assert_eq!(after.full_updates - mid.full_updates, 1);
        assert_eq!(e.sim.frame_info(Pfn(data)).unwrap().count, 2); // direct map + this leaf
                                                                   // Back to read-only: full path, reference dropped.
        s.set_pte(
            va,
            leaf(&s, data, EntryFlags::PRESENT | EntryFlags::USER),
            path,
        )
        .unwrap();
        assert_eq!(e.sim.frame_info(Pfn(data)).unwrap().count, 1);
    }
    // A leaf mapping a pinned table read-only is fine; flipping RW on it
    // is fully revalidated and refused, by both write paths.
    let ro_root = leaf(&s, root.0, EntryFlags::PRESENT);
    s.set_pte(va, ro_root, WritePath::Hypercall).unwrap();
    let rw_root = leaf(&s, root.0, EntryFlags::PRESENT | EntryFlags::WRITABLE);
    match s.set_pte(va, rw_root, WritePath::Hypercall) {
        Err(Error::Hypercall(h)) => assert_eq!(h.errno, errno::EBUSY),
        other => panic!("expected -EBUSY, got {other:?}"),
    }
    match s.set_pte(va, rw_root, WritePath::Store) {
        Err(Error::Fault(f)) => assert_eq!(f.errno, errno::EBUSY),
        other => panic!("expected an emulation refusal, got {other:?}"),
    }
    // Real Xen 4.17 marks a 64-bit PV kernel leaf USER | GUEST_KERNEL
    // (bit 52) when it writes it (tests/real_xen_scenarios.rs); the simulator does too.
    assert_eq!(
        s.read_pte(va).unwrap().bits(),
        ro_root.bits() | EntryFlags::USER.bits() | (1 << 52)
    );
    s.set_pte(va, pagepin::PageTableEntry::EMPTY, WritePath::Store)
        .unwrap();
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
    assert_eq!(e.sim.stats().faults, 0);
}

#[test]
fn large_pages_are_refused_and_pin_rolls_back() {
    let e = env::<X86_64>(5);
    let s: Space<X86_64, GlobalX> = space(&e, false);
    populate(&s, 2);
    // `map` refuses large leaves on Xen; one written straight into an L2
    // (as a hostile or foreign writer would) must be refused by the pin.
    assert_eq!(
        s.map(
            0x20_0000_0000,
            0x20_0000,
            PageSize::Size2M,
            EntryFlags::PRESENT
        ),
        Err(Error::UnsupportedPageSize)
    );
    let l2 = tables_at(&s, Level::L2)[0];
    let huge = leaf(&s, 0x200, EntryFlags::PRESENT | EntryFlags::HUGE);
    e.store
        .entry(l2, 100)
        .unwrap()
        .store(huge.bits(), std::sync::atomic::Ordering::Release);
    let before = snap(&e, &s);
    let mut b: Batch = Batch::new();
    match s.pin(&mut b) {
        Err(Error::Hypercall(h)) => assert_eq!(h.errno, errno::EINVAL),
        other => panic!("expected -EINVAL, got {other:?}"),
    }
    assert_eq!(snap(&e, &s), before);
    assert_quiet(&e.sim);
}

#[test]
fn new_baseptr_refuses_unpinned_and_unvalidatable_roots() {
    let e = env::<X86_64>(6);
    let s: Space<X86_64, SplitX> = space(&e, false);
    populate(&s, 2);
    let root = s.root();
    // Never pinned: still writable.
    assert_eq!(ext(&e, ExtCmd::NewBaseptr, root), -errno::EINVAL);
    // Read-only but its children are writable: unvalidatable.
    assert_eq!(uvm_ro(&e, root, uvmf::TLB_FLUSH), 0);
    assert_eq!(ext(&e, ExtCmd::NewBaseptr, root), -errno::EINVAL);
    assert_eq!(e.sim.frame_info(root).unwrap().ty, FrameType::None);
    assert_eq!(e.sim.base_pointer(0), None);
    assert_eq!(uvm_rw(&e, root), 0);
    assert_quiet(&e.sim);
}

#[test]
fn unpin_while_base_pointer_keeps_root_typed_and_engine_restores() {
    let e = env::<X86_64>(7);
    let s: Space<X86_64, SplitX> = space(&e, true);
    populate(&s, 4);
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    assert_eq!(ext(&e, ExtCmd::NewBaseptr, s.root()), 0);
    assert_eq!(e.sim.frame_info(s.root()).unwrap().count, 2);
    let before = snap(&e, &s);
    match s.unpin(&mut b) {
        Err(Error::Hypercall(h)) => assert_eq!(h.errno, errno::EBUSY),
        other => panic!("expected -EBUSY from a remap, got {other:?}"),
    }
    // Restored: still pinned, same frames, no lock held.
    assert!(s.is_pinned());
    assert_eq!(snap(&e, &s), before);
    assert!(!any_lock_held(&e, &s));
    let i = e.sim.frame_info(s.root()).unwrap();
    assert_eq!((i.ty, i.pinned), (FrameType::L4, true));
    // Raw Xen view: unpinning the root leaves it typed while it is CR3.
    assert_eq!(ext(&e, ExtCmd::UnpinTable, s.root()), 0);
    assert_eq!(e.sim.frame_info(s.root()).unwrap().ty, FrameType::L4);
    assert_eq!(ext(&e, ExtCmd::PinL4Table, s.root()), 0);
    // Switch away, then the unpin goes through.
    e.sim.drop_base_pointers();
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
}

fn root_first<P: pagepin::LockPolicy<Lock = pagepin::DefaultRawLock>>(sabotage: bool) -> u64 {
    let e = env::<X86_64>(8);
    let mut s: Space<X86_64, P> = space(&e, true);
    populate(&s, 6);
    s.set_sabotage(Sabotage {
        root_first: sabotage,
        ..Sabotage::default()
    });
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    let breaks = e.sim.stats().invariant_breaks;
    let stale = e.sim.check_all().len() as u64;
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    breaks.max(stale)
}

#[test]
fn root_visited_last_carries_the_flush() {
    assert_eq!(root_first::<SplitX>(false), 0);
    assert_eq!(root_first::<GlobalX>(false), 0);
    // Root first: the tables typed under it keep stale writable TLB entries.
    assert!(root_first::<SplitX>(true) > 0);
    assert!(root_first::<GlobalX>(true) > 0);
}

fn pae_kpmd(sabotage: bool) -> (Option<bool>, bool) {
    let e = env::<Pae>(9);
    let mut s: Space<Pae, SplitX> = space(&e, false);
    populate(&s, 4);
    let k = s.kernel_pmd().unwrap();
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    assert_eq!(e.sim.frame_info(k).unwrap().ty, FrameType::L2);
    assert_eq!(e.sim.stats().pins[2], 1); // PIN_L3 of the PAE root
    s.set_sabotage(Sabotage {
        pae_kpmd_pin_on_unpin: sabotage,
        ..Sabotage::default()
    });
    s.unpin(&mut b).unwrap();
    let i = e.sim.frame_info(k).unwrap();
    (
        i.direct_map_writable,
        e.store.meta(k).unwrap().is_pinned() || !e.sim.unquiet_frames().is_empty(),
    )
}

#[test]
fn pae_kernel_pmd_is_unpinned_on_unpin() {
    assert_eq!(pae_kpmd(false), (Some(true), false));
    // The pre-2008 bug: the kernel PMD stays read-only and flagged.
    assert_eq!(pae_kpmd(true), (Some(false), true));
}

fn released_l1<P: pagepin::LockPolicy<Lock = pagepin::DefaultRawLock>>() {
    let e = env::<X86_64>(10);
    let s: Space<X86_64, P> = space(&e, false);
    populate(&s, 4);
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    let before_l1 = tables_at(&s, Level::L1);
    // A fresh region: new L1 (and L2) linked into the pinned space.
    let va = 0x30_0000_0000;
    s.map(va, 17 << 12, PageSize::Size4K, EntryFlags::PRESENT)
        .unwrap();
    let new_l1: Vec<Pfn> = tables_at(&s, Level::L1)
        .into_iter()
        .filter(|p| !before_l1.contains(p))
        .collect();
    assert_eq!(new_l1.len(), 1);
    let i = e.sim.frame_info(new_l1[0]).unwrap();
    assert_eq!(i.direct_map_writable, Some(false));
    assert_eq!(i.ty, FrameType::L1);
    assert_eq!(i.pinned, P::SPLIT_PTE_LOCKS);
    assert!(e.store.meta(new_l1[0]).unwrap().is_pinned());
    // Release it: unlink, (split) unpin, make writable. No -EBUSY.
    s.unmap(va).unwrap();
    let errs = e.sim.stats().errors;
    s.release_table(va, Level::L1).unwrap();
    assert_eq!(e.sim.stats().errors, errs);
    let i = e.sim.frame_info(new_l1[0]).unwrap();
    assert_eq!(
        (i.ty, i.direct_map_writable, i.pinned),
        (FrameType::Writable, Some(true), false)
    );
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
}

#[test]
fn released_and_new_l1_in_pinned_space() {
    released_l1::<SplitX>();
    released_l1::<GlobalX>();
}

#[test]
fn never_pinned_space_tears_down_without_hypercalls() {
    let e = env::<X86_64>(11);
    let s: Space<X86_64, SplitX> = space(&e, true);
    populate(&s, 3);
    let before = e.sim.stats();
    s.teardown().unwrap();
    let after = e.sim.stats();
    assert_eq!(after.hypercalls, before.hypercalls);
    assert_eq!(after.unpins, 0);
    assert_quiet(&e.sim);
}

/// Pin with a batch of `N`: one trap per `N` calls. With a user root the
/// two root pins are adjacent `mmuext_op`s: they share one call when the
/// batch's argument space (16 bytes per entry, docs/PROTOCOL.md §4) holds both, i.e.
/// from N = 4; below that the argument limit forces an extra flush, so the
/// user-root variant is checked from N = 4.
fn batching<const N: usize>() {
    batching_with::<N>(false);
    if N >= 4 {
        batching_with::<N>(true);
    }
}

fn batching_with<const N: usize>(user_root: bool) {
    let e = env::<X86_64>(12);
    let s: Space<X86_64, SplitX> = space(&e, user_root);
    populate(&s, 12);
    let mut b: Batch<N> = Batch::new();
    let before = e.sim.stats();
    s.pin(&mut b).unwrap();
    let st = b.stats();
    let sim = e.sim.stats();
    let traps = sim.hypercalls - before.hypercalls;
    assert_eq!(st.flushes, st.calls.div_ceil(N as u64), "N={N}: {st:?}");
    assert_eq!(traps, st.flushes, "N={N}");
    assert_eq!(sim.multicalls - before.multicalls, st.multicalls, "N={N}");
    assert_eq!(
        sim.multicall_entries - before.multicall_entries + st.direct_calls,
        st.calls,
        "N={N}"
    );
    if N >= st.calls as usize {
        assert_eq!(traps, 1);
    }
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
}

#[test]
fn multicalls_issued_are_ceil_calls_over_n() {
    batching::<1>();
    batching::<2>();
    batching::<4>();
    batching::<8>();
    batching::<16>();
    batching::<32>();
    batching::<64>();
    batching::<128>();
    batching::<256>();
}

#[test]
fn sim_counts_and_queries() {
    let e = env::<X86_64>(13);
    let s: Space<X86_64, SplitX> = space(&e, false);
    populate(&s, 3);
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    let st = e.sim.stats();
    assert_eq!(st.pins[0], 3); // split: one PIN_L1 per PTE page
    assert_eq!(st.pins[3], 1);
    assert_eq!(st.ext_cmds[ExtCmd::PinL1Table as usize], 3);
    assert!(st.tlb_flushes >= 1);
    assert_eq!(e.sim.typed_tables().len(), s.table_frames().unwrap().len());
    for (p, l) in s.table_frames().unwrap() {
        let i = e.sim.frame_info(p).unwrap();
        assert_eq!(i.ty, FrameType::table(l));
        assert_eq!(i.direct_map_writable, Some(false));
    }
    s.unpin(&mut b).unwrap();
    assert_eq!(e.sim.stats().unpins, 4);
    assert_quiet(&e.sim);
    let _ = XenSim::set_current_vcpu;
}

/// Space `b` with one of space `a`'s PTE pages linked into a free slot of
/// its L2 by a raw write (as a kernel that builds its own tables could).
fn foreign_link<P: pagepin::LockPolicy<Lock = pagepin::DefaultRawLock>>(
    e: &Env,
) -> (Space<X86_64, P>, Space<X86_64, P>, Pfn) {
    let a: Space<X86_64, P> = space(e, false);
    let b: Space<X86_64, P> = space(e, false);
    populate(&a, 2);
    populate(&b, 1);
    let shared = tables_at(&a, Level::L1)[0];
    let l2 = tables_at(&b, Level::L2)[0];
    let slot = e.store.entry(l2, 511).expect("slot");
    assert_eq!(slot.load(std::sync::atomic::Ordering::Acquire), 0);
    let mfn = e.backend.pfn_to_mfn(shared);
    let flags = EntryFlags::PRESENT
        | EntryFlags::WRITABLE
        | EntryFlags::USER
        | EntryFlags::ACCESSED
        | EntryFlags::DIRTY;
    slot.store(
        pagepin::PageTableEntry::new(mfn.0, flags).bits(),
        std::sync::atomic::Ordering::Release,
    );
    (a, b, shared)
}

fn foreign_table_refused<P: pagepin::LockPolicy<Lock = pagepin::DefaultRawLock>>() {
    let e = env::<X86_64>(31);
    let (a, b, shared) = foreign_link::<P>(&e);
    let mut batch: Batch = Batch::new();
    // Before and after `a` is pinned: refused, nothing changed.
    for a_pinned in [false, true] {
        if a_pinned {
            a.pin(&mut batch).expect("a pins");
        }
        let before = snap(&e, &b);
        match b.pin(&mut batch) {
            Err(Error::ForeignTable { level, pfn, .. }) => {
                assert_eq!((level, pfn), (Level::L2, shared));
            }
            other => panic!("b pinned a table of a: {other:?}"),
        }
        assert_eq!(snap(&e, &b), before, "a refused pin changed something");
        assert!(!any_lock_held(&e, &b));
    }
    a.unpin(&mut batch).expect("a unpins");
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
    // Dropping `b` frees its own tables, not the one it borrowed from `a`.
    let a_tables = a.table_frames().expect("a walks");
    drop(b);
    assert!(e.store.meta(shared).expect("meta").is_allocated());
    assert_eq!(a.table_frames().expect("a walks"), a_tables);
}

#[test]
fn a_table_of_another_space_is_refused_split() {
    foreign_table_refused::<SplitX>();
}

#[test]
fn a_table_of_another_space_is_refused_global() {
    foreign_table_refused::<GlobalX>();
}

/// Negative control: with the ownership check off, `b`'s pin walks into
/// `a`'s pinned PTE page (already flagged, so skipped) and reports success;
/// `a`'s unpin then cannot make that page writable again while `b`'s
/// pinned L2 still references it.
#[test]
fn negative_control_foreign_table_admitted() {
    assert!(matches!(
        foreign_admitted::<SplitX>(),
        Err(Error::Hypercall(_))
    ));
    assert!(matches!(
        foreign_admitted::<GlobalX>(),
        Err(Error::Hypercall(_))
    ));
}

/// `a`'s unpin after `b`, with the ownership check off, pinned through
/// `a`'s PTE page.
fn foreign_admitted<P: pagepin::LockPolicy<Lock = pagepin::DefaultRawLock>>(
) -> Result<pagepin::PinStats, Error> {
    let e = env::<X86_64>(32);
    let mut batch: Batch = Batch::new();
    let (a, mut b, _) = foreign_link::<P>(&e);
    b.set_sabotage(Sabotage {
        admit_foreign_tables: true,
        ..Sabotage::default()
    });
    a.pin(&mut batch).expect("a pins");
    b.pin(&mut batch).expect("the broken check lets b pin");
    a.unpin(&mut batch)
}

/// The simulator's fully random p2m before extents: Sattolo's algorithm
/// over the frames (a uniformly random single n-cycle), seeded.
fn sattolo_reference(n: usize, seed: u64) -> Vec<u64> {
    let mut p: Vec<u64> = (0..n as u64).collect();
    let mut rng = pagepin::backends::SplitMix64::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    for i in (1..n).rev() {
        let j = rng.below(i as u64) as usize;
        p.swap(i, j);
    }
    p
}

#[test]
fn p2m_extents_are_a_bijection_without_fixed_points() {
    for n in [
        1usize, 2, 3, 63, 64, 511, 512, 513, 1000, 1024, 32_775, 300_000,
    ] {
        for extent in [1usize, 3, 16, P2M_EXTENT, 4096] {
            let p = p2m_permutation(n, 7, extent);
            assert_eq!(p.len(), n);
            let mut seen = vec![false; n];
            for (pfn, &m) in p.iter().enumerate() {
                let m = m as usize;
                assert!(m < n, "n {n} extent {extent}: pfn {pfn} -> {m}");
                assert!(!seen[m], "n {n} extent {extent}: mfn {m} twice");
                seen[m] = true;
                if n > 1 {
                    assert_ne!(m, pfn, "n {n} extent {extent}: pfn {pfn} maps to itself");
                }
            }
            // Deterministic per seed; another seed gives another map.
            assert_eq!(p, p2m_permutation(n, 7, extent));
            if n > 3 {
                assert_ne!(p, p2m_permutation(n, 8, extent), "n {n} extent {extent}");
            }
        }
        // Extents of one frame: the earlier fully random p2m, unchanged.
        assert_eq!(p2m_permutation(n, 7, 1), sattolo_reference(n, 7));
    }
}

#[test]
fn p2m_extents_are_machine_contiguous_and_placed_at_random() {
    // A large domain: 2 MiB extents, each machine-contiguous.
    let n = 300_000;
    let p = p2m_permutation(n, 9, P2M_EXTENT);
    let runs = n.div_ceil(P2M_EXTENT);
    for k in 0..runs {
        let base = p[k * P2M_EXTENT];
        for (o, &m) in p[k * P2M_EXTENT..((k + 1) * P2M_EXTENT).min(n)]
            .iter()
            .enumerate()
        {
            assert_eq!(m, base + o as u64, "extent {k} offset {o}");
        }
    }
    // Placed at random: few extents follow their predecessor in machine
    // memory (about one is expected).
    let in_order = (1..runs)
        .filter(|&k| p[k * P2M_EXTENT] == p[(k - 1) * P2M_EXTENT] + P2M_EXTENT as u64)
        .count();
    assert!(in_order < 8, "{in_order} of {runs} extents in order");
    // A small domain is cut into at least MIN_P2M_EXTENTS extents.
    for n in [1024usize, 1000, 4096] {
        let p = p2m_permutation(n, 9, P2M_EXTENT);
        let breaks = p.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert!(
            breaks + 1 >= MIN_P2M_EXTENTS / 2,
            "n {n}: only {} contiguous runs",
            breaks + 1
        );
    }
    // The default configuration uses 2 MiB extents.
    assert_eq!(SimConfig::for_mode::<X86_64>(n, 1).p2m_extent, P2M_EXTENT);
}

#[test]
fn fully_random_p2m_stays_available() {
    let mut cfg = SimConfig::for_mode::<X86_64>(PAGES, 7);
    cfg.p2m_extent = 1;
    let e: Env = xen_env_with(TABLES, cfg).expect("env");
    assert_eq!(e.sim.p2m_table(), &sattolo_reference(PAGES, 7)[..]);
    let s: Space<X86_64, SplitX> = space(&e, false);
    populate(&s, 4);
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    s.unpin(&mut b).unwrap();
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
}

/// A domain big enough for the simulator's large-array path (2 MiB of
/// `type_info` words, huge-page backed on Linux): every rule still holds
/// and every frame's state round-trips through pin and unpin.
#[test]
fn large_domain_state_round_trips_and_ownership_is_checked() {
    const N: usize = 300_000;
    const T: usize = 64;
    let e: Env = xen_env_with(T, SimConfig::for_mode::<X86_64>(N, 21)).expect("env");
    let sim = &e.sim;
    for p in (0..N as u64).step_by(997) {
        let m = sim.mfn_of(Pfn(p)).unwrap();
        assert_ne!(m.0, p);
        assert_eq!(sim.pfn_of(m), Some(Pfn(p)));
    }
    // Four fully mapped, writable PTE pages (data frames spanning extents).
    let s: Space<X86_64, SplitX> = space(&e, false);
    let rw = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER;
    for i in 0..4 * 512u64 {
        s.map(
            0x10_0000_0000 + (i << 12),
            (100 + i) << 12,
            PageSize::Size4K,
            rw,
        )
        .unwrap();
    }
    let mut b: Batch = Batch::new();
    s.pin(&mut b).unwrap();
    for i in 0..4 * 512u64 {
        let f = sim.frame_info(Pfn(100 + i)).unwrap();
        // The direct map's writable reference and the L1 entry's.
        assert_eq!((f.ty, f.count), (FrameType::Writable, 2), "pfn {}", 100 + i);
    }
    assert_eq!(sim.typed_tables().len(), s.table_frames().unwrap().len());
    s.unpin(&mut b).unwrap();
    assert_quiet(sim);
    let st = sim.stats();
    assert_eq!(st.invariant_breaks + st.refcount_errors, 0);

    // Ownership: an L1 entry for the last machine frame validates; one for
    // the first frame past the domain is -EINVAL, refused and rolled back.
    let l1 = e.store.alloc_table(Level::L1).unwrap();
    let slot = |i: usize| e.store.entry(l1, i).unwrap();
    let ent = |mfn: u64| pagepin::PageTableEntry::new(mfn, rw).bits();
    let last = N as u64 - 1;
    let last_pfn = sim.pfn_of(pagepin::Mfn(last)).unwrap();
    slot(0).store(ent(last), std::sync::atomic::Ordering::Release);
    slot(1).store(ent(N as u64), std::sync::atomic::Ordering::Release);
    assert_eq!(uvm_ro(&e, l1, uvmf::TLB_FLUSH), 0);
    let _ = sim.take_refusal();
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), -errno::EINVAL);
    let r = sim.take_refusal().expect("refusal");
    assert_eq!((r.index, r.errno), (1, errno::EINVAL));
    assert_eq!(sim.frame_info(last_pfn).unwrap().count, 1, "rolled back");
    slot(1).store(0, std::sync::atomic::Ordering::Release);
    assert_eq!(ext(&e, ExtCmd::PinL1Table, l1), 0);
    assert_eq!(sim.frame_info(last_pfn).unwrap().count, 2);
    assert_eq!(ext(&e, ExtCmd::UnpinTable, l1), 0);
    assert_eq!(sim.frame_info(last_pfn).unwrap().count, 1);
    slot(0).store(0, std::sync::atomic::Ordering::Release);
    assert_eq!(uvm_rw(&e, l1), 0);
    assert_quiet(sim);
}
