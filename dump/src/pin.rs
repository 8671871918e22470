//! Would Xen accept this table as a PV guest's, and what would pinning it
//! cost?
//!
//! [`xen_check`] applies the rules of docs/PROTOCOL.md §6 (Xen's `xen/arch/x86/mm.c`)
//! to the user half of a table read from a dump, in the order Xen's
//! recursive validation visits it (root slots in order, each table's
//! entries in order, children before the next entry), and reports the first
//! rule broken:
//!
//! - allowed flags (rule 3): in L4, L3 and L2 entries only P, RW, U, A, D,
//!   the available bits 9..=11 and 52..=62, and NX; so PWT, PCD, global and
//!   PS (superpages: PV guests have none) are refused; in L1 entries global
//!   is allowed too, and PWT/PCD/PAT only for a domain with I/O resources;
//!   bit 62 (Xen's grant-table marker) never; refused flags are `-EINVAL`;
//! - frame ownership (rule 3): a leaf must map a frame of the guest (here:
//!   inside the dump's RAM); an MMIO frame only for an I/O-privileged
//!   domain (`-EPERM` otherwise, as Xen's `get_page_from_l1e`);
//! - types (rules 1 and 2): a frame has one type: a table is reached at one
//!   level only (`-EINVAL`), a frame mapped writable cannot become a table
//!   (`-EINVAL`) and a table frame cannot be mapped writable (`-EBUSY`).
//!
//! Writable mappings of table frames in the *kernel* half (the direct map)
//! are counted separately: they are what the pin protocol's read-only
//! remaps remove, not a reason to refuse.
//!
//! `inspect --pin-report` takes its verdict from `sim_check` (feature `xen`), which pins a
//! copy of the user half on the simulated hypervisor (`XenSim`) through
//! the engine; [`xen_check`] explains it (rule number, in words).
//!
//! [`engine_count`] copies the user half's tables into a [`FrameStore`],
//! pins the copy with the engine against a backend that accepts and counts
//! every call, and reports the engine's own figures: multicall entries,
//! hypercalls (flushes), tables, L1 pins, locks held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(feature = "xen")]
use pagepin_backends::xen::{P2m, SimConfig, XenBackend, XenSim};
use pagepin_engine::errno;
#[cfg(feature = "xen")]
use pagepin_engine::TableMemory;
use pagepin_engine::{
    AddressSpace, Backend, Batch, CallResult, Calls, DefaultRawLock, Error, FrameStore, Global,
    La57, Level, LockPolicy, PageTableEntry, PagingMode, Pfn, SpaceOptions, Split, X86_64,
};

use super::walk::{canonical, Walker};
use super::DumpError;

/// Bits refused in L4/L3/L2 entries: PWT, PCD, PS, G (Xen's
/// `base_disallow_mask` restricted to the flag bits).
pub const UPPER_DISALLOWED: u64 = (1 << 3) | (1 << 4) | (1 << 7) | (1 << 8);
/// Bits refused in L1 entries of every domain: bit 62 (`_PAGE_GNTTAB`).
pub const L1_ALWAYS_DISALLOWED: u64 = 1 << 62;
/// Cache attribute bits (PWT, PCD, PAT) refused in L1 entries of a domain
/// without I/O resources.
pub const L1_CACHE_ATTRS: u64 = (1 << 3) | (1 << 4) | (1 << 7);

/// The largest batch `--batch` accepts.
pub const MAX_BATCH: usize = 256;

/// What kind of domain the table is checked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenOptions {
    /// The domain has I/O resources (dom0, or a domU with passthrough):
    /// cache attributes and MMIO frames are allowed in L1 entries.
    pub io_privileged: bool,
}

/// The first rule broken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleBreak {
    /// The rule's number in docs/PROTOCOL.md §6.
    pub rule: u8,
    /// The errno Xen returns (positive).
    pub errno: i32,
    /// Level of the table holding the offending entry (or of the table that
    /// could not be typed).
    pub level: u8,
    /// Entry index.
    pub index: usize,
    /// First virtual address the entry covers.
    pub va: u64,
    /// Guest-physical address of the entry.
    pub entry_pa: u64,
    /// The entry.
    pub entry: u64,
    /// What is wrong, in words.
    pub what: String,
}

