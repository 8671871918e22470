//! The backends `simulate` can run on, behind one small trait.

use std::sync::Arc;

use pagepin::backends::mock::MockBackend;
use pagepin::backends::native::NativeBackend;
use pagepin::backends::xen::{xen_env, XenBackend, XenSim};
use pagepin::backends::PinObserver;
use pagepin::{Backend, DefaultRawLock, FrameStore, PagingMode};

/// Counters a platform can report beyond what the engine counts.
#[derive(Debug, Default)]
pub struct PlatformCounters {
    /// Hypercalls seen by the platform (writers' included), if it counts them.
    pub hypercalls: Option<u64>,
    /// TLB flushes performed, if the platform counts them.
    pub tlb_flushes: Option<u64>,
    /// Guest stores the platform emulated.
    pub emulated_stores: u64,
    /// Faults the platform delivered.
    pub faults: u64,
    /// Invariant breaks the platform detected.
    pub invariant_violations: u64,
}

/// Table memory, the backend, and where data pages start.
pub struct Env<B> {
    pub store: Arc<FrameStore<DefaultRawLock>>,
    pub backend: Arc<B>,
    /// First guest frame of the data pages (`data_pages` of them).
    pub data_base: u64,
}

/// A backend `simulate` knows how to build and read. What it thinks is
/// still pinned, read-only or typed (the leaks) it tells as a
/// [`PinObserver`].
pub trait Platform: Backend + PinObserver + Sized + 'static {
    /// Build table memory of `table_frames` frames, room for `data_pages`
    /// data pages, and the backend.
    fn build<M: PagingMode>(
        table_frames: usize,
        data_pages: u64,
        trap_cost_ns: u64,
        seed: u64,
    ) -> Result<Env<Self>, String>;
    /// Its counters.
    fn counters(&self) -> PlatformCounters;
}

impl Platform for MockBackend {
    fn build<M: PagingMode>(
        table_frames: usize,
        _: u64,
        _: u64,
        _: u64,
    ) -> Result<Env<Self>, String> {
        let store = Arc::new(FrameStore::new(table_frames, 0));
        let m = MockBackend::with_memory(store.clone());
        m.set_store_log(false);
        Ok(Env {
            store,
            backend: Arc::new(m),
            data_base: table_frames as u64,
        })
    }
    fn counters(&self) -> PlatformCounters {
        PlatformCounters {
            hypercalls: Some(self.batch_count() as u64),
            ..Default::default()
        }
    }
}

impl Platform for NativeBackend {
    fn build<M: PagingMode>(
        table_frames: usize,
        _: u64,
        _: u64,
        _: u64,
    ) -> Result<Env<Self>, String> {
        let store = Arc::new(FrameStore::new(table_frames, 0));
        let backend = Arc::new(NativeBackend::with_memory(store.clone()));
        Ok(Env {
            store,
            backend,
            data_base: table_frames as u64,
        })
    }
    fn counters(&self) -> PlatformCounters {
        let c = self.counters();
        PlatformCounters {
            hypercalls: Some(0),
            tlb_flushes: Some(c.full_flushes),
            ..Default::default()
        }
    }
}

/// The Xen backend over the simulated hypervisor.
pub type Xen = XenBackend<Arc<XenSim>>;

impl Platform for Xen {
    fn build<M: PagingMode>(
        table_frames: usize,
        data_pages: u64,
        trap_cost_ns: u64,
        seed: u64,
    ) -> Result<Env<Self>, String> {
        // Data pages sit below the table frames in the domain.
        let nr_pages = data_pages as usize + table_frames;
        let env = xen_env::<M, DefaultRawLock>(table_frames, nr_pages, seed, trap_cost_ns)
            .map_err(|e| format!("building the Xen simulator: {e:?}"))?;
        Ok(Env {
            store: env.store,
            backend: env.backend,
            data_base: 0,
        })
    }
    fn counters(&self) -> PlatformCounters {
        let s = self.hypercalls().stats();
        PlatformCounters {
            hypercalls: Some(s.hypercalls),
            tlb_flushes: Some(s.tlb_flushes),
            emulated_stores: s.emulated_stores,
            faults: s.faults,
            invariant_violations: s.invariant_breaks + s.refcount_errors,
        }
    }
}

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformKind {
    /// The Xen backend over the simulated hypervisor.
    Xen,
    /// Native x86-64 (no pinning).
    Native,
    /// The recording mock.
    Mock,
}

impl PlatformKind {
    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "xen" => Some(PlatformKind::Xen),
            "native" => Some(PlatformKind::Native),
            "mock" => Some(PlatformKind::Mock),
            _ => None,
        }
    }
}

/// Run `$go!(BackendType)` for the chosen kind.
macro_rules! dispatch {
    ($kind:expr, $go:ident) => {
        match $kind {
            platform::PlatformKind::Xen => $go!(platform::Xen),
            platform::PlatformKind::Native => $go!(pagepin::backends::native::NativeBackend),
            platform::PlatformKind::Mock => $go!(pagepin::backends::mock::MockBackend),
        }
    };
}
pub(crate) use dispatch;
