//! The parallel scenarios: vCPU 0 pins and unpins while vCPUs 1..=k write
//! entries, written once and run twice: on real Xen inside the guest (one
//! vCPU each) and in the host test (`tests/real_xen_smp.rs`, one thread
//! each) against the simulator. Only `core` and `alloc`.
//!
//! Each job runs rounds of: every writer starts storing random entries of
//! its own (plain stores, emulated by Xen when the table is pinned, and
//! `mmu_update`s); vCPU 0 pins and unpins; the writers stop and read back
//! every entry they wrote that round. A fault is a page fault the platform
//! saw (the guest's #PF handler, the simulator's refused store).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use pagepin_backends::xen::XenHypercalls;
use pagepin_backends::SplitMix64;
use pagepin_engine::Sabotage;
use pagepin_engine::{
    pin_all, unpin_all, AddressSpace, Batch, EntryFlags, Error, ExtCmd, Global, Level, Mfn,
    PageSize, PageTableEntry, Pfn, SpaceOptions, Split, WritePath,
};
use pagepin_engine::{LockPolicy, SpinLock};

use crate::scenarios::{ext_raw, kernel_space, mfn_of, states, Platform, Report, Space, LEAF};

/// The prefix of a measurement line.
pub const MEASURE_PREFIX: &str = "PAGEPIN-MEASURE";

/// What a parallel scenario needs besides [`Platform`].
pub trait Smp: Platform + Sync {
    /// Writer vCPUs (1..=k).
    fn writers(&self) -> usize;
    /// Run `f(0)` on this vCPU and `f(w)` on writer `w`, all at once;
    /// return when every call has returned.
    fn run_parallel(&self, f: &(dyn Fn(usize) + Sync));
    /// Page faults seen so far, every vCPU.
    fn faults(&self) -> u64;
    /// Stores given up after repeated faults so far.
    fn skipped(&self) -> u64;
    /// A clock in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Tell the platform which vCPU the calling context is (the simulator
    /// keeps base pointers per vCPU; a real vCPU knows).
    fn set_vcpu(&self, _v: usize) {}
    /// Make the calling vCPU's guarded stores give up after `limit` faults
    /// (0: the default); for measuring a fault's round trip.
    fn set_retry_limit(&self, _limit: u64) {}
}

/// Which rule a job breaks on purpose (a negative control).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// None: the protocol.
    None,
    /// The PTE lock released between the read-only remap and the L1 pin.
    UnlockBeforePin,
    /// The L1 pin (and its lock) skipped under split.
    SkipL1Pin,
    /// Writers store without the PTE lock.
    Bypass,
}

/// One parallel scenario.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    /// The line's name.
    pub name: &'static str,
    /// Split PTE locks (else the global lock).
    pub split: bool,
    /// Batch size.
    pub batch: usize,
    /// Pin/unpin rounds.
    pub rounds: usize,
    /// The rule broken on purpose, if any.
    pub control: Control,
    /// Writers also link and free tables.
    pub churn: bool,
    /// Spaces (more than one: `pin_all` / `unpin_all`).
    pub spaces: usize,
    /// L1 tables per space.
    pub l1s: usize,
}

/// Where each space's L1 tables cover: L1 `i` at `RACE_BASE + i * 2 MiB`.
const RACE_BASE: u64 = 0x0000_0000_4000_0000;
/// Where churning writers link and free their own L1 (one 2 MiB region
/// per writer above the first, which stays mapped so the L2 exists).
const CHURN_BASE: u64 = 0x0000_0080_0000_0000;
/// A writer's entries touched in one round that it re-reads one by one;
/// past this it re-reads all of its entries.
const TOUCH_CAP: usize = 4096;
/// Churn steps (map, unmap, release) per writer and round: released
/// tables are only reused after the round (no_std has no epoch collector;
/// the round's end is the grace period), so the pool must not run dry.
const CHURN_STEPS: usize = 24;
/// "Never written" in a shadow slot.
const UNWRITTEN: u64 = u64::MAX;
/// The most L1s over all spaces of a job.
pub const MAX_L1S: usize = 64;

/// Per-boot scratch shared by the jobs (allocated once: the guest's heap
/// never frees).
pub struct Scratch {
    shadow: Vec<AtomicU64>,
    touched: Vec<Vec<AtomicU32>>,
    ntouched: Vec<AtomicUsize>,
}

impl Scratch {
    /// Scratch for `writers` writers.
    pub fn new(writers: usize) -> Self {
        Scratch {
            shadow: (0..MAX_L1S * 512)
                .map(|_| AtomicU64::new(UNWRITTEN))
                .collect(),
            touched: (0..=writers)
                .map(|_| (0..TOUCH_CAP).map(|_| AtomicU32::new(0)).collect())
                .collect(),
            ntouched: (0..=writers).map(|_| AtomicUsize::new(0)).collect(),
        }
    }
}

