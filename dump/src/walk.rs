//! A 4- or 5-level x86-64 walk of a foreign page table read from a dump.
//!
//! Entries are read straight from the [`PhysMem`] view and interpreted with
//! the engine's [`PageTableEntry`] / [`EntryFlags`] / [`Level`] types. The
//! walk handles what real tables contain: 2 MiB and 1 GiB leaves (PS), PAT
//! in bit 12 of large leaves (not an address bit), global and NX mappings,
//! PCD/PWT, and leaves that point outside RAM (MMIO: listed, not errors).
//! A table pointer outside memory is an error naming the entry.
//!
//! A dump is untrusted: its tables may form cycles (an entry pointing back
//! at its own table or an ancestor) or share tables, so the paths through
//! four (five) levels can number 512^4 (512^5) even for one table page. [`Walker::census`]
//! summarises every distinct (table, level) once, so statistics cost what
//! the distinct tables cost; a walk that follows every path
//! ([`Walker::walk`], QEMU's `info mem` / `info tlb`) first checks, with the
//! census, that its paths stay within a bound derived from the distinct
//! tables ([`Census::limit`]) and otherwise refuses with the table at fault.
//! A single recursive ("self-map") slot, as Windows keeps one, stays within
//! the bound: it makes each table appear at up to four levels, once each.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::ops::Range;

use pagepin_engine::{EntryFlags, Level, PageSize, PageTableEntry};

use super::phys::PhysMem;
use super::{DumpError, CR3_ADDR_MASK, PTI_USER_BIT};

/// Address bits of a table pointer (bits 12..=51).
pub const TABLE_ADDR_MASK: u64 = CR3_ADDR_MASK;

/// Sign-extend a 48-bit linear address.
pub fn canonical(va: u64) -> u64 {
    ((va << 16) as i64 >> 16) as u64
}

/// Sign-extend a 57-bit linear address (5-level paging, CR4.LA57).
pub fn canonical57(va: u64) -> u64 {
    ((va << 7) as i64 >> 7) as u64
}

/// One leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address (canonical).
    pub va: u64,
    /// Page size.
    pub size: PageSize,
    /// The raw leaf entry.
    pub entry: u64,
    /// Guest-physical address of the leaf entry.
    pub entry_pa: u64,
    /// Guest-physical base of the page (PAT bit 12 of a large leaf excluded).
    pub phys: u64,
    /// Effective user access (U set at every level).
    pub user: bool,
    /// Effective write access (RW set at every level).
    pub writable: bool,
    /// Effective no-execute (NX set at any level).
    pub nx: bool,
    /// Whether the page lies in the dump's memory (false: MMIO or a hole).
    pub in_ram: bool,
}

impl Leaf {
    /// The leaf's flag bits, with [`EntryFlags::PAT_LARGE`] for bit 12 of a
    /// large leaf and [`EntryFlags::HUGE`] as PS only on large leaves (bit 7
    /// of a 4 KiB entry is its PAT bit, reported by [`Self::pat`]).
    pub fn flags(&self) -> EntryFlags {
        let e = PageTableEntry::from_bits(self.entry);
        let mut f = e.flags();
        if self.size != PageSize::Size4K && self.entry & EntryFlags::PAT_LARGE.bits() != 0 {
            f |= EntryFlags::PAT_LARGE;
        }
        f
    }
    /// The PAT bit of the leaf (bit 7 of a 4 KiB entry, bit 12 of a large one).
    pub fn pat(&self) -> bool {
        match self.size {
            PageSize::Size4K => self.entry & EntryFlags::PAT_4K.bits() != 0,
            _ => self.entry & EntryFlags::PAT_LARGE.bits() != 0,
        }
    }
}