/// The result of [`xen_check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XenVerdict {
    /// The first rule broken; `None`: Xen would pin the table.
    pub broken: Option<RuleBreak>,
    /// Tables validated (until the first failure).
    pub tables_validated: usize,
    /// Leaf entries checked.
    pub leaves_checked: usize,
    /// Writable type references the user half's leaves would take.
    pub writable_refs: usize,
    /// Table frames of the user half that the kernel half maps writable
    /// (the pin protocol remaps these read-only before pinning).
    pub tables_mapped_writable_by_kernel: usize,
}

impl XenVerdict {
    /// Whether Xen would accept the pin.
    pub fn accepted(&self) -> bool {
        self.broken.is_none()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameType {
    /// Mapped writable by the leaf at this VA.
    Writable(u64),
    /// A table of this level.
    Table(Level),
}

struct Checker<'w, 'm> {
    w: &'w Walker<'m>,
    opts: XenOptions,
    types: HashMap<u64, FrameType>,
    v: XenVerdict,
}

fn level_name(l: Level) -> u8 {
    l.number()
}

impl Checker<'_, '_> {
    fn brk(
        &self,
        (rule, errno): (u8, i32),
        level: Level,
        table: u64,
        index: usize,
        va: u64,
        what: String,
    ) -> RuleBreak {
        RuleBreak {
            rule,
            errno,
            level: level_name(level),
            index,
            va: canonical(va),
            entry_pa: table + index as u64 * 8,
            entry: self.w.entry(table, index),
            what,
        }
    }

    /// Type `table` at `level` (taking a type reference), validating it the
    /// first time. `from` names the referring entry for messages.
    fn get_table(
        &mut self,
        table: u64,
        level: Level,
        first_va: u64,
        from: (Level, u64, usize),
    ) -> Result<Result<(), RuleBreak>, DumpError> {
        let frame = table >> 12;
        match self.types.get(&frame) {
            Some(FrameType::Table(l)) if *l == level => return Ok(Ok(())),
            Some(FrameType::Table(l)) => {
                let l = *l;
                return Ok(Err(self.brk(
                    (1, errno::EINVAL),
                    from.0,
                    from.1,
                    from.2,
                    first_va,
                    format!(
                        "frame {frame:#x} is already an L{} table and cannot also be typed L{} \
                         (one type per frame)",
                        l.number(),
                        level.number()
                    ),
                )));
            }
            Some(FrameType::Writable(va)) => {
                let va = *va;
                return Ok(Err(self.brk((2, errno::EINVAL),
                    from.0,
                    from.1,
                    from.2,
                    first_va,
                    format!(
                        "frame {frame:#x} is mapped writable (by the leaf at VA {va:#x}) and cannot \
                         become an L{} table",
                        level.number()
                    ),
                )));
            }
            None => {}
        }
        self.types.insert(frame, FrameType::Table(level));
        self.v.tables_validated += 1;
        let slots = if level == Level::L4 { 256 } else { 512 };
        for i in 0..slots {
            let e = self.w.entry(table, i);
            if e & 1 == 0 {
                continue;
            }
            let va = first_va | (i as u64) << level.shift();
            let leaf = self.w.is_leaf(level, table, i, e)?;
            if level != Level::L1 {
                let bad = e & UPPER_DISALLOWED;
                if bad != 0 {
                    let what = if bad & (1 << 7) != 0 {
                        format!(
                            "L{} entry has PS set: a {} superpage, which PV guests may not map",
                            level.number(),
                            if level == Level::L2 { "2 MiB" } else { "1 GiB" }
                        )
                    } else {
                        format!(
                            "L{} entry has disallowed flag bits {bad:#x} (PWT/PCD/PS/G are refused above L1)",
                            level.number()
                        )
                    };
                    return Ok(Err(self.brk((3, errno::EINVAL), level, table, i, va, what)));
                }
                debug_assert!(!leaf);
                let child = self.w.child(level, table, i, e, va)?;
                let child_level = level.child().unwrap_or(Level::L1);
                if let Err(b) = self.get_table(child, child_level, va, (level, table, i))? {
                    return Ok(Err(b));
                }
                continue;
            }
            self.v.leaves_checked += 1;
            let mut disallowed = L1_ALWAYS_DISALLOWED;
            if !self.opts.io_privileged {
                disallowed |= L1_CACHE_ATTRS;
            }
            let bad = e & disallowed;
            if bad != 0 {
                return Ok(Err(self.brk((3, errno::EINVAL),
                    level,
                    table,
                    i,
                    va,
                    format!(
                        "L1 entry has disallowed flag bits {bad:#x} (PWT/PCD/PAT need a domain with \
                         I/O resources; bit 62 is never allowed)"
                    ),
                )));
            }
            let pa = e & PageTableEntry::ADDR_MASK;
            let in_ram = self.w.mem().contains_page(pa);
            if !in_ram {
                if self.opts.io_privileged {
                    continue;
                }
                return Ok(Err(self.brk(
                    (3, errno::EPERM),
                    level,
                    table,
                    i,
                    va,
                    format!(
                        "L1 entry maps frame {:#x}, outside the guest's memory: not owned by the \
                         domain (only a domain with I/O-memory permission may map MMIO)",
                        pa >> 12
                    ),
                )));
            }
            if e & 2 != 0 {
                let frame = pa >> 12;
                match self.types.get(&frame) {
                    Some(FrameType::Table(l)) => {
                        let l = *l;
                        return Ok(Err(self.brk(
                            (2, errno::EBUSY),
                            level,
                            table,
                            i,
                            va,
                            format!(
                                "L1 entry maps frame {frame:#x}, an L{} table, writable",
                                l.number()
                            ),
                        )));
                    }
                    _ => {
                        self.types
                            .entry(frame)
                            .or_insert(FrameType::Writable(canonical(va)));
                        self.v.writable_refs += 1;
                    }
                }
            }
        }
        Ok(Ok(()))
    }
}

/// Check the user half of the table under `w` against Xen's rules for a PV
/// guest's root (a `MMUEXT_PIN_L4_TABLE` of the root).
pub fn xen_check(w: &Walker<'_>, opts: XenOptions) -> Result<XenVerdict, DumpError> {
    if w.la57() {
        return Err(DumpError::XenFourLevelOnly { root: w.root() });
    }
    let mut c = Checker {
        w,
        opts,
        types: HashMap::new(),
        v: XenVerdict::default(),
    };
    let r = c.get_table(w.root(), Level::L4, 0, (Level::L4, w.root(), 0))?;
    c.v.broken = r.err();
    // Table frames of the user half that the kernel half maps writable.
    let tables: Vec<u64> = c
        .types
        .iter()
        .filter(|(_, t)| matches!(t, FrameType::Table(_)))
        .map(|(f, _)| f << 12)
        .collect();
    if !tables.is_empty() {
        // Once per distinct leaf (not per path): the kernel half may hold
        // a recursive slot, and the set of frames is all that matters here.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        w.census_with(256..512, &mut |l, _| {
            if l.writable {
                ranges.push((l.phys, l.phys + l.size.bytes()));
            }
        })?;
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
                _ => merged.push(r),
            }
        }
        c.v.tables_mapped_writable_by_kernel = tables
            .iter()
            .filter(|&&pa| {
                let i = merged.partition_point(|r| r.0 <= pa);
                i > 0 && pa < merged[i - 1].1
            })
            .count();
    }
    Ok(c.v)
}

