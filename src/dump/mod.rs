//! Read real x86-64 page tables out of memory dumps.
//!
//! Two inputs are understood:
//!
//! - a QEMU `dump-guest-memory` ELF core: its `PT_LOAD` segments give
//!   guest-physical memory (`p_paddr`), and its `"QEMU"` notes carry each
//!   CPU's `QEMUCPUState` (CR0, CR3, CR4 among others; see [`elf`]);
//! - a raw physical image, as QEMU's `pmemsave` writes it (byte `n` of the
//!   file is guest-physical address `n`), with CR3 given by the caller.
//!
//! Files are memory-mapped ([`PhysMem`]), never read whole, so sparse
//! multi-gigabyte images cost only the pages that are touched.
//!
//! On top of the physical view:
//!
//! - [`walk`]: a 4-level walk of a foreign table (4 KiB, 2 MiB and 1 GiB
//!   leaves, PAT in bit 12 of large leaves, PTI's paired roots), with
//!   statistics and single-address translation;
//! - [`qemu`]: QEMU's `info mem` and `info tlb` output, line for line;
//! - [`pin`]: whether Xen would accept this table as a PV guest's (DESIGN
//!   §6, over the user half), and what pinning it would cost, counted by
//!   running the engine itself on a copy of the tables.
//!
//! Bad input is a [`DumpError`], never a panic.

pub mod cli;
pub mod elf;
pub mod phys;
pub mod pin;
pub mod qemu;
pub mod walk;

use std::fmt;
use std::path::Path;

pub use elf::{CpuState, ElfCoreWriter};
pub use phys::{PhysMem, Region};
pub use walk::{Leaf, Translation, WalkStats, Walker};

/// CR4.PAE (bit 5).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57 (bit 12): 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR0.PG (bit 31).
pub const CR0_PG: u64 = 1 << 31;
/// The bits of CR3 that hold the root table's address (bits 12..=51).
pub const CR3_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Under PTI the user root is the kernel root's frame + 4 KiB: this bit.
pub const PTI_USER_BIT: u64 = 0x1000;

