//! The environment builder: the engine's frame store, the simulated
//! hypervisor ([`XenSim`]) reading it, and the guest-side [`XenBackend`]
//! trapping into it, set up together for tests, examples and benches.

use alloc::sync::Arc;

use pagepin_engine::PagingMode;
use pagepin_engine::RawLock;
use pagepin_engine::{FrameStore, TableMemory};

use super::backend::{P2m, XenBackend};
use super::sim::{SimConfig, SimError, XenSim};

/// A ready-made setup: the engine's frame store, the simulator reading it,
/// and a backend trapping into the simulator with the guest's p2m.
pub struct XenEnv<L: RawLock> {
    /// Table memory (pfns `table_base..table_base + table_frames`).
    pub store: Arc<FrameStore<L>>,
    /// The simulated hypervisor.
    pub sim: Arc<XenSim>,
    /// The backend for address spaces.
    pub backend: Arc<XenBackend<Arc<XenSim>>>,
}

/// Build a [`XenEnv`] for paging mode `M`: `table_frames` frames of table
/// memory at the top of a domain of `nr_pages` frames (pfns below are data
/// pages with metadata only), with a p2m permutation from `seed` and a trap
/// cost of `trap_cost_ns`.
pub fn xen_env<M: PagingMode, L: RawLock>(
    table_frames: usize,
    nr_pages: usize,
    seed: u64,
    trap_cost_ns: u64,
) -> Result<XenEnv<L>, SimError> {
    let mut cfg = SimConfig::for_mode::<M>(nr_pages, seed);
    cfg.trap_cost_ns = trap_cost_ns;
    xen_env_with(table_frames, cfg)
}

/// [`xen_env`] with a configuration of one's own (`cfg.nr_pages` frames,
/// the top `table_frames` of them table memory).
pub fn xen_env_with<L: RawLock>(
    table_frames: usize,
    cfg: SimConfig,
) -> Result<XenEnv<L>, SimError> {
    let nr_pages = cfg.nr_pages;
    if table_frames == 0 || table_frames > nr_pages {
        return Err(SimError::BadSize);
    }
    let base = (nr_pages - table_frames) as u64;
    let store: Arc<FrameStore<L>> = Arc::new(FrameStore::new(table_frames, base));
    let mem: Arc<dyn TableMemory> = store.clone();
    let sim = Arc::new(XenSim::new(cfg, mem)?);
    let map = P2m::new(sim.p2m_table().to_vec()).ok_or(SimError::BadSize)?;
    let backend = Arc::new(XenBackend::new(sim.clone(), map));
    Ok(XenEnv {
        store,
        sim,
        backend,
    })
}
