//! [`XenBackend`]: the engine's [`Backend`] on top of [`XenHypercalls`].
//!
//! Each engine batch becomes one trap: a single call is issued as the
//! direct hypercall, two or more as one `multicall` whose entries point at
//! request arrays in a [`Scratch`] buffer. Per-entry results and `done`
//! counts come back as [`CallResult`]s.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;

use pagepin_engine::{errno, Backend, Call, CallResult, Calls, StoreFault};
use pagepin_engine::{Mfn, Pfn};
use smallvec::SmallVec;

use super::abi::{hypercall, rc_of, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, DOMID_SELF};
use super::XenHypercalls;

/// An mfn no guest owns: what an untranslatable pfn becomes, so the
/// hypervisor rejects it instead of acting on some other frame.
pub const INVALID_MFN: u64 = (1 << 40) - 1;

/// The guest's frame translation: pfn → mfn (Xen's p2m, from `start_info`)
/// and mfn → pfn (Xen's machine-to-phys table).
pub trait FrameMap: Send + Sync {
    /// The machine frame of `pfn`, if the guest has it.
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn>;
    /// The guest frame of `mfn`, if the guest owns it.
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn>;
}

/// A p2m held in memory: a table of mfns indexed by pfn, and its inverse
/// indexed by mfn.
#[derive(Clone, Debug)]
pub struct P2m {
    p2m: Box<[u64]>,
    m2p: Box<[u64]>,
}

impl P2m {
    /// A map from the p2m table (`p2m[pfn] = mfn`); entries equal to
    /// [`INVALID_MFN`] are holes. Returns `None` if two pfns share an mfn.
    pub fn new(p2m: Vec<u64>) -> Option<Self> {
        let max = p2m
            .iter()
            .copied()
            .filter(|&m| m != INVALID_MFN)
            .max()
            .map_or(0, |m| m + 1);
        let mut m2p = alloc::vec![u64::MAX; usize::try_from(max).ok()?];
        for (pfn, &mfn) in p2m.iter().enumerate() {
            if mfn == INVALID_MFN {
                continue;
            }
            let slot = m2p.get_mut(usize::try_from(mfn).ok()?)?;
            if *slot != u64::MAX {
                return None;
            }
            *slot = pfn as u64;
        }
        Some(P2m {
            p2m: p2m.into_boxed_slice(),
            m2p: m2p.into_boxed_slice(),
        })
    }

    /// The identity map over `pages` frames (a guest without translation).
    pub fn identity(pages: usize) -> Self {
        P2m {
            p2m: (0..pages as u64).collect(),
            m2p: (0..pages as u64).collect(),
        }
    }

    /// The p2m table.
    pub fn table(&self) -> &[u64] {
        &self.p2m
    }
}

impl FrameMap for P2m {
    #[inline]
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        let m = *self.p2m.get(usize::try_from(pfn.0).ok()?)?;
        (m != INVALID_MFN).then_some(Mfn(m))
    }
    #[inline]
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        let p = *self.m2p.get(usize::try_from(mfn.0).ok()?)?;
        (p != u64::MAX).then_some(Pfn(p))
    }
}

/// Inline capacity of the scratch buffers: Linux's batch size.
const INLINE: usize = 32;

/// The memory one trap needs: multicall entries, request arrays and `done`
/// counters. Kept inline for batches up to 32 calls; larger ones spill to
/// the heap.
#[derive(Default)]
pub struct Scratch {
    /// The encoded entries (one per call).
    pub entries: SmallVec<[MulticallEntry; INLINE]>,
    /// Every `mmu_update` request of the batch, calls concatenated.
    pub updates: SmallVec<[MmuUpdateAbi; INLINE]>,
    /// Every `mmuext_op` of the batch, calls concatenated.
    pub ops: SmallVec<[MmuExtOpAbi; INLINE]>,
    /// One `done` counter per call (unused for `update_va_mapping`).
    pub done: SmallVec<[u32; INLINE]>,
}

