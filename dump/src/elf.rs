//! QEMU `dump-guest-memory` ELF cores: reading and (for tests and tools)
//! writing.
//!
//! The layout follows the ELF64 specification and QEMU's
//! `target/i386/arch_dump.c`: every CPU contributes a `"CORE"` note
//! (`NT_PRSTATUS`) and a `"QEMU"` note of type 0 whose descriptor is a
//! `QEMUCPUState`, version 1, 432 bytes:
//!
//! | offset | field |
//! |---|---|
//! | 0 | `version: u32` (1) |
//! | 4 | `size: u32` (432) |
//! | 8 | rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15, rip, rflags (`u64` each) |
//! | 152 | cs, ds, es, fs, gs, ss, ldt, tr, gdt, idt: each `{selector, limit, flags, pad: u32; base: u64}` (24 bytes) |
//! | 392 | `cr[5]: u64` (CR0 at 392, CR3 at 416, CR4 at 424) |
//!
//! Written by hand rather than with an object-file crate: a core needs the
//! ELF header, program headers and notes only (no sections, symbols or
//! relocations), every count and offset must be checked against a hostile
//! file with a typed error naming the offset, and the segments are mapped,
//! not parsed into owned buffers. That is a few hundred lines that a
//! general parser would not make shorter or stricter.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use super::phys::{self, PhysMem, Region};
use super::{DumpError, CR0_PG, CR4_LA57, CR4_PAE, MAX_PHYS_END};

/// `PT_LOAD`.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE`.
pub const PT_NOTE: u32 = 4;
/// `ET_CORE`.
pub const ET_CORE: u16 = 4;
/// `EM_X86_64`.
pub const EM_X86_64: u16 = 62;
/// `PN_XNUM`: the real program-header count is in section 0's `sh_info`.
pub const PN_XNUM: u16 = 0xffff;
/// The `QEMUCPUState` version this reader knows.
pub const QEMU_CPU_STATE_VERSION: u32 = 1;
/// Size of a version-1 `QEMUCPUState`.
pub const QEMU_CPU_STATE_SIZE: usize = 432;
const CR_OFFSET: usize = 392;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// The registers of one CPU that the inspector uses, from its QEMU note.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3: the root table (and PCID / PTI bits).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// RIP.
    pub rip: u64,
}

impl CpuState {
    /// A state in 4-level long mode (PG, PE, PAE) with `cr3`.
    pub fn long_mode(cr3: u64) -> CpuState {
        CpuState {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            ..CpuState::default()
        }
    }

    /// Decode a `QEMUCPUState` descriptor.
    pub fn decode(desc: &[u8]) -> Result<CpuState, DumpError> {
        if desc.len() < 8 {
            return Err(DumpError::BadCpuState(format!(
                "descriptor of {} bytes, expected at least its 8-byte header",
                desc.len()
            )));
        }
        let version = u32_at(desc, 0);
        let size = u32_at(desc, 4) as usize;
        if version != QEMU_CPU_STATE_VERSION {
            return Err(DumpError::BadCpuState(format!(
                "version {version}, expected {QEMU_CPU_STATE_VERSION}"
            )));
        }
        if size < QEMU_CPU_STATE_SIZE || desc.len() < QEMU_CPU_STATE_SIZE {
            return Err(DumpError::BadCpuState(format!(
                "size {size} (descriptor {} bytes), expected {QEMU_CPU_STATE_SIZE}",
                desc.len()
            )));
        }
        Ok(CpuState {
            rip: u64_at(desc, 8 + 16 * 8),
            cr0: u64_at(desc, CR_OFFSET),
            cr2: u64_at(desc, CR_OFFSET + 16),
            cr3: u64_at(desc, CR_OFFSET + 24),
            cr4: u64_at(desc, CR_OFFSET + 32),
        })
    }

