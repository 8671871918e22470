//! Exhaustive interleavings (loom) of the engine's pin protocol on the real
//! simulated Xen hypervisor ([`XenSim`], through [`XenBackend`]) rather
//! than the engine's miniature model: the simulator's per-frame
//! `type_info` words, page locks, direct-map slots, TLB generation and
//! counters are loom objects here (the crate's sync facade under
//! `cfg(loom)`), so loom explores the orders in which the hypervisor's
//! own compare-and-swaps and locks interleave with the engine's.
//!
//! One pinner pins then unpins a space of two PTE pages while one writer
//! `set_pte`s an entry in each. Checked over every interleaving: the writer
//! never faults, its updates survive, after unpin every frame is at rest
//! (untyped, not pinned, mapped writable with one reference), the
//! simulator's invariant-break and refcount-error counters stay 0, no
//! engine lock or pinned flag is left, and nothing deadlocks. The negative
//! control (PTE lock dropped between the read-only remap and the L1 pin)
//! must be found as a writer fault.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom-xen
//! cargo test --release -p pagepin-backends --features xen --test loom_xen`
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use loom::thread;

use pagepin_backends::xen::{xen_env, XenBackend, XenEnv, XenSim};
use pagepin_engine::Sabotage;
use pagepin_engine::{
    AddressSpace, Batch, EntryFlags, LockPolicy, PageSize, PageTableEntry, Pfn, SpaceOptions,
    WritePath, X86_64,
};

#[path = "../../engine/tests/model/lock.rs"]
mod lock;
use lock::{GlobalM, ModelLock, SplitM};

type Space<P> = AddressSpace<X86_64, P, XenBackend<Arc<XenSim>>>;

/// Table memory: root, L3, L2 and two L1s (and spares) at pfns 8..16.
const TABLES: usize = 8;
/// The domain: pfns 0..8 are data pages.
const PAGES: usize = 16;
/// PTE pages (one mapped page each, in separate 2 MiB regions).
const PTES: u64 = 2;

/// Data pfn mapped at page `page` initially (`gen` 0) and by the writer
/// (`gen` 1): a different frame, so the writer's update is a full
/// revalidation (writable reference moved) when it is emulated.
fn data_pfn(page: u64, gen: u64) -> u64 {
    1 + page * 2 + gen
}

/// A leaf as 64-bit PV Xen stores it: a user page gets GLOBAL added on
/// the hypervisor's path (`adjust_guest_l1e`), so the writer writes it
/// itself and the entry reads back the same whichever path it took.
fn leaf_flags() -> EntryFlags {
    EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER | EntryFlags::GLOBAL
}

/// Failures found by a model run. loom aborts on a panic inside the model,
/// so a run records what it found and the test asserts after it.
#[derive(Clone, Default)]
struct Findings(Arc<std::sync::Mutex<Vec<String>>>);