impl Scratch {
    /// Encode `calls` into multicall entries. Request arrays are filled
    /// first, so the pointers stored in the entries stay valid until the
    /// scratch is next modified.
    pub fn encode(&mut self, calls: Calls<'_>) {
        self.entries.clear();
        self.updates.clear();
        self.ops.clear();
        self.done.clear();
        for c in calls {
            match c {
                Call::UpdateVaMapping { .. } => {}
                Call::MmuUpdate(r) => self
                    .updates
                    .extend(r.iter().map(|&u| MmuUpdateAbi::from(u))),
                Call::MmuExtOp(o) => self.ops.extend(o.iter().map(|&op| MmuExtOpAbi::from(op))),
            }
            self.done.push(0);
        }
        let upd = self.updates.as_ptr();
        let ops = self.ops.as_ptr();
        let done = self.done.as_mut_ptr();
        let (mut nu, mut no) = (0usize, 0usize);
        for (i, c) in calls.iter().enumerate() {
            // Pointers are computed with wrapping arithmetic: they are only
            // passed to the hypervisor, which reads `count` elements.
            let pdone = done.wrapping_add(i) as u64;
            let e = match c {
                Call::UpdateVaMapping { va, pte, flags } => MulticallEntry {
                    op: hypercall::UPDATE_VA_MAPPING,
                    result: 0,
                    args: [va, pte, flags, 0, 0, 0],
                },
                Call::MmuUpdate(r) => {
                    let p = upd.wrapping_add(nu) as u64;
                    nu += r.len();
                    MulticallEntry {
                        op: hypercall::MMU_UPDATE,
                        result: 0,
                        args: [p, r.len() as u64, pdone, DOMID_SELF as u64, 0, 0],
                    }
                }
                Call::MmuExtOp(o) => {
                    let p = ops.wrapping_add(no) as u64;
                    no += o.len();
                    MulticallEntry {
                        op: hypercall::MMUEXT_OP,
                        result: 0,
                        args: [p, o.len() as u64, pdone, DOMID_SELF as u64, 0, 0],
                    }
                }
            };
            self.entries.push(e);
        }
    }

    /// Read back the results of entries encoded from `calls` after the
    /// hypervisor ran them.
    pub fn decode(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        for (i, (c, r)) in calls.iter().zip(results.iter_mut()).enumerate() {
            let rc = self
                .entries
                .get(i)
                .map_or(-errno::EFAULT, |e| rc_of(e.result as i64));
            *r = result_of(&c, rc, self.done.get(i).copied().unwrap_or(0));
        }
    }
}

/// A call's result from its return code and `done` count (clamped to the
/// call's size; an `update_va_mapping` is done iff it succeeded).
#[inline]
fn result_of(c: &Call<'_>, rc: i32, done: u32) -> CallResult {
    match c {
        Call::UpdateVaMapping { .. } => CallResult {
            rc,
            done: u32::from(rc == 0),
        },
        _ if rc == 0 => CallResult::ok(c.count()),
        _ => CallResult {
            rc,
            done: done.min(c.count() as u32),
        },
    }
}

/// The engine's backend for a Xen PV guest.
pub struct XenBackend<H: XenHypercalls, F: FrameMap = P2m> {
    hyp: H,
    frames: F,
    direct_map_base: Option<u64>,
}

impl<H: XenHypercalls, F: FrameMap> XenBackend<H, F> {
    /// A backend that traps through `hyp` and translates frames with `frames`.
    pub fn new(hyp: H, frames: F) -> Self {
        XenBackend {
            hyp,
            frames,
            direct_map_base: None,
        }
    }
    /// The same backend for a guest whose direct map starts at `base` (the
    /// virtual address of pfn 0) instead of the paging mode's default; a
    /// PV kernel without a `VIRT_BASE` note maps virtual = pseudo-physical
    /// and uses 0. See [`Backend::direct_map_base`].
    pub fn with_direct_map_base(mut self, base: u64) -> Self {
        self.direct_map_base = Some(base);
        self
    }
    /// The hypercall interface.
    pub fn hypercalls(&self) -> &H {
        &self.hyp
    }
    /// The frame translation.
    pub fn frame_map(&self) -> &F {
        &self.frames
    }

