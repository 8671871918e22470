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

mod hypercall;
mod rt;
#[allow(dead_code)]
mod scenarios;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use pagepin_backends::xen::{
    FrameMap, MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, P2m, XenBackend, XenHypercalls, DOMID_SELF,
};
use pagepin_engine::backend::StoreFault;
use pagepin_engine::lock::SpinLock;
use pagepin_engine::{EntryFlags, Frame, FrameStore, Mfn, PageTableEntry, Pfn};

use hypercall::{hypercall5, nr};
use rt::Console;
use scenarios::{Platform, Recorder, DATA_PAGES, MAGIC, MAGIC_PAGE};

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
}

const _: () = assert!(core::mem::offset_of!(StartInfo, mfn_list) == 104);
const _: () = assert!(core::mem::offset_of!(StartInfo, pt_base) == 88);

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
        _mfn: Mfn,
        _index: usize,
        value: u64,
    ) -> Result<(), StoreFault> {
        // A plain store: into a read-only (pinned) L1 Xen traps and
        // emulates it; the engine never stores into other read-only tables.
        slot.store(value, Ordering::Release);
        Ok(())
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
    fn data_pfn(&self, i: usize) -> Pfn {
        Pfn(Self::data_va(i) >> 12)
    }
    fn mapping_writable(&self, pfn: Pfn) -> Option<bool> {
        let (slot, _) = self.boot_l1e(pfn.0 << 12)?;
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        e.is_present().then_some(e.is_writable())
    }
    fn typed(&self, _pfn: Pfn) -> Option<bool> {
        None
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
    let all = scenarios::run_all(&guest, &mut |r| {
        let _ = writeln!(Console, "{}", r.line());
    });
    let verdict = if all { "pass" } else { "fail" };
    let _ = writeln!(
        Console,
        "PAGEPIN-GUEST done verdict={verdict} platform={}",
        Guest::NAME
    );
    hypercall::qemu_exit(if all { rt::EXIT_PASS } else { rt::EXIT_FAIL })
}