/// Totals of one job, kept in atomics the vCPUs add to.
struct Tally {
    stores: AtomicU64,
    hyper: AtomicU64,
    store_errs: AtomicU64,
    lost: AtomicU64,
    checked: AtomicU64,
    churn_ok: AtomicU64,
    churn_errs: AtomicU64,
    max_wait_ns: AtomicU64,
    pins: AtomicU64,
    unpins: AtomicU64,
    pin_errs: AtomicU64,
    unpin_errs: AtomicU64,
    pin_ns: AtomicU64,
    unpin_ns: AtomicU64,
    pin_traps: AtomicU64,
    unpin_traps: AtomicU64,
    late_writers: AtomicU64,
    first_err: AtomicU64,
    churn_first: crate::scenarios::Locked<Option<String>>,
}

impl Tally {
    fn new() -> Self {
        let z = || AtomicU64::new(0);
        Tally {
            stores: z(),
            hyper: z(),
            store_errs: z(),
            lost: z(),
            checked: z(),
            churn_ok: z(),
            churn_errs: z(),
            max_wait_ns: z(),
            pins: z(),
            unpins: z(),
            pin_errs: z(),
            unpin_errs: z(),
            pin_ns: z(),
            unpin_ns: z(),
            pin_traps: z(),
            unpin_traps: z(),
            late_writers: z(),
            first_err: AtomicU64::new(u64::MAX),
            churn_first: crate::scenarios::Locked::new(None),
        }
    }
}

