//! A miniature hypervisor for model checking the pin protocol (loom and
//! shuttle). It keeps, per table frame, what matters for the race the seed
//! fixed: is the direct-map mapping read-only, how many L1 type references
//! does the frame hold, is it pinned; and it delivers a fault for a guest
//! store into a read-only frame that is not L1-typed, as Xen does.
//!
//! Global rules checked after every operation (the invariant): no frame
//! typed as a page table is mapped writable. At the root pin it also checks
//! that every read-only remap was followed by a TLB flush (the root's
//! flushing remap must come after all the others: "root visited last").
//!
//! The PTE pages are those linked in the one L2 (frame 2) at any moment:
//! the model follows the L2's entries, so a writer that links a new PTE
//! page (`map` into a fresh 2 MiB region) or unlinks one (`release_table`)
//! is checked as Xen checks it: into a validated L2 only a read-only page
//! may be linked (it takes an L1 type reference), and an unlink drops it.
#![allow(dead_code)]

use std::sync::atomic::Ordering as StdOrdering;

#[cfg(loom)]
pub use loom::sync::{Arc, Mutex};
#[cfg(loom)]
pub use loom::thread;
#[cfg(all(shuttle, not(loom)))]
pub use shuttle::sync::{Arc, Mutex};
#[cfg(all(shuttle, not(loom)))]
pub use shuttle::thread;

pub use pagepin_engine::Sabotage;
use pagepin_engine::{uvmf, Backend, Call, CallResult, Calls, ExtCmd, StoreFault};
use pagepin_engine::{
    AddressSpace, Batch, EntryFlags, FrameStore, Level, LockPolicy, Mfn, PageSize, PageTableEntry,
    Pfn, SpaceOptions, TableMemory, WritePath, X86_64,
};

mod lock;
pub use lock::{GlobalM, SplitM};

pub const EINVAL: i32 = 22;
pub const EBUSY: i32 = 16;
pub const FRAMES: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct Page {
    read_only: bool,
    /// L1 type references (own pin + the root's validation).
    l1_refs: u32,
    pinned: bool,
    /// Remapped read-only since the last TLB flush.
    unflushed: bool,
}

#[derive(Debug, Default)]
pub struct HvState {
    pages: Vec<Page>,
    root_pinned: bool,
    /// PTE pages linked in the L2 (frame 2), in link order.
    linked: Vec<usize>,
    /// L1 pages the root pin (and links into the pinned tree since) took
    /// references on.
    root_l1s: Vec<usize>,
    pub faults: u32,
    pub emulated: u32,
    /// Entry updates the hypervisor refused (a writer's hypercall failed).
    pub refused_updates: u32,
    pub violations: Vec<String>,
    /// Refuse `PIN_L1_TABLE` of this frame (`EINVAL`): a failed pin.
    pub fail_l1_pin_of: Option<usize>,
    /// Refuse the writable remap of this frame (`EINVAL`): a failed unpin.
    pub fail_writable_remap_of: Option<usize>,
}

/// The root, L3 and L2 frames of the one space ([`tiny_space`]'s layout).
pub const ROOT: usize = 0;
pub const L2: usize = 2;

/// The model hypervisor, over the space's table memory.
pub struct ModelHv {
    pub state: Mutex<HvState>,
    memory: std::sync::Arc<dyn TableMemory>,
}

pub const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;

impl ModelHv {
    pub fn new(memory: std::sync::Arc<dyn TableMemory>) -> Self {
        let state = HvState {
            pages: vec![Page::default(); FRAMES],
            ..HvState::default()
        };
        ModelHv {
            state: Mutex::new(state),
            memory,
        }
    }

