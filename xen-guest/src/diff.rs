//! The differential run (`diff=1` on the command line): random PV MMU
//! programs (`program.rs`) on real Xen, one line per program, for the host
//! test `tests/real_xen_diff.rs` to compare with `XenSim`.
//!
//! Command line: `diff=1 seed=S programs=P ops=N [first=K] [detail=1]`
//! runs programs `K..K+P` of seed `S`; with a boot module (dom0's
//! "initrd") the programs are the module's words instead
//! (`program::encode_all`), which is how the host sends a shrunk one.

use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use pagepin_backends::xen::{FrameMap, MmuExtOpAbi, MmuUpdateAbi, P2m, XenHypercalls, DOMID_SELF};
use pagepin_engine::{Mfn, Pfn};

use crate::program::{self, Sym, Target, POOL};
use crate::rt::Console;
use crate::{arg, smp, RealXen, StartInfo};

#[repr(C, align(4096))]
struct Pool([[u64; 512]; POOL]);

/// The programs' frames: .bss, so in Xen's initial mapping with virtual
/// address = pseudo-physical address.
static mut DIFF_POOL: Pool = Pool([[0; 512]; POOL]);

/// A vCPU mask naming vCPU 0 (the valid mask pointer's target).
static MASK: AtomicU64 = AtomicU64::new(1);

/// A pointer no guest can pass: non-canonical (and 8-byte aligned, so it
/// fits in `update_va_mapping`'s flags).
const BAD_PTR: u64 = 0x8000_0000_0000_0000;

struct Real<'a> {
    si: &'a StartInfo,
    p2m: &'a P2m,
    xen: RealXen,
    base_pfn: u64,
    mfns: [u64; POOL],
    boot: u64,
    xen_mfn: u64,
}

impl Real<'_> {
    /// The boot tables' L1 entry for `va`.
    fn boot_l1e(&self, va: u64) -> Option<&'static AtomicU64> {
        let mut table = self.si.pt_base;
        for level in (1..=4u32).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            // SAFETY: `table` is the virtual address of a boot page-table
            // frame (pt_base, or one found through the p2m: boot tables lie
            // in the initial mapping where virtual = pseudo-physical);
            // entries are aligned words.
            let slot: &'static AtomicU64 = unsafe { &*((table + idx * 8) as *const AtomicU64) };
            if level == 1 {
                return Some(slot);
            }
            let e = slot.load(Ordering::Acquire);
            if e & 1 == 0 || e & 0x80 != 0 {
                return None;
            }
            table = self.p2m.to_pfn(Mfn((e & program::ADDR_MASK) >> 12))?.0 << 12;
        }
        None
    }

    fn ext(&self, cmd: u32, arg1: u64) -> i64 {
        let op = MmuExtOpAbi {
            cmd,
            _pad: 0,
            arg1,
            arg2: 0,
        };
        let mut done = 0;
        // SAFETY: one live op and counter.
        unsafe { self.xen.mmuext_op(&op, 1, &mut done, DOMID_SELF) }
    }

    /// Back to the state every program starts from: no user base pointer
    /// or LDT, nothing pinned, every frame mapped as at boot and zeroed.
    /// Returns whether that worked.
    fn reset(&self, dm_boot: &[u64]) -> bool {
        self.ext(program::cmd::NEW_USER_BASEPTR, 0);
        self.ext(program::cmd::SET_LDT, 0);
        // Unpinning a root releases its children: a few rounds undo any
        // nesting of pins.
        let unpin_all = || {
            for _ in 0..4 {
                for &m in &self.mfns {
                    self.ext(program::cmd::UNPIN, m);
                }
            }
        };
        // A table that maps itself or a peer (Xen's linear page tables)
        // keeps a type count without a pin: clear entries through Xen
        // (which works on typed tables too), then unpin again.
        let clear_all = || {
            for (i, &m) in self.mfns.iter().enumerate() {
                for k in 0..512 {
                    if self.slot(i, k).load(Ordering::Relaxed) != 0 {
                        let req = MmuUpdateAbi {
                            ptr: (m << 12) + k as u64 * 8,
                            val: 0,
                        };
                        let mut done = 0;
                        // SAFETY: one live request and counter.
                        unsafe { self.xen.mmu_update(&req, 1, &mut done, DOMID_SELF) };
                    }
                }
            }
        };
        unpin_all();
        clear_all();
        unpin_all();
        // A table whose failed nested validation Xen lost track of stays
        // partially validated (typed, entries frozen) until a request of
        // its type resumes it: pinning every frame at L2..L4 (and
        // unpinning what pins) tears every such table down; then clear
        // what it froze.
        for &m in &self.mfns {
            for level in 1..4 {
                if self.ext(program::cmd::PIN_L1 + level, m) == 0 {
                    self.ext(program::cmd::UNPIN, m);
                }
            }
        }
        clear_all();
        unpin_all();
        for (i, &d) in dm_boot.iter().enumerate() {
            if self.dm_entry(i) != d {
                self.xen.update_va_mapping(self.va(i), d, 2);
            }
        }
        for i in 0..POOL {
            for k in 0..512 {
                let s = self.slot(i, k);
                let v = s.load(Ordering::Relaxed);
                if v != 0 && !smp::guarded_store(s, 0) {
                    // What the frame can be pinned as now (a hint at what
                    // still holds it).
                    let mut pins = [0i64; 4];
                    for (level, r) in pins.iter_mut().enumerate() {
                        *r = self.ext(program::cmd::PIN_L1 + level as u32, self.mfns[i]);
                        if *r == 0 {
                            self.ext(program::cmd::UNPIN, self.mfns[i]);
                        }
                    }
                    let _ = writeln!(
                        Console,
                        "{}-RESET stuck P{i}[{k}]={} dm={} pins={pins:?}",
                        program::LINE,
                        program::show_entry(program::symbolize(self, v)),
                        program::show_entry(program::symbolize(self, self.dm_entry(i)))
                    );
                    return false;
                }
            }
        }
        program::pool_clean(self, dm_boot)
    }
}

