//! The backends `simulate` can run on, behind one small trait.

use std::sync::Arc;

use pagepin::backends::mock::MockBackend;
use pagepin::{Backend, DefaultRawLock, FrameStore};

/// Counters a platform can report beyond what the engine counts.
#[derive(Debug, Default)]
pub struct PlatformCounters {
    /// Hypercalls seen by the platform (writers' included), if it counts them.
    pub hypercalls: Option<u64>,
    /// TLB flushes requested, if the platform counts them.
    pub tlb_flushes: Option<u64>,
    /// Guest stores the platform emulated.
    pub emulated_stores: u64,
    /// Faults the platform delivered.
    pub faults: u64,
    /// Invariant breaks the platform detected.
    pub invariant_violations: u64,
}

/// A backend `simulate` knows how to build and read.
pub trait Platform: Backend + Sized + 'static {
    /// Build it over `store`, for a guest of `guest_pages` pages.
    fn build(
        store: Arc<FrameStore<DefaultRawLock>>,
        guest_pages: u64,
        trap_cost_ns: u64,
        seed: u64,
    ) -> Result<Arc<Self>, String>;
    /// Its counters.
    fn counters(&self) -> PlatformCounters;
    /// Table frames it still treats as page tables (typed, read-only) after
    /// everything was unpinned.
    fn leaked_frames(&self, store: &FrameStore<DefaultRawLock>) -> usize;
}

impl Platform for MockBackend {
    fn build(
        store: Arc<FrameStore<DefaultRawLock>>,
        _: u64,
        _: u64,
        _: u64,
    ) -> Result<Arc<Self>, String> {
        let m = MockBackend::with_memory(store);
        m.set_store_log(false);
        Ok(Arc::new(m))
    }
    fn counters(&self) -> PlatformCounters {
        PlatformCounters {
            hypercalls: Some(self.batch_count() as u64),
            ..Default::default()
        }
    }
    fn leaked_frames(&self, _: &FrameStore<DefaultRawLock>) -> usize {
        // Replay what the mock accepted: pages left read-only or pinned.
        let mut ro = std::collections::BTreeSet::new();
        let mut pins = std::collections::BTreeMap::<u64, i64>::new();
        for b in self.batches() {
            for (c, r) in b.calls.iter().zip(&b.results) {
                if r.rc != 0 {
                    continue;
                }
                match c {
                    pagepin::backends::mock::Recorded::UpdateVaMapping { va, pte, .. } => {
                        if pte & 2 == 0 {
                            ro.insert(*va);
                        } else {
                            ro.remove(va);
                        }
                    }
                    pagepin::backends::mock::Recorded::MmuExtOp(ops) => {
                        for op in ops {
                            match op.cmd {
                                pagepin::ExtCmd::UnpinTable => {
                                    *pins.entry(op.arg1).or_default() -= 1
                                }
                                c if c.pin_level().is_some() => {
                                    *pins.entry(op.arg1).or_default() += 1
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        ro.len() + pins.values().filter(|v| **v != 0).count()
    }
}

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformKind {
    /// The recording mock.
    Mock,
}

impl PlatformKind {
    /// The default backend.
    pub fn default_kind() -> Self {
        PlatformKind::Mock
    }
    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mock" => Some(PlatformKind::Mock),
            _ => None,
        }
    }
}

/// Run `$go!(BackendType)` for the chosen kind.
macro_rules! dispatch {
    ($kind:expr, $go:ident) => {
        match $kind {
            platform::PlatformKind::Mock => $go!(pagepin::backends::mock::MockBackend),
        }
    };
}
pub(crate) use dispatch;
