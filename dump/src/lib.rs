//! Read real x86-64 page tables out of memory dumps: the library behind
//! the `inspect` tool (`cargo install --path dump`, then `inspect --help`).
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
//! - [`walk`]: a 4- or 5-level walk of a foreign table (4 KiB, 2 MiB and 1 GiB
//!   leaves, PAT in bit 12 of large leaves, PTI's paired roots), with
//!   statistics and single-address translation;
//! - [`qemu`]: QEMU's `info mem` and `info tlb` output, line for line;
//! - [`pin`]: whether Xen would accept this table as a PV guest's (the
//!   rules of the repository's docs/PROTOCOL.md §6, over the user half), and what pinning it would cost, counted by
//!   running the engine itself on a copy of the tables.
//!
//! Bad input is a [`DumpError`], never a panic, a hang or an allocation
//! sized by a number read from the file: header counts and sizes are
//! checked against the file before use, segments against the 52-bit
//! physical address space ([`MAX_PHYS_END`]), walks are bounded by the
//! dump's distinct tables whatever cycles they form ([`walk::Census`]), and
//! the simulated domain of `pin::sim_check` is sized by the frames the
//! tables map, not by their numbers.
//!
//! # Cargo features
//!
//! - `cli` (default): `pagepin_dump::cli`, the `inspect` command line (clap), and the
//!   `inspect` binary. Without it the crate is the reader alone.
//! - `xen` (default): `--pin-report`'s verdict comes from the simulated Xen
//!   hypervisor of `pagepin-backends` (`pin::sim_check`); without it the
//!   hand-written rule checks decide.