/// A backend that accepts every call and counts batches and calls.
#[derive(Default)]
pub struct CountingBackend {
    /// Batches issued (hypercalls: a multicall, or one direct call).
    pub batches: AtomicU64,
    /// Calls (multicall entries).
    pub calls: AtomicU64,
}

impl Backend for CountingBackend {
    const NAME: &'static str = "counting";
    const PINNING: bool = true;
    fn issue(&self, calls: Calls<'_>, _: &mut [CallResult]) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
    }
}

/// What pinning cost under one lock policy, as the engine did it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinCount {
    /// "split" or "global".
    pub policy: &'static str,
    /// The batch size.
    pub batch: usize,
    /// Multicall entries (calls) issued.
    pub entries: u64,
    /// Hypercalls issued (flushes: multicalls plus direct calls).
    pub hypercalls: u64,
    /// Of those, multicalls (2+ entries).
    pub multicalls: u64,
    /// Of those, direct calls (1 entry).
    pub direct_calls: u64,
    /// Table pages remapped read-only.
    pub tables: usize,
    /// Separate L1 pins.
    pub l1_pins: usize,
    /// Most locks held at once.
    pub max_locks_held: u32,
    /// The expected count: one remap per table page, one L1 pin per PTE
    /// page under split, one root pin (a user root adds its remap; its pin
    /// joins the root's `mmuext_op` entry).
    pub formula_entries: u64,
}

