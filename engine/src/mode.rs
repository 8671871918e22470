//! Paging modes: x86-64 4-level, x86-64 5-level (LA57) and PAE 3-level, as
//! types with constants.

use core::ops::Range;

/// A page-table level. `L1` is a PTE page, the root is `L4` (x86-64), `L5`
/// (x86-64 with LA57) or `L3` (PAE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Level {
    /// PTE page: entries map 4 KiB pages.
    L1 = 1,
    /// PMD page: entries point to L1 pages or map 2 MiB pages.
    L2 = 2,
    /// PUD page (PAE root): entries point to L2 pages or map 1 GiB pages.
    L3 = 3,
    /// P4D page (5-level) or PGD page (the 4-level x86-64 root).
    L4 = 4,
    /// PGD page of 5-level paging (the LA57 root).
    L5 = 5,
}

impl Level {
    /// The highest level of any paging mode.
    pub const MAX: Level = Level::L5;

    /// The level from its number (1..=5).
    pub const fn from_u8(n: u8) -> Option<Level> {
        match n {
            1 => Some(Level::L1),
            2 => Some(Level::L2),
            3 => Some(Level::L3),
            4 => Some(Level::L4),
            5 => Some(Level::L5),
            _ => None,
        }
    }
    /// The level's number (1..=5).
    pub const fn number(self) -> u8 {
        self as u8
    }
    /// The level of the tables this level's entries point to.
    pub const fn child(self) -> Option<Level> {
        Level::from_u8(self as u8 - 1)
    }
    /// The level of the tables whose entries point to this level's tables.
    pub const fn parent(self) -> Option<Level> {
        Level::from_u8(self as u8 + 1)
    }
    /// Bit position of the lowest virtual-address bit this level indexes.
    pub const fn shift(self) -> u32 {
        12 + 9 * (self as u32 - 1)
    }
    /// Bytes mapped by one entry of this level.
    pub const fn entry_span(self) -> u64 {
        1u64 << self.shift()
    }
    /// Whether an entry at this level with the PS bit is a leaf on x86.
    pub const fn may_be_huge(self) -> bool {
        matches!(self, Level::L2 | Level::L3)
    }
}

/// Page sizes a leaf can map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB, an L1 entry.
    Size4K,
    /// 2 MiB, an L2 entry with PS.
    Size2M,
    /// 1 GiB, an L3 entry with PS.
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
    /// The size of the page a leaf at `level` maps: L1 4 KiB, L2 2 MiB,
    /// L3 1 GiB. The walk refuses PS above L3, so no leaf exists higher up;
    /// such a level is answered with the largest size.
    pub const fn of_leaf(level: Level) -> PageSize {
        match level {
            Level::L1 => PageSize::Size4K,
            Level::L2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        }
    }
    /// The level whose entry maps a page of this size.
    pub const fn level(self) -> Level {
        match self {
            PageSize::Size4K => Level::L1,
            PageSize::Size2M => Level::L2,
            PageSize::Size1G => Level::L3,
        }
    }
}

/// Which paging mode a space uses, as compile-time constants.
///
/// Implemented by [`X86_64`] and [`Pae`]. The engine is generic over it, so
/// every constant folds away.
pub trait PagingMode: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Short name ("x86_64" / "pae").
    const NAME: &'static str;
    /// Level of the root table.
    const ROOT_LEVEL: Level;
    /// Entries in the root table (512, or 4 for PAE).
    const ROOT_ENTRIES: usize;
    /// Root slots walked for a user pin: those below the user limit.
    const USER_ROOT_SLOTS: usize;
    /// Root slots skipped by a full walk (the hypervisor's hole).
    const HYPERVISOR_HOLE: Range<usize>;
    /// Width of a virtual address (48 or 32).
    const VA_BITS: u32;
    /// The user limit in bytes (2^47 or 3 GiB).
    const USER_LIMIT: u64;
    /// Direct-map base: the kernel virtual address of pseudo-physical 0.
    const DIRECT_MAP_BASE: u64;
    /// PAE's unshared kernel PMD lives in this root slot (PAE only).
    const KERNEL_PMD_SLOT: Option<usize>;
    /// Whether a space may have a separate user root (64-bit PV).
    const HAS_USER_ROOT: bool;
    /// Whether 1 GiB leaves exist.
    const HAS_1G_PAGES: bool;
    /// Levels of the mode (the root's number): 3, 4 or 5.
    const LEVELS: usize = Self::ROOT_LEVEL as usize;

    /// Whether `va` is a valid (canonical, in-range) virtual address.
    fn is_canonical(va: u64) -> bool;
    /// Index into the table at `level` for `va`.
    #[inline]
    fn index(va: u64, level: Level) -> usize {
        let idx = (va >> level.shift()) as usize;
        if level == Self::ROOT_LEVEL {
            idx & (Self::ROOT_ENTRIES - 1)
        } else {
            idx & 511
        }
    }
    /// The virtual address a root slot starts at (sign-extended).
    fn root_slot_base(slot: usize) -> u64;
}

/// The modes are the engine's (every path is sized for the deepest of
/// them), so the trait is sealed.
mod sealed {
    pub trait Sealed {}
    impl Sealed for super::X86_64 {}
    impl Sealed for super::La57 {}
    impl Sealed for super::Pae {}
}

/// x86-64 4-level paging (48-bit virtual addresses).
#[derive(Clone, Copy, Debug, Default)]
pub struct X86_64;

