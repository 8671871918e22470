//! The pagepin PV test guest: a 64-bit Xen PV kernel (dom0) that embeds the
//! pagepin engine and the Xen backend, pins real page tables with real
//! hypercalls, prints one machine-readable line per scenario and ends QEMU
//! with a status that says pass or fail.
//!
//! The scenarios themselves live in `scenarios.rs`, shared with the host
//! test that runs them against the simulator.
#![no_std]
#![no_main]
#![warn(missing_docs)]

extern crate alloc;

mod diff;
mod hypercall;
#[allow(dead_code)]
mod program;
mod rt;
#[allow(dead_code)]
mod scenarios;
mod smp;
#[allow(dead_code)]
mod smp_scenarios;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use pagepin_backends::xen::{
    FrameMap, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, P2m, XenBackend, XenHypercalls, DOMID_SELF,
};
use pagepin_backends::PinObserver;
use pagepin_engine::SpinLock;
use pagepin_engine::StoreFault;
use pagepin_engine::{EntryFlags, Frame, FrameStore, Level, Mfn, PageTableEntry, Pfn};

use hypercall::{hypercall5, nr};
use rt::Console;
use scenarios::{Platform, Recorder, Report, DATA_PAGES, MAGIC, MAGIC_PAGE};
use smp_scenarios::Smp;

/// The `start_info` page Xen hands the guest in `%rsi` (x86-64 layout,
/// public `xen.h`).
#[repr(C)]
pub struct StartInfo {
    /// "xen-3.0-x86_64".
    pub magic: [u8; 32],
    /// Pages the domain has.
    pub nr_pages: u64,
    /// Machine address of the shared-info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    _pad0: u32,
    /// Store ring mfn.
    pub store_mfn: u64,
    /// Store event channel.
    pub store_evtchn: u32,
    _pad1: u32,
    /// Console information (domU: mfn + evtchn; dom0: offset + size).
    pub console: [u64; 2],
    /// Virtual address of the boot L4 table.
    pub pt_base: u64,
    /// Frames of boot page tables.
    pub nr_pt_frames: u64,
    /// Virtual address of the p2m (pfn → mfn) array.
    pub mfn_list: u64,
    /// Initial ramdisk.
    pub mod_start: u64,
    /// Its length.
    pub mod_len: u64,
    /// The guest's command line (`-initrd "guest.elf a=b"` puts `a=b` here).
    pub cmd_line: [u8; 1024],
}

const _: () = assert!(core::mem::offset_of!(StartInfo, mfn_list) == 104);
const _: () = assert!(core::mem::offset_of!(StartInfo, pt_base) == 88);
const _: () = assert!(core::mem::offset_of!(StartInfo, cmd_line) == 128);

/// Real Xen: every hypercall is a `syscall` from the guest kernel.
pub struct RealXen;

impl XenHypercalls for RealXen {
    unsafe fn multicall(&self, entries: *mut MulticallEntry, count: usize) -> i64 {
        // SAFETY: the caller guarantees `count` valid entries whose pointer
        // arguments are valid for their hypercalls (trait contract).
        unsafe { hypercall5(nr::MULTICALL, entries as u64, count as u64, 0, 0, 0) }
    }
    unsafe fn mmu_update(
        &self,
        reqs: *const MmuUpdateAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: `reqs` has `count` requests and `done` is null or
        // writable (trait contract).
        unsafe {
            hypercall5(
                nr::MMU_UPDATE,
                reqs as u64,
                count as u64,
                done as u64,
                domid as u64,
                0,
            )
        }
    }
    unsafe fn mmuext_op(
        &self,
        ops: *const MmuExtOpAbi,
        count: usize,
        done: *mut u32,
        domid: u16,
    ) -> i64 {
        // SAFETY: as for `mmu_update`, with `count` ops.
        unsafe {
            hypercall5(
                nr::MMUEXT_OP,
                ops as u64,
                count as u64,
                done as u64,
                domid as u64,
                0,
            )
        }
    }
    fn update_va_mapping(&self, va: u64, pte: u64, flags: u64) -> i64 {
        // SAFETY: no pointer arguments: Xen checks the address and entry
        // and refuses what the guest may not do.
        unsafe { hypercall5(nr::UPDATE_VA_MAPPING, va, pte, flags, 0, 0) }
    }
    fn guest_store(
        &self,
        slot: &AtomicU64,
        mfn: Mfn,
        index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        // A plain store: into a read-only (pinned) L1 Xen traps and
        // emulates it. Into a read-only page Xen will not emulate for (a
        // broken protocol) it is a page fault: the handler retries it, and
        // gives it up after a bound.
        if smp::guarded_store(slot, value) {
            Ok(())
        } else {
            Err(StoreFault {
                mfn,
                index,
                errno: 14,
            })
        }
    }
}