impl PinCount {
    /// `ceil(entries / batch)`: the multicalls the formula predicts.
    pub fn formula_hypercalls(&self) -> u64 {
        self.formula_entries.div_ceil(self.batch as u64)
    }
}

/// The user half's table pages, by address, with the level first met at;
/// and the set of leaves is not needed for pinning.
fn user_tables(w: &Walker<'_>) -> Result<Vec<(u64, Level)>, DumpError> {
    let mut out: Vec<(u64, Level)> = Vec::new();
    let mut seen: HashMap<u64, Level> = HashMap::new();
    w.walk(
        0..256,
        &mut |level, pa, _| {
            if level != w.top() && !seen.contains_key(&pa) {
                seen.insert(pa, level);
                out.push((pa, level));
            }
        },
        &mut |_| {},
    )?;
    Ok(out)
}

type Space<M, P> = AddressSpace<M, P, CountingBackend>;

/// Pin a copy of the user half under mode `M` (X86_64, or La57 for a
/// 5-level table) and policy `P`.
fn pin_copy<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>>(
    w: &Walker<'_>,
    tables: &[(u64, Level)],
    user_root: bool,
    batch: usize,
    policy: &'static str,
) -> Result<PinCount, Error> {
    // A separate user root is 64-bit PV's (M::HAS_USER_ROOT): La57 has none.
    let user_root = user_root && M::HAS_USER_ROOT;
    let frames = tables.len() + 2;
    let store = Arc::new(FrameStore::<DefaultRawLock>::new(frames, 0x100));
    let backend = Arc::new(CountingBackend::default());
    let space: Space<M, P> =
        AddressSpace::new(store.clone(), backend.clone(), SpaceOptions { user_root })?;
    let mut pfn_of: HashMap<u64, Pfn> = HashMap::new();
    pfn_of.insert(w.root(), space.root());
    for &(pa, level) in tables {
        if pfn_of.contains_key(&pa) {
            continue;
        }
        let pfn = store.alloc_table(level).ok_or(Error::OutOfFrames)?;
        pfn_of.insert(pa, pfn);
    }
    let mut roots = vec![space.root()];
    roots.extend(space.user_root());
    // Copy entries: table pointers retargeted to the copy, leaves verbatim.
    let copy = |src: u64, dst: Pfn, level: Level, slots: usize| {
        for i in 0..slots {
            let e = w.entry(src, i);
            let is_table =
                e & 1 != 0 && (level == w.top() || (level != Level::L1 && e & (1 << 7) == 0));
            let v = if is_table {
                match pfn_of.get(&(e & PageTableEntry::ADDR_MASK)) {
                    Some(p) => (e & !PageTableEntry::ADDR_MASK) | (p.0 << 12),
                    None => e,
                }
            } else {
                e
            };
            if let Some(slot) = store.entry(dst, i) {
                slot.store(v, Ordering::Release);
            }
        }
    };
    for &r in &roots {
        copy(w.root(), r, w.top(), 256);
    }
    for &(pa, level) in tables {
        if let Some(&p) = pfn_of.get(&pa) {
            copy(pa, p, level, 512);
        }
    }
    let mut b: Batch<MAX_BATCH> = Batch::with_limit(batch);
    let stats = space.pin(&mut b)?;
    let bs = b.stats();
    let l1 = tables.iter().filter(|t| t.1 == Level::L1).count() as u64;
    let split = policy == "split";
    // Remaps: every table page, the root and the user root; L1 pins under
    // split; one mmuext_op entry for the root pin, which the user root's pin
    // extends (consecutive mmuext_ops merge into one multicall entry).
    let formula_entries =
        tables.len() as u64 + 1 + u64::from(user_root) + if split { l1 } else { 0 } + 1;
    let count = PinCount {
        policy,
        batch,
        entries: bs.calls,
        hypercalls: bs.flushes,
        multicalls: bs.multicalls,
        direct_calls: bs.direct_calls,
        tables: stats.tables,
        l1_pins: stats.l1_ops,
        max_locks_held: stats.max_locks_held,
        formula_entries,
    };
    debug_assert_eq!(backend.calls.load(Ordering::Relaxed), bs.calls);
    let mut b2: Batch<MAX_BATCH> = Batch::with_limit(batch);
    space.unpin(&mut b2)?;
    Ok(count)
}

