//! The real-Xen scenarios, written once and run twice: inside the PV test
//! guest against real Xen, and in the host test (`tests/real_xen_scenarios.rs`, which
//! includes this file) against the simulator `XenSim`.
//!
//! Every hypercall goes through a [`Recorder`] between the Xen backend and
//! the platform's trap, so each scenario's report carries the per-entry
//! results (op and errno, in order) and the final page states; the host test
//! compares them field by field. Only `core` and `alloc` are used.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pagepin_backends::xen::abi::hypercall;
use pagepin_backends::xen::{
    MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, P2m, XenBackend, XenHypercalls, DOMID_SELF,
};
use pagepin_backends::{check_frame, Expected, PinObserver};
use pagepin_engine::{uvmf, ExtCmd, StoreFault};
use pagepin_engine::{
    AddressSpace, Batch, EntryFlags, Error, FrameStore, Global, Level, LockPolicy, Mfn, PageSize,
    PageTableEntry, Pfn, SpaceOptions, Split, StepKind, WritePath, X86_64,
};
use pagepin_engine::{RawLock, SpinLock};

/// The prefix of every scenario line on the console.
pub const LINE_PREFIX: &str = "PAGEPIN-SCENARIO";
/// Data pages a platform provides (`data_pfn(0..DATA_PAGES)`).
pub const DATA_PAGES: usize = 16;
/// The data page holding [`MAGIC`] (read through the pinned table).
pub const MAGIC_PAGE: usize = 15;
/// The value in the magic page's first word.
pub const MAGIC: u64 = 0x7061_6765_7069_6e21;
/// Where scenario 3 maps the magic page: a root slot the boot tables do not use.
pub const ALIAS_VA: u64 = 0x0000_4000_0000_0000;

// ---------------------------------------------------------------------------
// recording

/// What one hypercall entry was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `update_va_mapping(va, pte, flags)`.
    Uvm {
        /// The address.
        va: u64,
        /// The new entry.
        pte: u64,
        /// `UVMF_*` flags.
        flags: u64,
    },
    /// `mmu_update` of `count` requests.
    Mmu {
        /// Requests.
        count: u32,
    },
    /// `mmuext_op` of `count` operations (their commands and mfns are in
    /// [`Rec::ext`]).
    Ext {
        /// Operations.
        count: u32,
    },
    /// A plain guest store into a table entry.
    Store,
    /// Anything else.
    Other(u64),
}

/// One recorded entry: the op, its result and how many requests were done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    /// The op.
    pub op: Op,
    /// 0 or `-errno`.
    pub rc: i64,
    /// Requests done (mmu_update / mmuext_op).
    pub done: u32,
    /// Index of the trap (hypercall) this entry was part of.
    pub trap: u32,
    /// For `mmuext_op`: (command, arg1) of each operation.
    pub ext: Vec<(u32, u64)>,
}

impl Rec {
    /// The compact token compared across platforms: kind, rc, and (on
    /// failure) how many requests were done.
    pub fn token(&self) -> String {
        let k = match self.op {
            Op::Uvm { .. } => "u",
            Op::Mmu { .. } => "m",
            Op::Ext { .. } => "x",
            Op::Store => "s",
            Op::Other(_) => "o",
        };
        if self.rc == 0 {
            format!("{k}0")
        } else {
            format!("{k}{}/{}", self.rc, self.done)
        }
    }
}

/// A multicall entry decoded before the call: op, `pdone`, ext ops.
type Pending = (Op, u64, Vec<(u32, u64)>);

/// A tiny spin-locked cell (no_std).
pub struct Locked<T> {
    lock: SpinLock,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `with`, which holds `lock`.
unsafe impl<T: Send> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Locked {
            lock: SpinLock::new(),
            value: UnsafeCell::new(value),
        }
    }
    /// Run `f` on the value, holding the lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.lock.lock();
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.value.get() });
        // SAFETY: locked above by this context.
        unsafe { self.lock.unlock() };
        r
    }
}

/// A [`XenHypercalls`] that forwards to the platform's trap and records
/// every entry with its result.
pub struct Recorder<H: XenHypercalls> {
    inner: H,
    on: AtomicBool,
    traps: AtomicU64,
    log: Locked<Vec<Rec>>,
    /// Count `mmuext_op` commands even with recording off (the parallel
    /// scenarios run too long to keep a log).
    counting: AtomicBool,
    ext_counts: [AtomicU64; 16],
}