/// Frames of table memory for the scenarios.
const POOL_FRAMES: usize = 512;

#[repr(C, align(4096))]
struct Pool([u8; POOL_FRAMES * 4096]);

/// Zeroed table memory in .bss (so in Xen's initial mapping, where its
/// virtual address is its pseudo-physical address: the direct map base is 0).
static mut POOL: Pool = Pool([0; POOL_FRAMES * 4096]);

#[repr(C, align(4096))]
struct Data([[u64; 512]; DATA_PAGES]);

/// Data pages the scenarios map.
static mut DATA: Data = Data([[0; 512]; DATA_PAGES]);

/// The data page whose boot mapping is borrowed as a writable alias.
const ALIAS_PAGE: usize = 14;

/// Real Xen as a scenario platform.
struct Guest {
    si: &'static StartInfo,
    rec: Arc<Recorder<RealXen>>,
    backend: Arc<scenarios::Backend<RealXen>>,
    store: Arc<FrameStore<SpinLock>>,
    pool: (u64, u64),
    saved: AtomicU64,
}

impl Guest {
    fn p2m(&self) -> &P2m {
        self.backend.frame_map()
    }

    /// The boot page tables' L1 entry for `va`, and its machine address.
    fn boot_l1e(&self, va: u64) -> Option<(&'static AtomicU64, u64)> {
        let mut table = self.si.pt_base;
        let mut table_mfn = self.p2m().to_mfn(Pfn(table >> 12))?.0;
        for level in (1..=4u32).rev() {
            let idx = ((va >> (12 + 9 * (level - 1))) & 511) as usize;
            let ptr = (table + idx as u64 * 8) as *const AtomicU64;
            // SAFETY: `table` is the virtual address of a boot page-table
            // frame (pt_base, or a frame found through the p2m whose
            // pseudo-physical address is its virtual address in the initial
            // mapping); entries are 8-byte aligned words, read atomically.
            let slot: &'static AtomicU64 = unsafe { &*ptr };
            if level == 1 {
                return Some((slot, (table_mfn << 12) + idx as u64 * 8));
            }
            let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
            if !e.is_present() || e.is_huge() {
                return None;
            }
            table_mfn = e.frame();
            table = self.p2m().to_pfn(Mfn(table_mfn))?.0 << 12;
        }
        None
    }

    fn data_va(i: usize) -> u64 {
        // SAFETY: only the address is taken.
        (unsafe { core::ptr::addr_of!(DATA.0[i]) }) as u64
    }
}