/// The engine's counts under the split and the global policy (each an
/// engine error if the engine refuses the table).
pub type PinCounts = (Result<PinCount, Error>, Result<PinCount, Error>);

/// The engine's cost of pinning the user half of the table under `w`, under
/// the split and the global policy, with batches of `batch` (1..=256).
/// `user_root`: the space has a separate user root (PTI / 64-bit PV).
pub fn engine_count(w: &Walker<'_>, user_root: bool, batch: usize) -> Result<PinCounts, DumpError> {
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(DumpError::BadArgument(format!(
            "batch size {batch} outside 1..={MAX_BATCH}"
        )));
    }
    let tables = user_tables(w)?;
    Ok(if w.la57() {
        (
            pin_copy::<La57, Split<DefaultRawLock>>(w, &tables, user_root, batch, "split"),
            pin_copy::<La57, Global<DefaultRawLock>>(w, &tables, user_root, batch, "global"),
        )
    } else {
        (
            pin_copy::<X86_64, Split<DefaultRawLock>>(w, &tables, user_root, batch, "split"),
            pin_copy::<X86_64, Global<DefaultRawLock>>(w, &tables, user_root, batch, "global"),
        )
    })
}

#[cfg(feature = "xen")]
pub use sim::sim_check;

/// The simulated hypervisor's verdict on pinning the user half of a
/// dumped table (see `sim_check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimVerdict {
    /// `None`: the simulator pinned (and unpinned) the table.
    pub refused: Option<SimRefusal>,
    /// Machine frames the simulated domain had: one per distinct frame the
    /// user half's leaves map, then the copies of its tables.
    pub nr_pages: usize,
    /// Hypercalls the pin (and unpin) trapped with.
    pub hypercalls: u64,
}

impl SimVerdict {
    /// Whether the simulator accepted the pin.
    pub fn accepted(&self) -> bool {
        self.refused.is_none()
    }
}

/// Why the simulator refused the pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRefusal {
    /// The errno (positive).
    pub errno: i32,
    /// The engine's error: the failing hypercall, or the engine's own
    /// refusal of the table (then no errno: 0).
    pub call: String,
    /// The entry the simulator's validation refused, in dump terms:
    /// (level, index, guest-physical address of the entry, entry, first
    /// VA it covers); `None` when the failure was not inside a validation.
    pub entry: Option<(u8, usize, u64, u64, u64)>,
}

