//! A guest-physical memory view over a memory-mapped file.

use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

use super::{DumpError, MAX_PHYS_END};

/// One range of guest-physical memory and where it lies in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First guest-physical address.
    pub paddr: u64,
    /// Bytes of guest memory in the range.
    pub len: u64,
    /// File offset of `paddr`.
    pub offset: u64,
    /// Bytes present in the file (`<= len`); the rest reads as zero, as an
    /// ELF segment whose `p_filesz` is below its `p_memsz`.
    pub file_len: u64,
}

impl Region {
    /// One past the last address (saturating: a [`PhysMem`]'s regions are
    /// checked to end at or below [`MAX_PHYS_END`]).
    pub fn end(&self) -> u64 {
        self.paddr.saturating_add(self.len)
    }
}

/// Guest-physical memory: sorted, non-overlapping regions of a mapped file.
pub struct PhysMem {
    map: Option<Mmap>,
    regions: Vec<Region>,
}

/// Map `file` read-only; `what` names it in errors.
pub(crate) fn map_file(file: &File, what: &str) -> Result<Option<Mmap>, DumpError> {
    let meta = file.metadata().map_err(|source| DumpError::Io {
        what: format!("stat {what}"),
        source,
    })?;
    // A directory or a device cannot be mapped (mmap says ENODEV, which
    // names neither the problem nor the fix): refuse it as bad input.
    if !meta.is_file() {
        return Err(DumpError::NotAFile {
            kind: if meta.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            },
        });
    }
    let len = meta.len();
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: the mapping is read-only and private to this process; it is
    // only ever read through the `&[u8]` it derefs to. A dump is an input
    // file that nothing is expected to modify or truncate while it is
    // inspected (as with any mmap-based reader, a concurrent truncation
    // would raise SIGBUS, not corrupt memory safety of other data).
    let map = unsafe { MmapOptions::new().map(file) }.map_err(|source| DumpError::Io {
        what: format!("mmap {what}"),
        source,
    })?;
    Ok(Some(map))
}

pub(crate) fn open(path: &Path) -> Result<File, DumpError> {
    File::open(path).map_err(|source| DumpError::Io {
        what: format!("open {}", path.display()),
        source,
    })
}

impl PhysMem {
    /// A raw image: file offset `n` is guest-physical address `n`.
    pub fn open_raw(path: &Path) -> Result<PhysMem, DumpError> {
        let file = open(path)?;
        let map = map_file(&file, &path.display().to_string())?.ok_or(DumpError::Empty)?;
        let len = map.len() as u64;
        Ok(PhysMem {
            map: Some(map),
            regions: vec![Region {
                paddr: 0,
                len,
                offset: 0,
                file_len: len,
            }],
        })
    }

    /// A view over `map` with `regions` (each already checked to lie inside
    /// the file). Overlapping regions are clipped: the lower-addressed one
    /// wins, as QEMU writes the same memory for duplicate ranges. A region
    /// ending beyond [`MAX_PHYS_END`], or whose file part wraps, is an
    /// error (the ELF reader refuses such segments first, naming them).
    pub(crate) fn from_regions(
        map: Option<Mmap>,
        mut regions: Vec<Region>,
    ) -> Result<PhysMem, DumpError> {
        for r in &regions {
            let fits = r
                .paddr
                .checked_add(r.len)
                .is_some_and(|e| e <= MAX_PHYS_END)
                && r.offset.checked_add(r.file_len).is_some()
                && r.file_len <= r.len;
            if !fits {
                return Err(DumpError::UnsupportedElf(format!(
                    "memory range at {:#x} ({:#x} bytes, {:#x} of them at file offset {:#x}): \
                     expected it to end at most {MAX_PHYS_END:#x}, its file part inside the file",
                    r.paddr, r.len, r.file_len, r.offset
                )));
            }
        }
        regions.retain(|r| r.len > 0);
        regions.sort_by_key(|r| (r.paddr, std::cmp::Reverse(r.len)));
        let mut out: Vec<Region> = Vec::with_capacity(regions.len());
        for mut r in regions {
            if let Some(last) = out.last() {
                let end = last.end();
                if r.end() <= end {
                    continue;
                }
                if r.paddr < end {
                    // Drop the first `cut` bytes of memory; of the file, only
                    // what backs them (the rest of `cut` is zero fill, which
                    // has no file bytes to skip).
                    let cut = end - r.paddr;
                    let file_cut = cut.min(r.file_len);
                    r.paddr = end;
                    r.len -= cut;
                    r.offset += file_cut;
                    r.file_len -= file_cut;
                }
            }
            out.push(r);
        }
        Ok(PhysMem { map, regions: out })
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total(&self) -> u64 {
        // Disjoint regions below MAX_PHYS_END: the sum cannot wrap.
        self.regions
            .iter()
            .fold(0u64, |t, r| t.saturating_add(r.len))
    }

    fn region_of(&self, pa: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.paddr <= pa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (pa < r.end()).then_some(r)
    }

    /// Whether `[pa, pa + len)` is wholly guest memory.
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        let Some(last) = pa.checked_add(len.max(1) - 1) else {
            return false;
        };
        match self.region_of(pa) {
            Some(r) => last < r.end(),
            None => false,
        }
    }

    /// Whether the 4 KiB page holding `pa` is wholly guest memory.
    pub fn contains_page(&self, pa: u64) -> bool {
        self.contains(pa & !0xfff, 4096)
    }

    /// The little-endian 64-bit word at `pa`, if all 8 bytes are memory.
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        let r = self.region_of(pa)?;
        let off = pa - r.paddr;
        if off.checked_add(8)? > r.len {
            return None;
        }
        if off >= r.file_len {
            return Some(0);
        }
        let map = self.map.as_ref()?;
        let start = usize::try_from(r.offset.checked_add(off)?).ok()?;
        // A word may straddle the end of the file-backed part: the rest is
        // zero fill.
        let avail = usize::try_from((r.file_len - off).min(8)).ok()?;
        let mut buf = [0u8; 8];
        buf[..avail].copy_from_slice(map.get(start..start.checked_add(avail)?)?);
        Some(u64::from_le_bytes(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_clipped_and_looked_up() {
        let m = PhysMem::from_regions(
            None,
            vec![
                Region {
                    paddr: 0x2000,
                    len: 0x2000,
                    offset: 0,
                    file_len: 0,
                },
                Region {
                    paddr: 0x3000,
                    len: 0x2000,
                    offset: 0,
                    file_len: 0,
                },
                Region {
                    paddr: 0x10000,
                    len: 0,
                    offset: 0,
                    file_len: 0,
                },
            ],
        )
        .unwrap();
        assert_eq!(m.regions().len(), 2);
        assert_eq!(m.regions()[1].paddr, 0x4000);
        assert_eq!(m.total(), 0x3000);
        assert!(m.contains_page(0x2fff));
        assert!(!m.contains_page(0x1000));
        assert!(!m.contains(0x4ff8, 16));
        assert!(!m.contains(u64::MAX - 3, 8));
        // No file bytes: zero-filled.
        assert_eq!(m.read_u64(0x2000), Some(0));
        assert_eq!(m.read_u64(0x5000), None);
    }
}
