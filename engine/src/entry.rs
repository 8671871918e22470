//! 64-bit x86 page-table entries (the same layout in 4-level and PAE mode).

use core::fmt;

bitflags::bitflags! {
    /// Flag bits of an x86 page-table entry (a `bitflags` set: `bits()`,
    /// `contains`, `intersects`, `union`, `difference`, `|`, `&`, `!`).
    ///
    /// The bit positions are the architectural ones. Every bit outside the
    /// address field (bits 12..=51) is a known flag bit, so
    /// `from_bits_truncate` drops exactly the address bits;
    /// [`EntryFlags::PAT_LARGE`] (bit 12) is therefore not a member of the
    /// set: it is meaningful only in a large leaf, where the caller adds it.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct EntryFlags: u64 {
        /// Bit 0: the entry is present.
        const PRESENT = 1 << 0;
        /// Bit 1: writes allowed.
        const WRITABLE = 1 << 1;
        /// Bit 2: user-mode accesses allowed.
        const USER = 1 << 2;
        /// Bit 3: page-level write-through.
        const PWT = 1 << 3;
        /// Bit 4: page-level cache disable.
        const PCD = 1 << 4;
        /// Bit 5: accessed (set by the CPU).
        const ACCESSED = 1 << 5;
        /// Bit 6: dirty (set by the CPU, leaves only).
        const DIRTY = 1 << 6;
        /// Bit 7: page size (2 MiB at L2, 1 GiB at L3); PAT in an L1 entry.
        const HUGE = 1 << 7;
        /// Bit 7 of an L1 entry: PAT index bit for 4 KiB pages.
        const PAT_4K = 1 << 7;
        /// Bit 8: global translation.
        const GLOBAL = 1 << 8;
        /// Bits 9..=11 and 52..=58: ignored by the CPU, free for software.
        const AVAILABLE = (0b111 << 9) | (0x7f << 52);
        // Bits 59..=62 (protection key): kept by `from_bits_truncate`.
        const _ = 0xf << 59;
        /// Bit 63: no-execute (with EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

impl EntryFlags {
    /// Bit 12 of a large (2 MiB / 1 GiB) entry: PAT index bit. Outside the
    /// flag set (an address bit elsewhere): `from_bits_truncate` drops it.
    pub const PAT_LARGE: Self = Self::from_bits_retain(1 << 12);
}

impl fmt::Debug for EntryFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(EntryFlags, &str); 11] = [
            (EntryFlags::PRESENT, "P"),
            (EntryFlags::WRITABLE, "W"),
            (EntryFlags::USER, "U"),
            (EntryFlags::PWT, "PWT"),
            (EntryFlags::PCD, "PCD"),
            (EntryFlags::ACCESSED, "A"),
            (EntryFlags::DIRTY, "D"),
            (EntryFlags::HUGE, "PS"),
            (EntryFlags::GLOBAL, "G"),
            (EntryFlags::PAT_LARGE, "PAT12"),
            (EntryFlags::NO_EXECUTE, "NX"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// One 64-bit page-table entry, as the hardware (or hypervisor) sees it: the
/// address field holds a *machine* frame number on Xen PV.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct PageTableEntry(u64);

impl PageTableEntry {
    /// Bits 12..=51: the physical address of the next table or page.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// The highest physical-address width pagepin models (bits 46..=51 are
    /// reserved, as on CPUs with MAXPHYADDR = 46).
    pub const MAX_PHYS_BITS: u32 = 46;
    /// Address bits above [`Self::MAX_PHYS_BITS`]: must be zero.
    pub const RESERVED_ADDR_BITS: u64 = Self::ADDR_MASK & !((1u64 << Self::MAX_PHYS_BITS) - 1);
    /// The empty (non-present) entry.
    pub const EMPTY: Self = Self(0);

    /// An entry from raw bits.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
    /// An entry pointing at frame `frame` (a machine frame number) with `flags`.
    pub const fn new(frame: u64, flags: EntryFlags) -> Self {
        Self(((frame << 12) & Self::ADDR_MASK) | flags.bits())
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The flag bits.
    pub const fn flags(self) -> EntryFlags {
        EntryFlags::from_bits_truncate(self.0)
    }
    /// The address field (bits 12..=51).
    pub const fn addr(self) -> u64 {
        self.0 & Self::ADDR_MASK
    }
    /// The frame number in the address field.
    pub const fn frame(self) -> u64 {
        self.addr() >> 12
    }
    /// Whether the present bit is set.
    pub const fn is_present(self) -> bool {
        self.0 & EntryFlags::PRESENT.bits() != 0
    }
    /// Whether the RW bit is set.
    pub const fn is_writable(self) -> bool {
        self.0 & EntryFlags::WRITABLE.bits() != 0
    }
    /// Whether the page-size bit is set (meaningful at L2 and L3 only).
    pub const fn is_huge(self) -> bool {
        self.0 & EntryFlags::HUGE.bits() != 0
    }
    /// The same entry with `flags` set.
    pub const fn with(self, flags: EntryFlags) -> Self {
        Self(self.0 | flags.bits())
    }
    /// The same entry with `flags` cleared.
    pub const fn without(self, flags: EntryFlags) -> Self {
        Self(self.0 & !flags.bits())
    }
}

impl fmt::Debug for PageTableEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PTE({:#x} {:?})", self.addr(), self.flags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_bits() {
        assert_eq!(core::mem::size_of::<PageTableEntry>(), 8);
        let e = PageTableEntry::new(0x1234, EntryFlags::PRESENT | EntryFlags::WRITABLE);
        assert_eq!(e.bits(), 0x0123_4003);
        assert_eq!(e.frame(), 0x1234);
        assert!(e.is_present() && e.is_writable() && !e.is_huge());
        let ro = e.without(EntryFlags::WRITABLE);
        assert!(!ro.is_writable());
        assert_eq!(ro.frame(), 0x1234);
        assert_eq!(PageTableEntry::RESERVED_ADDR_BITS, 0x000f_c000_0000_0000);
        assert_eq!(
            EntryFlags::from_bits_truncate(u64::MAX).bits(),
            !PageTableEntry::ADDR_MASK,
            "truncation drops exactly the address bits"
        );
        let f = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::NO_EXECUTE;
        assert!(f.contains(EntryFlags::PRESENT | EntryFlags::NO_EXECUTE));
        assert!(!f.contains(EntryFlags::USER));
        assert_eq!(f.difference(EntryFlags::WRITABLE).bits(), (1 << 63) | 1);
        assert_eq!(EntryFlags::HUGE, EntryFlags::PAT_4K);
        assert_eq!(alloc::format!("{f:?}"), "P|W|NX");
        assert_eq!(alloc::format!("{:?}", EntryFlags::empty()), "-");
        assert_eq!(
            alloc::format!("{:?}", EntryFlags::HUGE | EntryFlags::PAT_LARGE),
            "PS|PAT12"
        );
    }
}