#[cfg(feature = "xen")]
mod sim {
    use super::*;
    use super::{SimRefusal, SimVerdict};
    use pagepin_engine::PageSize;

    /// Pin the user half of the table under `w` on the simulated Xen
    /// hypervisor ([`XenSim`]), through the engine and [`XenBackend`] under the
    /// global policy (one `MMUEXT_PIN_L4_TABLE` validates the whole table
    /// recursively, in Xen's order), and report the first entry it refuses.
    ///
    /// The simulated domain is sized by what the check needs, never by the
    /// frame numbers the dump holds (a leaf may name any frame below 2^40):
    /// each distinct frame the user half's leaves map gets a dense machine
    /// frame number (in the dump's RAM: owned by the domain; outside it: I/O
    /// memory), identity-mapped, and the user half's tables are copied above
    /// them (the engine's frame store holds them there). Table pointers, and
    /// L1 leaves that map a table frame, are retargeted to the copies, other
    /// leaves to their dense frames; refusals are translated back. Xen's
    /// checks only compare frames, ask whether the domain owns them and
    /// whether they are I/O memory, so the verdict is the one over the
    /// dump's own frame numbers.
    pub fn sim_check(
        w: &Walker<'_>,
        opts: XenOptions,
        user_root: bool,
        batch: usize,
    ) -> Result<SimVerdict, DumpError> {
        if w.la57() {
            return Err(DumpError::XenFourLevelOnly { root: w.root() });
        }
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(DumpError::BadArgument(format!(
                "batch size {batch} outside 1..={MAX_BATCH}"
            )));
        }
        let tables = user_tables(w)?;
        let table_set: std::collections::HashSet<u64> =
            tables.iter().map(|t| t.0).chain([w.root()]).collect();
        // First VA each table covers (for messages), and the frames the user
        // half's 4 KiB leaves map (the walk is bounded: `user_tables` ran
        // the census check).
        let mut first_va: HashMap<u64, u64> = HashMap::new();
        let mut ram_frames: Vec<u64> = Vec::new();
        let mut io_frames: Vec<u64> = Vec::new();
        let mut seen_frames: std::collections::HashSet<u64> = std::collections::HashSet::new();
        w.walk(
            0..256,
            &mut |_, pa, va| {
                first_va.entry(pa).or_insert(va);
            },
            &mut |l| {
                let e = l.entry;
                // Large leaves are refused whatever their frame; a frame
                // with reserved address bits too; table frames are copied.
                let pa = e & PageTableEntry::ADDR_MASK;
                if l.size != PageSize::Size4K
                    || e & PageTableEntry::RESERVED_ADDR_BITS != 0
                    || table_set.contains(&pa)
                    || !seen_frames.insert(pa >> 12)
                {
                    return;
                }
                if w.mem().contains_page(pa) {
                    ram_frames.push(pa >> 12);
                } else {
                    io_frames.push(pa >> 12);
                }
            },
        )?;
        // Dense machine frames: RAM frames first, then I/O frames, then the
        // table copies. Bounded by the leaves the dump holds.
        let mut data_of: HashMap<u64, u64> = HashMap::new();
        for (i, &f) in ram_frames.iter().chain(&io_frames).enumerate() {
            data_of.insert(f, i as u64);
        }
        let base = data_of.len() as u64;
        let io_range = ram_frames.len() as u64..base;
        let frames = tables.len() + 2;
        let nr_pages = (data_of.len() + frames).max(1);
        if nr_pages > u32::MAX as usize {
            return Err(DumpError::BadArgument(format!(
                "the user half maps {} frames: expected at most {:#x} for the simulator",
                data_of.len(),
                u32::MAX
            )));
        }
        let io_frames: Vec<std::ops::Range<u64>> = Some(io_range)
            .filter(|r| !r.is_empty())
            .into_iter()
            .collect();