    /// Follow a write of `new` over `old` in the L2's entry: which PTE
    /// page is linked. While the tree is pinned the L2 is validated: a
    /// newly linked page must be read-only and takes an L1 reference, an
    /// unlinked one drops its reference. Err: the update is refused.
    fn l2_entry_changed(st: &mut HvState, old: u64, new: u64) -> Result<(), i32> {
        let present = |e: u64| e & EntryFlags::PRESENT.bits() != 0;
        let frame = |e: u64| PageTableEntry::from_bits(e).frame() as usize;
        if present(new) {
            let f = frame(new);
            if st.root_pinned {
                if !st.pages[f].read_only {
                    return Err(EINVAL);
                }
                st.pages[f].l1_refs += 1;
                st.root_l1s.push(f);
            }
            st.linked.push(f);
        }
        if present(old) {
            let f = frame(old);
            if st.root_pinned {
                if let Some(k) = st.root_l1s.iter().position(|&l| l == f) {
                    st.root_l1s.swap_remove(k);
                    st.pages[f].l1_refs -= 1;
                }
            }
            if let Some(k) = st.linked.iter().position(|&l| l == f) {
                st.linked.remove(k);
            }
        }
        Ok(())
    }

    fn check(st: &mut HvState, what: &str) {
        for (i, p) in st.pages.iter().enumerate() {
            if p.l1_refs > 0 && !p.read_only {
                st.violations
                    .push(format!("{what}: frame {i} typed L1 but writable"));
            }
        }
    }

    /// Nothing read-only, typed or pinned.
    pub fn clean(&self) -> Result<(), String> {
        let st = self.state.lock().unwrap();
        for (i, p) in st.pages.iter().enumerate() {
            if p.read_only || p.l1_refs > 0 || p.pinned {
                return Err(format!("frame {i} left {p:?}"));
            }
        }
        if st.root_pinned {
            return Err("root left pinned".into());
        }
        Ok(())
    }
}