/// What a walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Distinct table pages per level (index 1..=5; index 0 unused; index
    /// 5 only under 5-level paging).
    pub tables: [usize; 6],
    /// Table pages reached through more than one entry.
    pub shared_tables: usize,
    /// Table pages reached at two different levels (a recursive or
    /// "linear" page-table mapping).
    pub multi_level_tables: usize,
    /// 4 KiB leaves.
    pub leaves_4k: usize,
    /// 2 MiB leaves.
    pub leaves_2m: usize,
    /// 1 GiB leaves.
    pub leaves_1g: usize,
    /// Leaves outside the dump's memory (MMIO or holes).
    pub leaves_outside_ram: usize,
    /// Bytes mapped.
    pub mapped_bytes: u128,
    /// Leaves with each flag set in the leaf entry: W, U, PWT, PCD, A, D,
    /// G, PAT, NX (in that order; see [`WalkStats::FLAG_NAMES`]).
    pub leaf_flags: [usize; 9],
    /// Leaves whose effective rights (all levels) are user-accessible.
    pub effective_user: usize,
    /// Leaves whose effective rights are writable.
    pub effective_writable: usize,
}

impl WalkStats {
    /// Names of [`WalkStats::leaf_flags`].
    pub const FLAG_NAMES: [&'static str; 9] = ["W", "U", "PWT", "PCD", "A", "D", "G", "PAT", "NX"];

    /// All leaves.
    pub fn leaves(&self) -> usize {
        self.leaves_4k + self.leaves_2m + self.leaves_1g
    }

    /// Count `n` leaves like `l` (`n` paths reach it).
    fn count_leaves(&mut self, l: &Leaf, n: u64) {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let add = |c: &mut usize, yes: bool| {
            if yes {
                *c = c.saturating_add(n);
            }
        };
        match l.size {
            PageSize::Size4K => add(&mut self.leaves_4k, true),
            PageSize::Size2M => add(&mut self.leaves_2m, true),
            PageSize::Size1G => add(&mut self.leaves_1g, true),
        }
        self.mapped_bytes = self
            .mapped_bytes
            .saturating_add(l.size.bytes() as u128 * n as u128);
        add(&mut self.leaves_outside_ram, !l.in_ram);
        let e = l.entry;
        let bits = [
            e & EntryFlags::WRITABLE.bits() != 0,
            e & EntryFlags::USER.bits() != 0,
            e & EntryFlags::PWT.bits() != 0,
            e & EntryFlags::PCD.bits() != 0,
            e & EntryFlags::ACCESSED.bits() != 0,
            e & EntryFlags::DIRTY.bits() != 0,
            e & EntryFlags::GLOBAL.bits() != 0,
            l.pat(),
            e & EntryFlags::NO_EXECUTE.bits() != 0,
        ];
        for (c, b) in self.leaf_flags.iter_mut().zip(bits) {
            add(c, b);
        }
        add(&mut self.effective_user, l.user);
        add(&mut self.effective_writable, l.writable);
    }
}

/// A walk may visit at most this many tables more than
/// [`WALK_VISITS_PER_PAIR`] times its distinct (table, level) pairs (see
/// [`Census::limit`]).
pub const WALK_VISIT_FLOOR: u64 = 64;
/// Table visits a walk may make per distinct (table, level) pair it
/// reaches. A tree (or a table with one self-map slot) visits each pair
/// once; the slack admits a little same-level sharing.
pub const WALK_VISITS_PER_PAIR: u64 = 4;
/// Table visits a walk may make, whatever its distinct pairs, when no table
/// is reached at two levels (sharing at one level, no cycle). Real kernels
/// share on purpose: Linux's espfix area points thousands of L2 entries at
/// one L1 (2,048 paths on a 1-vCPU Debian 6.1 guest, up to 8,192 with many
/// CPUs), which QEMU walks and prints path by path. The cap keeps the
/// output below 2^24 lines (32,768 tables x 512 entries).
pub const WALK_SHARED_VISIT_LIMIT: u64 = 32_768;

/// What a walk of some root slots finds, computed once per distinct
/// (table, level, inherited rights) instead of once per path, so its cost
/// is bounded by the dump's distinct tables whatever cycles or shared
/// tables they form.
///
/// A walk that follows every path (QEMU's `info tlb` / `info mem`,
/// [`Walker::walk`]) is bounded only for tree-like tables: [`Census::check`]
/// refuses one that would visit more than [`Census::limit`] tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Distinct (table, level) pairs reached, the root included.
    pub pairs: u64,
    /// Tables a path-by-path walk visits, the root included (a pair is
    /// counted once per path reaching it).
    pub visits: u64,
    /// Leaves a path-by-path walk reports.
    pub leaves: u64,
    /// The walk's statistics, exact whatever the visit count.
    pub stats: WalkStats,
    /// The first table (in walk order) reached at a second level.
    pub recursion: Option<Recursion>,
    /// The (table, level) pair reached by the most paths: (table, level,
    /// paths).
    pub hottest: (u64, u8, u64),
}

