//! A bounded, deterministic fuzz test of the dump reader (a dump is
//! untrusted input).
//!
//! Seeds: small valid dumps built the way `tests/inspect.rs` builds them
//! (an engine-built address space with 4 KiB, 2 MiB and 1 GiB leaves, PAT,
//! a direct map, MMIO and a PTI user root, written as a raw image and as a
//! QEMU-style ELF core), and hand-made raw images (a bare four-level
//! chain; a root with a Windows-style self-map slot). Each case stacks one
//! to four mutations on a seed: bit flips, byte and word replacements
//! biased to the table pages and the ELF and note headers (huge sizes,
//! offsets and counts, overlapping segments, PN_XNUM), table entries turned
//! into cycles, self-maps, far-away or out-of-memory frames, whole tables
//! pointing at one table, truncation and extension.
//!
//! Every case runs through the library entry points under `catch_unwind`
//! (open, CR3, census, statistics, leaves, translation, `info mem`, `info
//! tlb`, the Xen checks, the simulator and the engine's pin count),
//! asserting no panic, a typed error with exit status 2 or an answer that
//! agrees with the census (leaf counts, `info tlb` lines, translations), and
//! a time bound per case. A subset also runs through the `inspect` binary
//! under `ulimit -v` and a time limit: exit status 0 or 2 only (never 101
//! or a signal), and a refusal names the file, an offset or address and
//! what was expected. The children's peak RSS is checked at the end.
//!
//! The default run is a fixed seed set sized for about 10-20 s in a debug
//! build on two cores. A longer campaign:
//!
//! ```sh
//! PAGEPIN_FUZZ_CASES=100000 PAGEPIN_FUZZ_SEED=7 PAGEPIN_FUZZ_BIN_EVERY=50 \
//!     cargo test --release --test dump_fuzz -- --nocapture
//! ```
//!
//! (`PAGEPIN_FUZZ_CASES`: cases; `PAGEPIN_FUZZ_SEED`: the RNG seed;
//! `PAGEPIN_FUZZ_BIN_EVERY`: run every Nth case through the binary, 0 for
//! none.) A failing case is written to the temp directory and named in the
//! failure message, with its case number and seed.

#[path = "support/dump_cli.rs"]
mod dump_cli;

use std::fs::{self, File};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagepin_backends::mock::NullBackend;
// The project's one seeded generator (SplitMix64, as the simulator's p2m
// shuffle uses): a failing case is replayed from its seed, so the sequence
// never changes with a dependency's version.
use pagepin_backends::SplitMix64 as Rng;
use pagepin_dump::cli::exit_code;
use pagepin_dump::pin::{engine_count, sim_check, xen_check, XenOptions};
use pagepin_dump::{qemu, CpuState, Dump, DumpError, ElfCoreWriter, Walker};
use pagepin_engine::{
    AddressSpace, DefaultRawLock, EntryFlags, FrameStore, PageSize, Pfn, SpaceOptions, Split,
    X86_64,
};

/// Cases in the default run.
const DEFAULT_CASES: u64 = 600;
/// Every Nth case also runs through the binary, by default.
const DEFAULT_BIN_EVERY: u64 = 10;
const DEFAULT_SEED: u64 = 0x5eed_f00d;
/// Per case, in-process (debug build, two cores, loaded machine).
const CASE_LIMIT: Duration = Duration::from_secs(3);
/// Per binary run.
const BIN_LIMIT: Duration = Duration::from_secs(5);
/// Address space for the binary: a few hundred MiB is plenty for these
/// dumps; allocations sized by numbers read from a file are GiBs.
const BIN_VMEM_KIB: u64 = 1_000_000;
/// Peak RSS any binary run may reach.
const BIN_MAX_RSS_KIB: u64 = 256 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| {
            let s = s.replace('_', "");
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or(default)
}

fn tmp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagepin-dump-fuzz-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Core,
}

/// A seed dump: its bytes, the CR3 to use, and where its tables lie
/// (file offset and physical address of each table page, root first).
#[derive(Clone)]
struct Seed {
    name: &'static str,
    kind: Kind,
    bytes: Vec<u8>,
    cr3: u64,
    tables: Vec<(usize, u64)>,
}

/// The store's frames: pfns 0x10..0x30 (the raw image is 192 KiB).
const BASE_PFN: u64 = 0x10;
const FRAMES: usize = 32;

