//! Regression tests of the dump reader on hostile input (a dump is
//! untrusted): tables that point back at themselves, a leaf that names a
//! far-away frame, PT_LOAD segments whose sizes overflow. Each ran out of
//! memory, ran for minutes or panicked before its fix. The binary runs come
//! first, under a time and an address-space limit, so a regression fails
//! fast instead of hanging or aborting the test process.

#[path = "support/dump_cli.rs"]
mod dump_cli;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use dump_cli::{run_inspect, BinRun};
use pagepin_dump::pin::{engine_count, sim_check, xen_check, XenOptions};
use pagepin_dump::{cli, qemu, Dump, DumpError, Walker, MAX_PHYS_END};

/// Address-space limit for the binary: far below what the bugs allocated
/// (2 GiB to 32 GiB), well above what a small dump needs.
const VMEM_KIB: u64 = 1_000_000;
const LIMIT: Duration = Duration::from_secs(10);

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagepin-dump-reg-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A raw image of `pages` pages with `entries` (physical address, value).
fn raw_image(name: &str, pages: usize, entries: &[(u64, u64)]) -> PathBuf {
    let mut img = vec![0u8; pages * 4096];
    for &(pa, v) in entries {
        img[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }
    let p = tmp(name);
    fs::write(&p, img).unwrap();
    p
}

/// P | RW | U | A | D.
const TABLE: u64 = 0x67;

fn run(args: &[&str]) -> Result<String, DumpError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut out = Vec::new();
    cli::run(&args, &mut out).map(|()| String::from_utf8(out).unwrap())
}

fn bin(args: &[&str]) -> BinRun {
    let r = run_inspect(args, LIMIT, VMEM_KIB);
    assert!(!r.timed_out, "{args:?} ran over {LIMIT:?}: {r:?}");
    assert!(
        r.elapsed < Duration::from_secs(5),
        "{args:?} took {:?}",
        r.elapsed
    );
    assert_eq!(r.signal, None, "{args:?}: {r:?}");
    if let Some(rss) = r.max_rss_kib {
        assert!(rss < 256 * 1024, "{args:?} peaked at {rss} KiB");
    }
    r
}