impl Target for Real<'_> {
    type H = RealXen;
    fn hv(&self) -> &RealXen {
        &self.xen
    }
    fn mfn(&self, s: Sym) -> u64 {
        match s {
            Sym::Pool(i) => self.mfns[i as usize],
            Sym::Boot => self.boot,
            Sym::Io => program::IO_MFN,
            Sym::Far => program::FAR_MFN,
            Sym::Xen => self.xen_mfn,
        }
    }
    fn pfn(&self, i: usize) -> u64 {
        self.base_pfn + i as u64
    }
    fn va(&self, i: usize) -> u64 {
        self.pfn(i) << 12
    }
    fn slot(&self, i: usize, index: usize) -> &AtomicU64 {
        // SAFETY: the pool is a static of POOL frames of 512 aligned words
        // used only through these atomic views (and Xen).
        let w = unsafe { core::ptr::addr_of!(DIFF_POOL.0[i][index]) };
        // SAFETY: as above; `AtomicU64` has the layout of `u64`.
        unsafe { &*(w as *const AtomicU64) }
    }
    fn dm_entry(&self, i: usize) -> u64 {
        self.boot_l1e(self.va(i))
            .map_or(0, |s| s.load(Ordering::Acquire))
    }
    fn mask_ptr(&self, ok: bool) -> u64 {
        if ok {
            MASK.as_ptr() as u64
        } else {
            BAD_PTR
        }
    }
}

/// Run the differential programs; returns whether every reset worked.
pub fn run(si: &StartInfo, p2m: &P2m) -> bool {
    let cmd = &si.cmd_line;
    let base = core::ptr::addr_of!(DIFF_POOL) as u64;
    let base_pfn = base >> 12;
    let mfns = core::array::from_fn(|i| p2m.to_mfn(Pfn(base_pfn + i as u64)).map_or(0, |m| m.0));
    let boot = p2m.to_mfn(Pfn(si.pt_base >> 12)).map_or(0, |m| m.0);
    // A hypervisor frame: what the boot L4's first present Xen slot maps.
    let xen_mfn = (256..272)
        .map(|k| {
            // SAFETY: pt_base is the boot L4, mapped read-only for the
            // guest; an aligned word read.
            unsafe { ((si.pt_base + k * 8) as *const u64).read_volatile() }
        })
        .find(|e| e & 1 != 0)
        .map_or(0, |e| (e & program::ADDR_MASK) >> 12);
    let t = Real {
        si,
        p2m,
        xen: RealXen,
        base_pfn,
        mfns,
        boot,
        xen_mfn,
    };
    // Faulting stores are given up at the first fault (a program's store
    // is either emulated or a page fault; retrying changes nothing).
    smp::CPUS[smp::this_vcpu()]
        .retry_limit
        .store(1, Ordering::Relaxed);
    let dm_boot: Vec<u64> = (0..POOL).map(|i| t.dm_entry(i)).collect();
    let detail = arg(cmd, "detail").unwrap_or(0) != 0;
    let programs: Vec<program::Program> = if si.mod_len != 0 {
        // SAFETY: Xen maps dom0's module (mod_len bytes at virtual
        // address mod_start) in the initial mapping; it is u64-aligned
        // (page-aligned) and only read.
        let words = unsafe {
            core::slice::from_raw_parts(si.mod_start as *const u64, si.mod_len as usize / 8)
        };
        match program::decode_all(words) {
            Some(p) => p,
            None => {
                let _ = writeln!(
                    Console,
                    "PAGEPIN-GUEST panic verdict=fail msg=\"bad module\""
                );
                return false;
            }
        }
    } else {
        let seed = arg(cmd, "seed").unwrap_or(1);
        let n = arg(cmd, "programs").unwrap_or(32);
        let first = arg(cmd, "first").unwrap_or(0);
        let ops = arg(cmd, "ops").unwrap_or(200) as usize;
        (first..first + n)
            .map(|k| program::generate(program::program_seed(seed, k), ops))
            .collect()
    };
    let _ = writeln!(
        Console,
        "{} start programs={} pool={:#x} xen_mfn={:#x} module={}",
        program::LINE,
        programs.len(),
        base,
        xen_mfn,
        si.mod_len
    );
    let mut ok = true;
    let t0 = smp::now_ns();
    let mut total = 0;
    let mut scratch = program::Scratch::new();
    for (k, p) in programs.iter().enumerate() {
        let out = program::run(&t, p, detail, &mut scratch, &mut |l| {
            let _ = writeln!(Console, "{l}");
        });
        total += out.ops;
        let clean = t.reset(&dm_boot);
        ok &= clean;
        let _ = writeln!(
            Console,
            "{} p={k} seed={:#x} ops={} hash={:016x} reset={} probe={}",
            program::LINE,
            p.seed,
            out.ops,
            out.hash,
            if clean { "ok" } else { "fail" },
            out.probe
        );
        if !clean {
            break;
        }
    }
    let _ = writeln!(
        Console,
        "{}-END programs={} ops={total} ms={}",
        program::LINE,
        programs.len(),
        (smp::now_ns() - t0) / 1_000_000
    );
    ok
}