/// A table reached at more than one level: a cycle, or a recursive
/// ("self-map" or linear page-table) entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recursion {
    /// Guest-physical address of the table.
    pub table: u64,
    /// The levels it is reached at, highest first.
    pub levels: Vec<u8>,
    /// Level of the table holding the first entry that reaches it at a
    /// level other than its first.
    pub level: u8,
    /// That entry's index.
    pub index: usize,
    /// That entry's guest-physical address.
    pub entry_pa: u64,
    /// That entry.
    pub entry: u64,
}

impl Census {
    /// The most table visits a path-by-path walk may make:
    /// [`WALK_VISIT_FLOOR`] + [`WALK_VISITS_PER_PAIR`] x distinct pairs,
    /// or at least [`WALK_SHARED_VISIT_LIMIT`] when no table is reached at
    /// two levels. It grows with the dump's distinct tables, never with how
    /// often a cycle or a shared table repeats them.
    pub fn limit(&self) -> u64 {
        let per_pair =
            WALK_VISIT_FLOOR.saturating_add(WALK_VISITS_PER_PAIR.saturating_mul(self.pairs));
        if self.recursion.is_none() {
            per_pair.max(WALK_SHARED_VISIT_LIMIT)
        } else {
            per_pair
        }
    }

    /// Whether a path-by-path walk stays within [`Self::limit`].
    pub fn bounded(&self) -> bool {
        self.visits <= self.limit()
    }

    /// `Ok` if a path-by-path walk is bounded; otherwise the table that
    /// makes it explode: [`DumpError::TableRecursion`] if a table is reached
    /// at two levels, else [`DumpError::WalkTooLarge`].
    pub fn check(&self) -> Result<(), DumpError> {
        if self.bounded() {
            return Ok(());
        }
        if let Some(r) = &self.recursion {
            return Err(DumpError::TableRecursion {
                table: r.table,
                levels: r.levels.clone(),
                level: r.level,
                index: r.index,
                entry_pa: r.entry_pa,
                entry: r.entry,
                visits: self.visits,
                limit: self.limit(),
            });
        }
        let (table, level, paths) = self.hottest;
        Err(DumpError::WalkTooLarge {
            table,
            level,
            paths,
            visits: self.visits,
            limit: self.limit(),
        })
    }
}

/// Rights inherited from the levels above, as the walk tracks them: AND of
/// U and RW, OR of NX. Packed as bit 0 = U, bit 1 = RW, bit 2 = NX.
type Rights = u8;

const RIGHTS_ROOT: Rights = 0b011;

fn rights_after(r: Rights, entry: u64) -> Rights {
    let u = r & 1 != 0 && entry & EntryFlags::USER.bits() != 0;
    let w = r & 2 != 0 && entry & EntryFlags::WRITABLE.bits() != 0;
    let nx = r & 4 != 0 || entry & EntryFlags::NO_EXECUTE.bits() != 0;
    u8::from(u) | u8::from(w) << 1 | u8::from(nx) << 2
}

/// `(path_and, path_or)` for [`Walker::make_leaf`] from inherited rights.
fn rights_masks(r: Rights) -> (u64, u64) {
    let uw = EntryFlags::USER.bits() | EntryFlags::WRITABLE.bits();
    let mut and = !uw;
    if r & 1 != 0 {
        and |= EntryFlags::USER.bits();
    }
    if r & 2 != 0 {
        and |= EntryFlags::WRITABLE.bits();
    }
    let or = if r & 4 != 0 {
        EntryFlags::NO_EXECUTE.bits()
    } else {
        0
    };
    (and, or)
}

/// One distinct (table, rights) of a census level: the paths reaching it
/// and the lowest (first in walk order) VA it covers.
#[derive(Clone, Copy)]
struct Node {
    paths: u64,
    first_va: u64,
}

/// Walk order of an entry: by the VA it covers, then the higher level
/// first (a walk checks an entry before anything under it).
type Order = (u64, std::cmp::Reverse<u8>);

/// An entry reaching a table: (walk order, level and address of the table
/// holding it, index, entry).
type Ref = (Order, u8, u64, usize, u64);