    /// Encode as a version-1 `QEMUCPUState` (other registers zero).
    pub fn encode(&self) -> [u8; QEMU_CPU_STATE_SIZE] {
        let mut b = [0u8; QEMU_CPU_STATE_SIZE];
        b[0..4].copy_from_slice(&QEMU_CPU_STATE_VERSION.to_le_bytes());
        b[4..8].copy_from_slice(&(QEMU_CPU_STATE_SIZE as u32).to_le_bytes());
        b[8 + 16 * 8..8 + 17 * 8].copy_from_slice(&self.rip.to_le_bytes());
        for (i, v) in [self.cr0, 0, self.cr2, self.cr3, self.cr4]
            .into_iter()
            .enumerate()
        {
            let o = CR_OFFSET + 8 * i;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Check for long-mode paging: paging and PAE on (4-level, or 5-level
    /// with CR4.LA57: see [`Self::la57`]).
    pub fn check_long_mode(&self) -> Result<(), DumpError> {
        if self.cr0 & CR0_PG == 0 || self.cr4 & CR4_PAE == 0 {
            return Err(DumpError::NotLongMode {
                cr0: self.cr0,
                cr4: self.cr4,
            });
        }
        Ok(())
    }

    /// Whether CR4.LA57 is set: 5-level paging.
    pub fn la57(&self) -> bool {
        self.cr4 & CR4_LA57 != 0
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// A bounds-checked slice of the file.
fn slice<'a>(file: &'a [u8], off: u64, len: u64, what: &str) -> Result<&'a [u8], DumpError> {
    let end = off.checked_add(len);
    match end {
        Some(end) if end <= file.len() as u64 => Ok(&file[off as usize..end as usize]),
        _ => Err(DumpError::Truncated(format!(
            "{what} at offset {off:#x} ({len} bytes) runs past the end of the file ({} bytes): \
             expected it inside the file",
            file.len()
        ))),
    }
}

/// One program header.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    p_type: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Parse the program headers and notes of an ELF64 core in `file`.
fn parse(file: &[u8]) -> Result<(Vec<Phdr>, Vec<CpuState>), DumpError> {
    if file.is_empty() {
        return Err(DumpError::Empty);
    }
    if file.len() < 4 || &file[..4] != b"\x7fELF" {
        return Err(DumpError::NotElf);
    }
    let eh = slice(file, 0, EHDR_SIZE as u64, "the ELF header")?;
    match eh[4] {
        2 => {}
        1 => {
            return Err(DumpError::UnsupportedElf(
                "ELFCLASS32 at offset 0x4, expected ELFCLASS64 (2): QEMU writes a 32-bit core \
                 when the guest is not in long mode"
                    .into(),
            ))
        }
        c => {
            return Err(DumpError::UnsupportedElf(format!(
                "ELF class {c} at offset 0x4, expected ELFCLASS64 (2)"
            )))
        }
    }
    if eh[5] != 1 {
        return Err(DumpError::UnsupportedElf(format!(
            "byte order {} at offset 0x5, expected little-endian (1)",
            eh[5]
        )));
    }
    let e_type = u16_at(eh, 16);
    let machine = u16_at(eh, 18);
    if e_type != ET_CORE {
        return Err(DumpError::UnsupportedElf(format!(
            "e_type {e_type} at offset 0x10, expected ET_CORE (4)"
        )));
    }
    if machine != EM_X86_64 {
        return Err(DumpError::UnsupportedElf(format!(
            "e_machine {machine} at offset 0x12, expected EM_X86_64 (62)"
        )));
    }
    let phoff = u64_at(eh, 32);
    let shoff = u64_at(eh, 40);
    let phentsize = u16_at(eh, 54) as u64;
    let mut phnum = u16_at(eh, 56) as u64;
    if phentsize != PHDR_SIZE as u64 {
        return Err(DumpError::UnsupportedElf(format!(
            "e_phentsize {phentsize} at offset 0x36, expected {PHDR_SIZE}"
        )));
    }
    if phnum == PN_XNUM as u64 {
        // The real count is in section header 0's sh_info (offset 44).
        let sh0 = slice(file, shoff, 64, "section header 0 (PN_XNUM)")?;
        phnum = u32_at(sh0, 44) as u64;
    }
    let table = slice(
        file,
        phoff,
        phnum.saturating_mul(PHDR_SIZE as u64),
        "the program header table",
    )?;
    // The count was checked against the file above (the table is a slice of
    // it), so this allocation is bounded by the file's size.
    let mut phdrs = Vec::with_capacity(table.len() / PHDR_SIZE);
    for p in table.chunks_exact(PHDR_SIZE) {
        phdrs.push(Phdr {
            p_type: u32_at(p, 0),
            offset: u64_at(p, 8),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
        });
    }
    let mut cpus = Vec::new();
    for (i, p) in phdrs.iter().enumerate() {
        // phoff + i * 56 lies inside the table, itself inside the file.
        let header_offset = phoff + (i * PHDR_SIZE) as u64;
        match p.p_type {
            PT_NOTE => {
                let notes = slice(file, p.offset, p.filesz, &format!("PT_NOTE segment {i}"))?;
                parse_notes(notes, i, p.offset, &mut cpus)?;
            }
            PT_LOAD => {
                slice(file, p.offset, p.filesz, &format!("PT_LOAD segment {i}"))?;
                if p.filesz > p.memsz {
                    return Err(DumpError::UnsupportedElf(format!(
                        "PT_LOAD segment {i} (program header at offset {header_offset:#x}): \
                         p_filesz {:#x} > p_memsz {:#x}, expected p_filesz <= p_memsz",
                        p.filesz, p.memsz
                    )));
                }
                // Guest-physical memory ends at 2^52 on x86-64: a segment
                // beyond it (or wrapping) is no guest's, and its end would
                // overflow the arithmetic that clips overlapping segments.
                if p.paddr
                    .checked_add(p.memsz)
                    .is_none_or(|e| e > MAX_PHYS_END)
                {
                    return Err(DumpError::ImpossibleSegment {
                        index: i,
                        header_offset,
                        paddr: p.paddr,
                        memsz: p.memsz,
                    });
                }
            }
            _ => {}
        }
    }
    if !phdrs.iter().any(|p| p.p_type == PT_LOAD && p.memsz > 0) {
        return Err(DumpError::NoMemory {
            phoff,
            phnum: phdrs.len() as u64,
        });
    }
    Ok((phdrs, cpus))
}

/// Parse the notes of PT_NOTE segment `seg` (`b`, at file offset `off`).
fn parse_notes(
    mut b: &[u8],
    seg: usize,
    off: u64,
    cpus: &mut Vec<CpuState>,
) -> Result<(), DumpError> {
    let pad4 = |n: usize| n.div_ceil(4) * 4;
    let mut at = off;
    while b.len() >= 12 {
        let namesz = u32_at(b, 0) as usize;
        let descsz = u32_at(b, 4) as usize;
        let ntype = u32_at(b, 8);
        let name_end = 12usize.saturating_add(pad4(namesz));
        let desc_end = name_end.saturating_add(pad4(descsz));
        if desc_end > b.len() {
            return Err(DumpError::Truncated(format!(
                "the note at offset {at:#x} in PT_NOTE segment {seg} (name {namesz} bytes, \
                 descriptor {descsz} bytes) runs past its segment: expected it to end within \
                 {} bytes",
                b.len()
            )));
        }
        let name = &b[12..12 + namesz];
        if name == b"QEMU\0" && ntype == 0 {
            let desc_at = at + name_end as u64;
            let cpu = CpuState::decode(&b[name_end..name_end + descsz]).map_err(|e| match e {
                DumpError::BadCpuState(s) => {
                    DumpError::BadCpuState(format!("the descriptor at offset {desc_at:#x}: {s}"))
                }
                e => e,
            })?;
            cpus.push(cpu);
        }
        b = &b[desc_end..];
        at += desc_end as u64;
    }
    Ok(())
}

/// Open a core: its memory and its CPU states.
pub(crate) fn open_core(path: &Path) -> Result<(PhysMem, Vec<CpuState>), DumpError> {
    let file = phys::open(path)?;
    let map = phys::map_file(&file, &path.display().to_string())?.ok_or(DumpError::Empty)?;
    let (phdrs, cpus) = parse(&map)?;
    let regions: Vec<Region> = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.memsz > 0)
        .map(|p| Region {
            paddr: p.paddr,
            len: p.memsz,
            offset: p.offset,
            file_len: p.filesz,
        })
        .collect();
    Ok((PhysMem::from_regions(Some(map), regions)?, cpus))
}

/// Writes an ELF64 core in the shape QEMU's `dump-guest-memory` gives it:
/// one `PT_NOTE` segment with a `"CORE"` and a `"QEMU"` note per CPU, then
/// one `PT_LOAD` per memory range (`p_vaddr` 0, `p_paddr` the
/// guest-physical address), data 4 KiB-aligned. Ranges may be given as
/// sparse: only their non-zero pages need be written ([`Self::write_page`]).
pub struct ElfCoreWriter {
    cpus: Vec<CpuState>,
    ranges: Vec<(u64, u64)>,
}

impl ElfCoreWriter {
    /// A writer for memory `ranges` (`(paddr, len)`, page-aligned) and CPU
    /// states `cpus`.
    pub fn new(ranges: &[(u64, u64)], cpus: &[CpuState]) -> ElfCoreWriter {
        ElfCoreWriter {
            cpus: cpus.to_vec(),
            ranges: ranges.to_vec(),
        }
    }

    fn notes(&self) -> Vec<u8> {
        let mut n = Vec::new();
        let note = |n: &mut Vec<u8>, name: &[u8], ntype: u32, desc: &[u8]| {
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            n.extend_from_slice(&ntype.to_le_bytes());
            n.extend_from_slice(name);
            n.resize(n.len().div_ceil(4) * 4, 0);
            n.extend_from_slice(desc);
            n.resize(n.len().div_ceil(4) * 4, 0);
        };
        for (i, c) in self.cpus.iter().enumerate() {
            // x86_64 elf_prstatus: 336 bytes, pid at 32; registers zero.
            let mut prstatus = [0u8; 336];
            prstatus[32..36].copy_from_slice(&(i as u32 + 1).to_le_bytes());
            note(&mut n, b"CORE\0", 1, &prstatus);
            note(&mut n, b"QEMU\0", 0, &c.encode());
        }
        n
    }

    /// File offset of each range's data, and the total file size.
    fn layout(&self) -> (Vec<u64>, u64, Vec<u8>) {
        let notes = self.notes();
        let phnum = 1 + self.ranges.len() as u64;
        let notes_off = EHDR_SIZE as u64 + phnum * PHDR_SIZE as u64;
        let mut off = (notes_off + notes.len() as u64).div_ceil(4096) * 4096;
        let mut offs = Vec::new();
        for &(_, len) in &self.ranges {
            offs.push(off);
            off += len;
        }
        (offs, off, notes)
    }

    /// Write headers and notes to `f` and size it; data pages are then
    /// written with [`Self::write_page`] (unwritten pages read as zero and
    /// stay holes in a sparse file).
    pub fn write_headers(&self, f: &mut File) -> io::Result<()> {
        let (offs, total, notes) = self.layout();
        let phnum = 1 + self.ranges.len();
        assert!(phnum < PN_XNUM as usize, "too many ranges for this writer");
        let mut h = Vec::with_capacity(EHDR_SIZE + phnum * PHDR_SIZE);
        h.extend_from_slice(b"\x7fELF");
        h.extend_from_slice(&[2, 1, 1, 0]);
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&ET_CORE.to_le_bytes());
        h.extend_from_slice(&EM_X86_64.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes()); // e_version
        h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
        h.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
        h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        h.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        h.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        h.extend_from_slice(&(phnum as u16).to_le_bytes());
        h.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        h.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        h.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        let notes_off = (EHDR_SIZE + phnum * PHDR_SIZE) as u64;
        let phdr = |h: &mut Vec<u8>, t: u32, off: u64, paddr: u64, len: u64, align: u64| {
            h.extend_from_slice(&t.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes()); // p_flags
            h.extend_from_slice(&off.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr
            h.extend_from_slice(&paddr.to_le_bytes());
            h.extend_from_slice(&len.to_le_bytes()); // p_filesz
            h.extend_from_slice(&len.to_le_bytes()); // p_memsz
            h.extend_from_slice(&align.to_le_bytes());
        };
        phdr(&mut h, PT_NOTE, notes_off, 0, notes.len() as u64, 0);
        for (&(paddr, len), &off) in self.ranges.iter().zip(&offs) {
            phdr(&mut h, PT_LOAD, off, paddr, len, 0);
        }
        h.extend_from_slice(&notes);
        f.set_len(total)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&h)
    }

    /// Write `data` at guest-physical `pa` (inside one range).
    pub fn write_page(&self, f: &mut File, pa: u64, data: &[u8]) -> io::Result<()> {
        let (offs, _, _) = self.layout();
        for (&(paddr, len), &off) in self.ranges.iter().zip(&offs) {
            let end = pa.checked_add(data.len() as u64);
            if pa >= paddr && end.is_some_and(|e| Some(e) <= paddr.checked_add(len)) {
                f.seek(SeekFrom::Start(off + (pa - paddr)))?;
                return f.write_all(data);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{pa:#x} is in no range of the core"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_state_round_trips_at_qemu_offsets() {
        let s = CpuState {
            cr0: 0x8005_0033,
            cr2: 0x7f00_1234,
            cr3: 0x1234_5000 | 0x1000,
            cr4: 0x3606f0,
            rip: 0xffff_ffff_8100_0000,
        };
        let b = s.encode();
        assert_eq!(u64_at(&b, 416), s.cr3, "CR3 is cr[3] at 392 + 24");
        assert_eq!(u64_at(&b, 424), s.cr4);
        assert_eq!(u64_at(&b, 392), s.cr0);
        assert_eq!(u64_at(&b, 136), s.rip, "rip follows 16 GPRs");
        assert_eq!(CpuState::decode(&b).unwrap(), s);
        let mut bad = b;
        bad[0] = 2;
        assert!(matches!(
            CpuState::decode(&bad),
            Err(DumpError::BadCpuState(_))
        ));
        assert!(matches!(
            CpuState::decode(&b[..100]),
            Err(DumpError::BadCpuState(_))
        ));
    }

    #[test]
    fn mode_checks() {
        assert!(CpuState::long_mode(0x1000).check_long_mode().is_ok());
        let mut s = CpuState::long_mode(0x1000);
        s.cr4 |= CR4_LA57;
        assert!(s.check_long_mode().is_ok() && s.la57());
        s.cr4 = CR4_LA57;
        assert!(matches!(
            s.check_long_mode(),
            Err(DumpError::NotLongMode { .. })
        ));
        s.cr4 = 0;
        assert!(matches!(
            s.check_long_mode(),
            Err(DumpError::NotLongMode { .. })
        ));
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        assert!(matches!(parse(b""), Err(DumpError::Empty)));
        assert!(matches!(parse(b"\x7fEL"), Err(DumpError::NotElf)));
        assert!(matches!(parse(b"MZ\0\0\0\0"), Err(DumpError::NotElf)));
        assert!(matches!(
            parse(b"\x7fELF\x02\x01\x01"),
            Err(DumpError::Truncated(_))
        ));
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        assert!(matches!(parse(&h), Err(DumpError::UnsupportedElf(_))));
        h[4] = 2;
        h[5] = 1;
        h[16] = 2; // ET_EXEC
        assert!(matches!(parse(&h), Err(DumpError::UnsupportedElf(_))));
        h[16] = 4;
        h[18] = 62;
        h[54] = 56;
        h[56] = 3; // three program headers ...
        h[32] = 64; // ... at 64, past the end
        assert!(matches!(parse(&h), Err(DumpError::Truncated(_))));
        // Every prefix of a valid header parses or fails cleanly.
        for n in 0..h.len() {
            let _ = parse(&h[..n]);
        }
    }
}