/// Errors of the dump reader. Each names the problem precisely.
#[derive(Debug)]
pub enum DumpError {
    /// The file could not be opened or mapped.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is empty.
    Empty,
    /// Not an ELF file (no `\x7fELF` magic).
    NotElf,
    /// An ELF file of a kind this reader does not handle (class, byte order,
    /// machine, type).
    UnsupportedElf(String),
    /// The file ends before a structure it declares.
    Truncated(String),
    /// The ELF core has no `PT_LOAD` segment with memory in it.
    NoMemory,
    /// No CR3: the core has no QEMU CPU-state note and none was given.
    NoCr3,
    /// The CPU-state note is malformed or of an unknown version.
    BadCpuState(String),
    /// CR4.LA57 is set (or 5-level paging was asked for): not handled.
    FiveLevelPaging,
    /// The CPU was not in 4-level long mode (paging off or PAE off).
    NotLongMode {
        /// CR0 from the note.
        cr0: u64,
        /// CR4 from the note.
        cr4: u64,
    },
    /// The root table given by CR3 is not (wholly) inside the dump's memory.
    Cr3OutsideMemory {
        /// The CR3 value.
        cr3: u64,
    },
    /// A table entry (not a leaf) points outside the dump's memory.
    TableOutsideMemory {
        /// Level of the table holding the entry (4 = root).
        level: u8,
        /// Entry index in that table.
        index: usize,
        /// Guest-physical address of the entry.
        entry_pa: u64,
        /// The entry.
        entry: u64,
        /// First virtual address the entry covers (canonical).
        va: u64,
    },
    /// An entry with a bit set that the CPU treats as reserved in a way
    /// this walker cannot interpret (PS in a root entry).
    ReservedBit {
        /// Level of the table holding the entry.
        level: u8,
        /// Entry index.
        index: usize,
        /// Guest-physical address of the entry.
        entry_pa: u64,
        /// The entry.
        entry: u64,
    },
    /// A virtual address outside the 48-bit canonical space.
    NonCanonical {
        /// The address.
        va: u64,
    },
    /// A command-line style argument was invalid.
    BadArgument(String),
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Io { what, source } => write!(f, "{what}: {source}"),
            DumpError::Empty => write!(f, "the file is empty"),
            DumpError::NotElf => write!(f, "not an ELF file (no \\x7fELF magic)"),
            DumpError::UnsupportedElf(s) => write!(f, "unsupported ELF file: {s}"),
            DumpError::Truncated(s) => write!(f, "truncated file: {s}"),
            DumpError::NoMemory => write!(f, "the ELF core has no PT_LOAD segment with memory"),
            DumpError::NoCr3 => write!(
                f,
                "no CR3: the core has no QEMU CPU-state note; give --cr3 ADDR"
            ),
            DumpError::BadCpuState(s) => write!(f, "bad QEMU CPU-state note: {s}"),
            DumpError::FiveLevelPaging => write!(
                f,
                "5-level paging (CR4.LA57) is not supported: only 4-level x86-64 tables are read"
            ),
            DumpError::NotLongMode { cr0, cr4 } => write!(
                f,
                "the CPU is not in 4-level long mode (CR0 {cr0:#x}, CR4 {cr4:#x}: PG and PAE must be set)"
            ),
            DumpError::Cr3OutsideMemory { cr3 } => write!(
                f,
                "CR3 {cr3:#x}: the root table at {:#x} is outside the dump's memory",
                cr3 & CR3_ADDR_MASK
            ),
            DumpError::TableOutsideMemory {
                level,
                index,
                entry_pa,
                entry,
                va,
            } => write!(
                f,
                "L{level} entry {index} (at {entry_pa:#x}, value {entry:#018x}, covering VA {va:#x}) \
                 points to a table at {:#x}, outside the dump's memory",
                entry & CR3_ADDR_MASK
            ),
            DumpError::ReservedBit {
                level,
                index,
                entry_pa,
                entry,
            } => write!(
                f,
                "L{level} entry {index} (at {entry_pa:#x}, value {entry:#018x}) has the reserved PS bit set"
            ),
            DumpError::NonCanonical { va } => {
                write!(f, "{va:#x} is not a canonical 48-bit virtual address")
            }
            DumpError::BadArgument(s) => write!(f, "bad argument: {s}"),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A dump opened for reading: its physical memory and, for an ELF core,
/// the CPU states its QEMU notes carry.
pub struct Dump {
    /// Guest-physical memory.
    pub mem: PhysMem,
    /// One state per CPU, in note order (empty for a raw image or a core
    /// without QEMU notes).
    pub cpus: Vec<CpuState>,
}

impl Dump {
    /// Open a QEMU `dump-guest-memory` ELF core.
    pub fn open_core(path: &Path) -> Result<Dump, DumpError> {
        let (mem, cpus) = elf::open_core(path)?;
        Ok(Dump { mem, cpus })
    }

    /// Open a raw physical image (file offset = guest-physical address).
    pub fn open_raw(path: &Path) -> Result<Dump, DumpError> {
        Ok(Dump {
            mem: PhysMem::open_raw(path)?,
            cpus: Vec::new(),
        })
    }

    /// The CR3 to walk: `explicit` if given, else CPU `cpu`'s from the
    /// notes, checked for 4-level long mode (LA57 is an error).
    pub fn cr3(&self, explicit: Option<u64>, cpu: usize) -> Result<u64, DumpError> {
        if let Some(c) = explicit {
            if let Some(state) = self.cpus.get(cpu) {
                if state.cr4 & CR4_LA57 != 0 {
                    return Err(DumpError::FiveLevelPaging);
                }
            }
            return Ok(c);
        }
        let state = match self.cpus.get(cpu) {
            Some(s) => s,
            None if self.cpus.is_empty() => return Err(DumpError::NoCr3),
            None => {
                return Err(DumpError::BadArgument(format!(
                    "CPU {cpu} requested but the core has {} CPU note(s)",
                    self.cpus.len()
                )))
            }
        };
        state.check_long_mode()?;
        Ok(state.cr3)
    }
}