impl<H: XenHypercalls> Recorder<H> {
    /// Record the traps of `inner`.
    pub fn new(inner: H) -> Self {
        Recorder {
            inner,
            on: AtomicBool::new(true),
            traps: AtomicU64::new(0),
            log: Locked::new(Vec::new()),
            counting: AtomicBool::new(false),
            ext_counts: [const { AtomicU64::new(0) }; 16],
        }
    }
    /// Count every `mmuext_op` command issued from now on (or stop).
    pub fn set_counting(&self, on: bool) {
        self.counting.store(on, Ordering::SeqCst);
    }
    /// How many `mmuext_op` operations with command `cmd` were issued
    /// while counting.
    pub fn ext_count(&self, cmd: ExtCmd) -> u64 {
        self.ext_counts
            .get(cmd as usize)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
    /// Count the commands of `count` operations at `ptr`.
    ///
    /// # Safety
    /// As for [`Self::ext_list`].
    unsafe fn count_ext(&self, ptr: u64, count: usize) {
        if !self.counting.load(Ordering::Relaxed) {
            return;
        }
        let ops = ptr as *const MmuExtOpAbi;
        for i in 0..count {
            // SAFETY: the caller guarantees `count` readable ops.
            let cmd = unsafe { (*ops.add(i)).cmd } as usize;
            if let Some(c) = self.ext_counts.get(cmd) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    /// The platform's trap.
    pub fn inner(&self) -> &H {
        &self.inner
    }
    /// Turn recording on or off (platform set-up is not recorded).
    pub fn set_recording(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }
    /// Take what was recorded so far.
    pub fn take(&self) -> Vec<Rec> {
        self.log.with(core::mem::take)
    }
    fn trap(&self) -> Option<u32> {
        self.on
            .load(Ordering::SeqCst)
            .then(|| self.traps.fetch_add(1, Ordering::SeqCst) as u32)
    }
    fn push(&self, r: Rec) {
        self.log.with(|l| l.push(r));
    }

    /// Decode an entry's request list.
    ///
    /// # Safety
    /// `ptr` must point to `count` readable `MmuExtOpAbi`s (for `Ext`).
    unsafe fn ext_list(ptr: u64, count: usize) -> Vec<(u32, u64)> {
        let ops = ptr as *const MmuExtOpAbi;
        (0..count)
            .map(|i| {
                // SAFETY: the caller guarantees `count` readable ops.
                let o = unsafe { ops.add(i).read() };
                (o.cmd, o.arg1)
            })
            .collect()
    }
}

impl<H: XenHypercalls> XenHypercalls for Recorder<H> {
    unsafe fn multicall(&self, entries: *mut MulticallEntry, count: usize) -> i64 {
        // Decode the entries *before* the call: real Xen may rewrite an
        // entry's arguments in place (a continuation: Xen 4.17 finishes a
        // failed pin that left a partly validated table by re-issuing the
        // mmuext_op with arguments (NULL, PREEMPTED, NULL, rc)), so only the
        // results may be read afterwards.
        for i in 0..count {
            // SAFETY: the caller guarantees `count` valid entries, and an
            // mmuext_op entry's first two arguments are its ops and count.
            unsafe {
                let e = &*entries.add(i);
                if e.op == hypercall::MMUEXT_OP {
                    self.count_ext(e.args[0], e.args[1] as usize);
                }
            }
        }
        let before: Vec<Pending> = if self.on.load(Ordering::SeqCst) {
            (0..count)
                .map(|i| {
                    // SAFETY: the caller guarantees `count` valid entries.
                    let e = unsafe { entries.add(i).read() };
                    match e.op {
                        hypercall::UPDATE_VA_MAPPING => (
                            Op::Uvm {
                                va: e.args[0],
                                pte: e.args[1],
                                flags: e.args[2],
                            },
                            0,
                            Vec::new(),
                        ),
                        hypercall::MMU_UPDATE => (
                            Op::Mmu {
                                count: e.args[1] as u32,
                            },
                            e.args[2],
                            Vec::new(),
                        ),
                        hypercall::MMUEXT_OP => (
                            Op::Ext {
                                count: e.args[1] as u32,
                            },
                            e.args[2],
                            // SAFETY: the entry's first argument points to
                            // its `count` operations (contract).
                            unsafe { Self::ext_list(e.args[0], e.args[1] as usize) },
                        ),
                        other => (Op::Other(other), 0, Vec::new()),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        // SAFETY: forwarded contract.
        let rc = unsafe { self.inner.multicall(entries, count) };
        if let Some(trap) = self.trap() {
            for (i, (op, pdone, ext)) in before.into_iter().enumerate() {
                // SAFETY: the caller guarantees `count` valid entries; the
                // result field is the hypervisor's answer.
                let result = unsafe { (*entries.add(i)).result } as i64;
                let done = if pdone == 0 {
                    0
                } else {
                    // SAFETY: an mmu_update/mmuext_op entry's `pdone`
                    // (valid per the contract).
                    unsafe { (pdone as *const u32).read() }
                };
                self.push(Rec {
                    op,
                    rc: rc_or(rc, result),
                    done,
                    trap,
                    ext,
                });
            }
        }
        rc
    }

    unsafe fn mmu_update(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: forwarded contract.
        let rc = unsafe { self.inner.mmu_update(reqs, count, done, domid) };
        if let Some(trap) = self.trap() {
            // SAFETY: `done` is null or valid (contract).
            let d = if done.is_null() {
                0
            } else {
                unsafe { done.read() }
            };
            self.push(Rec {
                op: Op::Mmu {
                    count: count as u32,
                },
                rc,
                done: d,
                trap,
                ext: Vec::new(),
            });
        }
        rc
    }

    unsafe fn mmuext_op(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: `ops` points to `count` readable ops (contract); read
        // before the call, which does not modify them.
        unsafe { self.count_ext(ops as u64, count) };
        let ext = if self.on.load(Ordering::SeqCst) {
            // SAFETY: as above.
            unsafe { Self::ext_list(ops as u64, count) }
        } else {
            Vec::new()
        };
        // SAFETY: forwarded contract.
        let rc = unsafe { self.inner.mmuext_op(ops, count, done, domid) };
        if let Some(trap) = self.trap() {
            // SAFETY: `done` is null or valid (contract).
            let d = if done.is_null() {
                0
            } else {
                unsafe { done.read() }
            };
            self.push(Rec {
                op: Op::Ext {
                    count: count as u32,
                },
                rc,
                done: d,
                trap,
                ext,
            });
        }
        rc
    }

    fn update_va_mapping(&self, va: u64, pte: u64, flags: u64) -> i64 {
        let rc = self.inner.update_va_mapping(va, pte, flags);
        if let Some(trap) = self.trap() {
            self.push(Rec {
                op: Op::Uvm { va, pte, flags },
                rc,
                done: 0,
                trap,
                ext: Vec::new(),
            });
        }
        rc
    }

    fn guest_store(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        let r = self.inner.guest_store(slot, mfn, index, value);
        if self.on.load(Ordering::SeqCst) {
            self.push(Rec {
                op: Op::Store,
                // Recorded as hypercall results are: a negated errno.
                rc: r.as_ref().map_or_else(|f| -(f.errno as i64), |_| 0),
                done: 0,
                trap: u32::MAX,
                ext: Vec::new(),
            });
        }
        r
    }
}

/// A multicall entry's result, unless the multicall itself failed.
fn rc_or(multicall_rc: i64, entry: i64) -> i64 {
    if multicall_rc != 0 {
        multicall_rc
    } else {
        entry
    }
}

// ---------------------------------------------------------------------------
// platforms

/// The backend every scenario space uses.
pub type Backend<H> = XenBackend<Arc<Recorder<H>>, P2m>;

/// What a scenario needs from where it runs (real Xen or the simulator).
pub trait Platform {
    /// The platform's trap.
    type H: XenHypercalls;
    /// Name for reports ("xen" / "sim").
    const NAME: &'static str;
    /// The recorder the backend traps through.
    fn recorder(&self) -> &Arc<Recorder<Self::H>>;
    /// The backend.
    fn backend(&self) -> &Arc<Backend<Self::H>>;
    /// Table memory.
    fn store(&self) -> &Arc<FrameStore<SpinLock>>;
    /// What the platform thinks of the table frames.
    type O: PinObserver;
    /// Data page `i` (`0..DATA_PAGES`), pseudo-physical.
    fn data_pfn(&self, i: usize) -> Pfn;
    /// What the platform thinks is read-only, typed or pinned (real Xen:
    /// the boot page tables' direct-map entry, and no answer for the rest;
    /// the simulator: everything).
    fn observer(&self) -> &Self::O;
    /// The pages scenario 3 maps so the guest keeps running on the pinned
    /// table: (virtual address, frame, entry flags).
    fn kernel_layout(&self) -> Vec<(u64, Pfn, EntryFlags)>;
    /// The machine frame of the root the guest runs on (to switch back to).
    fn boot_root(&self) -> Mfn;
    /// Read the word at `va` through the current base pointer (after
    /// `NEW_BASEPTR`); `expect` is what the engine says `va` translates to
    /// (the simulator cannot execute loads, so it checks that instead).
    fn read_current(&self, va: u64, root: Mfn, expect: Option<Pfn>) -> Option<u64>;
    /// Give table frame `victim` a second, writable mapping the engine does
    /// not know about (unrecorded). Returns a token for [`Self::unalias`].
    fn alias_writable(&self, victim: Pfn) -> u64;
    /// Remove that mapping (unrecorded).
    fn unalias(&self, token: u64);
    /// Extra platform facts for the report (not compared).
    fn info(&self) -> String;
    /// A progress note (the guest prints it when tracing is on).
    fn trace(&self, _what: &str) {}
}

// ---------------------------------------------------------------------------
// reports

/// One scenario's outcome: one console line.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Scenario name.
    pub name: &'static str,
    /// Per-entry results, sub-runs separated by `|` (compared).
    pub results: String,
    /// Final page states (compared).
    pub states: String,
    /// Counters (compared).
    pub counts: String,
    /// Checks that failed.
    pub failed: Vec<String>,
    /// Platform facts (not compared).
    pub info: String,
}

impl Report {
    /// An empty report named `name`.
    pub fn new(name: &'static str) -> Self {
        Report {
            name,
            ..Default::default()
        }
    }
    /// Record a check (failed when `ok` is false).
    pub fn check(&mut self, what: &str, ok: bool) {
        if !ok {
            self.failed.push(String::from(what));
        }
    }
    fn sub(&mut self, label: &str, recs: &[Rec]) {
        if !self.results.is_empty() {
            self.results.push('|');
        }
        self.results.push_str(label);
        self.results.push(':');
        self.results.push_str(&rle(recs));
    }
    /// Add a counter `k=v`.
    pub fn count(&mut self, k: &str, v: impl core::fmt::Display) {
        if !self.counts.is_empty() {
            self.counts.push(',');
        }
        let _ = write!(self.counts, "{k}={v}");
    }
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failed.is_empty()
    }
    /// The console line.
    pub fn line(&self) -> String {
        let verdict = if self.passed() { "pass" } else { "fail" };
        let failed = if self.failed.is_empty() {
            String::from("-")
        } else {
            self.failed.join(",")
        };
        format!(
            "{LINE_PREFIX} name={} verdict={verdict} results={} states={} counts={} failed={failed} info={}",
            self.name,
            or_dash(&self.results),
            or_dash(&self.states),
            or_dash(&self.counts),
            or_dash(&self.info)
        )
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Run-length-encoded tokens: `u0*12,x0,x-22/0`.
pub fn rle(recs: &[Rec]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < recs.len() {
        let t = recs[i].token();
        let mut n = 1;
        while i + n < recs.len() && recs[i + n].token() == t {
            n += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&t);
        if n > 1 {
            let _ = write!(out, "*{n}");
        }
        i += n;
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

// ---------------------------------------------------------------------------
// helpers

/// A scenario space on platform `Pl` under policy `P`.
pub type Space<P, Pl> = AddressSpace<X86_64, P, Backend<<Pl as Platform>::H>>;

/// The leaf flags scenarios map data pages with.
pub const LEAF: EntryFlags = EntryFlags::PRESENT
    .union(EntryFlags::WRITABLE)
    .union(EntryFlags::USER)
    .union(EntryFlags::ACCESSED)
    .union(EntryFlags::DIRTY);

/// The test layout: two L1s under one L2, another L2, two more root slots.
const VAS: [u64; 10] = [
    0x0000_0000_4000_0000,
    0x0000_0000_4000_1000,
    0x0000_0000_4000_2000,
    0x0000_0000_4020_0000,
    0x0000_0000_4020_1000,
    0x0000_0000_8000_0000,
    0x0000_0080_0000_0000,
    0x0000_0080_0000_3000,
    0x0000_2000_0000_0000,
    0x0000_7fff_ffff_f000,
];

fn build<P: LockPolicy<Lock = SpinLock>, Pl: Platform>(pl: &Pl) -> Result<Space<P, Pl>, Error> {
    let s = AddressSpace::new(
        pl.store().clone(),
        pl.backend().clone(),
        SpaceOptions::default(),
    )?;
    for (i, &va) in VAS.iter().enumerate() {
        s.map(va, pl.data_pfn(i % 8).0 << 12, PageSize::Size4K, LEAF)?;
    }
    Ok(s)
}

/// `RO`/`RW` and pinned flag of every table frame, in walk order, plus
/// whether they match `pinned`: the engine's flag, and what the platform
/// can tell of each frame ([`check_frame`]: read-only, validated as its
/// level and pinned itself at the root and, under split locks, each L1).
pub fn states<P: LockPolicy<Lock = SpinLock>, Pl: Platform>(
    pl: &Pl,
    s: &Space<P, Pl>,
    pinned: bool,
) -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    let frames = s.table_frames().unwrap_or_default();
    for &(pfn, level) in &frames {
        let flag = s.store().meta(pfn).is_some_and(|m| m.is_pinned());
        let _ = write!(
            out,
            "L{}{}{}",
            level.number(),
            flag_rw(pl.observer().read_only(pfn)),
            if flag { "p" } else { "" }
        );
        let own_pin = level == Level::L4 || (level == Level::L1 && P::SPLIT_PTE_LOCKS);
        let want = Expected::table(pinned, level, own_pin);
        ok &= check_frame(pl.observer(), pfn, want).is_ok() && flag == pinned;
    }
    (out, ok && !frames.is_empty())
}

fn ext_cmds(recs: &[Rec]) -> Vec<(u32, u64)> {
    recs.iter().flat_map(|r| r.ext.iter().copied()).collect()
}

/// The machine frame of `pfn`.
pub fn mfn_of<Pl: Platform>(pl: &Pl, pfn: Pfn) -> u64 {
    use pagepin_engine::Backend as _;
    pl.backend().pfn_to_mfn(pfn).0
}

/// One mmuext op straight through the recorder.
pub fn ext_raw<Pl: Platform>(pl: &Pl, cmd: ExtCmd, arg1: u64) -> i64 {
    let op = MmuExtOpAbi {
        cmd: cmd as u32,
        _pad: 0,
        arg1,
        arg2: 0,
    };
    let mut done = 0u32;
    // SAFETY: one live op and a live `done` counter, untouched during the call.
    unsafe { pl.recorder().mmuext_op(&op, 1, &mut done, DOMID_SELF) }
}

fn dm_pte<Pl: Platform>(pl: &Pl, pfn: Pfn, writable: bool) -> u64 {
    let mut f =
        EntryFlags::PRESENT | EntryFlags::ACCESSED | EntryFlags::DIRTY | EntryFlags::NO_EXECUTE;
    if writable {
        f |= EntryFlags::WRITABLE;
    }
    PageTableEntry::new(mfn_of(pl, pfn), f).bits()
}

fn dm_va<Pl: Platform>(pl: &Pl, pfn: Pfn) -> u64 {
    use pagepin_engine::Backend as _;
    pl.backend()
        .direct_map_base()
        .unwrap_or(<X86_64 as pagepin_engine::PagingMode>::DIRECT_MAP_BASE)
        + (pfn.0 << 12)
}

/// A split-lock space mapping `layout` (the platform's
/// [`Platform::kernel_layout`]), so the guest can run on it; whether every
/// page mapped. `None` (a failed `new` check in `r`) if it cannot be made.
pub fn kernel_space<Pl: Platform>(
    pl: &Pl,
    layout: &[(u64, Pfn, EntryFlags)],
    r: &mut Report,
) -> Option<(Space<Split<SpinLock>, Pl>, bool)> {
    let Ok(s) = AddressSpace::new(
        pl.store().clone(),
        pl.backend().clone(),
        SpaceOptions::default(),
    ) else {
        r.check("new", false);
        return None;
    };
    let mut mapped = true;
    for &(va, pfn, flags) in layout {
        mapped &= s.map(va, pfn.0 << 12, PageSize::Size4K, flags).is_ok();
    }
    Some((s, mapped))
}

// ---------------------------------------------------------------------------
// scenarios

/// Run every scenario, handing each report to `out` as it completes.
pub fn run_all<Pl: Platform>(pl: &Pl, out: &mut dyn FnMut(&Report)) -> bool {
    let mut all = true;
    let scenarios: [fn(&Pl) -> Report; 6] = [
        pin_matrix::<Pl>,
        entry_writes::<Pl>,
        base_pointer::<Pl>,
        negatives::<Pl>,
        rollback::<Pl>,
        seed_rules::<Pl>,
    ];
    for f in scenarios {
        pl.recorder().take();
        let r = f(pl);
        all &= r.passed();
        out(&r);
    }
    all
}

fn pin_unpin<P: LockPolicy<Lock = SpinLock>, Pl: Platform, const N: usize>(
    pl: &Pl,
    r: &mut Report,
    label: &str,
    limit: usize,
) {
    pl.recorder().take();
    pl.trace(label);
    let s = match build::<P, Pl>(pl) {
        Ok(s) => s,
        Err(_) => return r.check(&format!("{label}-build"), false),
    };
    pl.trace("built");
    let mut b: Box<Batch<N>> = Box::new(Batch::with_limit(limit));
    pl.trace("batch");
    let pin = s.pin(&mut *b);
    pl.trace("pinned");
    r.check(&format!("{label}-pin"), pin.is_ok());
    let (st_p, ok_p) = states::<P, Pl>(pl, &s, true);
    r.check(&format!("{label}-pinned-states"), ok_p);
    let pinned = pl.recorder().take();
    r.sub(&format!("{label}-pin"), &pinned);
    let unpin = s.unpin(&mut *b);
    r.check(&format!("{label}-unpin"), unpin.is_ok());
    let (st_u, ok_u) = states::<P, Pl>(pl, &s, false);
    r.check(&format!("{label}-unpinned-states"), ok_u);
    let unpinned = pl.recorder().take();
    r.sub(&format!("{label}-unpin"), &unpinned);
    let l1_pins = ext_cmds(&pinned)
        .iter()
        .filter(|c| c.0 == ExtCmd::PinL1Table as u32)
        .count();
    let traps = pinned.iter().map(|x| x.trap).collect::<Vec<_>>();
    let mut distinct = traps.clone();
    distinct.dedup();
    r.count(&format!("{label}-traps"), distinct.len());
    r.count(&format!("{label}-l1pins"), l1_pins);
    if !r.states.is_empty() {
        r.states.push('|');
    }
    let _ = write!(r.states, "{label}:{st_p}/{st_u}");
    r.check(&format!("{label}-teardown"), s.teardown().is_ok());
}

/// Scenario 1: pin and unpin under split and global at batch sizes 1, 32
/// and 256 with real multicalls; nothing left pinned, read-only or typed.
pub fn pin_matrix<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("pin_matrix");
    let before = pl.store().allocated();
    for limit in [1usize, 32, 256] {
        pin_unpin::<Split<SpinLock>, Pl, 256>(pl, &mut r, &format!("split{limit}"), limit);
        pin_unpin::<Global<SpinLock>, Pl, 256>(pl, &mut r, &format!("global{limit}"), limit);
    }
    r.check("frames-returned", pl.store().allocated() == before);
    r.info = pl.info();
    r
}

/// Scenario 2: write entries of a pinned space by plain stores (emulated by
/// Xen) and by `mmu_update`, and read them back.
pub fn entry_writes<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("entry_writes");
    for split in [true, false] {
        let label = if split { "split" } else { "global" };
        if split {
            writes_under::<Split<SpinLock>, Pl>(pl, &mut r, label);
        } else {
            writes_under::<Global<SpinLock>, Pl>(pl, &mut r, label);
        }
    }
    r
}

fn writes_under<P: LockPolicy<Lock = SpinLock>, Pl: Platform>(
    pl: &Pl,
    r: &mut Report,
    label: &str,
) {
    let Ok(s) = build::<P, Pl>(pl) else {
        return r.check(&format!("{label}-build"), false);
    };
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    r.check(&format!("{label}-pin"), s.pin(&mut *b).is_ok());
    pl.recorder().take();
    let cases: [(u64, usize, WritePath); 4] = [
        (VAS[0], 9, WritePath::Store),
        (VAS[1], 10, WritePath::Hypercall),
        (VAS[0] + 0x5000, 11, WritePath::Store),
        (VAS[3] + 0x7000, 12, WritePath::Hypercall),
    ];
    let mut ok = 0;
    let mut reads = String::new();
    for (va, data, path) in cases {
        let e = PageTableEntry::new(mfn_of(pl, pl.data_pfn(data)), LEAF);
        let w = s.set_pte(va, e, path);
        let back = s.read_pte(va);
        let tr = s.translate(va).map(|t| t.phys >> 12);
        // Xen stores a 64-bit PV guest's USER leaf with GLOBAL added
        // (`adjust_guest_l1e`): the frame and every flag written must read
        // back, and nothing else but GLOBAL may be added.
        let same = back.is_ok_and(|b| b.bits() & !EntryFlags::GLOBAL.bits() == e.bits());
        let _ = write!(reads, "{:x}", back.map_or(0, |b| b.flags().bits()));
        reads.push('.');
        if w.is_ok() && same && tr == Some(pl.data_pfn(data).0) {
            ok += 1;
        } else {
            r.check(&format!("{label}-write-{va:#x}"), false);
            r.count(
                &format!("{label}-bad-{va:#x}"),
                format!(
                    "{}/{:#x}/{:#x}/{:#x}",
                    w.is_ok(),
                    back.map_or(0, |b| b.bits()),
                    e.bits(),
                    tr.unwrap_or(0)
                ),
            );
        }
    }
    // Clear one entry both ways.
    r.check(
        &format!("{label}-clear-store"),
        s.set_pte(VAS[0] + 0x5000, PageTableEntry::EMPTY, WritePath::Store)
            .is_ok()
            && s.read_pte(VAS[0] + 0x5000) == Ok(PageTableEntry::EMPTY),
    );
    r.check(
        &format!("{label}-clear-hypercall"),
        s.set_pte(VAS[3] + 0x7000, PageTableEntry::EMPTY, WritePath::Hypercall)
            .is_ok()
            && s.read_pte(VAS[3] + 0x7000) == Ok(PageTableEntry::EMPTY),
    );
    let recs = pl.recorder().take();
    r.sub(label, &recs);
    r.count(&format!("{label}-ok"), ok);
    r.check(&format!("{label}-unpin"), s.unpin(&mut *b).is_ok());
    let (st, good) = states::<P, Pl>(pl, &s, false);
    r.check(&format!("{label}-states"), good);
    if !r.states.is_empty() {
        r.states.push('|');
    }
    let _ = write!(r.states, "{label}:{st}:read={reads}");
    r.check(&format!("{label}-teardown"), s.teardown().is_ok());
}

/// Scenario 3: load the pinned table with `NEW_BASEPTR`, read memory
/// through a mapping only it holds, switch back, unpin.
pub fn base_pointer<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("base_pointer");
    let layout = pl.kernel_layout();
    let Some((s, mut mapped)) = kernel_space(pl, &layout, &mut r) else {
        return r;
    };
    let magic = pl.data_pfn(MAGIC_PAGE);
    mapped &= s
        .map(
            ALIAS_VA,
            magic.0 << 12,
            PageSize::Size4K,
            EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::ACCESSED,
        )
        .is_ok();
    r.check("map", mapped);
    r.count("pages", layout.len() + 1);
    r.count("tables", s.table_frames().map_or(0, |t| t.len()));
    pl.recorder().take();
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    r.check("pin", s.pin(&mut *b).is_ok());
    let recs = pl.recorder().take();
    r.sub("pin", &recs);
    let root = Mfn(mfn_of(pl, s.root()));
    let expect = s.translate(ALIAS_VA).map(|t| Pfn(t.phys >> 12));
    let rc_in = ext_raw(pl, ExtCmd::NewBaseptr, root.0);
    let got = if rc_in == 0 {
        pl.read_current(ALIAS_VA, root, expect)
    } else {
        None
    };
    let rc_out = ext_raw(pl, ExtCmd::NewBaseptr, pl.boot_root().0);
    r.check("switch-in", rc_in == 0);
    r.check("read-magic", got == Some(MAGIC));
    r.check("switch-back", rc_out == 0);
    let recs = pl.recorder().take();
    r.sub("switch", &recs);
    r.check("unpin", s.unpin(&mut *b).is_ok());
    let recs = pl.recorder().take();
    r.sub("unpin", &recs);
    let (st, ok) = states::<Split<SpinLock>, Pl>(pl, &s, false);
    r.check("states", ok);
    r.states = st;
    r.check("teardown", s.teardown().is_ok());
    // Pages of the span the layout leaves out (mapped to frames that are
    // not the guest's, e.g. the shared-info page), so the simulator's
    // clone of the span leaves out the same ones.
    let mut holes = String::new();
    for w in layout.windows(2) {
        let mut va = w[0].0 + 0x1000;
        while va < w[1].0 {
            if !holes.is_empty() {
                holes.push(';');
            }
            holes.push_str(&format!("{va:#x}"));
            va += 0x1000;
        }
    }
    r.info = format!(
        "read={:#x},span={:#x}-{:#x},holes={}",
        got.unwrap_or(0),
        layout.first().map_or(0, |l| l.0),
        layout.last().map_or(0, |l| l.0 + 0x1000),
        if holes.is_empty() { "-" } else { &holes }
    );
    r
}

/// Scenario 4: what Xen answers to protocol violations, one raw hypercall
/// each, on a lone table frame.
pub fn negatives<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("negatives");
    let Some(t) = pl.store().alloc_table(Level::L1) else {
        r.check("alloc", false);
        return r;
    };
    let mfn = mfn_of(pl, t);
    let va = dm_va(pl, t);
    pl.recorder().take();
    // 1. pin while still writable
    let a = ext_raw(pl, ExtCmd::PinL1Table, mfn);
    // make it read-only, pin: allowed
    let b = pl
        .recorder()
        .update_va_mapping(va, dm_pte(pl, t, false), uvmf::TLB_FLUSH);
    let c = ext_raw(pl, ExtCmd::PinL1Table, mfn);
    // 2. map the pinned table page writable
    let d = pl
        .recorder()
        .update_va_mapping(va, dm_pte(pl, t, true), uvmf::TLB_FLUSH);
    // 3. double pin
    let e = ext_raw(pl, ExtCmd::PinL1Table, mfn);
    // unpin (ok), 4. unpin of an unpinned table
    let f = ext_raw(pl, ExtCmd::UnpinTable, mfn);
    let g = ext_raw(pl, ExtCmd::UnpinTable, mfn);
    // 5. load an unpinned root that cannot be validated (it is mapped
    // writable) as the base pointer.
    let h = pl
        .recorder()
        .update_va_mapping(va, dm_pte(pl, t, true), uvmf::TLB_FLUSH);
    let i = ext_raw(pl, ExtCmd::NewBaseptr, mfn);
    let recs = pl.recorder().take();
    r.sub("raw", &recs);
    r.count("pin_writable", a);
    r.count("map_pinned_writable", d);
    r.count("double_pin", e);
    r.count("unpin_unpinned", g);
    r.count("baseptr_writable", i);
    r.check("pin-writable-refused", a < 0);
    r.check("ro-ok", b == 0 && c == 0);
    r.check("map-pinned-writable-refused", d < 0);
    r.check("double-pin-refused", e < 0);
    r.check("unpin-ok", f == 0);
    r.check("unpin-unpinned-refused", g < 0);
    r.check("rw-again", h == 0);
    r.check("baseptr-writable-refused", i < 0);
    r.states = format!("L1{}", flag_rw(pl.observer().read_only(t)));
    r.check(
        "restored",
        check_frame(pl.observer(), t, Expected::AT_REST).is_ok(),
    );
    // SAFETY: `t` was allocated for this scenario only and linked into no
    // table.
    unsafe { pl.store().free_now(t) };
    // The engine refuses what Xen would refuse, before any hypercall.
    if let Ok(s) = build::<Split<SpinLock>, Pl>(pl) {
        let mut bt: Box<Batch<32>> = Box::new(Batch::new());
        let _ = pl.recorder().take();
        r.check(
            "engine-unpin-unpinned",
            s.unpin(&mut *bt) == Err(Error::NotPinned),
        );
        r.check("engine-pin", s.pin(&mut *bt).is_ok());
        let n = pl.recorder().take().len();
        r.check(
            "engine-double-pin",
            s.pin(&mut *bt) == Err(Error::AlreadyPinned),
        );
        r.check(
            "engine-double-pin-silent",
            pl.recorder().take().is_empty() && n > 0,
        );
        r.check("engine-teardown", s.teardown().is_ok());
    } else {
        r.check("build", false);
    }
    r
}

/// `r` read-only, `w` writable, `?` unknown.
fn flag_rw(read_only: Option<bool>) -> &'static str {
    match read_only {
        Some(true) => "r",
        Some(false) => "w",
        None => "?",
    }
}

/// Scenario 5: a real failure mid-pin (a table page given a second writable
/// mapping behind the engine's back): the engine names the failing entry
/// and restores every other page; after the mapping is removed it pins.
pub fn rollback<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("rollback");
    rollback_under::<Split<SpinLock>, Pl>(pl, &mut r, "split");
    rollback_under::<Global<SpinLock>, Pl>(pl, &mut r, "global");
    r
}

fn rollback_under<P: LockPolicy<Lock = SpinLock>, Pl: Platform>(
    pl: &Pl,
    r: &mut Report,
    label: &str,
) {
    let Ok(s) = build::<P, Pl>(pl) else {
        return r.check(&format!("{label}-build"), false);
    };
    let frames = s.table_frames().unwrap_or_default();
    // The second L1 in walk order.
    let Some(&(victim, _)) = frames.iter().filter(|f| f.1 == Level::L1).nth(1) else {
        return r.check(&format!("{label}-victim"), false);
    };
    let token = pl.alias_writable(victim);
    pl.trace("aliased");
    pl.recorder().take();
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    let res = s.pin(&mut *b);
    pl.trace("pin returned");
    let recs = pl.recorder().take();
    r.sub(&format!("{label}-failed-pin"), &recs);
    let (want_step, want_pfn) = if P::SPLIT_PTE_LOCKS {
        (StepKind::Pin(Level::L1), victim)
    } else {
        (StepKind::Pin(Level::L4), s.root())
    };
    match res {
        Err(Error::Hypercall(h)) => {
            r.count(&format!("{label}-errno"), h.errno);
            r.count(
                &format!("{label}-step"),
                format!("{:?}", h.step).replace(['(', ')'], ""),
            );
            r.check(
                &format!("{label}-names-entry"),
                h.step == Some(want_step) && h.pfn == Some(want_pfn),
            );
        }
        other => {
            r.check(&format!("{label}-error"), false);
            r.count(
                &format!("{label}-unexpected"),
                format!("{other:?}").replace(' ', ""),
            );
        }
    }
    pl.trace("states");
    let (st, ok) = states::<P, Pl>(pl, &s, false);
    r.check(&format!("{label}-restored"), ok && !s.is_pinned());
    if !r.states.is_empty() {
        r.states.push('|');
    }
    let _ = write!(r.states, "{label}:{st}");
    pl.unalias(token);
    r.check(&format!("{label}-pin-after"), s.pin(&mut *b).is_ok());
    r.check(&format!("{label}-unpin-after"), s.unpin(&mut *b).is_ok());
    pl.recorder().take();
    r.check(&format!("{label}-teardown"), s.teardown().is_ok());
}

/// Scenario 6: the seed's rules on the wire: the root's read-only remap is
/// the last remap of a pin and carries the only TLB flush; no L1 pin under
/// the global policy; the root pin comes after every remap.
pub fn seed_rules<Pl: Platform>(pl: &Pl) -> Report {
    let mut r = Report::new("seed_rules");
    seed_under::<Split<SpinLock>, Pl>(pl, &mut r, "split");
    seed_under::<Global<SpinLock>, Pl>(pl, &mut r, "global");
    r
}

fn seed_under<P: LockPolicy<Lock = SpinLock>, Pl: Platform>(pl: &Pl, r: &mut Report, label: &str) {
    let Ok(s) = build::<P, Pl>(pl) else {
        return r.check(&format!("{label}-build"), false);
    };
    pl.recorder().take();
    let mut b: Box<Batch<32>> = Box::new(Batch::new());
    r.check(&format!("{label}-pin"), s.pin(&mut *b).is_ok());
    let recs = pl.recorder().take();
    r.sub(label, &recs);
    let root_va = dm_va(pl, s.root());
    let uvms: Vec<(usize, u64, u64)> = recs
        .iter()
        .enumerate()
        .filter_map(|(i, x)| match x.op {
            Op::Uvm { va, flags, .. } => Some((i, va, flags)),
            _ => None,
        })
        .collect();
    let flushes: Vec<_> = uvms
        .iter()
        .filter(|u| u.2 & uvmf::FLUSHTYPE_MASK != 0)
        .collect();
    let last = uvms.last().copied();
    r.check(
        &format!("{label}-root-last"),
        last.is_some_and(|l| l.1 == root_va),
    );
    r.check(
        &format!("{label}-one-flush-on-root"),
        flushes.len() == 1 && flushes[0].1 == root_va,
    );
    let cmds = ext_cmds(&recs);
    let root_mfn = mfn_of(pl, s.root());
    let l1_pins = cmds
        .iter()
        .filter(|c| c.0 == ExtCmd::PinL1Table as u32)
        .count();
    let l1s = s
        .table_frames()
        .map_or(0, |t| t.iter().filter(|f| f.1 == Level::L1).count());
    if P::SPLIT_PTE_LOCKS {
        r.check(&format!("{label}-l1-pinned-each"), l1_pins == l1s);
    } else {
        r.check(&format!("{label}-no-l1-pin"), l1_pins == 0);
    }
    // The root pin is the last op, after the root's remap.
    let root_pin_at = recs
        .iter()
        .rposition(|x| x.ext.contains(&(ExtCmd::PinL4Table as u32, root_mfn)));
    r.check(
        &format!("{label}-root-pin-after-remap"),
        matches!((root_pin_at, last), (Some(p), Some(l)) if p > l.0),
    );
    r.count(&format!("{label}-uvms"), uvms.len());
    r.count(&format!("{label}-l1pins"), l1_pins);
    r.check(&format!("{label}-unpin"), s.unpin(&mut *b).is_ok());
    pl.recorder().take();
    r.check(&format!("{label}-teardown"), s.teardown().is_ok());
}

/// Parse a scenario line into (name, field → value).
pub fn parse_line(line: &str) -> Option<(String, Vec<(String, String)>)> {
    let rest = line.trim().strip_prefix(LINE_PREFIX)?;
    let mut name = None;
    let mut fields = Vec::new();
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        if k == "name" {
            name = Some(String::from(v));
        } else {
            fields.push((String::from(k), String::from(v)));
        }
    }
    Some((name?, fields))
}