#[cfg(feature = "cli")]
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
pub use walk::{Census, Leaf, Translation, WalkStats, Walker};

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
/// One past the highest guest-physical address x86-64 can have (52-bit
/// MAXPHYADDR): memory ranges of a dump must end at or below it.
pub const MAX_PHYS_END: u64 = 1 << 52;

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
    /// The path is a directory (or another non-regular file).
    NotAFile {
        /// What it is instead.
        kind: &'static str,
    },
    /// Not an ELF file (no `\x7fELF` magic).
    NotElf,
    /// An ELF file of a kind this reader does not handle (class, byte order,
    /// machine, type).
    UnsupportedElf(String),
    /// The file ends before a structure it declares.
    Truncated(String),
    /// The ELF core has no `PT_LOAD` segment with memory in it.
    NoMemory {
        /// File offset of the program header table (`e_phoff`).
        phoff: u64,
        /// Program headers in it.
        phnum: u64,
    },
    /// A `PT_LOAD` segment that no guest can have: it ends beyond the
    /// 52-bit guest-physical address space x86-64 allows (or wraps).
    ImpossibleSegment {
        /// The segment's program-header index.
        index: usize,
        /// File offset of its program header.
        header_offset: u64,
        /// `p_paddr`.
        paddr: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// No CR3: the core has no QEMU CPU-state note and none was given.
    NoCr3,
    /// The CPU-state note is malformed or of an unknown version.
    BadCpuState(String),
    /// The CPU was not in long-mode paging (paging off or PAE off).
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
    /// A table reached at more than one level (a cycle, or a recursive
    /// "self-map" entry) in a table whose walk would visit more tables than
    /// its bound ([`Census::limit`]): following every path, as QEMU
    /// does, would take time (and output) exponential in the recursion.
    TableRecursion {
        /// Guest-physical address of the table.
        table: u64,
        /// The levels it is reached at, highest first.
        levels: Vec<u8>,
        /// Level of the table holding the first entry that reaches it at a
        /// second level.
        level: u8,
        /// That entry's index.
        index: usize,
        /// That entry's guest-physical address.
        entry_pa: u64,
        /// That entry.
        entry: u64,
        /// Table visits a walk of every path would make.
        visits: u64,
        /// The bound.
        limit: u64,
    },
    /// Tables shared by so many entries at one level that a walk of every
    /// path would visit more tables than its bound ([`Census::limit`]).
    WalkTooLarge {
        /// Guest-physical address of the table reached by the most paths.
        table: u64,
        /// Its level.
        level: u8,
        /// Paths reaching it.
        paths: u64,
        /// Table visits a walk of every path would make.
        visits: u64,
        /// The bound.
        limit: u64,
    },
    /// A virtual address outside the canonical space (48-bit, or 57-bit
    /// under 5-level paging).
    NonCanonical {
        /// The address.
        va: u64,
        /// Whether the walk is 5-level (57-bit addresses).
        la57: bool,
    },
    /// A 5-level table given to a Xen PV check: Xen PV guests are 4-level
    /// only (their root is pinned with `MMUEXT_PIN_L4_TABLE`).
    XenFourLevelOnly {
        /// The 5-level root.
        root: u64,
    },
    /// A command-line style argument was invalid.
    BadArgument(String),
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Io { what, source } => write!(f, "{what}: {source}"),
            DumpError::Empty => write!(
                f,
                "the file is empty: expected an ELF core or a raw image from offset 0x0"
            ),
            DumpError::NotAFile { kind } => write!(
                f,
                "{kind}: expected a regular file (an ELF core, or a raw image with --raw) at \
                 offset 0x0"
            ),
            DumpError::NotElf => write!(
                f,
                "not an ELF file: expected the magic \\x7fELF at offset 0x0 (a raw image needs --raw)"
            ),
            DumpError::UnsupportedElf(s) => write!(f, "unsupported ELF file: {s}"),
            DumpError::Truncated(s) => write!(f, "truncated file: {s}"),
            DumpError::NoMemory { phoff, phnum } => write!(
                f,
                "the ELF core has no PT_LOAD segment with memory: expected one among the \
                 {phnum} program header(s) at offset {phoff:#x}"
            ),
            DumpError::ImpossibleSegment {
                index,
                header_offset,
                paddr,
                memsz,
            } => write!(
                f,
                "PT_LOAD segment {index} (program header at offset {header_offset:#x}): p_paddr \
                 {paddr:#x} + p_memsz {memsz:#x} ends beyond guest-physical memory: expected an \
                 end at most {MAX_PHYS_END:#x} (52-bit physical addresses)"
            ),
            DumpError::NoCr3 => write!(
                f,
                "no CR3: expected a QEMU CPU-state note (\"QEMU\", type 0) in a PT_NOTE segment; \
                 the core has none: give --cr3 ADDR"
            ),
            DumpError::BadCpuState(s) => write!(f, "bad QEMU CPU-state note: {s}"),
            DumpError::NotLongMode { cr0, cr4 } => write!(
                f,
                "the CPU is not in long-mode paging (CR0 {cr0:#x}, CR4 {cr4:#x}): expected \
                 CR0.PG ({CR0_PG:#x}) and CR4.PAE ({CR4_PAE:#x}) set"
            ),
            DumpError::Cr3OutsideMemory { cr3 } => write!(
                f,
                "CR3 {cr3:#x}: the root table at {:#x} is outside the dump's memory: expected a \
                 page inside it",
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
                 points to a table at {:#x}, outside the dump's memory: expected a page inside it",
                entry & CR3_ADDR_MASK
            ),
            DumpError::ReservedBit {
                level,
                index,
                entry_pa,
                entry,
            } => write!(
                f,
                "L{level} entry {index} (at {entry_pa:#x}, value {entry:#018x}) has the reserved PS \
                 bit set: expected it clear in a root entry"
            ),
            DumpError::TableRecursion {
                table,
                levels,
                level,
                index,
                entry_pa,
                entry,
                visits,
                limit,
            } => {
                let names: Vec<String> = levels.iter().map(|l| format!("L{l}")).collect();
                write!(
                    f,
                    "the table at {table:#x} is reached at levels {} (L{level} entry {index} at \
                     {entry_pa:#x} = {entry:#018x} reaches it again as an L{}): a cycle or \
                     recursive mapping whose walk would visit {visits} tables, over the bound \
                     {limit}; expected each table at one level, or a recursion as bounded as \
                     one self-map slot (--stats counts it exactly)",
                    names.join(", "),
                    level.saturating_sub(1),
                )
            }
            DumpError::WalkTooLarge {
                table,
                level,
                paths,
                visits,
                limit,
            } => write!(
                f,
                "the L{level} table at {table:#x} is reached by {paths} paths (shared entries): a \
                 walk of every path would visit {visits} tables, over the bound {limit}; expected \
                 tables shared less (--stats counts them exactly)"
            ),
            DumpError::NonCanonical { va, la57 } => {
                let (bits, top) = if *la57 { (57, 56) } else { (48, 47) };
                write!(
                    f,
                    "{va:#x} is not a canonical {bits}-bit virtual address: expected bits \
                     63..={top} all equal"
                )
            }
            DumpError::XenFourLevelOnly { root } => write!(
                f,
                "the table at {root:#x} is 5-level (CR4.LA57): Xen PV cannot run it; expected a \
                 4-level table (Xen PV pins an L4 root)"
            ),
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
    /// notes, checked for long-mode paging.
    pub fn cr3(&self, explicit: Option<u64>, cpu: usize) -> Result<u64, DumpError> {
        if let Some(c) = explicit {
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

    /// Whether CPU `cpu`'s note says 5-level paging (CR4.LA57); `false`
    /// without a note (a raw image: `--la57` says so).
    pub fn la57(&self, cpu: usize) -> bool {
        self.cpus.get(cpu).is_some_and(CpuState::la57)
    }
}