/// One level of a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The level of the table read.
    pub level: Level,
    /// Entry index.
    pub index: usize,
    /// Guest-physical address of the entry.
    pub entry_pa: u64,
    /// The entry.
    pub entry: u64,
}

/// The result of translating one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The address asked for.
    pub va: u64,
    /// Every entry read, root first.
    pub steps: Vec<Step>,
    /// The leaf, if the address is mapped.
    pub leaf: Option<Leaf>,
    /// The guest-physical address (`leaf.phys` + offset), if mapped.
    pub phys: Option<u64>,
}

/// A walker over the table rooted at one CR3.
pub struct Walker<'a> {
    mem: &'a PhysMem,
    root: u64,
    /// The root's level: L4, or L5 under CR4.LA57.
    top: Level,
}

impl<'a> Walker<'a> {
    /// A walker for `cr3` (PCID and flag bits are ignored). The root table
    /// must be wholly in memory.
    pub fn new(mem: &'a PhysMem, cr3: u64) -> Result<Walker<'a>, DumpError> {
        Self::with_levels(mem, cr3, false)
    }

    /// A walker for `cr3` with 4-level paging, or 5-level (`la57`: CR4.LA57,
    /// an L5 root, 57-bit addresses).
    pub fn with_levels(mem: &'a PhysMem, cr3: u64, la57: bool) -> Result<Walker<'a>, DumpError> {
        let root = cr3 & CR3_ADDR_MASK;
        if !mem.contains_page(root) {
            return Err(DumpError::Cr3OutsideMemory { cr3 });
        }
        let top = if la57 { Level::L5 } else { Level::L4 };
        Ok(Walker { mem, root, top })
    }

    /// The root's level: [`Level::L4`], or [`Level::L5`] under LA57.
    pub fn top(&self) -> Level {
        self.top
    }

    /// Whether the walk is 5-level.
    pub fn la57(&self) -> bool {
        self.top == Level::L5
    }

    /// Sign-extend `va` from the top of this walk's address space (bit 47,
    /// or bit 56 under LA57).
    pub fn canonical(&self, va: u64) -> u64 {
        if self.la57() {
            canonical57(va)
        } else {
            canonical(va)
        }
    }

    /// The root table's guest-physical address.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The memory.
    pub fn mem(&self) -> &'a PhysMem {
        self.mem
    }

    /// Entry `index` of the table at `table` (a page known to be in
    /// memory; anything else reads as 0).
    pub fn entry(&self, table: u64, index: usize) -> u64 {
        // Callers pass checked tables and indexes below 512; the checked
        // sum only keeps a stray argument from overflowing.
        (index as u64)
            .checked_mul(8)
            .and_then(|o| table.checked_add(o))
            .and_then(|pa| self.mem.read_u64(pa))
            .unwrap_or(0)
    }

    /// The child table of a present non-leaf entry, checked to be in memory;
    /// `level` is the level of the table holding the entry.
    pub fn child(
        &self,
        level: Level,
        table: u64,
        index: usize,
        entry: u64,
        va: u64,
    ) -> Result<u64, DumpError> {
        let child = entry & TABLE_ADDR_MASK;
        if !self.mem.contains_page(child) {
            return Err(DumpError::TableOutsideMemory {
                level: level.number(),
                index,
                entry_pa: table + index as u64 * 8,
                entry,
                va: self.canonical(va),
            });
        }
        Ok(child)
    }

    /// Whether a present entry at `level` is a leaf; PS in a root entry is
    /// an error.
    pub fn is_leaf(
        &self,
        level: Level,
        table: u64,
        index: usize,
        entry: u64,
    ) -> Result<bool, DumpError> {
        let ps = entry & EntryFlags::HUGE.bits() != 0;
        match level {
            Level::L1 => Ok(true),
            Level::L2 | Level::L3 => Ok(ps),
            Level::L4 | Level::L5 if ps => Err(DumpError::ReservedBit {
                level: level.number(),
                index,
                entry_pa: table + index as u64 * 8,
                entry,
            }),
            Level::L4 | Level::L5 => Ok(false),
        }
    }

    fn make_leaf(
        &self,
        level: Level,
        va: u64,
        entry: u64,
        entry_pa: u64,
        path_and: u64,
        path_or: u64,
    ) -> Leaf {
        let size = PageSize::of_leaf(level);
        let phys = entry & TABLE_ADDR_MASK & !(size.bytes() - 1);
        let and = path_and & entry;
        let or = path_or | entry;
        Leaf {
            va: self.canonical(va),
            size,
            entry,
            entry_pa,
            phys,
            user: and & EntryFlags::USER.bits() != 0,
            writable: and & EntryFlags::WRITABLE.bits() != 0,
            nx: or & EntryFlags::NO_EXECUTE.bits() != 0,
            in_ram: self.mem.contains(phys, size.bytes()),
        }
    }

    /// Walk root slots `slots` depth-first in address order, calling
    /// `on_table(level, table_pa, first_va)` for every table reached (root
    /// included, first) and `on_leaf` for every leaf, once per path.
    ///
    /// The census runs first: a table graph whose paths exceed
    /// [`Census::limit`] (a cycle, a table at several levels, heavy sharing)
    /// is refused ([`Census::check`]) before any callback, so the walk's
    /// time is bounded by the dump's distinct tables.
    pub fn walk(
        &self,
        slots: Range<usize>,
        on_table: &mut dyn FnMut(Level, u64, u64),
        on_leaf: &mut dyn FnMut(&Leaf),
    ) -> Result<(), DumpError> {
        self.census(slots.clone())?.check()?;
        self.walk_paths(slots, on_table, on_leaf)
    }

    /// The unchecked depth-first walk behind [`Self::walk`].
    fn walk_paths(
        &self,
        slots: Range<usize>,
        on_table: &mut dyn FnMut(Level, u64, u64),
        on_leaf: &mut dyn FnMut(&Leaf),
    ) -> Result<(), DumpError> {
        on_table(self.top, self.root, 0);
        let slots = slots.start.min(512)..slots.end.min(512);
        self.walk_table(
            self.top,
            self.root,
            0,
            slots,
            u64::MAX,
            0,
            on_table,
            on_leaf,
        )
    }

    /// Walk entries `slots` of the `level` table at `table`, which covers
    /// VAs from `base` (uncanonical); `and` / `or` are the entries above
    /// ANDed / ORed (the effective U/RW and NX of a leaf).
    #[allow(clippy::too_many_arguments)]
    fn walk_table(
        &self,
        level: Level,
        table: u64,
        base: u64,
        slots: Range<usize>,
        and: u64,
        or: u64,
        on_table: &mut dyn FnMut(Level, u64, u64),
        on_leaf: &mut dyn FnMut(&Leaf),
    ) -> Result<(), DumpError> {
        for i in slots {
            let e = self.entry(table, i);
            if e & 1 == 0 {
                continue;
            }
            let va = base | (i as u64) << level.shift();
            let entry_pa = table + i as u64 * 8;
            if self.is_leaf(level, table, i, e)? {
                on_leaf(&self.make_leaf(level, va, e, entry_pa, and, or));
                continue;
            }
            let Some(child_level) = level.child() else {
                continue;
            };
            let child = self.child(level, table, i, e, va)?;
            on_table(child_level, child, self.canonical(va));
            self.walk_table(
                child_level,
                child,
                va,
                0..512,
                and & e,
                or | e,
                on_table,
                on_leaf,
            )?;
        }
        Ok(())
    }

    /// Every leaf of root slots `slots`, in address order (bounded as
    /// [`Self::walk`]).
    pub fn leaves(&self, slots: Range<usize>) -> Result<Vec<Leaf>, DumpError> {
        let mut out = Vec::new();
        self.walk(slots, &mut |_, _, _| {}, &mut |l| out.push(*l))?;
        Ok(out)
    }

    /// Statistics over root slots `slots`: the [`Census`]'s, exact and
    /// bounded whatever cycles or shared tables the dump holds.
    pub fn stats(&self, slots: Range<usize>) -> Result<WalkStats, DumpError> {
        Ok(self.census(slots)?.stats)
    }

    /// The census of root slots `slots` (see [`Census`]), in time and
    /// memory bounded by the distinct (table, level) pairs. An entry a walk
    /// would refuse (PS in a root entry, a table outside memory) is the
    /// error, the one first in walk order.
    pub fn census(&self, slots: Range<usize>) -> Result<Census, DumpError> {
        self.census_with(slots, &mut |_, _| {})
    }

    /// [`Self::census`], calling `on_leaf(leaf, paths)` once per distinct
    /// leaf entry and inherited rights, where `paths` is how many paths
    /// reach it and `leaf.va` is the first VA among them.
    pub fn census_with(
        &self,
        slots: Range<usize>,
        on_leaf: &mut dyn FnMut(&Leaf, u64),
    ) -> Result<Census, DumpError> {
        let mut c = Census::default();
        // Table -> (levels it is reached at, as bits; paths over all levels).
        let mut tables: HashMap<u64, (u8, u64)> = HashMap::new();
        // (table, level) -> the first entry reaching it: (walk order, level
        // and address of the entry's table, index, entry). CR3 reaches the
        // root first.
        let mut first_ref: HashMap<(u64, u8), Ref> = HashMap::new();
        let top = self.top.number();
        first_ref.insert((self.root, top), ((0, Reverse(top + 1)), top + 1, 0, 0, 0));
        let mut error: Option<(Order, DumpError)> = None;
        let mut keep_first = |order: Order, e: DumpError| {
            if error.as_ref().is_none_or(|(o, _)| order < *o) {
                error = Some((order, e));
            }
        };
        let mut nodes: HashMap<(u64, Rights), Node> = HashMap::from([(
            (self.root, RIGHTS_ROOT),
            Node {
                paths: 1,
                first_va: 0,
            },
        )]);
        let mut level = self.top;
        loop {
            let range = if level == self.top {
                slots.start.min(512)..slots.end.min(512)
            } else {
                0..512
            };
            let mut next: HashMap<(u64, Rights), Node> = HashMap::new();
            let mut pair_paths: HashMap<u64, u64> = HashMap::new();
            for (&(table, rights), node) in &nodes {
                let p = pair_paths.entry(table).or_default();
                *p = p.saturating_add(node.paths);
                for i in range.clone() {
                    let e = self.entry(table, i);
                    if e & 1 == 0 {
                        continue;
                    }
                    let va = node.first_va | (i as u64) << level.shift();
                    let order = (va, Reverse(level.number()));
                    let is_leaf = match self.is_leaf(level, table, i, e) {
                        Ok(l) => l,
                        Err(err) => {
                            keep_first(order, err);
                            continue;
                        }
                    };
                    let entry_pa = table + i as u64 * 8;
                    if is_leaf {
                        let (and, or) = rights_masks(rights);
                        let l = self.make_leaf(level, va, e, entry_pa, and, or);
                        c.leaves = c.leaves.saturating_add(node.paths);
                        c.stats.count_leaves(&l, node.paths);
                        on_leaf(&l, node.paths);
                        continue;
                    }
                    let child = match self.child(level, table, i, e, va) {
                        Ok(t) => t,
                        Err(err) => {
                            keep_first(order, err);
                            continue;
                        }
                    };
                    let n = next
                        .entry((child, rights_after(rights, e)))
                        .or_insert(Node {
                            paths: 0,
                            first_va: va,
                        });
                    n.paths = n.paths.saturating_add(node.paths);
                    n.first_va = n.first_va.min(va);
                    let child_level = level.number() - 1;
                    let new: Ref = (order, level.number(), table, i, e);
                    let r = first_ref.entry((child, child_level)).or_insert(new);
                    if order < r.0 {
                        *r = new;
                    }
                }
            }
            for (table, paths) in pair_paths {
                c.pairs += 1;
                c.visits = c.visits.saturating_add(paths);
                let t = tables.entry(table).or_default();
                t.0 |= 1 << level.number();
                t.1 = t.1.saturating_add(paths);
                let hot = (paths, Reverse(table));
                if hot > (c.hottest.2, Reverse(c.hottest.0)) || c.hottest.2 == 0 {
                    c.hottest = (table, level.number(), paths);
                }
            }
            match level.child() {
                Some(l) if !next.is_empty() => {
                    nodes = next;
                    level = l;
                }
                _ => break,
            }
        }
        if let Some((_, e)) = error {
            return Err(e);
        }
        // The first table (in walk order) reached at a second level: its
        // first reference at a level other than the one it is first met at.
        let mut best: Option<(Order, Recursion)> = None;
        for (&table, &(levels, paths)) in &tables {
            for n in 1..=5u8 {
                if levels & (1 << n) != 0 {
                    c.stats.tables[n as usize] += 1;
                }
            }
            if paths > 1 {
                c.stats.shared_tables += 1;
            }
            if levels.count_ones() < 2 {
                continue;
            }
            c.stats.multi_level_tables += 1;
            let mut refs: Vec<Ref> = (1..=5u8)
                .filter(|n| levels & (1 << n) != 0)
                .filter_map(|n| first_ref.get(&(table, n)).copied())
                .collect();
            refs.sort_unstable();
            let Some(&(order, level, holder, index, entry)) = refs.get(1) else {
                continue;
            };
            if best
                .as_ref()
                .is_none_or(|(o, b)| (order, table) < (*o, b.table))
            {
                best = Some((
                    order,
                    Recursion {
                        table,
                        levels: (1..=5u8).rev().filter(|n| levels & (1 << n) != 0).collect(),
                        level,
                        index,
                        entry_pa: holder + index as u64 * 8,
                        entry,
                    },
                ));
            }
        }
        c.recursion = best.map(|(_, r)| r);
        Ok(c)
    }

    /// Translate one address, recording every entry read.
    pub fn translate(&self, va: u64) -> Result<Translation, DumpError> {
        if self.canonical(va) != va {
            return Err(DumpError::NonCanonical {
                va,
                la57: self.la57(),
            });
        }
        let mut t = Translation {
            va,
            steps: Vec::new(),
            leaf: None,
            phys: None,
        };
        let mut table = self.root;
        let mut level = self.top;
        let (mut and, mut or) = (u64::MAX, 0u64);
        loop {
            let index = ((va >> level.shift()) & 511) as usize;
            let entry = self.entry(table, index);
            let entry_pa = table + index as u64 * 8;
            t.steps.push(Step {
                level,
                index,
                entry_pa,
                entry,
            });
            if entry & 1 == 0 {
                return Ok(t);
            }
            if self.is_leaf(level, table, index, entry)? {
                let base = va & !(level.entry_span() - 1);
                let leaf = self.make_leaf(level, base, entry, entry_pa, and, or);
                t.phys = Some(leaf.phys + (va & (level.entry_span() - 1)));
                t.leaf = Some(leaf);
                return Ok(t);
            }
            and &= entry;
            or |= entry;
            table = self.child(level, table, index, entry, va & !(level.entry_span() - 1))?;
            level = match level.child() {
                Some(l) => l,
                None => return Ok(t),
            };
        }
    }

    /// Under PTI (Linux's page-table isolation) the user root is the
    /// kernel root's frame + 4 KiB. Returns that root's address if the page
    /// after this root looks like one: in memory, this root 8 KiB-aligned,
    /// and its user-half entries equal this root's (up to the NX bit the
    /// kernel copy adds), with at least one present.
    pub fn pti_user_root(&self) -> Option<u64> {
        if self.root & PTI_USER_BIT != 0 {
            return None;
        }
        let user = self.root | PTI_USER_BIT;
        if !self.mem.contains_page(user) {
            return None;
        }
        let nx = EntryFlags::NO_EXECUTE.bits();
        let mut present = 0;
        for i in 0..256 {
            let k = self.entry(self.root, i);
            let u = self.entry(user, i);
            if k & !nx != u & !nx {
                return None;
            }
            present += (k & 1) as usize;
        }
        (present > 0).then_some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sign_extends_bit_47() {
        assert_eq!(canonical(0x8000_0000_0000), 0xffff_8000_0000_0000);
        assert_eq!(canonical(0x7fff_ffff_f000), 0x7fff_ffff_f000);
        assert_eq!(canonical(0x1_0000_0000_0000), 0);
    }

    #[test]
    fn canonical57_sign_extends_bit_56() {
        assert_eq!(canonical57(0x0100_0000_0000_0000), 0xff00_0000_0000_0000);
        assert_eq!(canonical57(0x00ff_ffff_ffff_f000), 0x00ff_ffff_ffff_f000);
        assert_eq!(canonical57(0x8000_0000_0000), 0x8000_0000_0000);
        assert_eq!(canonical57(0x0200_0000_0000_0000), 0);
    }
}
