//! QEMU monitor output: `info mem` and `info tlb` for 4- and 5-level long
//! mode, line for line, so the inspector's output can be diffed against
//! QEMU's.
//!
//! The rules, from QEMU's `target/i386/monitor.c` (`mem_info_la48`,
//! `mem_print`, `tlb_info_la48`, `print_pte`, `addr_canonical`):
//!
//! - `info mem` scans every entry of every level in address order and keeps
//!   a running protection `prot` = the entry's U|RW|P bits ANDed with those
//!   of every level above (0 for a non-present entry at any level). Whenever
//!   `prot` changes, the range that just ended is printed (if it was
//!   mapped) and a new one starts at the current entry (if it is mapped).
//!   So consecutive mappings merge when their U/RW/P agree, whatever their
//!   physical addresses or other flags. A last, unmapped, boundary at
//!   `1 << 48` closes the scan.
//! - A range line is `START-END SIZE PROT`: three 16-digit lowercase hex
//!   numbers and `u`/`-`, `r`, `w`/`-`. Each number is "canonicalised" the
//!   QEMU way: if bit 47 is set, bits 48..=63 are set; otherwise it is left
//!   alone (so the end `1 << 48` prints as `0001000000000000`, and a size
//!   with bit 47 set prints sign-extended).
//! - `info tlb` prints one line per present leaf: `VA: PHYS FLAGS`, VA
//!   canonicalised, PHYS the entry masked to bits 12..=49 (4 KiB),
//!   21..=49 (2 MiB) or 30..=49 (1 GiB) (so PAT in bit 12 of a large leaf
//!   does not show), and nine flag characters `XGPDACTUW` (NX, global, PS,
//!   dirty, accessed, PCD, PWT, user, RW; `-` when clear); a 4 KiB entry's
//!   bit 7 (its PAT bit) is cleared first, so `P` marks large leaves only.
//!
//! Under 5-level paging (CR4.LA57; QEMU's `mem_info_la57`, `tlb_info_la57`)
//! the scans gain the L5 level on top, addresses are canonicalised from
//! bit 56 (bits 57..=63 set when it is set) and `info mem` closes at
//! `1 << 57`. `info tlb` here is QEMU's line for line. `info mem` is what
//! QEMU's scan is meant to print, **not** what QEMU 7.2 prints: its
//! `mem_info_la57` tests the present bit of L3 and L2 entries inverted
//! (a present entry counts as unmapped, a non-present one is descended
//! into), so on a real 5-level Linux guest it prints no line at all (fixed
//! upstream later; docs/PROTOCOL.md §13). Ours follows `mem_info_la48`'s
//! rules with the extra level: the ranges are exactly those QEMU's
//! `info tlb` implies, merged on U/RW/P (`tests/inspect_live_qemu.rs`
//! checks that on a live guest).

use std::io::Write;

use pagepin_engine::Level;

use super::walk::Walker;
use super::DumpError;

const PG_PRESENT: u64 = 1 << 0;
const PG_RW: u64 = 1 << 1;
const PG_USER: u64 = 1 << 2;
const PG_PWT: u64 = 1 << 3;
const PG_PCD: u64 = 1 << 4;
const PG_ACCESSED: u64 = 1 << 5;
const PG_DIRTY: u64 = 1 << 6;
const PG_PSE: u64 = 1 << 7;
const PG_GLOBAL: u64 = 1 << 8;
const PG_NX: u64 = 1 << 63;
const PROT_MASK: u64 = PG_USER | PG_RW | PG_PRESENT;

/// QEMU's leaf address masks in `info tlb`.
const MASK_4K: u64 = 0x3_ffff_ffff_f000;
const MASK_2M: u64 = 0x3_ffff_ffe0_0000;
const MASK_1G: u64 = 0x3_ffff_c000_0000;

/// QEMU's `addr_canonical` for 4-level paging: set bits 48..=63 when bit 47
/// is set; leave the value alone otherwise.
pub fn qemu_canonical(addr: u64) -> u64 {
    qemu_canonical_for(false, addr)
}

/// QEMU's `addr_canonical`: under 5-level paging (`la57`) set bits 57..=63
/// when bit 56 is set, else bits 48..=63 when bit 47 is set.
pub fn qemu_canonical_for(la57: bool, addr: u64) -> u64 {
    let top = if la57 { 56 } else { 47 };
    if addr & (1 << top) != 0 {
        addr | !((1u64 << (top + 1)) - 1)
    } else {
        addr
    }
}

/// The running state of `info mem`'s `mem_print`.
struct MemPrinter<'o> {
    /// Start of the open range; `None` is QEMU's `-1`.
    start: Option<u64>,
    last_prot: u64,
    la57: bool,
    out: &'o mut dyn Write,
}

