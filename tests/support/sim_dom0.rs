//! The simulated dom0 the real-Xen tests hold real Xen's answers against:
//! a domain shaped like the real one (16384 pages, table memory at the top,
//! direct map at 0) whose vCPUs run on a pinned "boot" space, as the guest
//! does on Xen, and the part of the guest's `Platform` every test's
//! simulated dom0 answers alike ([`SimPlatform`], [`dom0_platform!`]).
//! Needs the guest's `scenarios` module at the crate root.
#![allow(dead_code)]

use std::ops::Deref;
use std::sync::Arc;

use pagepin_backends::xen::{MmuExtOpAbi, SimConfig, XenBackend, XenHypercalls, XenSim};
use pagepin_engine::{
    AddressSpace, Batch, EntryFlags, ExtCmd, FrameStore, Mfn, PageSize, SpaceOptions, SpinLock,
    Split, TableMemory, X86_64,
};

use crate::scenarios::{self, Recorder};

/// Pages of the domain, as Xen gives dom0 with `dom0_mem=64M`.
pub const NR_PAGES: usize = 16384;
/// Table frames (the top of the domain).
pub const POOL: usize = 512;
/// The first data page the scenarios use.
pub const DATA_BASE: u64 = 8000;
/// A page of the boot space whose entry is borrowed as a writable alias
/// (scenario 5).
pub const BOOT_ALIAS_VA: u64 = 0x0000_0100_0000_0000;

/// The simulator as the guest's hypercall layer.
pub type SimH = Arc<XenSim>;

/// The simulated domain and its boot space.
pub struct Dom0 {
    pub sim: Arc<XenSim>,
    pub rec: Arc<Recorder<SimH>>,
    pub backend: Arc<scenarios::Backend<SimH>>,
    pub store: Arc<FrameStore<SpinLock>>,
    pub boot: AddressSpace<X86_64, Split<SpinLock>, scenarios::Backend<SimH>>,
}

impl Dom0 {
    /// A domain (the simulator's 4 vCPUs) whose hypercalls cost
    /// `trap_cost_ns`, with vCPUs `0..running` on the pinned boot space.
    /// Recording is off when it returns.
    pub fn new(running: usize, trap_cost_ns: u64) -> Dom0 {
        let store: Arc<FrameStore<SpinLock>> =
            Arc::new(FrameStore::new(POOL, (NR_PAGES - POOL) as u64));
        let mem: Arc<dyn TableMemory> = store.clone();
        let mut cfg = SimConfig::for_mode::<X86_64>(NR_PAGES, 0x5eed);
        cfg.direct_map_base = 0;
        cfg.trap_cost_ns = trap_cost_ns;
        let sim = Arc::new(XenSim::new(cfg, mem).expect("simulator"));
        let rec = Arc::new(Recorder::new(sim.clone()));
        let backend =
            Arc::new(XenBackend::new(rec.clone(), sim.frame_map()).with_direct_map_base(0));
        rec.set_recording(false);
        let boot = AddressSpace::new(store.clone(), backend.clone(), SpaceOptions::default())
            .expect("boot space");
        boot.map(
            BOOT_ALIAS_VA,
            (DATA_BASE + 100) << 12,
            PageSize::Size4K,
            EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER,
        )
        .expect("boot map");
        boot.pin(&mut Batch::<32>::new()).expect("boot pin");
        let root = sim.mfn_of(boot.root()).expect("boot root mfn");
        for v in 0..running {
            XenSim::set_current_vcpu(v);
            assert_eq!(new_baseptr(&sim, root), 0, "boot base pointer");
        }
        XenSim::set_current_vcpu(0);
        Dom0 {
            sim,
            rec,
            backend,
            store,
            boot,
        }
    }
}

/// `MMUEXT_NEW_BASEPTR` of `root` on the current vCPU; the return code.
pub fn new_baseptr(sim: &XenSim, root: Mfn) -> i64 {
    let op = MmuExtOpAbi {
        cmd: ExtCmd::NewBaseptr as u32,
        _pad: 0,
        arg1: root.0,
        arg2: 0,
    };
    let mut done = 0;
    // SAFETY: one live op and counter.
    unsafe { sim.mmuext_op(&op, 1, &mut done, 0x7ff0) }
}

/// A simulated dom0 as a scenario platform: the domain, and what the test
/// keeps beside it (`own`). The domain's parts (`self.sim`, `self.rec`,
/// ...) read through it.
pub struct SimPlatform<X> {
    /// The domain.
    pub dom: Dom0,
    /// The test's own state.
    pub own: X,
}

impl<X> Deref for SimPlatform<X> {
    type Target = Dom0;
    fn deref(&self) -> &Dom0 {
        &self.dom
    }
}

/// The items of the guest's `scenarios::Platform` that every simulated
/// dom0 ([`SimPlatform`]) answers alike: its trap, recorder, backend and
/// table memory, data pages from [`DATA_BASE`], the simulator as the
/// observer, the boot space's root, and the name "sim". Use it inside
/// `impl Platform for SimPlatform<X> { ... }`, beside the test's own items.
macro_rules! dom0_platform {
    () => {
        type H = $crate::sim_dom0::SimH;
        type O = ::pagepin_backends::xen::XenSim;
        const NAME: &'static str = "sim";
        fn recorder(&self) -> &::std::sync::Arc<$crate::scenarios::Recorder<Self::H>> {
            &self.dom.rec
        }
        fn backend(&self) -> &::std::sync::Arc<$crate::scenarios::Backend<Self::H>> {
            &self.dom.backend
        }
        fn store(
            &self,
        ) -> &::std::sync::Arc<::pagepin_engine::FrameStore<::pagepin_engine::SpinLock>> {
            &self.dom.store
        }
        fn data_pfn(&self, i: usize) -> ::pagepin_engine::Pfn {
            assert!(i < $crate::scenarios::DATA_PAGES);
            ::pagepin_engine::Pfn($crate::sim_dom0::DATA_BASE + i as u64)
        }
        fn observer(&self) -> &Self::O {
            &self.dom.sim
        }
        fn boot_root(&self) -> ::pagepin_engine::Mfn {
            self.dom
                .sim
                .mfn_of(self.dom.boot.root())
                .expect("boot root")
        }
        fn info(&self) -> ::std::string::String {
            ::std::string::String::from("sim")
        }
    };
}
pub(crate) use dom0_platform;