impl Backend for ModelHv {
    const NAME: &'static str = "model";
    const PINNING: bool = true;

    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        let mut st = self.state.lock().unwrap();
        for (call, res) in calls.iter().zip(results.iter_mut()) {
            *res = CallResult::ok(call.count());
            match call {
                Call::UpdateVaMapping { va, pte, flags } => {
                    let f = ((va - DIRECT_MAP) >> 12) as usize;
                    let ro = pte & EntryFlags::WRITABLE.bits() == 0;
                    if !ro && st.fail_writable_remap_of == Some(f) {
                        *res = CallResult::err(EINVAL, 0);
                        continue;
                    }
                    let p = &mut st.pages[f];
                    if !ro && (p.l1_refs > 0 || p.pinned) {
                        *res = CallResult::err(EBUSY, 0);
                        continue;
                    }
                    p.read_only = ro;
                    if ro {
                        p.unflushed = true;
                    }
                    if flags & uvmf::FLUSHTYPE_MASK == uvmf::TLB_FLUSH {
                        for p in st.pages.iter_mut() {
                            p.unflushed = false;
                        }
                    }
                }
                Call::MmuExtOp(ops) => {
                    for (k, op) in ops.iter().enumerate() {
                        let f = op.arg1 as usize;
                        let r = match op.cmd {
                            ExtCmd::PinL1Table => {
                                let refuse = st.fail_l1_pin_of == Some(f);
                                let p = &mut st.pages[f];
                                if !p.read_only || p.pinned || refuse {
                                    Err(EINVAL)
                                } else {
                                    p.pinned = true;
                                    p.l1_refs += 1;
                                    Ok(())
                                }
                            }
                            ExtCmd::PinL4Table => {
                                if st.pages.iter().any(|p| p.unflushed) {
                                    st.violations
                                        .push("root pinned with unflushed read-only remaps".into());
                                }
                                if !st.pages[f].read_only
                                    || st.root_pinned
                                    || st.linked.iter().any(|&l| !st.pages[l].read_only)
                                {
                                    Err(EINVAL)
                                } else {
                                    st.root_pinned = true;
                                    st.pages[f].pinned = true;
                                    let linked = st.linked.clone();
                                    for &l in &linked {
                                        st.pages[l].l1_refs += 1;
                                    }
                                    st.root_l1s = linked;
                                    Ok(())
                                }
                            }
                            ExtCmd::UnpinTable => {
                                if st.root_pinned && st.pages[f].pinned && f == ROOT {
                                    st.root_pinned = false;
                                    st.pages[f].pinned = false;
                                    for l in std::mem::take(&mut st.root_l1s) {
                                        st.pages[l].l1_refs -= 1;
                                    }
                                    Ok(())
                                } else if st.pages[f].pinned {
                                    st.pages[f].pinned = false;
                                    st.pages[f].l1_refs -= 1;
                                    Ok(())
                                } else {
                                    Err(EINVAL)
                                }
                            }
                            ExtCmd::TlbFlushLocal => {
                                // The rollback of a failed unpin flushes
                                // this way before it pins the root again.
                                for p in st.pages.iter_mut() {
                                    p.unflushed = false;
                                }
                                Ok(())
                            }
                            _ => Ok(()),
                        };
                        if let Err(e) = r {
                            *res = CallResult::err(e, k);
                            break;
                        }
                    }
                }
                Call::MmuUpdate(reqs) => {
                    // Entry updates through the hypervisor: checked for the
                    // L2 (what is linked there), written for every table.
                    for (k, r) in reqs.iter().enumerate() {
                        let (mfn, index) = ((r.ptr >> 12) as usize, (r.ptr & 0xfff) as usize / 8);
                        let slot = self.memory.frame(Pfn(mfn as u64)).unwrap().entry(index);
                        if mfn == L2 {
                            let old = slot.load(StdOrdering::Acquire);
                            if let Err(e) = Self::l2_entry_changed(&mut st, old, r.val) {
                                st.refused_updates += 1;
                                *res = CallResult::err(e, k);
                                break;
                            }
                        }
                        slot.store(r.val, StdOrdering::Release);
                    }
                }
            }
            Self::check(&mut st, "after call");
        }
    }

    fn store_entry(
        &self,
        slot: &std::sync::atomic::AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        let mut st = self.state.lock().unwrap();
        let p = st.pages[mfn.0 as usize];
        if p.read_only && p.l1_refs == 0 {
            st.faults += 1;
            return Err(StoreFault {
                mfn,
                index,
                errno: 14,
            });
        }
        if p.read_only {
            st.emulated += 1;
        }
        if mfn.0 as usize == L2 {
            let old = slot.load(StdOrdering::Acquire);
            // A writable L2 is not validated: nothing to refuse.
            let _ = Self::l2_entry_changed(&mut st, old, value);
        }
        slot.store(value, StdOrdering::Release);
        Ok(())
    }
}

pub type Space<P> = AddressSpace<X86_64, P, ModelHv>;

/// A space with `ptes` PTE pages (one mapped page each, in separate 2 MiB
/// regions): frames 0 root, 1 L3, 2 L2, 3.. L1s.
pub fn tiny_space<P: LockPolicy>(ptes: usize, sabotage: Sabotage) -> Arc<Space<P>> {
    let store = std::sync::Arc::new(FrameStore::<P::Lock>::new(FRAMES, 0));
    let memory: std::sync::Arc<dyn TableMemory> = store.clone();
    let hv = std::sync::Arc::new(ModelHv::new(memory));
    let mut s = AddressSpace::new(store, hv, SpaceOptions::default()).unwrap();
    s.set_sabotage(sabotage);
    for i in 0..ptes as u64 {
        s.map(i << 21, 0x100_0000 + (i << 12), PageSize::Size4K, leaf(0))
            .unwrap();
    }
    let frames: Vec<u64> = s.table_frames().unwrap().iter().map(|t| t.0 .0).collect();
    let mut expect: Vec<u64> = vec![1, 2];
    expect.extend(3..3 + ptes as u64);
    expect.push(0);
    assert_eq!(frames, expect, "frame layout the model assumes");
    Arc::new(s)
}