impl Platform for Guest {
    type H = RealXen;
    const NAME: &'static str = "xen";
    fn recorder(&self) -> &Arc<Recorder<RealXen>> {
        &self.rec
    }
    fn backend(&self) -> &Arc<scenarios::Backend<RealXen>> {
        &self.backend
    }
    fn store(&self) -> &Arc<FrameStore<SpinLock>> {
        &self.store
    }
    type O = Self;
    fn data_pfn(&self, i: usize) -> Pfn {
        Pfn(Self::data_va(i) >> 12)
    }
    fn observer(&self) -> &Self {
        self
    }
    fn kernel_layout(&self) -> Vec<(u64, Pfn, EntryFlags)> {
        let mut out = Vec::new();
        // Everything Xen mapped for us lies in the first 1 GiB.
        let mut va = 0u64;
        while va < (1 << 30) {
            let Some((slot, _)) = self.boot_l1e(va) else {
                va = (va | 0x1f_ffff) + 1;
                continue;
            };
            let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
            if e.is_present() {
                if let Some(pfn) = self.p2m().to_pfn(Mfn(e.frame())) {
                    let mut flags = e.flags();
                    if (self.pool.0..self.pool.1).contains(&pfn.0) {
                        // Table memory is never writable in a space that
                        // is to be pinned.
                        flags = flags.difference(EntryFlags::WRITABLE);
                    }
                    out.push((va, pfn, flags));
                }
            }
            va += 0x1000;
        }
        out
    }
    fn boot_root(&self) -> Mfn {
        self.p2m()
            .to_mfn(Pfn(self.si.pt_base >> 12))
            .unwrap_or(Mfn(0))
    }
    fn read_current(&self, va: u64, _root: Mfn, _expect: Option<Pfn>) -> Option<u64> {
        // SAFETY: the caller loaded a base pointer that maps `va` to a data
        // page (the magic page); an aligned 8-byte read.
        Some(unsafe { (va as *const u64).read_volatile() })
    }
    fn alias_writable(&self, victim: Pfn) -> u64 {
        let Some((slot, maddr)) = self.boot_l1e(Self::data_va(ALIAS_PAGE)) else {
            return 0;
        };
        self.saved
            .store(slot.load(Ordering::Acquire), Ordering::Relaxed);
        let mfn = self.p2m().to_mfn(victim).map_or(0, |m| m.0);
        let e = PageTableEntry::new(
            mfn,
            EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::ACCESSED | EntryFlags::DIRTY,
        );
        let req = MmuUpdateAbi {
            ptr: maddr,
            val: e.bits(),
        };
        let mut done = 0;
        // SAFETY: one live request and counter; the entry maps a data page
        // nothing else uses while aliased.
        let rc = unsafe { self.rec.inner().mmu_update(&req, 1, &mut done, DOMID_SELF) };
        if rc != 0 {
            let _ = writeln!(Console, "PAGEPIN-GUEST alias failed rc={rc}");
        }
        maddr
    }
    fn unalias(&self, token: u64) {
        let req = MmuUpdateAbi {
            ptr: token,
            val: self.saved.load(Ordering::Relaxed),
        };
        let mut done = 0;
        // SAFETY: as in `alias_writable`, restoring the saved entry.
        let rc = unsafe { self.rec.inner().mmu_update(&req, 1, &mut done, DOMID_SELF) };
        if rc != 0 {
            let _ = writeln!(Console, "PAGEPIN-GUEST unalias failed rc={rc}");
        }
    }
    fn info(&self) -> String {
        format!(
            "nr_pages={},pool={:#x}-{:#x},heap={}",
            self.si.nr_pages,
            self.pool.0 << 12,
            self.pool.1 << 12,
            rt::heap_used()
        )
    }
}

/// What real Xen thinks, as far as a guest can see: whether a frame's
/// direct-map entry in the boot page tables is read-only. Xen cannot be
/// asked about types or pins.
impl PinObserver for Guest {
    fn read_only(&self, pfn: Pfn) -> Option<bool> {
        let (slot, _) = self.boot_l1e(pfn.0 << 12)?;
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        e.is_present().then_some(!e.is_writable())
    }
    fn table_level(&self, _pfn: Pfn) -> Option<Option<Level>> {
        None
    }
    fn pinned(&self, _pfn: Pfn) -> Option<bool> {
        None
    }
}

impl Smp for Guest {
    fn writers(&self) -> usize {
        smp::online() - 1
    }
    fn run_parallel(&self, f: &(dyn Fn(usize) + Sync)) {
        smp::run_parallel(f, JOB_LIMIT_NS)
    }
    fn faults(&self) -> u64 {
        smp::fault_totals().0
    }
    fn skipped(&self) -> u64 {
        smp::fault_totals().1
    }
    fn now_ns(&self) -> u64 {
        smp::now_ns()
    }
    fn set_retry_limit(&self, limit: u64) {
        smp::CPUS[smp::this_vcpu()]
            .retry_limit
            .store(limit, Ordering::Relaxed);
    }
}

/// Longest a vCPU may take over one parallel job before the run counts as
/// a hang (the host test's timeout is longer).
const JOB_LIMIT_NS: u64 = 20_000_000_000;

