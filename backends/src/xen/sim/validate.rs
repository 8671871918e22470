//! Validation and devalidation of page tables: the per-entry checks and
//! references of docs/PROTOCOL.md §6 (rules 3, 7, 9), partial validation
//! (Xen's `PGT_partial`), linear page-table entries, and the checked
//! replacement of one entry.

use std::ops::Range;

use pagepin_engine::errno;
use pagepin_engine::Level;
use pagepin_engine::{EntryFlags, PageTableEntry};
use pagepin_engine::{Mfn, Pfn, ENTRIES_PER_FRAME};

use crate::sync::{AtomicU64, Ordering};
use core::sync::atomic::AtomicU64 as EntryWord;

use super::stats::Local;
use super::types::{hold, FrameType, COUNT_MASK, PARTIAL, PARTIAL_HELD, TYPE_MASK, VALIDATED};
use super::{XenSim, R};

/// How many entries ahead of the one being checked a (de)validation
/// prefetches the referenced frame's `type_info`.
const PREFETCH_AHEAD: usize = 16;

/// Bits that may change on the `mmu_update` fast path (XSA-182): accessed,
/// dirty, NX, user, global and the software-available bits (9..=11 and
/// all of 52..=62, Xen's `_PAGE_AVAIL_HIGH`).
pub(super) const FAST_PATH_BITS: u64 = EntryFlags::ACCESSED.bits()
    | EntryFlags::DIRTY.bits()
    | EntryFlags::NO_EXECUTE.bits()
    | EntryFlags::USER.bits()
    | EntryFlags::GLOBAL.bits()
    | EntryFlags::AVAILABLE.bits()
    | (0x7ff << 52);

/// Flags a guest may set in any entry: Xen's `base_disallow_mask`
/// complement (P, RW, U, A, D, available bits 9..=11 and 52..=62, NX).
const BASE_ALLOWED: u64 = EntryFlags::PRESENT.bits()
    | EntryFlags::WRITABLE.bits()
    | EntryFlags::USER.bits()
    | EntryFlags::ACCESSED.bits()
    | EntryFlags::DIRTY.bits()
    | (0b111 << 9)
    | (0x7ff << 52)
    | EntryFlags::NO_EXECUTE.bits();
/// Cache attributes (PWT, PCD, PAT): in L1 entries only for a domain with
/// I/O resources (Xen's `l1_disallow_mask`).
const CACHE_ATTRS: u64 =
    EntryFlags::PWT.bits() | EntryFlags::PCD.bits() | EntryFlags::PAT_4K.bits();
/// Bits an L1 entry may carry besides its frame (Xen's `L1_DISALLOW_MASK`
/// complement: GLOBAL allowed), without I/O resources. Bit 62 included:
/// real Xen 4.17 (64-bit PV) accepts it in an L1 entry (differential
/// programs, `tests/xen_sim_regressions.rs`).
const L1_ALLOWED: u64 = BASE_ALLOWED | EntryFlags::GLOBAL.bits();

/// Bits an L2..L4 entry may carry besides its frame: no PWT, PCD, PS, G.
const TABLE_ALLOWED: u64 = BASE_ALLOWED;
/// Bits a PAE root (L3) entry may carry: present, PWT, PCD, available.
const PAE_ROOT_ALLOWED: u64 =
    EntryFlags::PRESENT.bits() | EntryFlags::PWT.bits() | EntryFlags::PCD.bits() | ((0b111) << 9);

/// The entry a table validation refused (see [`XenSim::take_refusal`]):
/// what Xen's log names when a pin fails deep inside a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The table holding the entry.
    pub mfn: Mfn,
    /// Its level.
    pub level: Level,
    /// The entry's index.
    pub index: usize,
    /// The entry.
    pub entry: u64,
    /// The errno (positive).
    pub errno: i32,
}

impl XenSim {
    fn table_slots(&self, level: Level) -> (usize, Range<usize>) {
        if level == self.cfg.root_level {
            (self.cfg.root_entries, self.cfg.hypervisor_hole.clone())
        } else {
            (ENTRIES_PER_FRAME, 0..0)
        }
    }
}