impl MemPrinter<'_> {
    fn print(&mut self, end: u64, prot: u64) -> Result<(), DumpError> {
        if prot == self.last_prot {
            return Ok(());
        }
        if let Some(start) = self.start {
            writeln!(
                self.out,
                "{}",
                mem_line_for(self.la57, start, end, self.last_prot)
            )
            .map_err(write_error)?;
        }
        self.start = (prot != 0).then_some(end);
        self.last_prot = prot;
        Ok(())
    }
}

fn write_error(source: std::io::Error) -> DumpError {
    DumpError::Io {
        what: "write output".into(),
        source,
    }
}

/// Output collected in memory is UTF-8 (every line is ASCII).
fn into_string(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// One 4-level `info mem` line for the range `[start, end)` with
/// protection `prot` (U|RW|P bits), as QEMU prints it (without the newline).
pub fn mem_line(start: u64, end: u64, prot: u64) -> String {
    mem_line_for(false, start, end, prot)
}

/// [`mem_line`] for 4-level or (`la57`) 5-level paging.
pub fn mem_line_for(la57: bool, start: u64, end: u64, prot: u64) -> String {
    format!(
        "{:016x}-{:016x} {:016x} {}r{}",
        qemu_canonical_for(la57, start),
        qemu_canonical_for(la57, end),
        qemu_canonical_for(la57, end.wrapping_sub(start)),
        if prot & PG_USER != 0 { 'u' } else { '-' },
        if prot & PG_RW != 0 { 'w' } else { '-' },
    )
}

/// One 4-level `info tlb` line for a leaf at `va` with entry `pte` and
/// address mask `mask`, as QEMU's `print_pte` prints it (without the
/// newline).
pub fn tlb_line(va: u64, pte: u64, mask: u64) -> String {
    tlb_line_for(false, va, pte, mask)
}

/// [`tlb_line`] for 4-level or (`la57`) 5-level paging.
pub fn tlb_line_for(la57: bool, va: u64, pte: u64, mask: u64) -> String {
    let c = |bit: u64, ch: char| if pte & bit != 0 { ch } else { '-' };
    format!(
        "{:016x}: {:016x} {}{}{}{}{}{}{}{}{}",
        qemu_canonical_for(la57, va),
        pte & mask,
        c(PG_NX, 'X'),
        c(PG_GLOBAL, 'G'),
        c(PG_PSE, 'P'),
        c(PG_DIRTY, 'D'),
        c(PG_ACCESSED, 'A'),
        c(PG_PCD, 'C'),
        c(PG_PWT, 'T'),
        c(PG_USER, 'U'),
        c(PG_RW, 'W'),
    )
}

/// `info mem` for the table under `w`, as QEMU prints it (4-level: its
/// very lines; 5-level: what its scan means, see the module docs).
pub fn info_mem(w: &Walker<'_>) -> Result<String, DumpError> {
    let mut buf = Vec::new();
    write_info_mem(w, &mut buf)?;
    Ok(into_string(buf))
}

/// [`info_mem`], streamed to `out`.
///
/// QEMU follows every path through the tables; so does this, after the
/// walker's census has checked that the paths are bounded by the dump's
/// distinct tables (a cycle or a table at several levels that would make
/// them explode is [`DumpError::TableRecursion`]). One self-map slot is
/// bounded, and printed as QEMU prints it.
pub fn write_info_mem(w: &Walker<'_>, out: &mut dyn Write) -> Result<(), DumpError> {
    w.census(0..512)?.check()?;
    let mut p = MemPrinter {
        start: None,
        last_prot: 0,
        la57: w.la57(),
        out,
    };
    mem_table(w, &mut p, w.top(), w.root(), 0, PROT_MASK)?;
    // The top of the (uncanonical) scan closes the last range.
    p.print(1 << (w.top().shift() + 9), 0)
}

/// QEMU's `mem_info_la48` scan, one level: entries of the `level` table at
/// `table` covering VAs from `base`; `above` is the AND of the entries
/// above (the root: all of U|RW|P).
fn mem_table(
    w: &Walker<'_>,
    p: &mut MemPrinter<'_>,
    level: Level,
    table: u64,
    base: u64,
    above: u64,
) -> Result<(), DumpError> {
    for i in 0..512usize {
        let e = w.entry(table, i);
        let end = base + ((i as u64) << level.shift());
        if e & PG_PRESENT == 0 {
            p.print(end, 0)?;
            continue;
        }
        let leaf = match level {
            Level::L1 => true,
            Level::L2 | Level::L3 => e & PG_PSE != 0,
            // PS in an L4/L5 entry is reserved: an error naming it.
            _ => w.is_leaf(level, table, i, e)?,
        };
        if leaf {
            p.print(end, e & PROT_MASK & above)?;
            continue;
        }
        let (Some(child_level), child) = (level.child(), w.child(level, table, i, e, end)?) else {
            continue;
        };
        mem_table(w, p, child_level, child, end, above & e)?;
    }
    Ok(())
}

/// `info tlb` for the table under `w`, exactly as QEMU prints it.
pub fn info_tlb(w: &Walker<'_>) -> Result<String, DumpError> {
    let mut buf = Vec::new();
    write_info_tlb(w, &mut buf)?;
    Ok(into_string(buf))
}

/// [`info_tlb`], streamed to `out`; bounded as [`write_info_mem`].
pub fn write_info_tlb(w: &Walker<'_>, out: &mut dyn Write) -> Result<(), DumpError> {
    w.census(0..512)?.check()?;
    tlb_table(w, out, w.top(), w.root(), 0)
}

/// QEMU's `tlb_info_la48` (under `tlb_info_la57` for 5-level), one level.
fn tlb_table(
    w: &Walker<'_>,
    out: &mut dyn Write,
    level: Level,
    table: u64,
    base: u64,
) -> Result<(), DumpError> {
    let la57 = w.la57();
    for i in 0..512usize {
        let e = w.entry(table, i);
        if e & PG_PRESENT == 0 {
            continue;
        }
        let va = base + ((i as u64) << level.shift());
        let line = match level {
            Level::L3 if e & PG_PSE != 0 => tlb_line_for(la57, va, e, MASK_1G),
            Level::L2 if e & PG_PSE != 0 => tlb_line_for(la57, va, e, MASK_2M),
            // A 4 KiB entry's bit 7 is PAT: QEMU clears it before printing.
            Level::L1 => tlb_line_for(la57, va, e & !PG_PSE, MASK_4K),
            _ => {
                // PS in an L4/L5 entry is reserved: an error naming it.
                w.is_leaf(level, table, i, e)?;
                if let Some(child_level) = level.child() {
                    let child = w.child(level, table, i, e, va)?;
                    tlb_table(w, out, child_level, child, va)?;
                }
                continue;
            }
        };
        writeln!(out, "{line}").map_err(write_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected strings worked out by hand from QEMU's format strings:
    // TARGET_FMT_plx is "%016" PRIx64.

    #[test]
    fn mem_lines() {
        assert_eq!(
            mem_line(0x40_0000, 0x40_2000, PG_PRESENT | PG_USER | PG_RW),
            "0000000000400000-0000000000402000 0000000000002000 urw"
        );
        assert_eq!(
            mem_line(0x8880_0000_0000, 0x8880_4000_0000, PG_PRESENT | PG_RW),
            "ffff888000000000-ffff888040000000 0000000040000000 -rw"
        );
        // The top of the space closes at 1 << 48, printed unextended.
        assert_eq!(
            mem_line(0xffff_ffe0_0000, 1 << 48, PG_PRESENT),
            "ffffffffffe00000-0001000000000000 0000000000200000 -r-"
        );
        // A size with bit 47 set is sign-extended, as QEMU does.
        assert_eq!(
            mem_line(0, 0x8000_0000_0000, PG_PRESENT | PG_USER),
            "0000000000000000-ffff800000000000 ffff800000000000 ur-"
        );
    }

    #[test]
    fn tlb_lines() {
        // 4 KiB: PAT (bit 7) cleared by the caller; NX, G, D, A, U, W.
        let pte = (1u64 << 63) | 0x1234_5000 | 0x100 | 0x40 | 0x20 | 0x4 | 0x2 | 0x1;
        assert_eq!(
            tlb_line(0x7fff_f000, pte, MASK_4K),
            "000000007ffff000: 0000000012345000 XG-DA--UW"
        );
        // 2 MiB with PAT in bit 12, PCD and PWT: the mask drops bit 12.
        let pde = 0x20_0000 | 0x1000 | 0x80 | 0x10 | 0x8 | 0x1;
        assert_eq!(
            tlb_line(0xffff_8000_0020_0000, pde, MASK_2M),
            "ffff800000200000: 0000000000200000 --P--CT--"
        );
        // 1 GiB, kernel half, given uncanonical as QEMU computes it.
        let pdpe = 0x4000_0000 | 0x80 | 0x2 | 0x1;
        assert_eq!(
            tlb_line(0x8880_4000_0000, pdpe, MASK_1G),
            "ffff888040000000: 0000000040000000 --P-----W"
        );
    }

    #[test]
    fn printer_merges_on_prot_only() {
        let mut out = Vec::new();
        let mut p = MemPrinter {
            start: None,
            last_prot: 0,
            la57: false,
            out: &mut out,
        };
        for (end, prot) in [
            (0x1000, 0),
            (0x2000, 7),
            (0x3000, 7),
            (0x4000, 3),
            (0x5000, 0),
        ] {
            p.print(end, prot).unwrap();
        }
        p.print(1 << 48, 0).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0000000000002000-0000000000004000 0000000000002000 urw\n\
             0000000000004000-0000000000005000 0000000000001000 -rw\n"
        );
    }
}