/// `key=value` words of the command line.
fn arg(cmd: &[u8], key: &str) -> Option<u64> {
    let end = cmd.iter().position(|&c| c == 0).unwrap_or(cmd.len());
    let line = core::str::from_utf8(&cmd[..end]).ok()?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Every vCPU runs the same counting loop, alone and then all at once:
/// each must see every other's counter move during its own loop, and all
/// together should take about as long as one alone (MTTCG runs vCPUs on
/// host threads; serialised they would take `vcpus` times as long). With
/// more vCPUs than host cores the host may run one vCPU's whole loop
/// before it schedules another, so the parallel run is tried up to
/// `ATTEMPTS` times and passes if one attempt overlaps (bounded by count:
/// a host that never runs two vCPUs at once still fails).
fn parallel_check() -> Report {
    const ITERS: u64 = 2_000_000;
    const ATTEMPTS: usize = 3;
    let n = smp::online();
    let spin = |v: usize| -> (u64, bool) {
        let before: [u64; smp::MAX_VCPUS] =
            core::array::from_fn(|o| smp::CPUS[o].progress.load(Ordering::Acquire));
        let t0 = smp::now_ns();
        for _ in 0..ITERS {
            smp::CPUS[v].progress.fetch_add(1, Ordering::Relaxed);
        }
        let dt = smp::now_ns() - t0;
        let all_moved = (0..n)
            .filter(|&o| o != v)
            .all(|o| smp::CPUS[o].progress.load(Ordering::Acquire) > before[o]);
        (dt, all_moved)
    };
    let alone = spin(0).0;
    let mut together = 0;
    let mut overlapped = false;
    let mut attempts = 0;
    while attempts < ATTEMPTS && !overlapped {
        attempts += 1;
        let times: [AtomicU64; smp::MAX_VCPUS] = [const { AtomicU64::new(0) }; smp::MAX_VCPUS];
        let overlap: [AtomicU64; smp::MAX_VCPUS] = [const { AtomicU64::new(0) }; smp::MAX_VCPUS];
        smp::run_parallel(
            &|v| {
                let (dt, moved) = spin(v);
                times[v].store(dt, Ordering::Relaxed);
                overlap[v].store(moved as u64, Ordering::Relaxed);
            },
            JOB_LIMIT_NS,
        );
        together = times
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        overlapped = overlap
            .iter()
            .take(n)
            .all(|o| o.load(Ordering::Relaxed) == 1);
    }
    let mut r = Report::new("smp_parallel");
    r.count("vcpus", n);
    r.count("alone_us", alone / 1000);
    r.count("together_us", together / 1000);
    r.count(
        "ratio",
        format!("{:.2}", together as f64 / alone.max(1) as f64),
    );
    r.count("attempts", attempts);
    r.check("vcpus-up", n >= 2);
    r.check("progress-overlapped", overlapped);
    r
}

/// The parallel scenarios at batch sizes 1, 32 and 256 (`batch=N`: only
/// N), scenario 6, and (with `sweep=R`, R rounds per point) the
/// measurements; `jobs=0` runs the measurements alone.
fn run_smp(guest: &Guest, cmd: &[u8]) -> bool {
    let rounds = arg(cmd, "rounds").unwrap_or(200) as usize;
    let controls = arg(cmd, "controls").unwrap_or(40) as usize;
    let sweep = arg(cmd, "sweep").unwrap_or(0);
    guest.rec.set_recording(false);
    let mut all = true;
    let mut emit = |r: &Report| {
        all &= r.passed();
        let _ = writeln!(Console, "{}", r.line());
    };
    emit(&parallel_check());
    let scratch = smp_scenarios::Scratch::new(guest.writers());
    let batches: &[usize] = match arg(cmd, "batch") {
        Some(n) => &[n as usize][..],
        None => &[1, 32, 256],
    };
    let jobs = arg(cmd, "jobs").unwrap_or(1) != 0;
    for &batch in batches.iter().filter(|_| jobs) {
        for job in smp_scenarios::jobs(batch, rounds, controls) {
            let t0 = smp::now_ns();
            let mut r = smp_scenarios::run_job(guest, &job, &scratch);
            let ms = format!("ms={}", (smp::now_ns() - t0) / 1_000_000);
            r.info = if r.info.is_empty() {
                ms
            } else {
                format!("{ms},{}", r.info)
            };
            emit(&r);
        }
    }
    if jobs {
        emit(&smp_scenarios::unpin_under_base_pointer(guest));
    }
    if sweep != 0 {
        smp_scenarios::sweep(guest, sweep as usize, &mut |l| {
            let _ = writeln!(Console, "{l}");
        });
    }
    let (faults, skipped) = smp::fault_totals();
    let c = &smp::CPUS;
    let _ = writeln!(
        Console,
        "PAGEPIN-GUEST smp faults={faults} skipped={skipped} cr2_match={} last_fault=vcpu1:cr2={:#x},err={:#x},rip={:#x}",
        c.iter().map(|c| c.cr2_match.load(Ordering::Relaxed)).sum::<u64>(),
        c[1].last_cr2.load(Ordering::Relaxed),
        c[1].last_err.load(Ordering::Relaxed),
        c[1].last_rip.load(Ordering::Relaxed)
    );
    all
}

/// Rust entry, called by `_start` on the guest's own stack.
#[no_mangle]
extern "C" fn guest_main(si: *const StartInfo) -> ! {
    // SAFETY: Xen passes a pointer to the start_info page, mapped in the
    // initial mapping for the whole life of the guest.
    let si: &'static StartInfo = unsafe { &*si };
    let _ = writeln!(
        Console,
        "PAGEPIN-GUEST boot nr_pages={} pt_base={:#x} nr_pt_frames={} mfn_list={:#x}",
        si.nr_pages, si.pt_base, si.nr_pt_frames, si.mfn_list
    );
    // SAFETY: Xen maps the p2m (nr_pages u64s) at mfn_list for the guest.
    let p2m_raw =
        unsafe { core::slice::from_raw_parts(si.mfn_list as *const u64, si.nr_pages as usize) };
    let Some(p2m) = P2m::new(p2m_raw.to_vec()) else {
        panic!("p2m maps two pfns to one mfn");
    };
    // SAFETY: POOL is zeroed .bss memory used only through this store from
    // here on; all-zero bytes are a valid `[Frame]` (arrays of AtomicU64),
    // and the cast keeps size and 4096-byte alignment.
    let frames: &'static [Frame] = unsafe {
        core::slice::from_raw_parts(core::ptr::addr_of!(POOL) as *const Frame, POOL_FRAMES)
    };
    let base = frames.as_ptr() as u64 >> 12;
    // SAFETY: the magic page is written once, before any scenario maps it.
    unsafe { core::ptr::addr_of_mut!(DATA.0[MAGIC_PAGE][0]).write_volatile(MAGIC) };
    let rec = Arc::new(Recorder::new(RealXen));
    let backend = Arc::new(XenBackend::new(rec.clone(), p2m).with_direct_map_base(0));
    let guest = Guest {
        si,
        rec,
        backend,
        store: Arc::new(FrameStore::from_static(frames, base)),
        pool: (base, base + POOL_FRAMES as u64),
        saved: AtomicU64::new(0),
    };
    let vcpus = arg(&si.cmd_line, "vcpus").unwrap_or(0) as usize;
    let boot_l4 = guest.boot_root().0;
    match smp::init(si.shared_info, boot_l4, vcpus) {
        Ok(n) => {
            let _ = writeln!(
                Console,
                "PAGEPIN-GUEST vcpus up={n} bringup_us={}",
                smp::BRINGUP_NS.load(Ordering::Relaxed) / 1000
            );
        }
        Err(e) => panic!("vCPU bring-up failed: {e}"),
    }
    let all = if arg(&si.cmd_line, "diff").is_some() {
        diff::run(si, guest.p2m())
    } else if vcpus == 0 {
        scenarios::run_all(&guest, &mut |r| {
            let _ = writeln!(Console, "{}", r.line());
        })
    } else {
        run_smp(&guest, &si.cmd_line)
    };
    let verdict = if all { "pass" } else { "fail" };
    let _ = writeln!(
        Console,
        "PAGEPIN-GUEST done verdict={verdict} platform={}",
        Guest::NAME
    );
    hypercall::qemu_exit(if all { rt::EXIT_PASS } else { rt::EXIT_FAIL })
}