fn frame_bytes(store: &FrameStore<DefaultRawLock>, pfn: u64) -> Vec<u8> {
    let f = store.frame(Pfn(pfn)).unwrap();
    let mut out = Vec::with_capacity(4096);
    for (i, e) in f.entries().iter().enumerate() {
        let mut v = e.load(std::sync::atomic::Ordering::Acquire);
        if store.meta(Pfn(pfn)).is_some_and(|m| m.is_data()) && i == 0 {
            v = 0xda7a_0000 | pfn;
        }
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The engine-built seeds: one space, as a raw image and as an ELF core.
fn engine_seeds() -> Vec<Seed> {
    const P: EntryFlags = EntryFlags::PRESENT;
    const W: EntryFlags = EntryFlags::WRITABLE;
    const U: EntryFlags = EntryFlags::USER;
    const G: EntryFlags = EntryFlags::GLOBAL;
    const NX: EntryFlags = EntryFlags::NO_EXECUTE;
    let store = Arc::new(FrameStore::<DefaultRawLock>::new(FRAMES, BASE_PFN));
    let space: AddressSpace<X86_64, Split, NullBackend> = AddressSpace::new(
        store.clone(),
        Arc::new(NullBackend),
        SpaceOptions { user_root: true },
    )
    .unwrap();
    let d: Vec<u64> = (0..3)
        .map(|_| store.alloc_data().unwrap().0 << 12)
        .collect();
    let map = |va: u64, pa: u64, size: PageSize, f: EntryFlags| space.map(va, pa, size, f).unwrap();
    map(0x40_0000, d[0], PageSize::Size4K, P | U | W);
    map(0x40_1000, d[1], PageSize::Size4K, P | U);
    map(
        0x40_2000,
        d[2],
        PageSize::Size4K,
        P | U | W | NX | EntryFlags::PAT_4K,
    );
    map(0x4000_0000, 0x60_0000, PageSize::Size2M, P | U | W);
    map(
        0x80_0000_0000,
        0x4000_0000,
        PageSize::Size1G,
        P | U | EntryFlags::PCD,
    );
    for i in 0..8u64 {
        let pa = (BASE_PFN + i) << 12;
        map(
            0xffff_8880_0000_0000 + pa,
            pa,
            PageSize::Size4K,
            P | W | G | NX,
        );
    }
    map(0xffff_ffff_8100_0000, 0, PageSize::Size2M, P | G);
    map(
        0xffff_ffff_ff5f_b000,
        0xfee0_0000,
        PageSize::Size4K,
        P | W | G | NX | EntryFlags::PCD,
    );
    let cr3 = space.root().0 << 12;
    let mut tables: Vec<usize> = vec![cr3 as usize];
    tables.extend(space.user_root().map(|p| (p.0 << 12) as usize));
    tables.extend(
        space
            .table_frames()
            .unwrap()
            .iter()
            .map(|t| (t.0 .0 << 12) as usize)
            .filter(|&t| t != cr3 as usize),
    );
    tables.dedup();

    let size = ((BASE_PFN as usize) + FRAMES) << 12;
    let mut raw = vec![0u8; size];
    for p in BASE_PFN..BASE_PFN + FRAMES as u64 {
        raw[(p << 12) as usize..][..4096].copy_from_slice(&frame_bytes(&store, p));
    }

    let ranges = [(0, BASE_PFN << 12), (BASE_PFN << 12, (FRAMES as u64) << 12)];
    let path = tmp_dir().join("seed.core");
    {
        let mut f = File::create(&path).unwrap();
        let w = ElfCoreWriter::new(&ranges, &[CpuState::long_mode(cr3)]);
        w.write_headers(&mut f).unwrap();
        for p in BASE_PFN..BASE_PFN + FRAMES as u64 {
            w.write_page(&mut f, p << 12, &frame_bytes(&store, p))
                .unwrap();
        }
    }
    let core = fs::read(&path).unwrap();
    // Table pages' file offsets in the core: segment 1 holds the store.
    let seg1 = core_segments(&core)[1];
    let core_tables = tables
        .iter()
        .map(|&t| ((seg1.0 + (t as u64 - seg1.1)) as usize, t as u64))
        .collect();
    let tables = tables.iter().map(|&t| (t, t as u64)).collect();
    vec![
        Seed {
            name: "engine.raw",
            kind: Kind::Raw,
            bytes: raw,
            cr3,
            tables,
        },
        Seed {
            name: "engine.core",
            kind: Kind::Core,
            bytes: core,
            cr3,
            tables: core_tables,
        },
    ]
}

/// (p_offset, p_paddr) of each PT_LOAD of a well-formed core.
fn core_segments(b: &[u8]) -> Vec<(u64, u64)> {
    let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let phoff = u(32) as usize;
    let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
    (0..phnum)
        .map(|i| phoff + i * 56)
        .filter(|&h| b[h] == 1)
        .map(|h| (u(h + 8), u(h + 24)))
        .collect()
}

fn put(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off.saturating_add(8)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Hand-made raw seeds: a 16 KiB four-level chain mapping one page, and
/// the same with a self-map slot in the kernel half.
fn chain_seeds() -> Vec<Seed> {
    let mut img = vec![0u8; 5 * 4096];
    put(&mut img, 0, 0x1000 | 0x67);
    put(&mut img, 0x1000, 0x2000 | 0x67);
    put(&mut img, 0x2000, 0x3000 | 0x67);
    put(&mut img, 0x3000, 0x4000 | 0x67);
    put(&mut img, 0x3008, 0x4000 | 0x65);
    let mut selfmap = img.clone();
    put(&mut selfmap, 0x1ed * 8, 0x63);
    vec![
        Seed {
            name: "chain.raw",
            kind: Kind::Raw,
            bytes: img,
            cr3: 0,
            tables: vec![(0, 0), (0x1000, 0x1000), (0x2000, 0x2000), (0x3000, 0x3000)],
        },
        Seed {
            name: "selfmap.raw",
            kind: Kind::Raw,
            bytes: selfmap,
            cr3: 0,
            tables: vec![(0, 0), (0x1000, 0x1000), (0x2000, 0x2000), (0x3000, 0x3000)],
        },
    ]
}

/// Values that break arithmetic and allocation sizes.
fn interesting(rng: &mut Rng, len: usize) -> u64 {
    let len = len as u64;
    let (r1, r2) = (rng.next(), rng.next());
    rng.pick(&[
        0,
        1,
        7,
        0xfff,
        0x1000,
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        1 << 52,
        (1 << 52) - 0x1000,
        1 << 46,
        1 << 40,
        0xf000_0000 << 12,
        u32::MAX as u64,
        0xffff,
        len,
        len + 1,
        len.wrapping_sub(8),
        r1,
        r2 & 0xffff_f000,
    ])
}

/// A table entry worth trying: cycles (to the table holding it, the root
/// or another table), self-maps, large pages, far and outside frames,
/// reserved bits. `here` is the physical address of the table written to.
fn entry_value(rng: &mut Rng, seed: &Seed, here: u64) -> u64 {
    let flags = rng.pick(&[
        0x67u64,
        0x67,
        0x63,
        0x65,
        0xe7,
        0x1,
        0x8000_0000_0000_0067,
        0x167,
    ]);
    let target = match rng.below(10) {
        0 | 1 => here,
        2 => seed.cr3 & !0xfff,
        3..=5 => seed.tables[rng.below(seed.tables.len() as u64) as usize].1,
        6 => (rng.below(0x1_0000_0000) << 12) & 0x000f_ffff_ffff_f000,
        7 => 0xf000_0000 << 12,
        8 => 1 << 40,
        _ => rng.below(64) << 12,
    };
    target | flags
}

/// A random table of the seed: (file offset, physical address).
fn some_table(rng: &mut Rng, seed: &Seed) -> (usize, u64) {
    seed.tables[rng.below(seed.tables.len() as u64) as usize]
}

/// Apply one mutation to `b` (a copy of `seed`'s bytes).
fn mutate(rng: &mut Rng, seed: &Seed, b: &mut Vec<u8>) -> String {
    let len = b.len();
    if len == 0 {
        b.push(rng.next() as u8);
        return "grow from empty".into();
    }
    // An entry of a table: (its file offset, the table's physical address).
    let in_table = |rng: &mut Rng| {
        let (off, pa) = some_table(rng, seed);
        (off + (rng.below(512) as usize) * 8, pa)
    };
    match rng.below(100) {
        0..=9 => {
            let o = rng.below(len as u64) as usize;
            let bit = rng.below(8);
            b[o] ^= 1 << bit;
            format!("flip bit {bit} at {o:#x}")
        }
        10..=17 => {
            // A bit flip inside a table entry: flags, address bits.
            let o = in_table(rng).0 + rng.below(8) as usize;
            let bit = rng.below(8);
            if let Some(x) = b.get_mut(o) {
                *x ^= 1 << bit;
            }
            format!("flip table bit {bit} at {o:#x}")
        }
        18..=23 => {
            let o = rng.below(len as u64) as usize;
            let r = rng.next() as u8;
            let v = rng.pick(&[0u8, 0xff, 0x7f, 0x80, 0x01, r]);
            b[o] = v;
            format!("byte {v:#x} at {o:#x}")
        }
        24..=43 => {
            let (o, here) = in_table(rng);
            let v = entry_value(rng, seed, here);
            put(b, o, v);
            format!("entry {v:#x} at {o:#x}")
        }
        44..=49 => {
            // A whole table pointing at one table: an exploding cycle, or
            // heavy sharing.
            let (t, here) = some_table(rng, seed);
            let v = entry_value(rng, seed, here);
            let n = rng.pick(&[2usize, 16, 256, 512]);
            for i in 0..n {
                put(b, t + i * 8, v);
            }
            format!("{n} entries of the table at {t:#x} = {v:#x}")
        }
        50..=57 => {
            // A self-map slot in the root.
            let root = seed.tables[0].0;
            let slot = rng.below(512) as usize;
            let v = (seed.cr3 & !0xfff) | rng.pick(&[0x63u64, 0x67]);
            put(b, root + slot * 8, v);
            format!("self-map slot {slot:#x}")
        }
        58..=61 => {
            let n = rng.below(len as u64) as usize;
            b.truncate(n);
            format!("truncate to {n:#x}")
        }
        62..=63 => {
            let n = rng.pick(&[1usize, 8, 4096, 5000]);
            b.resize(len + n, 0);
            format!("extend by {n}")
        }
        _ if seed.kind == Kind::Core => mutate_core_header(rng, b),
        _ => {
            let o = (rng.below(len as u64 / 8) * 8) as usize;
            let v = interesting(rng, len);
            put(b, o, v);
            format!("word {v:#x} at {o:#x}")
        }
    }
}

/// Mutate an ELF header, program header or note field.
fn mutate_core_header(rng: &mut Rng, b: &mut [u8]) -> String {
    let len = b.len();
    if len < 64 {
        return "short header: none".into();
    }
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o.saturating_add(8))
            .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    let phoff = u64_at(b, 32) as usize;
    let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
    let ph = |rng: &mut Rng| phoff.saturating_add(rng.below(phnum.max(1) as u64) as usize * 56);
    match rng.below(10) {
        0 => {
            let v = interesting(rng, len);
            put(b, 32, v);
            format!("e_phoff {v:#x}")
        }
        1 => {
            let v = rng.pick(&[0u16, 1, 2, 0xffff, 0x7fff, (phnum as u16).wrapping_add(1)]);
            b[56..58].copy_from_slice(&v.to_le_bytes());
            if v == 0xffff {
                // PN_XNUM: the count from section header 0's sh_info.
                let sh = rng.pick(&[0u64, 64, len as u64 - 64, u64::MAX]);
                put(b, 40, sh);
            }
            format!("e_phnum {v:#x}")
        }
        2 => {
            let v = rng.pick(&[0u16, 55, 57, 64]);
            b[54..56].copy_from_slice(&v.to_le_bytes());
            format!("e_phentsize {v}")
        }
        3 => {
            // Overlap: a segment's p_paddr copied from another's, +1.
            let (h1, h2) = (ph(rng), ph(rng));
            let v = u64_at(b, h2.saturating_add(24)).wrapping_add(rng.below(2));
            put(b, h1.saturating_add(24), v);
            format!("p_paddr of {h1:#x} = {v:#x} (overlap)")
        }
        4..=7 => {
            let h = ph(rng);
            let field = rng.pick(&[
                (8usize, "p_offset"),
                (24, "p_paddr"),
                (32, "p_filesz"),
                (40, "p_memsz"),
            ]);
            let v = interesting(rng, len);
            put(b, h.saturating_add(field.0), v);
            if field.1 == "p_memsz" && rng.chance(50) {
                put(
                    b,
                    h.saturating_add(32),
                    v.min(u64_at(b, h.saturating_add(32))),
                );
            }
            format!("{} of {h:#x} = {v:#x}", field.1)
        }
        8 => {
            // The PT_NOTE's first note: namesz / descsz.
            let h = ph(rng);
            let note = u64_at(b, h.saturating_add(8)) as usize;
            let o = note.saturating_add(rng.pick(&[0usize, 4]));
            let v = rng.pick(&[0u32, 3, 5, 431, 433, u32::MAX, u32::MAX - 2, 0x7fff_ffff]);
            if let Some(s) = b.get_mut(o..o.saturating_add(4)) {
                s.copy_from_slice(&v.to_le_bytes());
            }
            format!("note size {v:#x} at {o:#x}")
        }
        _ => {
            // A CPU-state field: version, size, CR0, CR3, CR4 (searched
            // by the QEMU note name).
            let Some(q) = b.windows(5).position(|w| w == b"QEMU\0") else {
                return "no QEMU note".into();
            };
            let desc = q + 8;
            let (o, v) = match rng.below(5) {
                0 => (desc, rng.pick(&[0u64, 2])),
                1 => (desc + 4, rng.pick(&[0u64, 8, 431])),
                2 => (desc + 392, rng.pick(&[0u64, 1 << 31])),
                3 => (desc + 416, interesting(rng, len)),
                _ => (desc + 424, rng.pick(&[0u64, 1 << 12, 1 << 5])),
            };
            if o + 4 <= len {
                let n = if o == desc || o == desc + 4 { 4 } else { 8 };
                b[o..(o + n).min(len)].copy_from_slice(&v.to_le_bytes()[..(n.min(len - o))]);
            }
            format!("cpu state {v:#x} at {o:#x}")
        }
    }
}

/// What one case's library run found.
#[derive(Default)]
struct Outcome {
    /// The first refusal's kind (the `DumpError` variant), if any.
    refused: Option<String>,
    /// The tables reach a table at two levels, and the walk was bounded:
    /// printed in full.
    recursion_printed: bool,
}

fn kind_of(e: &DumpError) -> String {
    let d = format!("{e:?}");
    d.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("")
        .to_string()
}

/// Run `path` through the library entry points; assert agreement and
/// typed errors.
fn library_case(path: &Path, kind: Kind, cr3: Option<u64>) -> Result<Outcome, String> {
    let fail = |what: &str, e: &DumpError| -> String {
        format!("{what}: exit code {} for {e}", exit_code(e))
    };
    let typed = |e: &DumpError| -> Result<(), String> {
        if exit_code(e) != 2 || e.to_string().is_empty() {
            return Err(fail("error", e));
        }
        Ok(())
    };
    let dump = match kind {
        Kind::Raw => Dump::open_raw(path),
        Kind::Core => Dump::open_core(path),
    };
    let dump = match dump {
        Ok(d) => d,
        Err(e) => {
            typed(&e)?;
            return Ok(Outcome {
                refused: Some(kind_of(&e)),
                ..Outcome::default()
            });
        }
    };
    let cr3 = match dump.cr3(cr3, 0) {
        Ok(c) => c,
        Err(e) => {
            typed(&e)?;
            return Ok(Outcome {
                refused: Some(kind_of(&e)),
                ..Outcome::default()
            });
        }
    };
    let w = match Walker::new(&dump.mem, cr3) {
        Ok(w) => w,
        Err(e) => {
            typed(&e)?;
            return Ok(Outcome {
                refused: Some(kind_of(&e)),
                ..Outcome::default()
            });
        }
    };
    let census = w.census(0..512);
    let stats = w.stats(0..512);
    let leaves = w.leaves(0..512);
    let tlb = qemu::info_tlb(&w);
    let mem = qemu::info_mem(&w);
    let mut refused = None;
    let mut recursion_printed = false;
    match &census {
        Err(e) => {
            typed(e)?;
            refused = Some(kind_of(e));
            // Every walk reports the same entry.
            for (what, other) in [
                ("stats", stats.as_ref().err()),
                ("leaves", leaves.as_ref().err()),
                ("tlb", tlb.as_ref().err()),
                ("mem", mem.as_ref().err()),
            ] {
                match other {
                    Some(o) if o.to_string() == e.to_string() => {}
                    o => return Err(format!("census: {e}; {what}: {o:?}")),
                }
            }
        }
        Ok(c) => {
            let s = stats.as_ref().map_err(|e| fail("stats", e))?;
            if *s != c.stats || s.leaves() as u64 != c.leaves {
                return Err(format!("stats {s:?} != census {c:?}"));
            }
            if c.bounded() {
                recursion_printed = c.recursion.is_some();
                let l = leaves.as_ref().map_err(|e| fail("leaves", e))?;
                let t = tlb.as_ref().map_err(|e| fail("tlb", e))?;
                mem.as_ref().map_err(|e| fail("mem", e))?;
                if l.len() as u64 != c.leaves || t.lines().count() as u64 != c.leaves {
                    return Err(format!(
                        "census {} leaves, walk {}, info tlb {} lines",
                        c.leaves,
                        l.len(),
                        t.lines().count()
                    ));
                }
                // Single-address translation agrees with the walk.
                for leaf in l.iter().step_by(l.len() / 8 + 1) {
                    let tr = w
                        .translate(leaf.va + 0x10)
                        .map_err(|e| fail("translate", &e))?;
                    if tr.leaf.map(|x| x.entry) != Some(leaf.entry) {
                        return Err(format!("translate {:#x}: {tr:?} vs {leaf:?}", leaf.va));
                    }
                }
            } else {
                refused = c.check().err().map(|e| kind_of(&e));
                for (what, r) in [
                    ("leaves", leaves.as_ref().err()),
                    ("tlb", tlb.as_ref().err()),
                    ("mem", mem.as_ref().err()),
                ] {
                    match r {
                        Some(
                            e @ (DumpError::TableRecursion { .. } | DumpError::WalkTooLarge { .. }),
                        ) => typed(e)?,
                        r => return Err(format!("unbounded walk, {what}: {r:?}")),
                    }
                }
            }
        }
    }
    for va in [0x40_1234u64, 0xffff_8880_0001_0000, 0x7fff_ffff_f000, 0] {
        if let Err(e) = w.translate(va) {
            typed(&e)?;
        }
    }
    let user_root = w.pti_user_root().is_some();
    match xen_check(&w, XenOptions::default()) {
        Ok(_) => {}
        Err(e) => typed(&e)?,
    }
    for io_privileged in [false, true] {
        if let Err(e) = sim_check(&w, XenOptions { io_privileged }, user_root, 32) {
            typed(&e)?;
        }
    }
    if let Err(e) = engine_count(&w, user_root, 8) {
        typed(&e)?;
    }
    Ok(Outcome {
        refused,
        recursion_printed,
    })
}

/// Peak RSS of this process (KiB), from /proc.
fn self_peak_rss_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn fuzz_the_dump_reader() {
    let cases = env_u64("PAGEPIN_FUZZ_CASES", DEFAULT_CASES);
    let seed = env_u64("PAGEPIN_FUZZ_SEED", DEFAULT_SEED);
    let bin_every = env_u64("PAGEPIN_FUZZ_BIN_EVERY", DEFAULT_BIN_EVERY);
    let mut seeds = engine_seeds();
    seeds.extend(chain_seeds());
    let dir = tmp_dir();
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let (mut refused, mut bin_runs, mut bin_refused) = (0u64, 0u64, 0u64);
    let mut slowest = (Duration::ZERO, 0u64);
    let mut slowest_bin = Duration::ZERO;
    let mut max_rss: Option<u64> = None;
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    let mut printed_recursive = 0u64;
    // The unmutated seeds first: each must read cleanly.
    for (i, s) in seeds.iter().enumerate() {
        let p = dir.join(s.name);
        fs::write(&p, &s.bytes).unwrap();
        let cr3 = (s.kind == Kind::Raw).then_some(s.cr3);
        let o = library_case(&p, s.kind, cr3).unwrap_or_else(|e| panic!("seed {i}: {e}"));
        assert_eq!(o.refused, None, "seed {} must be accepted", s.name);
    }
    for case in 0..cases {
        let s = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut bytes = s.bytes.clone();
        let mut log = Vec::new();
        for _ in 0..1 + rng.below(4) {
            log.push(mutate(&mut rng, s, &mut bytes));
        }
        // Raw images need a CR3; cores use their note, or a given one.
        let cr3 = match s.kind {
            Kind::Raw if rng.chance(90) => Some(s.cr3),
            Kind::Raw => Some(rng.below(bytes.len() as u64 + 0x2000) & !0xfff),
            Kind::Core if rng.chance(25) => Some(s.cr3),
            Kind::Core => None,
        };
        let path = dir.join(format!(
            "case-{case}.{}",
            if s.kind == Kind::Raw { "raw" } else { "core" }
        ));
        fs::write(&path, &bytes).unwrap();
        let what = || {
            format!(
                "case {case} (seed {seed:#x}, from {}: {log:?}, file {})",
                s.name,
                path.display()
            )
        };

        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| library_case(&path, s.kind, cr3)));
        let took = t.elapsed();
        match r {
            Err(_) => panic!("{}: the library panicked", what()),
            Ok(Err(e)) => panic!("{}: {e}", what()),
            Ok(Ok(o)) => {
                printed_recursive += o.recursion_printed as u64;
                if let Some(k) = o.refused {
                    refused += 1;
                    *kinds.entry(k).or_insert(0u64) += 1;
                }
            }
        }
        assert!(took < CASE_LIMIT, "{}: took {took:?}", what());
        if took > slowest.0 {
            slowest = (took, case);
        }

        if bin_every != 0 && case % bin_every == 0 {
            let ps = path.to_str().unwrap();
            let mut args: Vec<String> = match s.kind {
                Kind::Raw => vec!["--raw".into(), ps.into()],
                Kind::Core => vec!["--core".into(), ps.into()],
            };
            if let Some(c) = cr3 {
                args.extend(["--cr3".into(), format!("{c:#x}")]);
            }
            let action = rng.pick(&["--stats", "--mem", "--tlb", "--pin-report", "--translate"]);
            args.push(action.into());
            if action == "--translate" {
                args.push(format!(
                    "{:#x}",
                    rng.pick(&[0x40_1000u64, 0x4000_0123, 0xffff_f6fb_7dbe_d000])
                ));
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = dump_cli::run_inspect(&a, BIN_LIMIT, BIN_VMEM_KIB);
            bin_runs += 1;
            slowest_bin = slowest_bin.max(r.elapsed);
            if let Some(rss) = r.max_rss_kib {
                max_rss = max_rss.max(Some(rss));
                assert!(
                    rss < BIN_MAX_RSS_KIB,
                    "{}: inspect peaked at {rss} KiB",
                    what()
                );
            }
            assert!(
                !r.timed_out,
                "{}: inspect {a:?} ran over {BIN_LIMIT:?}",
                what()
            );
            assert_eq!(r.signal, None, "{}: inspect {a:?}: {r:?}", what());
            match r.code {
                Some(0) => assert!(r.stderr.is_empty(), "{}: {r:?}", what()),
                Some(2) => {
                    bin_refused += 1;
                    let msg = r.stderr.trim_end();
                    assert_eq!(msg.lines().count(), 1, "{}: {msg}", what());
                    let prefix = format!("inspect: error: {ps}: ");
                    assert!(
                        msg.starts_with(&prefix),
                        "{}: not naming the file: {msg}",
                        what()
                    );
                    assert!(
                        msg.contains("expected"),
                        "{}: no expectation: {msg}",
                        what()
                    );
                    // Where: an offset or address (0x...). The one refusal
                    // about something absent (no CPU note) has no place.
                    assert!(
                        msg.contains("0x") || msg.contains("no CR3"),
                        "{}: no offset or address: {msg}",
                        what()
                    );
                }
                _ => panic!("{}: inspect {a:?} exited {r:?}", what()),
            }
        }
        let _ = fs::remove_file(&path);
    }
    let elapsed = started.elapsed();
    let self_rss = self_peak_rss_kib();
    println!(
        "dump fuzz: {cases} cases (seed {seed:#x}), {refused} refused, {printed_recursive} \
         printed with a table at two levels, in {elapsed:.1?}; \
         slowest case {} in {:.1?}; {bin_runs} binary runs ({bin_refused} exit 2), slowest \
         {slowest_bin:.1?}, the binary's peak RSS {max_rss:?} KiB; this process's peak RSS \
         {self_rss:?} KiB; refusals by kind: {kinds:?}",
        slowest.1, slowest.0
    );
    if let Some(rss) = self_rss {
        assert!(rss < 1024 * 1024, "the library runs peaked at {rss} KiB");
    }
    // The mutations reach both outcomes (a fuzz that never refuses, or
    // never accepts, tests little).
    assert!(
        refused > 0 && refused < cases,
        "{refused} of {cases} refused"
    );
    let _ = fs::remove_dir_all(&dir);
}