impl XenSim {
    /// Start fetching the `type_info` word of the frame entry `e` maps (for
    /// writing: the reference counting will change it), so the misses of
    /// a table's entries overlap instead of serialising behind each
    /// locked compare-and-swap. Only a hint: no effect on the state.
    #[inline(always)]
    fn prefetch_entry(&self, e: u64) {
        #[cfg(all(target_arch = "x86_64", not(any(loom, shuttle))))]
        if e & EntryFlags::PRESENT.bits() != 0 {
            let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
            if let Some(w) = self.type_info.get(mfn as usize) {
                use core::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
                // SAFETY: a prefetch has no architectural effect; the
                // address is that of a live `AtomicU64`.
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(w.as_ptr().cast::<i8>()) };
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(any(loom, shuttle)))))]
        let _ = e;
    }

    pub(super) fn table_memory(&self, mfn: u64) -> R<&pagepin_engine::Frame> {
        let pfn = *self
            .m2p
            .get(usize::try_from(mfn).map_err(|_| errno::EINVAL)?)
            .ok_or(errno::EINVAL)?;
        self.mem.frame(Pfn(pfn)).ok_or(errno::EINVAL)
    }

    /// Validate table `mfn` at `level` (its page lock is held): take the
    /// references of every present entry. `from`: the entry to start at and
    /// whether it already holds a partial child (resuming a [`PARTIAL`]
    /// table), else `(0, false)`.
    ///
    /// On failure an L1 undoes its references; an L2..L4 failing at entry
    /// `i > 0` keeps those of entries `0..i` and becomes the request's
    /// `old_guest_table` (`l.ogt`), as Xen 4.17 does, to be torn down when
    /// the request ends. Not inlined: its 4 KiB snapshot would make every
    /// `get_type` (most take a writable reference and never validate)
    /// probe a 4 KiB stack frame.
    #[inline(never)]
    pub(super) fn validate(&self, mfn: u64, level: Level, from: (usize, bool), l: &mut Local) -> R {
        let frame = self.table_memory(mfn)?;
        let (n, hole) = self.table_slots(level);
        let mut snap = [0u64; ENTRIES_PER_FRAME];
        for (i, s) in snap.iter_mut().enumerate().take(n) {
            *s = frame.entry(i).load(Ordering::Acquire);
        }
        for &e in &snap[..n.min(PREFETCH_AHEAD)] {
            self.prefetch_entry(e);
        }
        // A table being validated starts with no linear entries (Xen
        // resets `linear_pt_count`), unless it resumes.
        let (start, start_held) = from;
        if let (Ok(f), 0) = (self.frame(mfn), start) {
            f.cold.linear.store(0, Ordering::Release);
        }
        for i in start..n {
            if let Some(&ahead) = snap[..n].get(i + PREFETCH_AHEAD) {
                self.prefetch_entry(ahead);
            }
            if hole.contains(&i) {
                continue;
            }
            // Xen rewrites each entry it accepts with the PV adjustment
            // (`adjust_guest_entry`), in place, even when a later entry
            // then fails the validation (real Xen 4.17, differential
            // programs).
            let adj = self.adjust_guest_entry(level, snap[i]);
            let adj = match self.get_entry_refs(level, adj, mfn, false, l) {
                Ok(v) => v,
                Err(e) => {
                    self.refusal.lock().get_or_insert(Refusal {
                        mfn: Mfn(mfn),
                        level,
                        index: i,
                        entry: snap[i],
                        errno: e,
                    });
                    if level == Level::L1 {
                        for j in (0..i).rev() {
                            if !hole.contains(&j) {
                                self.put_entry_refs(level, snap[j], mfn, l);
                            }
                        }
                    } else if i > 0 {
                        self.keep_partial(mfn, i, snap[i], i == start && start_held, l);
                    }
                    return Err(e);
                }
            };
            if adj != snap[i] {
                frame.entry(i).store(adj, Ordering::Release);
                snap[i] = adj;
            }
        }
        // A validated L4 gets the hypervisor's slots (Xen's
        // `init_xen_l4_slots`), whatever the guest left there.
        if let (Level::L4, Some(slots)) = (level, &self.cfg.l4_xen_slots) {
            for i in hole {
                let v = slots
                    .iter()
                    .find(|s| s.0 == i)
                    .map_or(0, |&(_, f, flags)| (f.unwrap_or(mfn) << 12) | flags);
                frame.entry(i).store(v, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Table `mfn` failed its validation at entry `i > 0` (entry `e`):
    /// leave it partially validated, as the request's `old_guest_table`.
    /// `held`: entry `i` already held a partial child when it resumed.
    fn keep_partial(&self, mfn: u64, i: usize, e: u64, held: bool, l: &mut Local) {
        let child = (e & PageTableEntry::ADDR_MASK) >> 12;
        // A child left partial by this failure is the request's
        // `old_guest_table`: entry `i` takes over its reference. Any other
        // one (a grandchild, when the child failed at its first entry) Xen
        // 4.17 overwrites and never tears down: it stays partial, with
        // its references, until a request of its type resumes it.
        let held = match l.ogt {
            Some(g) if g == child && e & EntryFlags::PRESENT.bits() != 0 => true,
            Some(_) => {
                l.lost_partials += 1;
                held
            }
            None => held,
        };
        if let Ok(f) = self.frame(mfn) {
            let flag = if held { PARTIAL_HELD } else { 0 };
            f.cold.partial.store(i as u64 | flag, Ordering::Release);
        }
        l.ogt = Some(mfn);
        l.partial_validations += 1;
    }

    /// Tear down a [`PARTIAL`] table (Xen's `put_old_guest_table`): drop
    /// the references of the entries it had accepted, last first, and of a
    /// partial child it holds; then untype it. Nothing if it is no longer
    /// partial (resumed meanwhile).
    fn put_partial(&self, mfn: u64, l: &mut Local) {
        let Ok(f) = self.frame(mfn) else { return };
        let x = loop {
            let x = f.type_info.load(Ordering::Acquire);
            if x & PARTIAL == 0 {
                return;
            }
            // Its one reference is the partial state's: clearing the bit
            // makes others wait, as for a validation.
            if f.type_info
                .compare_exchange_weak(x, x & !PARTIAL, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break x;
            }
        };
        let Some(level) = FrameType::from_bits(x).level() else {
            return;
        };
        let p = f.cold.partial.load(Ordering::Acquire);
        let nv = (p & 0xffff) as usize;
        {
            let _g = hold(f.lock);
            if let Ok(frame) = self.table_memory(mfn) {
                let (_, hole) = self.table_slots(level);
                if p & PARTIAL_HELD != 0 {
                    let e = frame.entry(nv).load(Ordering::Acquire);
                    let child = (e & PageTableEntry::ADDR_MASK) >> 12;
                    if e & EntryFlags::PRESENT.bits() != 0 && child != mfn {
                        self.put_partial(child, l);
                    }
                }
                for j in (0..nv).rev() {
                    if !hole.contains(&j) {
                        let e = frame.entry(j).load(Ordering::Acquire);
                        self.put_entry_refs(level, e, mfn, l);
                    }
                }
            }
        }
        self.stamp(f, x);
        f.type_info.store(0, Ordering::Release);
        l.devalidations += 1;
    }

    /// End of a request: tear down the table its failed validation left
    /// partial (Xen does it before the next request, or the guest, runs).
    pub(super) fn put_old_guest_table(&self, l: &mut Local) {
        if let Some(m) = l.ogt.take() {
            self.put_partial(m, l);
        }
    }

    pub(super) fn devalidate(&self, mfn: u64, level: Level, l: &mut Local) {
        let Ok(frame) = self.table_memory(mfn) else {
            return;
        };
        let (n, hole) = self.table_slots(level);
        for i in 0..n.min(PREFETCH_AHEAD) {
            self.prefetch_entry(frame.entry(i).load(Ordering::Relaxed));
        }
        for i in 0..n {
            if i + PREFETCH_AHEAD < n {
                self.prefetch_entry(frame.entry(i + PREFETCH_AHEAD).load(Ordering::Relaxed));
            }
            if !hole.contains(&i) {
                self.put_entry_refs(level, frame.entry(i).load(Ordering::Acquire), mfn, l);
            }
        }
    }

    /// Check entry `e` of table `table` (machine frame; `u64::MAX` for the
    /// direct map) at `level` and take the references it needs (rule 3).
    /// Returns the entry as Xen stores it: an L1 entry of I/O memory
    /// mapped cacheable is made uncacheable.
    pub(super) fn get_entry_refs(
        &self,
        level: Level,
        e: u64,
        table: u64,
        direct: bool,
        l: &mut Local,
    ) -> R<u64> {
        let pte = PageTableEntry::from_bits(e);
        if !pte.is_present() {
            return Ok(e);
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        let flags = e & !PageTableEntry::ADDR_MASK;
        if level == Level::L1 {
            // Flags first, as Xen's get_page_from_l1e.
            self.check_flags_only(level, e)?;
            if self.is_io_frame(mfn) {
                // I/O memory: mapped without references, if permitted,
                // and never cacheable (Xen flips WB/WT/WP to UC).
                return if self.cfg.io_privileged {
                    Ok(e ^ io_cache_flip(e))
                } else {
                    Err(errno::EPERM)
                };
            }
            if !self.owned(mfn) {
                // Dom0 (real Xen 4.17, differential programs): beyond any
                // machine address, I/O memory it is not permitted
                // (-EPERM); below, memory of another owner (the
                // hypervisor's), which Xen cannot reference (-EBUSY),
                // read-only or not. Other domains keep the simulator's
                // plain -EINVAL.
                return Err(if !self.cfg.io_privileged {
                    errno::EINVAL
                } else if e & PageTableEntry::RESERVED_ADDR_BITS != 0 {
                    errno::EPERM
                } else {
                    errno::EBUSY
                });
            }
            if pte.is_writable() {
                self.get_type(mfn, FrameType::Writable, direct, l)
                    .map_err(|_| errno::EBUSY)?;
            }
            return Ok(e);
        }
        let allowed = if level == self.cfg.root_level && self.cfg.root_entries == 4 {
            PAE_ROOT_ALLOWED
        } else {
            TABLE_ALLOWED
        };
        if flags & !allowed != 0 {
            // PS (large pages) included: refused as Xen PV does.
            return Err(errno::EINVAL);
        }
        if !self.owned(mfn) {
            return Err(errno::EINVAL);
        }
        let child = level.child().ok_or(errno::EINVAL)?;
        match self.get_type(mfn, FrameType::table(child), direct, l) {
            // A table of the entry's own level, mapped read-only: a linear
            // page table (Xen's `opt_pv_linear_pt`, on by default).
            Err(errno::EINVAL) if self.get_linear(level, e, table, l) => Ok(e),
            r => r.map(|()| e),
        }
    }

    /// Accept entry `e` of table `table` (at `level` >= L2) as a linear
    /// page-table entry if Xen would: read-only; mapping the table itself
    /// (no reference), or another validated table of the same level that
    /// has no linear entries of its own, from a table nobody maps
    /// linearly (a type reference, counted on both).
    fn get_linear(&self, level: Level, e: u64, table: u64, l: &mut Local) -> bool {
        if e & EntryFlags::WRITABLE.bits() != 0 {
            return false;
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        if mfn == table {
            l.linear_entries += 1;
            return true;
        }
        let (Ok(pt), Ok(pg)) = (self.frame(table), self.frame(mfn)) else {
            return false;
        };
        let bump = |c: &AtomicU64, up: bool| {
            let mut x = c.load(Ordering::Acquire);
            loop {
                let n = (x as i64) + if up { 1 } else { -1 };
                if (up && n <= 0) || (!up && n >= 0) {
                    return false;
                }
                match c.compare_exchange_weak(x, n as u64, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return true,
                    Err(y) => x = y,
                }
            }
        };
        if !bump(&pt.cold.linear, true) {
            return false;
        }
        if !bump(&pg.cold.linear, false) {
            pt.cold.linear.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let want = FrameType::table(level).bits() | VALIDATED;
        loop {
            let x = pg.type_info.load(Ordering::Acquire);
            if x & (TYPE_MASK | VALIDATED) != want || x & COUNT_MASK == COUNT_MASK {
                pg.cold.linear.fetch_add(1, Ordering::AcqRel);
                pt.cold.linear.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            if pg
                .type_info
                .compare_exchange_weak(x, x + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                l.linear_entries += 1;
                return true;
            }
        }
    }

    pub(super) fn put_entry_refs(&self, level: Level, e: u64, table: u64, l: &mut Local) {
        let pte = PageTableEntry::from_bits(e);
        if !pte.is_present() {
            return;
        }
        let mfn = (e & PageTableEntry::ADDR_MASK) >> 12;
        match level {
            Level::L1 => {
                if pte.is_writable() && !self.is_io_frame(mfn) && self.owned(mfn) {
                    self.put_type(mfn, l);
                }
            }
            // A table's entry mapping the table itself held nothing.
            _ if mfn == table => {}
            _ => self.put_type_from(mfn, Some(table), l),
        }
    }

    /// Whether the domain owns machine frame `mfn`. The p2m is a bijection
    /// of `0..nr_pages` onto `0..nr_pages`, so this is exactly "the m2p has
    /// an entry for `mfn`", answered without a read of the m2p (a random
    /// access per entry an L1 validation checks).
    #[inline]
    pub(super) fn owned(&self, mfn: u64) -> bool {
        mfn < self.cfg.nr_pages as u64
    }

    /// Whether `mfn` is I/O memory of the domain's range (not its RAM).
    fn is_io_frame(&self, mfn: u64) -> bool {
        !self.cfg.io_frames.is_empty() && self.cfg.io_frames.iter().any(|r| r.contains(&mfn))
    }

    /// What a 64-bit PV guest's new entry becomes before Xen checks and
    /// writes it (Xen's `adjust_guest_l*e`; the guest kernel runs in ring
    /// 3): a present L1 entry without USER is a kernel page, marked USER
    /// and GUEST_KERNEL (bit 52); one that is not a kernel page is made
    /// USER | GLOBAL; present L2/L3 entries get USER, L4 entries USER and
    /// ACCESSED. Real Xen 4.17 stores `0x167` for a written `0x067`.
    pub(super) fn adjust_guest_entry(&self, level: Level, new: u64) -> u64 {
        const GUEST_KERNEL: u64 = 1 << 52;
        let user = EntryFlags::USER.bits();
        if self.cfg.root_level != Level::L4 || new & EntryFlags::PRESENT.bits() == 0 {
            return new;
        }
        match level {
            Level::L1 => {
                let mut e = new;
                if e & user == 0 {
                    e |= user | GUEST_KERNEL;
                }
                if e & GUEST_KERNEL == 0 {
                    e |= user | EntryFlags::GLOBAL.bits();
                }
                e
            }
            Level::L2 | Level::L3 => new | user,
            Level::L4 | Level::L5 => new | user | EntryFlags::ACCESSED.bits(),
        }
    }

    /// Replace entry `index` of table `mfn` (level `level`, page lock held,
    /// a type reference held) with `new`, checked (rules 7 and 9).
    /// `preserve_ad`: the old entry's A/D bits are or-ed into the new one
    /// (`MMU_PT_UPDATE_PRESERVE_AD`); `emulated`: a guest store Xen
    /// emulates (no fast path: every present entry is checked in full).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update_entry(
        &self,
        mfn: u64,
        level: Level,
        index: usize,
        new: u64,
        slot: &EntryWord,
        preserve_ad: bool,
        emulated: bool,
        l: &mut Local,
    ) -> R {
        let (n, hole) = self.table_slots(level);
        if index >= n || hole.contains(&index) {
            return Err(errno::EINVAL);
        }
        let new = self.adjust_guest_entry(level, new);
        let old = slot.load(Ordering::Acquire);
        let ad = EntryFlags::ACCESSED.bits() | EntryFlags::DIRTY.bits();
        let write = |v: u64| {
            let v = if preserve_ad { v | (old & ad) } else { v };
            slot.store(v, Ordering::Release);
        };
        let (o, nw) = (
            PageTableEntry::from_bits(old),
            PageTableEntry::from_bits(new),
        );
        if !emulated
            && o.is_present()
            && nw.is_present()
            && o.addr() == nw.addr()
            && (old ^ new) & !FAST_PATH_BITS == 0
        {
            // Fast path: nothing the references depend on changed. Still
            // refuse flags the level does not allow.
            self.check_flags_only(level, new)?;
            write(new);
            l.fast_path_updates += 1;
            return Ok(());
        }
        let new = self.get_entry_refs(level, new, mfn, true, l)?;
        write(new);
        self.put_entry_refs(level, old, mfn, l);
        l.full_updates += 1;
        if level != Level::L1 {
            l.table_entry_updates += 1;
        }
        Ok(())
    }

    pub(super) fn check_flags_only(&self, level: Level, e: u64) -> R {
        let flags = e & !PageTableEntry::ADDR_MASK;
        let allowed = match level {
            Level::L1 if self.cfg.io_privileged => L1_ALLOWED | CACHE_ATTRS,
            Level::L1 => L1_ALLOWED,
            _ if level == self.cfg.root_level && self.cfg.root_entries == 4 => PAE_ROOT_ALLOWED,
            _ => TABLE_ALLOWED,
        };
        if flags & !allowed != 0 {
            Err(errno::EINVAL)
        } else {
            Ok(())
        }
    }
}

/// The cache bits Xen flips in an L1 entry of I/O memory: write-back,
/// write-through and write-protect become uncacheable (PCD | PWT);
/// UC-, UC and WC stay.
fn io_cache_flip(e: u64) -> u64 {
    let (pwt, pcd, pat) = (
        EntryFlags::PWT.bits(),
        EntryFlags::PCD.bits(),
        EntryFlags::PAT_4K.bits(),
    );
    match e & (pwt | pcd | pat) {
        0 => pwt | pcd,
        a if a == pwt || a == pwt | pat => pcd | (a & pat),
        _ => 0,
    }
}