/// A refusal: exit 2, one line naming the file, an address and what was
/// expected.
fn assert_refusal(r: &BinRun, file: &str, needles: &[&str]) {
    assert_eq!(r.code, Some(2), "{r:?}");
    let msg = r.stderr.trim_end();
    assert!(
        msg.starts_with(&format!("inspect: error: {file}: ")),
        "{msg}"
    );
    assert!(msg.contains("expected"), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
}

fn refused_recursion(e: DumpError, levels: &[u8]) {
    match e {
        DumpError::TableRecursion {
            table,
            levels: l,
            level,
            index,
            entry_pa,
            visits,
            limit,
            ..
        } => {
            assert_eq!(table, 0);
            assert_eq!(l, levels);
            assert_eq!((level, index, entry_pa), (4, 0, 0));
            assert!(visits > limit, "{visits} {limit}");
        }
        e => panic!("expected TableRecursion, got {e}"),
    }
}

/// A 4 KiB root whose entries all point at the root itself, and one whose
/// 256 user slots do: `--stats` used to keep every one of the 512^4 (2^32)
/// leaf visits in a Vec (GBs, then an allocation failure), `--mem`,
/// `--tlb` and `--pin-report` to walk them for minutes. Now the statistics
/// are counted once per distinct (table, level) and exact; the walks that
/// follow every path are refused, naming the table and its levels.
#[test]
fn self_referencing_root_is_counted_or_refused_not_walked() {
    for (name, slots, leaves) in [
        ("selfref-all.raw", 512u64, 512u64.pow(4)),
        ("selfref-user.raw", 256, 256u64.pow(4)),
    ] {
        let entries: Vec<(u64, u64)> = (0..slots).map(|i| (i * 8, TABLE)).collect();
        let p = raw_image(name, 1, &entries);
        let ps = p.to_str().unwrap();
        let r = bin(&["--raw", ps, "--cr3", "0", "--stats"]);
        assert_eq!(r.code, Some(0), "{r:?}");
        assert!(
            r.stdout
                .contains(&format!("leaves: 4K {leaves}, 2M 0, 1G 0")),
            "{}",
            r.stdout
        );
        assert!(
            r.stdout
                .contains("tables: L4 1, L3 1, L2 1, L1 1 (shared 1, at two levels 1)"),
            "{}",
            r.stdout
        );
        for action in ["--mem", "--tlb", "--pin-report"] {
            let r = bin(&["--raw", ps, "--cr3", "0", action]);
            assert_refusal(
                &r,
                ps,
                &["table at 0x0", "levels L4, L3, L2, L1", "L4 entry 0 at 0x0"],
            );
            assert!(r.stdout.is_empty(), "no partial output: {}", r.stdout);
        }

        // The library: the same, typed.
        let dump = Dump::open_raw(&p).unwrap();
        let w = Walker::new(&dump.mem, 0).unwrap();
        let c = w.census(0..512).unwrap();
        assert_eq!(c.pairs, 4, "the root at four levels");
        assert_eq!(c.leaves, leaves);
        assert!(!c.bounded());
        let s = w.stats(0..512).unwrap();
        assert_eq!(s.leaves_4k as u64, leaves);
        assert_eq!(s.effective_writable as u64, leaves);
        assert_eq!(s.mapped_bytes, leaves as u128 * 4096);
        let all = [4, 3, 2, 1];
        refused_recursion(qemu::info_mem(&w).unwrap_err(), &all);
        refused_recursion(qemu::info_tlb(&w).unwrap_err(), &all);
        refused_recursion(w.leaves(0..512).unwrap_err(), &all);
        refused_recursion(engine_count(&w, false, 32).unwrap_err(), &all);
        refused_recursion(
            sim_check(&w, XenOptions::default(), false, 32).unwrap_err(),
            &all,
        );
        // Xen's own rule (one type per frame) is checked once per table.
        let v = xen_check(&w, XenOptions::default()).unwrap();
        let b = v.broken.unwrap();
        assert_eq!((b.rule, b.level, b.index), (1, 4, 0), "{b:?}");
        // Translating one address follows one path: fine.
        let t = w.translate(0x80_8060_4123).unwrap();
        assert_eq!(t.phys, Some(0x123));
        let e = run(&["--raw", ps, "--cr3", "0", "--tlb"]).unwrap_err();
        assert_eq!(cli::exit_code(&e), 2);
    }
}

/// Two tables pointing at each other (root slot 0 -> B, B entry 0 -> root)
/// is a bounded recursion: printed as QEMU prints it. Pointing every entry
/// of B back makes it explode: refused, naming B's first second level.
#[test]
fn a_two_table_cycle_prints_while_bounded() {
    let p = raw_image("cycle.raw", 2, &[(0, 0x1000 | TABLE), (0x1000, TABLE)]);
    let ps = p.to_str().unwrap();
    let r = bin(&["--raw", ps, "--cr3", "0", "--tlb", "--mem"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        r.stdout,
        "0000000000000000-0000000000001000 0000000000001000 urw\n\
         0000000000000000: 0000000000000000 ---DA--UW\n"
    );
    let mut entries = vec![(0, 0x1000 | TABLE)];
    entries.extend((0..512).map(|i| (0x1000 + i * 8, TABLE)));
    let p = raw_image("cycle-wide.raw", 2, &entries);
    let ps = p.to_str().unwrap();
    let r = bin(&["--raw", ps, "--cr3", "0", "--tlb"]);
    assert_refusal(
        &r,
        ps,
        &["table at 0x0", "levels L4, L2", "L3 entry 0 at 0x1000"],
    );
}

/// Tables shared at one level (no cycle) can explode the paths too: every
/// L3 entry -> one L2 whose entries -> one L1 of 512 leaves is 2^27
/// `info tlb` lines for three pages of tables. Counted, not walked.
#[test]
fn same_level_sharing_is_bounded_too() {
    let mut entries = vec![(0, 0x1000 | TABLE)];
    entries.extend((0..512).map(|i| (0x1000 + i * 8, 0x2000 | TABLE)));
    entries.extend((0..512).map(|i| (0x2000 + i * 8, 0x3000 | TABLE)));
    entries.extend((0..512).map(|i| (0x3000 + i * 8, 0x4000 | TABLE)));
    let p = raw_image("shared.raw", 5, &entries);
    let ps = p.to_str().unwrap();
    let r = bin(&["--raw", ps, "--cr3", "0", "--stats"]);
    assert!(r.stdout.contains("leaves: 4K 134217728,"), "{r:?}");
    let r = bin(&["--raw", ps, "--cr3", "0", "--mem"]);
    assert_refusal(&r, ps, &["L1 table at 0x3000", "262144 paths"]);
    let dump = Dump::open_raw(&p).unwrap();
    let w = Walker::new(&dump.mem, 0).unwrap();
    assert!(matches!(
        qemu::info_tlb(&w),
        Err(DumpError::WalkTooLarge {
            table: 0x3000,
            level: 1,
            paths: 262_144,
            ..
        })
    ));
}

/// Linux's espfix area shares on purpose: on a live Debian 6.1 guest 2,048
/// L2 entries point at one L1 whose 32 entries map one stack page, 65,536
/// `info tlb` lines QEMU prints path by path. The per-pair bound refused it
/// (found by tests/inspect_live_qemu.rs); sharing without recursion is now
/// walked up to `WALK_SHARED_VISIT_LIMIT` tables.
#[test]
fn espfix_like_sharing_is_walked_like_qemu() {
    // Root slot 510 -> L3; L3 entries 0..4 -> four L2s; every L2 entry ->
    // one L1; every 16th L1 entry -> the page at 0x7000.
    let mut entries = vec![(510 * 8, 0x1000 | TABLE)];
    entries.extend((0..4u64).map(|i| (0x1000 + i * 8, (0x2000 + i * 0x1000) | TABLE)));
    for t in 0..4u64 {
        entries.extend((0..512).map(|i| (0x2000 + t * 0x1000 + i * 8, 0x6000 | TABLE)));
    }
    entries.extend((0..32u64).map(|i| (0x6000 + i * 16 * 8, 0x7000 | TABLE)));
    let p = raw_image("espfix.raw", 8, &entries);
    let ps = p.to_str().unwrap();
    let r = bin(&["--raw", ps, "--cr3", "0", "--tlb"]);
    assert_eq!(r.code, Some(0), "{:?}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 65_536);
    assert_eq!(lines[0], "ffffff0000000000: 0000000000007000 ---DA--UW");
    assert_eq!(lines[1], "ffffff0000010000: 0000000000007000 ---DA--UW");
    let dump = Dump::open_raw(&p).unwrap();
    let c = Walker::new(&dump.mem, 0).unwrap().census(0..512).unwrap();
    assert!(c.recursion.is_none() && c.bounded(), "{c:?}");
    assert_eq!(c.visits, 1 + 1 + 4 + 2048);
}

/// Root -> L3 -> L2 -> L1 in a 16 KiB image; the one user leaf maps `leaf`.
fn far_leaf_image(name: &str, leaf: u64) -> PathBuf {
    raw_image(
        name,
        4,
        &[
            (0, 0x1000 | TABLE),
            (0x1000, 0x2000 | TABLE),
            (0x2000, 0x3000 | TABLE),
            (0x3000, leaf | TABLE),
        ],
    )
}

/// A 16 KiB image whose one user leaf maps frame 0xf000_0000 (or a page at
/// 1 TiB): `--pin-report` sized the simulated domain by the largest frame
/// referenced and allocated 32 GiB (2 GiB). Now the domain has one frame
/// per distinct frame the leaves map, plus the table copies.
#[test]
fn a_far_away_leaf_does_not_size_the_simulated_domain() {
    for (name, pa) in [
        ("far-frame.raw", 0xf000_0000u64 << 12),
        ("far-tib.raw", 1u64 << 40),
    ] {
        let p = far_leaf_image(name, pa);
        let ps = p.to_str().unwrap();
        let r = bin(&["--raw", ps, "--cr3", "0", "--pin-report"]);
        assert_eq!(r.code, Some(0), "{r:?}");
        // Outside the dump's RAM: I/O memory, refused without I/O rights.
        assert!(
            r.stdout
                .contains("xen: REFUSED: rule 3 (-EPERM): L1 entry 0 at 0x3000"),
            "{}",
            r.stdout
        );
        let r = bin(&["--raw", ps, "--cr3", "0", "--pin-report", "--io-privileged"]);
        assert!(r.stdout.contains("xen: ACCEPTED"), "{r:?}");

        let dump = Dump::open_raw(&p).unwrap();
        let w = Walker::new(&dump.mem, 0).unwrap();
        let v = sim_check(&w, XenOptions::default(), false, 32).unwrap();
        assert!(v.nr_pages <= 8, "{v:?}");
        let r = v.refused.unwrap();
        assert_eq!((r.errno, r.entry.map(|e| e.2)), (1, Some(0x3000)), "{r:?}");
    }
}

/// An ELF64 core (no notes) with PT_LOAD `segs` (p_paddr, p_memsz,
/// p_filesz), each segment's file part at 4 KiB-aligned offsets from 4096
/// holding `data`'s pages in turn.
fn core_bytes(segs: &[(u64, u64, u64)], data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&4u16.to_le_bytes()); // ET_CORE
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, segs.len() as u16, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let mut off = 4096u64;
    for &(paddr, memsz, filesz) in segs {
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [off, 0, paddr, filesz, memsz, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        off += filesz.div_ceil(4096) * 4096;
    }
    f.resize(4096, 0);
    f.extend_from_slice(data);
    f.resize(off as usize, 0);
    f
}

/// Two overlapping PT_LOAD segments (physical 0 and 1, 2^64 - 2 bytes
/// each): the splitter that clips overlaps advanced the second's file
/// offset by the clipped memory size and overflowed ("attempt to add with
/// overflow" in a debug build; a wrapped offset in release). Such a segment
/// ends beyond any guest's physical memory: a typed error naming it.
#[test]
fn overlapping_huge_segments_are_a_typed_error() {
    let huge = u64::MAX - 1;
    let p = tmp("overlap.core");
    fs::write(
        &p,
        core_bytes(&[(0, huge, 4096), (1, huge, 4096)], &[0; 8192]),
    )
    .unwrap();
    let ps = p.to_str().unwrap();
    let r = bin(&["--core", ps, "--cr3", "0"]);
    assert_refusal(
        &r,
        ps,
        &["PT_LOAD segment 0", "offset 0x40", "0xfffffffffffffffe"],
    );
    let e = std::panic::catch_unwind(|| Dump::open_core(&p).map(|_| ()))
        .expect("no panic")
        .unwrap_err();
    assert!(
        matches!(
            e,
            DumpError::ImpossibleSegment {
                index: 0,
                header_offset: 0x40,
                paddr: 0,
                memsz,
            } if memsz == huge
        ),
        "{e}"
    );
    // Not only wrapping ends: any end past 2^52.
    fs::write(
        &p,
        core_bytes(
            &[(0, 0x1000, 0x1000), (MAX_PHYS_END - 0x1000, 0x2000, 0)],
            &[0; 4096],
        ),
    )
    .unwrap();
    assert!(matches!(
        Dump::open_core(&p),
        Err(DumpError::ImpossibleSegment {
            index: 1,
            header_offset: 0x78,
            ..
        })
    ));
    // Overlaps that are possible are clipped, the file offset advanced only
    // over the file-backed bytes: the second segment's zero-filled tail
    // stays zero, its file page after the overlap is read.
    let mut data = vec![0u8; 3 * 4096];
    data[..8].copy_from_slice(&0x1111u64.to_le_bytes()); // seg 0 at 0x0
    data[4096..4104].copy_from_slice(&0x2222u64.to_le_bytes()); // seg 1 at 0x1000
    data[8192..8200].copy_from_slice(&0x3333u64.to_le_bytes()); // seg 1 at 0x2000
    fs::write(
        &p,
        core_bytes(&[(0, 0x2000, 0x1000), (0x1000, 0x3000, 0x2000)], &data),
    )
    .unwrap();
    let d = Dump::open_core(&p).unwrap();
    assert_eq!(d.mem.read_u64(0), Some(0x1111));
    assert_eq!(
        d.mem.read_u64(0x1000),
        Some(0),
        "segment 0's zero fill wins"
    );
    assert_eq!(d.mem.read_u64(0x2000), Some(0x3333));
    assert_eq!(d.mem.read_u64(0x3000), Some(0));
    assert_eq!(d.mem.total(), 0x4000);
}

/// Errors about a dump's contents name the file, where, and what was
/// expected; usage errors do not blame the file.
#[test]
fn refusals_name_file_place_and_expectation() {
    let p = tmp("garbage.core");
    fs::write(&p, b"MZ not an elf").unwrap();
    let ps = p.to_str().unwrap();
    let r = bin(&["--core", ps]);
    assert_refusal(&r, ps, &["offset 0x0", "\\x7fELF"]);
    let p2 = tmp("nomem.core");
    fs::write(&p2, core_bytes(&[(0, 0, 0)], &[])).unwrap();
    let ps2 = p2.to_str().unwrap();
    assert_refusal(&bin(&["--core", ps2]), ps2, &["PT_LOAD", "offset 0x40"]);
    // Usage errors are clap's: the value, the flag, the expectation, the
    // usage line; exit 2.
    let r = bin(&["--core", ps, "--batch", "0"]);
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr
            .starts_with("error: invalid value '0' for '--batch <N>': expected 1..=256"),
        "{r:?}"
    );
    assert!(r.stderr.contains("try '--help'"), "{r:?}");
}

/// The binary's contract (issue 14): `--help` and `--version` exit 0 on
/// stdout; a directory, an empty file, a truncated ELF, a core without a
/// CPU note and a CR3 outside memory are each one line on stderr naming
/// the file and what was expected, exit 2, never a panic.
#[test]
fn the_binary_answers_help_version_and_bad_files() {
    let r = bin(&["--help"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    for flag in [
        "--core",
        "--raw",
        "--cr3",
        "--cpu",
        "--root",
        "--mem",
        "--tlb",
        "--translate",
        "--pin-report",
        "--batch",
        "--io-privileged",
        "--stats",
        "--la57",
        "--version",
    ] {
        assert!(r.stdout.contains(flag), "--help lacks {flag}: {}", r.stdout);
    }
    let r = bin(&["--version"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        r.stdout.trim(),
        format!("inspect {}", env!("CARGO_PKG_VERSION"))
    );
    // Usage errors: exit 2, nothing on stdout.
    for args in [
        &[][..],
        &["--bogus"],
        &["--raw", "x"],
        &["--core", "a", "--raw", "b"],
    ] {
        let r = bin(args);
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert!(
            r.stdout.is_empty() && r.stderr.starts_with("error: "),
            "{args:?}: {r:?}"
        );
    }

    let dir = tmp("a-directory");
    fs::create_dir_all(&dir).unwrap();
    let ds = dir.to_str().unwrap();
    let r = bin(&["--core", ds]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(
        r.stderr.contains(ds) && r.stderr.contains("expected"),
        "{r:?}"
    );

    let empty = tmp("empty.core");
    fs::write(&empty, b"").unwrap();
    let es = empty.to_str().unwrap();
    assert_refusal(&bin(&["--core", es]), es, &["empty", "offset 0x0"]);
    assert_refusal(&bin(&["--raw", es, "--cr3", "0x1000"]), es, &["empty"]);

    let mut elf = core_bytes(&[(0, 0x1000, 0x1000)], &[0; 0x1000]);
    elf.truncate(0x30);
    let trunc = tmp("truncated.core");
    fs::write(&trunc, &elf).unwrap();
    let ts = trunc.to_str().unwrap();
    assert_refusal(&bin(&["--core", ts]), ts, &["truncated", "0x"]);

    let nonote = tmp("nonote.core");
    fs::write(&nonote, core_bytes(&[(0, 0x1000, 0x1000)], &[0; 0x1000])).unwrap();
    let ns = nonote.to_str().unwrap();
    assert_refusal(&bin(&["--core", ns]), ns, &["no CR3", "QEMU"]);
    assert_refusal(
        &bin(&["--core", ns, "--cr3", "0x7000000"]),
        ns,
        &["CR3 0x7000000", "outside the dump's memory"],
    );
}
