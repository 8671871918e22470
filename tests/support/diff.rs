//! The simulator side of the differential programs
//! (`xen-guest/src/program.rs`): a fresh `XenSim` shaped like the test
//! guest's dom0 (16384 frames, direct map at 0, I/O memory permitted, a
//! pinned boot L4 as vCPU 0's base pointer) per program. Shared by
//! `tests/real_xen_diff.rs` and `tests/xen_sim_regressions.rs`.

#![allow(dead_code)] // each test crate uses part of it

#[path = "../../xen-guest/src/program.rs"]
pub mod program;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use pagepin_backends::xen::{MmuExtOpAbi, SimConfig, XenHypercalls, XenSim, DOMID_SELF};
use pagepin_engine::SpinLock;
use pagepin_engine::{FrameStore, Pfn, TableMemory, X86_64};
use program::{Outcome, Program, Sym, Target, POOL};

/// Frames of the simulated domain (the guest's dom0 has 64 MiB).
pub const NR_PAGES: usize = 16384;
/// A frame the simulated domain does not own (and not I/O memory).
const XEN_MFN: u64 = 0x3_0000;

/// The vCPU mask the valid mask pointer points to.
static MASK: AtomicU64 = AtomicU64::new(1);

/// One program's simulator.
pub struct SimTarget {
    /// The simulated hypervisor.
    pub sim: Arc<XenSim>,
    store: Arc<FrameStore<SpinLock>>,
    base: u64,
}

impl SimTarget {
    /// A fresh domain: pool frames untyped, mapped writable, zero; the
    /// boot L4 (frame `POOL` of the table memory) pinned and loaded.
    pub fn new() -> SimTarget {
        let base = (NR_PAGES - POOL - 1) as u64;
        let store: Arc<FrameStore<SpinLock>> = Arc::new(FrameStore::new(POOL + 1, base));
        let mem: Arc<dyn TableMemory> = store.clone();
        let mut cfg = SimConfig::for_mode::<X86_64>(NR_PAGES, 0x5eed);
        cfg.direct_map_base = 0;
        cfg.io_privileged = true;
        cfg.io_frames = core::iter::once(program::IO_MFN..program::IO_MFN + 1).collect();
        // What real Xen does beyond the protocol's stricter default: stale
        // writable TLB entries take plain stores, every type change
        // flushes when it must.
        cfg.exact_tlb = true;
        // The hypervisor slots real Xen 4.17 writes into a validated L4
        // on the test machine: the linear slot (the L4 itself), the
        // per-domain L3, Xen's image and the direct map (frames of its
        // own, which read back as unknown frames).
        cfg.l4_xen_slots = Some(vec![
            (258, None, 0x8000_0000_0000_0063),
            (260, Some(XEN_MFN + 1), 0x8000_0000_0000_0063),
            (261, Some(XEN_MFN + 2), 0x63),
            (262, Some(XEN_MFN + 3), 0x8000_0000_0000_0063),
        ]);
        let sim = Arc::new(XenSim::new(cfg, mem).expect("simulator"));
        let t = SimTarget { sim, store, base };
        let boot = t.mfn(Sym::Boot);
        let va = (base + POOL as u64) << 12;
        assert_eq!(t.sim.update_va_mapping(va, (boot << 12) | 0x61, 0), 0);
        for cmd in [3, program::cmd::NEW_BASEPTR] {
            let op = MmuExtOpAbi {
                cmd,
                _pad: 0,
                arg1: boot,
                arg2: 0,
            };
            let mut done = 0;
            // SAFETY: one live op and counter.
            let rc = unsafe { t.sim.mmuext_op(&op, 1, &mut done, DOMID_SELF) };
            assert_eq!(rc, 0, "boot L4 command {cmd}");
        }
        // The guest's boot mapping of its own memory: P | RW | A | D (Xen
        // adds USER and GUEST_KERNEL).
        for i in 0..POOL {
            let m = t.mfn(Sym::Pool(i as u8));
            assert_eq!(t.sim.update_va_mapping(t.va(i), (m << 12) | 0x63, 0), 0);
        }
        t.sim.reset_stats();
        t
    }
}

impl Default for SimTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for SimTarget {
    type H = Arc<XenSim>;
    fn hv(&self) -> &Arc<XenSim> {
        &self.sim
    }
    fn mfn(&self, s: Sym) -> u64 {
        match s {
            Sym::Pool(i) => self.sim.mfn_of(Pfn(self.base + i as u64)).expect("pool").0,
            Sym::Boot => {
                self.sim
                    .mfn_of(Pfn(self.base + POOL as u64))
                    .expect("boot")
                    .0
            }
            Sym::Io => program::IO_MFN,
            Sym::Far => program::FAR_MFN,
            Sym::Xen => XEN_MFN,
        }
    }
    fn pfn(&self, i: usize) -> u64 {
        self.base + i as u64
    }
    fn va(&self, i: usize) -> u64 {
        self.pfn(i) << 12
    }
    fn slot(&self, i: usize, index: usize) -> &AtomicU64 {
        self.store
            .frame(Pfn(self.base + i as u64))
            .expect("pool frame")
            .entry(index)
    }
    fn dm_entry(&self, i: usize) -> u64 {
        self.sim.direct_map_entry(Pfn(self.pfn(i))).unwrap_or(0)
    }
    fn mask_ptr(&self, ok: bool) -> u64 {
        if ok {
            MASK.as_ptr() as u64
        } else {
            0x8000_0000_0000_0000
        }
    }
}

/// What the simulator did with one program.
pub struct SimRun {
    /// Hash, operations, probe.
    pub out: Outcome,
    /// The per-operation lines (with `detail`).
    pub lines: Vec<String>,
    /// Invariant breaks and refcount errors of the simulator.
    pub breaks: u64,
}

/// Run `p` on a fresh simulator.
pub fn run_sim(p: &Program, detail: bool) -> SimRun {
    let t = SimTarget::new();
    let mut lines = Vec::new();
    let out = program::run(&t, p, detail, &mut program::Scratch::new(), &mut |l| {
        lines.push(l.to_string())
    });
    let st = t.sim.stats();
    let breaks = st.invariant_breaks + st.refcount_errors + t.sim.check_all().len() as u64;
    SimRun { out, lines, breaks }
}