pub fn leaf(gen: u64) -> EntryFlags {
    let _ = gen;
    EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::WRITABLE
}

pub fn value(page: u64, gen: u64) -> PageTableEntry {
    PageTableEntry::from_bits(
        PageTableEntry::new(0x100_0000 / 4096 + page, leaf(gen)).bits() | (gen << 52),
    )
}

/// The pinner: pin, then unpin, with a batch of `N`.
pub fn pin_unpin<P: LockPolicy, const N: usize>(s: &Space<P>) -> Result<(), String> {
    let mut b: Batch<N> = Batch::new();
    s.pin(&mut b).map_err(|e| format!("pin: {e:?}"))?;
    s.unpin(&mut b).map_err(|e| format!("unpin: {e:?}"))?;
    if b.preempt().held() != 0 {
        return Err("locks still counted".into());
    }
    Ok(())
}

/// Failures found by a model run. Model checkers abort on a panic inside
/// the model (destructors of their objects run outside it), so a run
/// records what it found and the test asserts afterwards.
#[derive(Clone, Default)]
pub struct Findings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Findings {
    pub fn record(&self, r: Result<(), String>) {
        if let Err(e) = r {
            self.0.lock().unwrap().push(e);
        }
    }
    pub fn first(&self) -> Option<String> {
        self.0.lock().unwrap().first().cloned()
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A writer: rewrite the entry of page `page` `n` times; return the last value.
pub fn write<P: LockPolicy>(s: &Space<P>, page: u64, n: u64) -> Result<u64, String> {
    let mut last = 0;
    for gen in 1..=n {
        let v = value(page, gen);
        s.set_pte(page << 21, v, WritePath::Store)
            .map_err(|e| format!("writer faulted: {e:?}"))?;
        last = v.bits();
    }
    Ok(last)
}

/// A writer that links and frees a PTE page: map a page in the fresh
/// 2 MiB region `region` (a new PTE page is linked), unmap it, release the
/// PTE page. Every call must succeed whatever a pin or unpin is doing.
pub fn map_release<P: LockPolicy>(s: &Space<P>, region: u64) -> Result<(), String> {
    let va = region << 21;
    s.map(va, 0x100_0000, PageSize::Size4K, leaf(0))
        .map_err(|e| format!("map: {e:?}"))?;
    s.unmap(va).map_err(|e| format!("unmap: {e:?}"))?;
    s.release_table(va, Level::L1)
        .map_err(|e| format!("release_table: {e:?}"))
}

/// Check the end state: no fault, no violation, writes kept, nothing left
/// read-only, typed or pinned, no lock held.
pub fn check_end<P: LockPolicy>(s: &Space<P>, last: &[(u64, u64)]) -> Result<(), String> {
    let hv = s.backend();
    {
        let st = hv.state.lock().unwrap();
        if st.faults > 0 {
            return Err(format!("{} faults", st.faults));
        }
        if let Some(v) = st.violations.first() {
            return Err(v.clone());
        }
        if st.refused_updates > 0 {
            return Err(format!("{} entry updates refused", st.refused_updates));
        }
    }
    for &(page, v) in last {
        let got = s.read_pte(page << 21).map_err(|e| format!("{e:?}"))?.bits();
        if got != v {
            return Err(format!("lost update on page {page}: {got:#x} != {v:#x}"));
        }
    }
    hv.clean()?;
    if s.is_pinned() || pagepin_engine::RawLock::is_locked(s.space_lock()) {
        return Err("space left pinned or locked".into());
    }
    for i in 0..FRAMES as u64 {
        let m = s.store().meta(Pfn(i)).unwrap();
        if m.lock().is_locked() || m.is_pinned() {
            return Err(format!("frame {i} locked or flagged"));
        }
    }
    Ok(())
}