impl PagingMode for X86_64 {
    const NAME: &'static str = "x86_64";
    const ROOT_LEVEL: Level = Level::L4;
    const ROOT_ENTRIES: usize = 512;
    const USER_ROOT_SLOTS: usize = 256;
    const HYPERVISOR_HOLE: Range<usize> = 256..272;
    const VA_BITS: u32 = 48;
    const USER_LIMIT: u64 = 1 << 47;
    const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
    const KERNEL_PMD_SLOT: Option<usize> = None;
    const HAS_USER_ROOT: bool = true;
    const HAS_1G_PAGES: bool = true;

    #[inline]
    fn is_canonical(va: u64) -> bool {
        let top = (va as i64) >> 47;
        top == 0 || top == -1
    }
    #[inline]
    fn root_slot_base(slot: usize) -> u64 {
        let raw = (slot as u64) << 39;
        ((raw << 16) as i64 >> 16) as u64
    }
}

/// x86-64 5-level paging (CR4.LA57: 57-bit virtual addresses, an L5 root
/// over 512 L4s; the user half is below 2^56).
///
/// Native x86-64 and the mock backend take it; Xen PV is 4-level only, so a
/// space of this mode over the Xen backend does not compile (see
/// [`Backend::MAX_ROOT_LEVEL`](crate::Backend::MAX_ROOT_LEVEL)).
#[derive(Clone, Copy, Debug, Default)]
pub struct La57;

impl PagingMode for La57 {
    const NAME: &'static str = "la57";
    const ROOT_LEVEL: Level = Level::L5;
    const ROOT_ENTRIES: usize = 512;
    const USER_ROOT_SLOTS: usize = 256;
    // No hypervisor of ours reserves 5-level root slots (Xen PV is 4-level).
    const HYPERVISOR_HOLE: Range<usize> = 0..0;
    const VA_BITS: u32 = 57;
    const USER_LIMIT: u64 = 1 << 56;
    /// Linux's direct map under LA57 (`page_offset_base` without KASLR).
    const DIRECT_MAP_BASE: u64 = 0xff11_0000_0000_0000;
    const KERNEL_PMD_SLOT: Option<usize> = None;
    const HAS_USER_ROOT: bool = false;
    const HAS_1G_PAGES: bool = true;

    #[inline]
    fn is_canonical(va: u64) -> bool {
        let top = (va as i64) >> 56;
        top == 0 || top == -1
    }
    #[inline]
    fn root_slot_base(slot: usize) -> u64 {
        let raw = (slot as u64) << 48;
        ((raw << 7) as i64 >> 7) as u64
    }
}

/// PAE 3-level paging (32-bit virtual addresses, 4-entry root).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pae;

impl PagingMode for Pae {
    const NAME: &'static str = "pae";
    const ROOT_LEVEL: Level = Level::L3;
    const ROOT_ENTRIES: usize = 4;
    const USER_ROOT_SLOTS: usize = 3;
    const HYPERVISOR_HOLE: Range<usize> = 0..0;
    const VA_BITS: u32 = 32;
    const USER_LIMIT: u64 = 3 << 30;
    const DIRECT_MAP_BASE: u64 = 0xc000_0000;
    const KERNEL_PMD_SLOT: Option<usize> = Some(3);
    const HAS_USER_ROOT: bool = false;
    const HAS_1G_PAGES: bool = false;

    #[inline]
    fn is_canonical(va: u64) -> bool {
        va >> 32 == 0
    }
    #[inline]
    fn root_slot_base(slot: usize) -> u64 {
        (slot as u64) << 30
    }
}

const _: () = {
    assert!(X86_64::USER_LIMIT == (X86_64::USER_ROOT_SLOTS as u64) << 39);
    assert!(Pae::USER_LIMIT == (Pae::USER_ROOT_SLOTS as u64) << 30);
    assert!(X86_64::HYPERVISOR_HOLE.start == X86_64::USER_ROOT_SLOTS);
    assert!(La57::USER_LIMIT == (La57::USER_ROOT_SLOTS as u64) << 48);
    assert!(La57::LEVELS == 5 && X86_64::LEVELS == 4 && Pae::LEVELS == 3);
    assert!(Level::MAX as usize == La57::LEVELS);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_and_canonical() {
        let va = 0x0000_7fff_ffff_f000u64;
        assert_eq!(X86_64::index(va, Level::L4), 255);
        assert_eq!(X86_64::index(va, Level::L1), 511);
        assert!(X86_64::is_canonical(va));
        assert!(!X86_64::is_canonical(0x0000_8000_0000_0000));
        assert!(X86_64::is_canonical(0xffff_8000_0000_0000));
        assert_eq!(X86_64::root_slot_base(256), 0xffff_8000_0000_0000);
        assert_eq!(Pae::index(0xc000_0000, Level::L3), 3);
        assert_eq!(Pae::index(0xbfff_f000, Level::L2), 511);
        assert!(!Pae::is_canonical(1 << 32));
        assert_eq!(Level::L2.entry_span(), 2 << 20);
    }

    #[test]
    fn la57_indices_and_canonical() {
        let top_user = (1u64 << 56) - 4096;
        assert!(La57::is_canonical(top_user));
        assert!(!La57::is_canonical(1 << 56));
        assert!(La57::is_canonical(0xff00_0000_0000_0000));
        assert!(!La57::is_canonical(0xfe00_0000_0000_0000));
        assert_eq!(La57::index(top_user, Level::L5), 255);
        assert_eq!(La57::index(top_user, Level::L4), 511);
        assert_eq!(La57::index(0xff11_0000_0000_0000, Level::L5), 273);
        assert_eq!(La57::root_slot_base(256), 0xff00_0000_0000_0000);
        assert_eq!(La57::root_slot_base(255), 0x00ff_0000_0000_0000);
        assert_eq!(Level::L5.shift(), 48);
        assert_eq!(Level::L4.parent(), Some(Level::L5));
        assert_eq!(Level::L5.parent(), None);
    }
}