    /// Issue one direct hypercall for `call` (the one-call batch).
    fn issue_one(&self, call: &Call<'_>, scratch: &mut Scratch) -> CallResult {
        let rc = match *call {
            Call::UpdateVaMapping { va, pte, flags } => {
                rc_of(self.hyp.update_va_mapping(va, pte, flags))
            }
            Call::MmuUpdate(r) => {
                scratch.updates.clear();
                scratch
                    .updates
                    .extend(r.iter().map(|&u| MmuUpdateAbi::from(u)));
                let mut done = 0u32;
                // SAFETY: `updates` holds exactly `r.len()` requests and
                // `done` is a live local; both outlive the call and nothing
                // else touches them meanwhile.
                let raw = unsafe {
                    self.hyp
                        .mmu_update(scratch.updates.as_ptr(), r.len(), &mut done, DOMID_SELF)
                };
                return result_of(call, rc_of(raw), done);
            }
            Call::MmuExtOp(o) => {
                scratch.ops.clear();
                scratch
                    .ops
                    .extend(o.iter().map(|&op| MmuExtOpAbi::from(op)));
                let mut done = 0u32;
                // SAFETY: as above, for `ops`.
                let raw = unsafe {
                    self.hyp
                        .mmuext_op(scratch.ops.as_ptr(), o.len(), &mut done, DOMID_SELF)
                };
                return result_of(call, rc_of(raw), done);
            }
        };
        result_of(call, rc, 0)
    }
}

impl<H: XenHypercalls, F: FrameMap> Backend for XenBackend<H, F> {
    const NAME: &'static str = "xen";
    const PINNING: bool = true;
    /// Xen PV refuses PS in a guest's L2 and L3 entries.
    const LARGE_LEAVES: bool = false;
    /// Xen PV is 4-level: a 5-level space over this backend does not
    /// compile.
    ///
    /// ```compile_fail,E0080
    /// use std::sync::Arc;
    /// use pagepin_backends::xen::{xen_env, XenEnv};
    /// use pagepin_engine::{AddressSpace, DefaultRawLock, La57, SpaceOptions, Split};
    /// let e: XenEnv<DefaultRawLock> = xen_env::<La57, _>(64, 1024, 1, 0).unwrap();
    /// // error[E0080]: evaluation panicked: this backend cannot run this
    /// // paging mode (Xen PV has no 5-level tables)
    /// let s: AddressSpace<La57, Split, _> =
    ///     AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default()).unwrap();
    /// ```
    ///
    /// The same program with `X86_64` compiles and runs:
    ///
    /// ```
    /// use pagepin_backends::xen::{xen_env, XenEnv};
    /// use pagepin_engine::{AddressSpace, DefaultRawLock, SpaceOptions, Split, X86_64};
    /// let e: XenEnv<DefaultRawLock> = xen_env::<X86_64, _>(64, 1024, 1, 0).unwrap();
    /// let s: AddressSpace<X86_64, Split, _> =
    ///     AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default()).unwrap();
    /// # drop(s);
    /// ```
    const MAX_ROOT_LEVEL: pagepin_engine::Level = pagepin_engine::Level::L4;

    fn issue(&self, calls: Calls<'_>, results: &mut [CallResult]) {
        let mut scratch = Scratch::default();
        match calls.len() {
            0 => {}
            1 => {
                if let Some(r) = results.first_mut() {
                    if let Some(c) = calls.get(0) {
                        *r = self.issue_one(&c, &mut scratch);
                    }
                }
            }
            n => {
                scratch.encode(calls);
                // SAFETY: `encode` made `n` entries whose pointer arguments
                // point into `scratch`'s request arrays and done counters,
                // sized by each entry's count; `scratch` is not touched
                // until the call returns.
                let raw = unsafe { self.hyp.multicall(scratch.entries.as_mut_ptr(), n) };
                if raw != 0 {
                    // The multicall itself was refused: nothing ran.
                    let rc = rc_of(raw);
                    for (c, r) in calls.iter().zip(results.iter_mut()) {
                        *r = result_of(&c, if rc == 0 { -errno::EFAULT } else { rc }, 0);
                    }
                } else {
                    scratch.decode(calls, results);
                }
            }
        }
    }

    #[inline]
    fn store_entry(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        self.hyp.guest_store(slot, mfn, index, value)
    }

    #[inline]
    fn pfn_to_mfn(&self, pfn: Pfn) -> Mfn {
        self.frames.to_mfn(pfn).unwrap_or(Mfn(INVALID_MFN))
    }

    #[inline]
    fn try_pfn_to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.frames.to_mfn(pfn)
    }

    #[inline]
    fn mfn_to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.frames.to_pfn(mfn)
    }

    #[inline]
    fn direct_map_base(&self) -> Option<u64> {
        self.direct_map_base
    }
}