fn wait_until(pl: &impl Smp, limit_ns: u64, cond: impl Fn() -> bool) -> bool {
    let start = pl.now_ns();
    while !cond() {
        if pl.now_ns().wrapping_sub(start) > limit_ns {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Build a space with `l1s` L1 tables (one entry each, so they exist).
fn build_space<P: LockPolicy<Lock = SpinLock>, Pl: Smp>(
    pl: &Pl,
    l1s: usize,
    churn: bool,
    control: Control,
) -> Result<Space<P, Pl>, Error> {
    let mut s = AddressSpace::new(
        pl.store().clone(),
        pl.backend().clone(),
        SpaceOptions::default(),
    )?;
    let mut sab = Sabotage::NONE;
    match control {
        Control::UnlockBeforePin => sab.unlock_before_pin = true,
        Control::SkipL1Pin => sab.skip_l1_pin = true,
        Control::None | Control::Bypass => {}
    }
    s.set_sabotage(sab);
    for i in 0..l1s {
        s.map(
            RACE_BASE + (i as u64) * 0x20_0000,
            pl.data_pfn(i % 8).0 << 12,
            PageSize::Size4K,
            LEAF,
        )?;
    }
    if churn {
        s.map(CHURN_BASE, pl.data_pfn(0).0 << 12, PageSize::Size4K, LEAF)?;
    }
    Ok(s)
}

/// Run one job under policy `P`.
pub fn race<P: LockPolicy<Lock = SpinLock>, Pl: Smp>(pl: &Pl, job: &Job, sc: &Scratch) -> Report {
    let mut r = Report::new(job.name);
    let k = pl.writers();
    let l1s = job.l1s.min(MAX_L1S / job.spaces.max(1));
    let mut spaces: Vec<Space<P, Pl>> = Vec::new();
    for _ in 0..job.spaces.max(1) {
        match build_space::<P, Pl>(pl, l1s, job.churn, job.control) {
            Ok(s) => spaces.push(s),
            Err(_) => {
                r.check("build", false);
                return r;
            }
        }
    }
    // Each space's L1 frames in address order (the walk's order).
    let l1_frames: Vec<Vec<Pfn>> = spaces
        .iter()
        .map(|s| {
            s.table_frames()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f.1 == Level::L1)
                .map(|f| f.0)
                .take(l1s)
                .collect()
        })
        .collect();
    let data: Vec<u64> = (0..8).map(|i| mfn_of(pl, pl.data_pfn(i))).collect();
    for w in &sc.shadow {
        w.store(UNWRITTEN, Ordering::Relaxed);
    }
    let refs: Vec<&Space<P, Pl>> = spaces.iter().collect();
    let mut batch: Box<Batch<256>> = Box::new(Batch::with_limit(job.batch));
    let t = Tally::new();
    let faults0 = pl.faults();
    let skipped0 = pl.skipped();
    pl.recorder().set_counting(true);
    let l1pin0 = pl.recorder().ext_count(ExtCmd::PinL1Table);
    let started = AtomicUsize::new(0);
    let wrote = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let batch_cell = crate::scenarios::Locked::new(&mut batch);
    let entries = job.spaces.max(1) * l1s * 512;
    for round in 0..job.rounds {
        started.store(0, Ordering::SeqCst);
        wrote.store(0, Ordering::SeqCst);
        stop.store(false, Ordering::SeqCst);
        let body = |v: usize| {
            pl.set_vcpu(v);
            if v == 0 {
                batch_cell.with(|b| pinner(pl, &refs, b, &t, k, &started, &wrote, &stop));
            } else {
                writer(
                    pl, &refs, &l1_frames, &data, sc, &t, job, v, k, round, entries, &started,
                    &wrote, &stop,
                );
            }
        };
        pl.run_parallel(&body);
        // Writers are done: tables they retired can be reused.
        pl.store().quiesce();
    }
    // Leave nothing pinned (a negative control may have failed an unpin).
    batch_cell.with(|b| {
        for s in &spaces {
            if s.is_pinned() && s.unpin(&mut ***b).is_err() {
                t.unpin_errs.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let faults = pl.faults() - faults0;
    let skipped = pl.skipped() - skipped0;
    let l1pins = pl.recorder().ext_count(ExtCmd::PinL1Table) - l1pin0;
    pl.recorder().set_counting(false);
    let mut st_ok = true;
    let (mut tables, mut rw) = (0usize, 0usize);
    for s in &spaces {
        let (st, ok) = states::<P, Pl>(pl, s, false);
        st_ok &= ok;
        tables += st.matches('L').count();
        rw += st.matches('w').count();
    }
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let pins = g(&t.pins);
    r.count("vcpus", k + 1);
    r.count("batch", job.batch);
    r.count("rounds", job.rounds);
    r.count("l1s", l1s * job.spaces.max(1));
    r.count("pins", pins);
    r.count("unpins", g(&t.unpins));
    r.count("pin_errs", g(&t.pin_errs));
    r.count("unpin_errs", g(&t.unpin_errs));
    r.count("stores", g(&t.stores));
    r.count("hyper", g(&t.hyper));
    r.count("store_errs", g(&t.store_errs));
    r.count("faults", faults);
    r.count("skipped", skipped);
    r.count("lost", g(&t.lost));
    r.count("checked", g(&t.checked));
    r.count("l1pins", l1pins);
    r.count("churn_ok", g(&t.churn_ok));
    r.count("churn_errs", g(&t.churn_errs));
    r.count("late", g(&t.late_writers));
    r.count(
        "traps_pin",
        format!("{:.2}", g(&t.pin_traps) as f64 / pins.max(1) as f64),
    );
    r.count(
        "traps_unpin",
        format!(
            "{:.2}",
            g(&t.unpin_traps) as f64 / g(&t.unpins).max(1) as f64
        ),
    );
    r.count("pin_us", g(&t.pin_ns) / pins.max(1) / 1000);
    r.count("unpin_us", g(&t.unpin_ns) / g(&t.unpins).max(1) / 1000);
    r.count("max_wait_us", g(&t.max_wait_ns) / 1000);
    r.states = format!("tables={tables},writable={rw},unpinned={st_ok}");
    let first = g(&t.first_err);
    let mut info = Vec::new();
    if first != u64::MAX {
        info.push(format!("first_err={first:#x}"));
    }
    if let Some(c) = t.churn_first.with(|f| f.take()) {
        info.push(format!("churn_first={c}"));
    }
    r.info = info.join(",");
    if job.control == Control::None {
        r.check("no-faults", faults == 0 && skipped == 0);
        r.check("no-lost-updates", g(&t.lost) == 0);
        r.check("stores-ok", g(&t.store_errs) == 0);
        r.check(
            "every-pin-unpin-ok",
            pins == job.rounds as u64
                && g(&t.unpins) == job.rounds as u64
                && g(&t.pin_errs) == 0
                && g(&t.unpin_errs) == 0,
        );
        r.check("nothing-typed-after", st_ok);
        r.check(
            "writers-wrote-both-ways",
            g(&t.stores) > 0 && g(&t.hyper) > 0,
        );
        if !job.split {
            r.check("no-l1-pin-under-global", l1pins == 0);
        } else if !job.churn {
            r.check(
                "l1-pinned-each-round",
                l1pins == pins * (l1s * job.spaces.max(1)) as u64,
            );
        }
        if job.churn {
            r.check(
                "tables-churned",
                g(&t.churn_ok) > 0 && g(&t.churn_errs) == 0,
            );
        }
    } else {
        // A negative control passes when the platform caught the break.
        r.check("faults-caught", faults > 0);
    }
    for s in spaces {
        r.check("teardown", s.teardown().is_ok());
    }
    pl.store().quiesce();
    r
}

/// vCPU 0's part of a round: wait for the writers, pin (every space, by
/// `pin_all` when there are several), unpin, stop the writers.
#[allow(clippy::too_many_arguments)]
fn pinner<P: LockPolicy<Lock = SpinLock>, Pl: Smp>(
    pl: &Pl,
    spaces: &[&Space<P, Pl>],
    b: &mut Box<Batch<256>>,
    t: &Tally,
    k: usize,
    started: &AtomicUsize,
    wrote: &AtomicU64,
    stop: &AtomicBool,
) {
    if !wait_until(pl, 2_000_000_000, || started.load(Ordering::Acquire) >= k) {
        t.late_writers.fetch_add(1, Ordering::Relaxed);
    }
    // Let every writer land a few entries first, so each round races
    // stores and `mmu_update`s against the pin (bounded: a writer that
    // cannot is counted, not waited for).
    if !wait_until(pl, 200_000_000, || {
        wrote.load(Ordering::Acquire) >= 4 * k as u64
    }) {
        t.late_writers.fetch_add(1, Ordering::Relaxed);
    }
    let b = &mut **b;
    let f0 = b.stats().flushes;
    let t0 = pl.now_ns();
    let pinned = if spaces.len() == 1 {
        spaces[0].pin(b).map(|_| None)
    } else {
        pin_all(spaces, b).map(Some)
    };
    let t1 = pl.now_ns();
    let f1 = b.stats().flushes;
    match pinned {
        Ok(set) => {
            t.pins.fetch_add(1, Ordering::Relaxed);
            t.pin_ns.fetch_add(t1 - t0, Ordering::Relaxed);
            t.pin_traps.fetch_add(f1 - f0, Ordering::Relaxed);
            let unpinned = match set {
                None => spaces[0].unpin(b).map(|_| ()),
                Some(set) => unpin_all(spaces, set, b),
            };
            let t2 = pl.now_ns();
            if unpinned.is_ok() {
                t.unpins.fetch_add(1, Ordering::Relaxed);
                t.unpin_ns.fetch_add(t2 - t1, Ordering::Relaxed);
                t.unpin_traps
                    .fetch_add(b.stats().flushes - f1, Ordering::Relaxed);
            } else {
                t.unpin_errs.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            t.pin_errs.fetch_add(1, Ordering::Relaxed);
        }
    }
    stop.store(true, Ordering::Release);
}

/// A churning writer's region: no table, a table with one page mapped, or
/// a table emptied but not yet released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Churn {
    Empty,
    Mapped,
    Unmapped,
}

impl Churn {
    /// The next step (map, unmap, release), counted; the first failure's
    /// error is kept in `t.churn_first`. Returns whether it succeeded.
    fn step<P: LockPolicy<Lock = SpinLock>, Pl: Smp>(
        &mut self,
        s: &Space<P, Pl>,
        va: u64,
        data: Pfn,
        t: &Tally,
    ) -> bool {
        let (r, next) = match self {
            Churn::Empty => (
                s.map(va, data.0 << 12, PageSize::Size4K, LEAF),
                Churn::Mapped,
            ),
            Churn::Mapped => (s.unmap(va).map(|_| ()), Churn::Unmapped),
            Churn::Unmapped => (s.release_table(va, Level::L1), Churn::Empty),
        };
        match r {
            Ok(()) => {
                *self = next;
                t.churn_ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                t.churn_errs.fetch_add(1, Ordering::Relaxed);
                t.churn_first.with(|f| {
                    if f.is_none() {
                        *f = Some(format!("{self:?}:{e:?}").replace(' ', ""));
                    }
                });
                false
            }
        }
    }
}

/// Writer `w`'s part of a round: store random entries of its own until
/// told to stop, then read back every entry it wrote.
#[allow(clippy::too_many_arguments)]
fn writer<P: LockPolicy<Lock = SpinLock>, Pl: Smp>(
    pl: &Pl,
    spaces: &[&Space<P, Pl>],
    l1_frames: &[Vec<Pfn>],
    data: &[u64],
    sc: &Scratch,
    t: &Tally,
    job: &Job,
    w: usize,
    k: usize,
    round: usize,
    entries: usize,
    started: &AtomicUsize,
    wrote: &AtomicU64,
    stop: &AtomicBool,
) {
    // Deterministic per writer and round.
    let mut rng = SplitMix64::new(((round as u64) << 8) ^ w as u64 ^ 0x5eed);
    let per_space = entries / spaces.len();
    // This writer's entries: global index `e` with `e % k == w - 1`.
    let mine = entries / k;
    let touched = &sc.touched[w];
    let ntouched = &sc.ntouched[w];
    ntouched.store(0, Ordering::Relaxed);
    let (mut stores, mut hyper, mut errs, mut max_wait) = (0u64, 0u64, 0u64, 0u64);
    let churn_va = CHURN_BASE + (w as u64) * 0x20_0000;
    let mut churn = Churn::Empty;
    let mut churn_steps = 0;
    let churn_space = (w - 1) % spaces.len();
    started.fetch_add(1, Ordering::AcqRel);
    while !stop.load(Ordering::Acquire) {
        let x = rng.next();
        let e = ((x >> 20) as usize % mine) * k + (w - 1);
        let (si, rest) = (e / per_space, e % per_space);
        let (l1, idx) = (rest / 512, rest % 512);
        let va = RACE_BASE + (l1 as u64) * 0x20_0000 + (idx as u64) * 0x1000;
        let value = match x & 7 {
            0 => PageTableEntry::EMPTY,
            1 | 2 => PageTableEntry::new(
                data[(x >> 3) as usize % data.len()],
                LEAF.difference(EntryFlags::WRITABLE),
            ),
            _ => PageTableEntry::new(data[(x >> 3) as usize % data.len()], LEAF),
        };
        // A bypassing writer only stores (its `mmu_update`s would take the
        // lock and wait out the batch, narrowing the race it must show).
        let path = if x & 8 == 0 || job.control == Control::Bypass {
            WritePath::Store
        } else {
            WritePath::Hypercall
        };
        let t0 = pl.now_ns();
        let ok = if job.control == Control::Bypass && path == WritePath::Store {
            // Broken on purpose: a plain store with no PTE lock.
            let pfn = l1_frames[si][l1];
            match pl.store().entry(pfn, idx) {
                Some(slot) => pl
                    .recorder()
                    .guest_store(slot, Mfn(mfn_of(pl, pfn)), idx, value.bits())
                    .is_ok(),
                None => false,
            }
        } else {
            match spaces[si].set_pte(va, value, path) {
                Ok(_) => true,
                Err(err) => {
                    let code = match err {
                        Error::Hypercall(h) => h.errno as u64,
                        Error::Fault(_) => 0xfa,
                        _ => 0xee,
                    };
                    let _ = t.first_err.compare_exchange(
                        u64::MAX,
                        code,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    false
                }
            }
        };
        max_wait = max_wait.max(pl.now_ns().wrapping_sub(t0));
        // A writer does other work between entries: without a pause the
        // engine's spin locks (test-and-set, not fair) let a writer that
        // releases and retakes a lock in a loop starve the pinner.
        for _ in 0..(x >> 56) {
            core::hint::spin_loop();
        }
        if ok {
            match path {
                WritePath::Store => stores += 1,
                WritePath::Hypercall => hyper += 1,
            }
            sc.shadow[e].store(value.bits(), Ordering::Relaxed);
            wrote.fetch_add(1, Ordering::Release);
            let n = ntouched.fetch_add(1, Ordering::Relaxed);
            if n < TOUCH_CAP {
                touched[n].store(e as u32, Ordering::Relaxed);
            }
        } else {
            errs += 1;
        }
        if job.churn && x % 16 == 15 && churn_steps < CHURN_STEPS {
            churn_steps += 1;
            churn.step::<P, Pl>(spaces[churn_space], churn_va, pl.data_pfn(1), t);
        }
    }
    // Churn leaves its region as it found it: unmapped, table released.
    while churn != Churn::Empty {
        if !churn.step::<P, Pl>(spaces[churn_space], churn_va, pl.data_pfn(1), t) {
            break;
        }
    }
    // Read back what this round wrote.
    let n = ntouched.load(Ordering::Relaxed);
    let check = |e: usize| -> bool {
        let want = sc.shadow[e].load(Ordering::Relaxed);
        if want == UNWRITTEN {
            return true;
        }
        let (si, rest) = (e / per_space, e % per_space);
        let (l1, idx) = (rest / 512, rest % 512);
        let got = pl
            .store()
            .entry(l1_frames[si][l1], idx)
            .map_or(0, |s| s.load(Ordering::Acquire));
        // Xen adds GLOBAL to a 64-bit PV guest's USER leaf.
        got & !EntryFlags::GLOBAL.bits() == want
    };
    let (mut lost, mut checked) = (0u64, 0u64);
    if n <= TOUCH_CAP {
        for slot in &touched[..n] {
            checked += 1;
            lost += u64::from(!check(slot.load(Ordering::Relaxed) as usize));
        }
    } else {
        for e in (w - 1..entries).step_by(k) {
            checked += 1;
            lost += u64::from(!check(e));
        }
    }
    t.stores.fetch_add(stores, Ordering::Relaxed);
    t.hyper.fetch_add(hyper, Ordering::Relaxed);
    t.store_errs.fetch_add(errs, Ordering::Relaxed);
    t.lost.fetch_add(lost, Ordering::Relaxed);
    t.checked.fetch_add(checked, Ordering::Relaxed);
    t.max_wait_ns.fetch_max(max_wait, Ordering::Relaxed);
}

/// The jobs of one batch size: the protocol under split and global, the
/// negative controls, table churn under both, `pin_all` over four spaces.
pub fn jobs(batch: usize, rounds: usize, control_rounds: usize) -> Vec<Job> {
    let name = |s: &str| -> &'static str {
        // Names live for the whole run (leaked once per job, a few bytes).
        Box::leak(format!("smp_{s}_b{batch}").into_boxed_str())
    };
    let base = Job {
        name: "",
        split: true,
        batch,
        rounds,
        control: Control::None,
        churn: false,
        spaces: 1,
        l1s: 64,
    };
    Vec::from([
        Job {
            name: name("split"),
            ..base
        },
        Job {
            name: name("global"),
            split: false,
            ..base
        },
        Job {
            name: name("neg_unlock_before_pin"),
            control: Control::UnlockBeforePin,
            rounds: control_rounds,
            ..base
        },
        Job {
            name: name("neg_skip_l1_pin"),
            control: Control::SkipL1Pin,
            rounds: control_rounds,
            ..base
        },
        Job {
            name: name("neg_bypass_lock"),
            control: Control::Bypass,
            rounds: control_rounds,
            ..base
        },
        Job {
            name: name("churn_split"),
            churn: true,
            rounds: rounds / 2,
            ..base
        },
        Job {
            name: name("churn_global"),
            churn: true,
            split: false,
            rounds: rounds / 2,
            ..base
        },
        Job {
            name: name("pin_all"),
            spaces: 4,
            l1s: 16,
            rounds: rounds / 2,
            ..base
        },
    ])
}

/// Run a job under its policy.
pub fn run_job<Pl: Smp>(pl: &Pl, job: &Job, sc: &Scratch) -> Report {
    if job.split {
        race::<Split<SpinLock>, Pl>(pl, job, sc)
    } else {
        race::<Global<SpinLock>, Pl>(pl, job, sc)
    }
}

/// Scenario 6: vCPU 1 loads the pinned space's root as its base pointer;
/// vCPU 0 unpins. The root stays typed, so making its tables writable is
/// refused: the engine reports the failure and leaves the space pinned,
/// exactly as before the call (README: "a failed request is reported ...
/// and the space is left exactly as before the call"). Once vCPU 1 has
/// switched back, the unpin succeeds.
pub fn unpin_under_base_pointer<Pl: Smp>(pl: &Pl) -> Report {
    let mut r = Report::new("smp_unpin_loaded_root");
    if pl.writers() == 0 {
        r.check("needs-two-vcpus", false);
        return r;
    }
    let layout = pl.kernel_layout();
    let Some((s, mapped)) = kernel_space(pl, &layout, &mut r) else {
        return r;
    };
    r.check("map", mapped);
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    r.check("pin", s.pin(&mut *b).is_ok());
    let root = mfn_of(pl, s.root());
    let boot = pl.boot_root().0;
    let loaded = AtomicU64::new(u64::MAX);
    let tried = AtomicBool::new(false);
    let back = AtomicU64::new(u64::MAX);
    let first = crate::scenarios::Locked::new(None::<Result<(), Error>>);
    let pinned_between = AtomicBool::new(false);
    let b_cell = crate::scenarios::Locked::new(&mut b);
    let body = |v: usize| {
        pl.set_vcpu(v);
        match v {
            0 => {
                let ok = wait_until(pl, 2_000_000_000, || {
                    loaded.load(Ordering::Acquire) != u64::MAX
                });
                if ok && loaded.load(Ordering::Acquire) == 0 {
                    let res = b_cell.with(|b| s.unpin(&mut ***b).map(|_| ()));
                    first.with(|f| *f = Some(res));
                    pinned_between.store(s.is_pinned(), Ordering::Release);
                }
                tried.store(true, Ordering::Release);
            }
            1 => {
                let rc = ext_raw(pl, ExtCmd::NewBaseptr, root);
                loaded.store(rc as u64, Ordering::Release);
                wait_until(pl, 4_000_000_000, || tried.load(Ordering::Acquire));
                let rc = ext_raw(pl, ExtCmd::NewBaseptr, boot);
                back.store(rc as u64, Ordering::Release);
            }
            _ => {}
        }
    };
    pl.run_parallel(&body);
    let first = first.with(|f| f.take());
    r.check("load-root-on-vcpu1", loaded.load(Ordering::Relaxed) == 0);
    r.check("switch-back", back.load(Ordering::Relaxed) == 0);
    match &first {
        Some(Err(Error::Hypercall(h))) => {
            r.count("errno", h.errno);
            r.count("step", format!("{:?}", h.step).replace(['(', ')', ' '], ""));
            let level = h
                .pfn
                .and_then(|p| {
                    s.table_frames()
                        .ok()?
                        .into_iter()
                        .find(|f| f.0 == p)
                        .map(|f| f.1.number())
                })
                .unwrap_or(0);
            r.count("failed_level", level);
            r.check("unpin-refused", true);
        }
        other => {
            r.check("unpin-refused", false);
            r.count("unexpected", format!("{other:?}").replace([' ', '\n'], ""));
        }
    }
    r.check("space-still-pinned", pinned_between.load(Ordering::Relaxed));
    let (st_p, ok_p) = states::<Split<SpinLock>, Pl>(pl, &s, true);
    r.check("pinned-states-restored", ok_p);
    let second = b_cell.with(|b| s.unpin(&mut ***b));
    r.check("unpin-after-switch-back", second.is_ok());
    let (st_u, ok_u) = states::<Split<SpinLock>, Pl>(pl, &s, false);
    r.check("nothing-typed-after", ok_u);
    r.count("tables", st_p.matches('L').count());
    r.states = format!(
        "pinned={}/unpinned={}",
        st_p.matches('p').count(),
        st_u.matches('w').count()
    );
    r.check("teardown", s.teardown().is_ok());
    r
}

// ---------------------------------------------------------------------------
// measurements

/// One measurement line.
pub fn measure_line(name: &str, fields: &[(&str, String)]) -> String {
    let mut out = format!("{MEASURE_PREFIX} name={name}");
    for (k, v) in fields {
        let _ = write!(out, " {k}={v}");
    }
    out
}

/// For N = 1, 2, 4, ..., 256: pin + unpin alone (time per table page,
/// traps per pin), then the same with writers storing (their stores per
/// second and longest wait, against writers alone).
pub fn sweep<Pl: Smp>(pl: &Pl, rounds: usize, out: &mut dyn FnMut(String)) {
    let Ok(s) = build_space::<Split<SpinLock>, Pl>(pl, 64, false, Control::None) else {
        out(measure_line("sweep", &[("error", String::from("build"))]));
        return;
    };
    let tables = s.table_frames().map_or(0, |t| t.len());
    let k = pl.writers();
    let data = mfn_of(pl, pl.data_pfn(2));
    let mut n = 1;
    while n <= 256 {
        let mut b: Box<Batch<256>> = Box::new(Batch::with_limit(n));
        // Alone.
        let f0 = b.stats().flushes;
        let t0 = pl.now_ns();
        let mut ok = true;
        for _ in 0..rounds {
            ok &= s.pin(&mut *b).is_ok() && s.unpin(&mut *b).is_ok();
        }
        let alone_ns = pl.now_ns() - t0;
        let traps = (b.stats().flushes - f0) as f64 / (2 * rounds) as f64;
        let pin_traps = {
            let f = b.stats().flushes;
            ok &= s.pin(&mut *b).is_ok();
            let p = b.stats().flushes - f;
            ok &= s.unpin(&mut *b).is_ok();
            p
        };
        // With writers, and writers alone for the same time.
        let with = writers_during(pl, &s, &mut b, rounds, data, true);
        let solo = writers_during(pl, &s, &mut b, rounds, data, false);
        out(measure_line(
            "sweep",
            &[
                ("n", format!("{n}")),
                ("vcpus", format!("{}", k + 1)),
                ("tables", format!("{tables}")),
                ("ok", format!("{ok}")),
                (
                    "pin_unpin_ns_per_table",
                    format!("{}", alone_ns / (rounds * tables).max(1) as u64),
                ),
                ("traps_per_pin", format!("{pin_traps}")),
                ("traps_per_op", format!("{traps:.1}")),
                ("stores_per_s_pin", format!("{}", with.0)),
                ("stores_per_s_alone", format!("{}", solo.0)),
                ("max_wait_us_pin", format!("{}", with.1 / 1000)),
                ("max_wait_us_alone", format!("{}", solo.1 / 1000)),
            ],
        ));
        n *= 2;
    }
    costs(pl, &s, data, out);
    let _ = s.teardown();
}

/// Writers store (plain stores) while vCPU 0 pins and unpins `rounds`
/// times (or, `pinning == false`, spins for as long): their stores per
/// second and the longest single store.
fn writers_during<Pl: Smp>(
    pl: &Pl,
    s: &Space<Split<SpinLock>, Pl>,
    b: &mut Box<Batch<256>>,
    rounds: usize,
    data: u64,
    pinning: bool,
) -> (u64, u64) {
    let k = pl.writers();
    if k == 0 {
        return (0, 0);
    }
    let stop = AtomicBool::new(false);
    let started = AtomicUsize::new(0);
    let stores = AtomicU64::new(0);
    let max_wait = AtomicU64::new(0);
    let span = AtomicU64::new(0);
    let b_cell = crate::scenarios::Locked::new(b);
    let body = |v: usize| {
        if v == 0 {
            wait_until(pl, 2_000_000_000, || started.load(Ordering::Acquire) >= k);
            let t0 = pl.now_ns();
            if pinning {
                b_cell.with(|b| {
                    for _ in 0..rounds {
                        let _ = s.pin(&mut ***b);
                        let _ = s.unpin(&mut ***b);
                    }
                });
            } else {
                // As long as the pinning run took, roughly: a fixed spin
                // measured by the clock.
                let want = PIN_SPAN.load(Ordering::Relaxed).max(1_000_000);
                while pl.now_ns() - t0 < want {
                    core::hint::spin_loop();
                }
            }
            let dt = pl.now_ns() - t0;
            if pinning {
                PIN_SPAN.store(dt, Ordering::Relaxed);
            }
            span.store(dt, Ordering::Relaxed);
            stop.store(true, Ordering::Release);
        } else {
            let mut rng = SplitMix64::new(v as u64);
            let (mut n, mut mw) = (0u64, 0u64);
            started.fetch_add(1, Ordering::AcqRel);
            while !stop.load(Ordering::Acquire) {
                let x = rng.next();
                let l1 = (x >> 20) as usize % 64;
                let idx = 1 + (((x >> 8) as usize % 511) / k) * k + (v - 1);
                let va = RACE_BASE + (l1 as u64) * 0x20_0000 + (idx.min(511) as u64) * 0x1000;
                let t0 = pl.now_ns();
                let _ = s.set_pte(va, PageTableEntry::new(data, LEAF), WritePath::Store);
                mw = mw.max(pl.now_ns() - t0);
                n += 1;
            }
            stores.fetch_add(n, Ordering::Relaxed);
            max_wait.fetch_max(mw, Ordering::Relaxed);
        }
    };
    pl.run_parallel(&body);
    let dt = span.load(Ordering::Relaxed).max(1);
    (
        stores.load(Ordering::Relaxed) * 1_000_000_000 / dt,
        max_wait.load(Ordering::Relaxed),
    )
}

/// How long the last pinning run of [`writers_during`] took.
static PIN_SPAN: AtomicU64 = AtomicU64::new(0);

/// A ptwr-emulated store against an `mmu_update` of one entry (into the
/// pinned space), and a page fault's round trip (a store into a read-only
/// table page that is not pinned, given up after one fault).
fn costs<Pl: Smp>(pl: &Pl, s: &Space<Split<SpinLock>, Pl>, data: u64, out: &mut dyn FnMut(String)) {
    const N: u64 = 2000;
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    if s.pin(&mut *b).is_err() {
        out(measure_line("costs", &[("error", String::from("pin"))]));
        return;
    }
    let va = RACE_BASE + 5 * 0x1000;
    let e = PageTableEntry::new(data, LEAF);
    let time = |path: WritePath| {
        let t0 = pl.now_ns();
        for _ in 0..N {
            let _ = s.set_pte(va, e, path);
        }
        (pl.now_ns() - t0) / N
    };
    let emulated = time(WritePath::Store);
    let hyper = time(WritePath::Hypercall);
    let _ = s.unpin(&mut *b);
    // A read-only, untyped table page: every store to it faults.
    let fault_ns = pl.store().alloc_table(Level::L1).map_or(0, |t| {
        let va = s.direct_map_va(t);
        let mfn = mfn_of(pl, t);
        let ro = PageTableEntry::new(
            mfn,
            EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY | EntryFlags::NO_EXECUTE,
        );
        let rw = PageTableEntry::from_bits(ro.bits() | EntryFlags::WRITABLE.bits());
        let mut ns = 0;
        if pl.recorder().update_va_mapping(va, ro.bits(), 2) == 0 {
            pl.set_retry_limit(1);
            let f0 = pl.faults();
            let slot = pl.store().entry(t, 0);
            let t0 = pl.now_ns();
            for _ in 0..N {
                if let Some(slot) = slot {
                    let _ = pl.recorder().guest_store(slot, Mfn(mfn), 0, 0x1234);
                }
            }
            let dt = pl.now_ns() - t0;
            let faults = pl.faults() - f0;
            pl.set_retry_limit(0);
            ns = dt.checked_div(faults).unwrap_or(0);
            let _ = pl.recorder().update_va_mapping(va, rw.bits(), 2);
        }
        // SAFETY: `t` was allocated above for this measurement only and
        // linked into no table.
        unsafe { pl.store().free_now(t) };
        ns
    });
    out(measure_line(
        "costs",
        &[
            ("emulated_store_ns", format!("{emulated}")),
            ("mmu_update_ns", format!("{hyper}")),
            ("fault_round_trip_ns", format!("{fault_ns}")),
        ],
    ));
}