        let store = Arc::new(FrameStore::<DefaultRawLock>::new(frames, base));
        let mut cfg = SimConfig::for_mode::<X86_64>(nr_pages, 0);
        cfg.identity_p2m = true;
        cfg.io_privileged = opts.io_privileged;
        cfg.io_frames = io_frames;
        let mem: Arc<dyn TableMemory> = store.clone();
        let sim = Arc::new(
            XenSim::new(cfg, mem)
                .map_err(|e| DumpError::BadArgument(format!("simulator setup: {e:?}")))?,
        );
        let backend = Arc::new(XenBackend::new(sim.clone(), P2m::identity(nr_pages)));
        let space: AddressSpace<X86_64, Global<DefaultRawLock>, _> =
            AddressSpace::new(store.clone(), backend, SpaceOptions { user_root })
                .map_err(|e| DumpError::BadArgument(format!("engine: {e}")))?;
        // Dump table address -> copy pfn, and back.
        let mut pfn_of: HashMap<u64, Pfn> = HashMap::new();
        pfn_of.insert(w.root(), space.root());
        for &(pa, level) in &tables {
            if let std::collections::hash_map::Entry::Vacant(v) = pfn_of.entry(pa) {
                let pfn = store
                    .alloc_table(level)
                    .ok_or_else(|| DumpError::BadArgument("frame store exhausted".into()))?;
                v.insert(pfn);
            }
        }
        let mut dump_of: HashMap<u64, u64> = pfn_of.iter().map(|(&pa, p)| (p.0, pa)).collect();
        let mut roots = vec![space.root()];
        roots.extend(space.user_root());
        for &r in &roots {
            dump_of.insert(r.0, w.root());
        }
        let retarget = |e: u64| {
            let pa = e & PageTableEntry::ADDR_MASK;
            let frame = match pfn_of.get(&pa) {
                Some(p) => p.0,
                None if e & PageTableEntry::RESERVED_ADDR_BITS != 0 => return e,
                None => match data_of.get(&(pa >> 12)) {
                    Some(&f) => f,
                    None => return e,
                },
            };
            (e & !PageTableEntry::ADDR_MASK) | (frame << 12)
        };
        let copy = |src: u64, dst: Pfn, level: Level, slots: usize| {
            for i in 0..slots {
                let e = w.entry(src, i);
                let present = e & 1 != 0;
                let points_at_frame =
                    present && (level == Level::L4 || level == Level::L1 || e & (1 << 7) == 0);
                let v = if points_at_frame { retarget(e) } else { e };
                if let Some(slot) = store.entry(dst, i) {
                    slot.store(v, Ordering::Release);
                }
            }
        };
        for &r in &roots {
            copy(w.root(), r, Level::L4, 256);
        }
        for &(pa, level) in &tables {
            if let Some(&p) = pfn_of.get(&pa) {
                copy(pa, p, level, 512);
            }
        }

        sim.take_refusal();
        let mut b: Batch<MAX_BATCH> = Batch::with_limit(batch);
        let result = space.pin(&mut b);
        let refused = match result {
            Ok(_) => {
                space
                    .unpin(&mut Batch::<MAX_BATCH>::with_limit(batch))
                    .map_err(|e| DumpError::BadArgument(format!("unpin after pin: {e}")))?;
                None
            }
            Err(e) => {
                let errno = match &e {
                    Error::Hypercall(h) | Error::RollbackFailed { first: h, .. } => h.errno,
                    _ => 0,
                };
                let entry = sim.take_refusal().and_then(|r| {
                    let table = *dump_of.get(&r.mfn.0)?;
                    let va = first_va.get(&table).copied().unwrap_or(0)
                        | (r.index as u64) << r.level.shift();
                    // The dump's entry (a retargeted copy reads differently).
                    let raw = w.entry(table, r.index);
                    Some((
                        r.level.number(),
                        r.index,
                        table + r.index as u64 * 8,
                        raw,
                        canonical(va),
                    ))
                });
                Some(SimRefusal {
                    errno,
                    call: e.to_string(),
                    entry,
                })
            }
        };
        Ok(SimVerdict {
            refused,
            nr_pages,
            hypercalls: sim.stats().hypercalls,
        })
    }
}