impl Findings {
    fn record(&self, r: Result<(), String>) {
        if let Err(e) = r {
            self.0.lock().unwrap().push(e);
        }
    }
    fn first(&self) -> Option<String> {
        self.0.lock().unwrap().first().cloned()
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// The space: two PTE pages mapping writable data pages.
fn tiny_space<P: LockPolicy<Lock = ModelLock>>(
    sabotage: Sabotage,
) -> (XenEnv<ModelLock>, Arc<Space<P>>) {
    let env = xen_env::<X86_64, ModelLock>(TABLES, PAGES, 7, 0).expect("env");
    let mut s = AddressSpace::new(
        env.store.clone(),
        env.backend.clone(),
        SpaceOptions::default(),
    )
    .expect("space");
    s.set_sabotage(sabotage);
    for page in 0..PTES {
        s.map(
            page << 21,
            data_pfn(page, 0) << 12,
            PageSize::Size4K,
            leaf_flags(),
        )
        .expect("map");
    }
    (env, Arc::new(s))
}

/// The writer's entry for `page`, in machine frames.
fn written<P: LockPolicy>(s: &Space<P>, page: u64) -> PageTableEntry {
    let mfn = pagepin_engine::Backend::pfn_to_mfn(&**s.backend(), Pfn(data_pfn(page, 1)));
    PageTableEntry::new(mfn.0, leaf_flags())
}

/// Pin then unpin with a batch of `N`.
fn pin_unpin<P: LockPolicy, const N: usize>(s: &Space<P>) -> Result<(), String> {
    let mut b: Batch<N> = Batch::new();
    s.pin(&mut b).map_err(|e| format!("pin: {e:?}"))?;
    s.unpin(&mut b).map_err(|e| format!("unpin: {e:?}"))?;
    if b.preempt().held() != 0 {
        return Err("locks still counted".into());
    }
    Ok(())
}

/// The end state, after both threads finished.
fn check_end<P: LockPolicy>(
    env: &XenEnv<ModelLock>,
    s: &Space<P>,
    last: &[(u64, PageTableEntry)],
) -> Result<(), String> {
    let st = env.sim.stats();
    if st.faults != 0 {
        return Err(format!("{} guest store faults", st.faults));
    }
    if st.invariant_breaks != 0 || st.refcount_errors != 0 {
        return Err(format!(
            "sim counters: {} invariant breaks, {} refcount errors",
            st.invariant_breaks, st.refcount_errors
        ));
    }
    for &(page, v) in last {
        let got = s.read_pte(page << 21).map_err(|e| format!("{e:?}"))?;
        if got != v {
            return Err(format!(
                "lost update on page {page}: {:#x} != {:#x}",
                got.bits(),
                v.bits()
            ));
        }
    }
    if let Some(f) = env.sim.unquiet_frames().first() {
        return Err(format!("frame not at rest after unpin: {f:?}"));
    }
    if s.is_pinned() {
        return Err("space still pinned".into());
    }
    let base = env.store.base().0;
    for i in 0..env.store.len() as u64 {
        let m = env.store.meta(Pfn(base + i)).expect("meta");
        if m.lock().is_locked() || m.is_pinned() {
            return Err(format!("engine frame {} locked or flagged", base + i));
        }
    }
    Ok(())
}

/// Every interleaving (bounded by `LOOM_MAX_PREEMPTIONS`) of a pinner and
/// one writer; returns what was found, and in how many interleavings the
/// simulator emulated a writer's store (the writer met a pinned L1).
fn explore<P: LockPolicy<Lock = ModelLock>, const N: usize>(
    sabotage: Sabotage,
) -> (Findings, usize) {
    let found = Findings::default();
    let f = found.clone();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let emulated = Arc::new(AtomicUsize::new(0));
    let em = emulated.clone();
    let mut builder = loom::model::Builder::new();
    // The simulator's atomics make long executions; LOOM_MAX_BRANCHES
    // still overrides.
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        builder.max_branches = 20_000;
    }
    let t0 = Instant::now();
    builder.check(move || {
        r.fetch_add(1, Ordering::Relaxed);
        let (env, s) = tiny_space::<P>(sabotage);
        let targets: Vec<(u64, PageTableEntry)> = (0..PTES).map(|p| (p, written(&s, p))).collect();
        let writer = {
            let s = s.clone();
            let targets = targets.clone();
            thread::spawn(move || -> Result<(), String> {
                for &(page, v) in &targets {
                    s.set_pte(page << 21, v, WritePath::Store)
                        .map_err(|e| format!("writer faulted on page {page}: {e:?}"))?;
                }
                Ok(())
            })
        };
        let mut result = pin_unpin::<P, N>(&s);
        if let Err(e) = writer.join().unwrap() {
            result = result.and(Err(e));
        }
        if env.sim.stats().emulated_stores > 0 {
            em.fetch_add(1, Ordering::Relaxed);
        }
        f.record(result.and_then(|()| check_end(&env, &s, &targets)));
    });
    let runs = runs.load(Ordering::Relaxed);
    let emulated = emulated.load(Ordering::Relaxed);
    eprintln!(
        "loom (XenSim): {runs} interleavings explored in {:.1?}, {emulated} with an emulated \
         store (batch {N}, {}, {sabotage:?})",
        t0.elapsed(),
        P::NAME
    );
    assert!(runs > 10, "loom explored only {runs} interleavings");
    (found, emulated)
}

fn holds<P: LockPolicy<Lock = ModelLock>, const N: usize>() {
    let (found, emulated) = explore::<P, N>(Sabotage::default());
    assert_eq!(
        found.first(),
        None,
        "{} of the interleavings failed",
        found.count()
    );
    // The writer must also have met the table pinned (its store trapped
    // and emulated), not only before pin or after unpin.
    assert!(
        emulated > 0,
        "no interleaving had the writer meet a pinned L1"
    );
}

#[test]
fn xen_split_batch_1() {
    holds::<SplitM, 1>();
}

#[test]
fn xen_split_batch_2() {
    holds::<SplitM, 2>();
}

#[test]
fn xen_global_batch_1() {
    holds::<GlobalM, 1>();
}

#[test]
fn xen_global_batch_2() {
    holds::<GlobalM, 2>();
}

/// Negative control: the PTE lock released between an L1's read-only
/// remap and its pin. The writer then finds the page read-only but not
/// typed L1, so the simulator delivers a page fault; loom must find it.
#[test]
fn xen_negative_unlock_before_pin() {
    let (found, _) = explore::<SplitM, 2>(Sabotage {
        unlock_before_pin: true,
        ..Default::default()
    });
    assert!(
        found.count() > 0,
        "loom found no failing interleaving for: unlock before pin"
    );
    let first = found.first().unwrap();
    assert!(
        first.contains("fault"),
        "expected a writer fault, found: {first}"
    );
    eprintln!(
        "unlock before pin: loom found {} failing interleavings, e.g. {first}",
        found.count()
    );
}
