//! A 4-level x86-64 walk of a foreign page table read from a dump.
//!
//! Entries are read straight from the [`PhysMem`] view and interpreted with
//! the engine's [`PageTableEntry`] / [`EntryFlags`] / [`Level`] types. The
//! walk handles what real tables contain: 2 MiB and 1 GiB leaves (PS), PAT
//! in bit 12 of large leaves (not an address bit), global and NX mappings,
//! PCD/PWT, and leaves that point outside RAM (MMIO: listed, not errors).
//! A table pointer outside memory is an error naming the entry. With a fixed
//! depth of four levels the walk always terminates, whatever the tables.

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
    /// Distinct table pages per level (index 1..=4; index 0 unused).
    pub tables: [usize; 5],
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

    fn count_leaf(&mut self, l: &Leaf) {
        match l.size {
            PageSize::Size4K => self.leaves_4k += 1,
            PageSize::Size2M => self.leaves_2m += 1,
            PageSize::Size1G => self.leaves_1g += 1,
        }
        self.mapped_bytes += l.size.bytes() as u128;
        if !l.in_ram {
            self.leaves_outside_ram += 1;
        }
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
            *c += b as usize;
        }
        self.effective_user += l.user as usize;
        self.effective_writable += l.writable as usize;
    }
}

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
}

impl<'a> Walker<'a> {
    /// A walker for `cr3` (PCID and flag bits are ignored). The root table
    /// must be wholly in memory.
    pub fn new(mem: &'a PhysMem, cr3: u64) -> Result<Walker<'a>, DumpError> {
        let root = cr3 & CR3_ADDR_MASK;
        if !mem.contains_page(root) {
            return Err(DumpError::Cr3OutsideMemory { cr3 });
        }
        Ok(Walker { mem, root })
    }

    /// The root table's guest-physical address.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The memory.
    pub fn mem(&self) -> &'a PhysMem {
        self.mem
    }

    /// Entry `index` of the table at `table` (a page known to be in memory).
    pub fn entry(&self, table: u64, index: usize) -> u64 {
        // Table pages are checked before they are read, so this is in range.
        self.mem.read_u64(table + index as u64 * 8).unwrap_or(0)
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
                va: canonical(va),
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
        let size = match level {
            Level::L1 => PageSize::Size4K,
            Level::L2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        };
        let phys = entry & TABLE_ADDR_MASK & !(size.bytes() - 1);
        let and = path_and & entry;
        let or = path_or | entry;
        Leaf {
            va: canonical(va),
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
    /// included, first) and `on_leaf` for every leaf.
    pub fn walk(
        &self,
        slots: Range<usize>,
        on_table: &mut dyn FnMut(Level, u64, u64),
        on_leaf: &mut dyn FnMut(&Leaf),
    ) -> Result<(), DumpError> {
        on_table(Level::L4, self.root, 0);
        let all = u64::MAX;
        for i4 in slots.start.min(512)..slots.end.min(512) {
            let e4 = self.entry(self.root, i4);
            if e4 & 1 == 0 {
                continue;
            }
            let va4 = (i4 as u64) << 39;
            self.is_leaf(Level::L4, self.root, i4, e4)?;
            let t3 = self.child(Level::L4, self.root, i4, e4, va4)?;
            on_table(Level::L3, t3, canonical(va4));
            for i3 in 0..512 {
                let e3 = self.entry(t3, i3);
                if e3 & 1 == 0 {
                    continue;
                }
                let va3 = va4 | (i3 as u64) << 30;
                if self.is_leaf(Level::L3, t3, i3, e3)? {
                    on_leaf(&self.make_leaf(Level::L3, va3, e3, t3 + i3 as u64 * 8, e4, e4));
                    continue;
                }
                let t2 = self.child(Level::L3, t3, i3, e3, va3)?;
                on_table(Level::L2, t2, canonical(va3));
                for i2 in 0..512 {
                    let e2 = self.entry(t2, i2);
                    if e2 & 1 == 0 {
                        continue;
                    }
                    let va2 = va3 | (i2 as u64) << 21;
                    if self.is_leaf(Level::L2, t2, i2, e2)? {
                        on_leaf(&self.make_leaf(
                            Level::L2,
                            va2,
                            e2,
                            t2 + i2 as u64 * 8,
                            e4 & e3,
                            e4 | e3,
                        ));
                        continue;
                    }
                    let t1 = self.child(Level::L2, t2, i2, e2, va2)?;
                    on_table(Level::L1, t1, canonical(va2));
                    for i1 in 0..512 {
                        let e1 = self.entry(t1, i1);
                        if e1 & 1 == 0 {
                            continue;
                        }
                        let va1 = va2 | (i1 as u64) << 12;
                        on_leaf(&self.make_leaf(
                            Level::L1,
                            va1,
                            e1,
                            t1 + i1 as u64 * 8,
                            e4 & e3 & e2 & all,
                            e4 | e3 | e2,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every leaf of root slots `slots`, in address order.
    pub fn leaves(&self, slots: Range<usize>) -> Result<Vec<Leaf>, DumpError> {
        let mut out = Vec::new();
        self.walk(slots, &mut |_, _, _| {}, &mut |l| out.push(*l))?;
        Ok(out)
    }

    /// Statistics over root slots `slots`.
    pub fn stats(&self, slots: Range<usize>) -> Result<WalkStats, DumpError> {
        let mut s = WalkStats::default();
        // table address -> (levels seen as a bit set, references)
        let mut seen: HashMap<u64, (u8, usize)> = HashMap::new();
        let mut leaves = Vec::new();
        self.walk(
            slots,
            &mut |level, pa, _| {
                let e = seen.entry(pa).or_insert((0, 0));
                e.0 |= 1 << level.number();
                e.1 += 1;
            },
            &mut |l| leaves.push(*l),
        )?;
        for l in &leaves {
            s.count_leaf(l);
        }
        for (levels, refs) in seen.values() {
            for n in 1..=4u8 {
                if levels & (1 << n) != 0 {
                    s.tables[n as usize] += 1;
                }
            }
            if *refs > 1 {
                s.shared_tables += 1;
            }
            if levels.count_ones() > 1 {
                s.multi_level_tables += 1;
            }
        }
        Ok(s)
    }

    /// Translate one address, recording every entry read.
    pub fn translate(&self, va: u64) -> Result<Translation, DumpError> {
        if canonical(va) != va {
            return Err(DumpError::NonCanonical { va });
        }
        let mut t = Translation {
            va,
            steps: Vec::new(),
            leaf: None,
            phys: None,
        };
        let mut table = self.root;
        let mut level = Level::L4;
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
}
