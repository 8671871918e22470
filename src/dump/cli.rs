//! The `inspect` command line, as a library function so tests can run it.
//!
//! ```text
//! inspect (--core FILE | --raw FILE --cr3 ADDR) [--cr3 ADDR] [--cpu N]
//!         [--root cr3|kernel|user] [--mem] [--tlb] [--translate VA]...
//!         [--pin-report] [--batch N] [--io-privileged] [--stats]
//! ```
//!
//! `--mem` and `--tlb` print exactly what QEMU's `info mem` / `info tlb`
//! print; with no action the statistics are printed.

use std::io::Write;
use std::path::PathBuf;

use pagepin_engine::{EntryFlags, Level, PageSize};

use super::pin::{self, PinCount, XenOptions};
use super::walk::{Translation, WalkStats, Walker};
use super::{qemu, Dump, DumpError, PTI_USER_BIT};

/// Usage text.
pub const USAGE: &str = "\
usage: inspect (--core FILE | --raw FILE --cr3 ADDR) [options]
  --core FILE       a QEMU dump-guest-memory ELF core (CR3 from its QEMU CPU note)
  --raw FILE        a raw physical image (pmemsave): needs --cr3
  --cr3 ADDR        the root table (overrides the core's note)
  --cpu N           which CPU's note gives CR3 (default 0)
  --root WHICH      cr3 (default: CR3 as is, as QEMU does), kernel (CR3 & ~0x1000)
                    or user (CR3 | 0x1000: PTI's user root)
  --mem             QEMU `info mem` lines
  --tlb             QEMU `info tlb` lines
  --translate VA    every level's entry for VA (repeatable)
  --pin-report      would Xen pin this as a PV guest's table; what pinning costs
  --batch N         multicall batch size for --pin-report (1..=256, default 32)
  --io-privileged   check --pin-report for a domain with I/O resources
  --stats           tables per level, leaves per size, flag counts (the default)
  --la57            the dump uses 5-level paging (refused: only 4-level is read)
exit status: 0 ok, 1 I/O error, 2 bad input or usage";

#[derive(Debug, Default)]
struct Args {
    core: Option<PathBuf>,
    raw: Option<PathBuf>,
    cr3: Option<u64>,
    cpu: usize,
    root: Option<String>,
    mem: bool,
    tlb: bool,
    translate: Vec<u64>,
    pin_report: bool,
    batch: usize,
    io_privileged: bool,
    stats: bool,
    help: bool,
}

/// Parse a number: `0x` hex, or decimal; `_` separators allowed.
pub fn parse_u64(s: &str) -> Result<u64, DumpError> {
    let t = s.replace('_', "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| DumpError::BadArgument(format!("not a number: {s:?}")))
}

fn parse_args(args: &[String]) -> Result<Args, DumpError> {
    let mut a = Args {
        batch: 32,
        ..Args::default()
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| DumpError::BadArgument(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--core" => a.core = Some(value("--core")?.into()),
            "--raw" => a.raw = Some(value("--raw")?.into()),
            "--cr3" => a.cr3 = Some(parse_u64(&value("--cr3")?)?),
            "--cpu" => a.cpu = parse_u64(&value("--cpu")?)? as usize,
            "--root" => a.root = Some(value("--root")?),
            "--mem" => a.mem = true,
            "--tlb" => a.tlb = true,
            "--translate" => a.translate.push(parse_u64(&value("--translate")?)?),
            "--pin-report" => a.pin_report = true,
            "--batch" => {
                let n = parse_u64(&value("--batch")?)?;
                if !(1..=pin::MAX_BATCH as u64).contains(&n) {
                    return Err(DumpError::BadArgument(format!(
                        "--batch {n}: must be 1..={}",
                        pin::MAX_BATCH
                    )));
                }
                a.batch = n as usize;
            }
            "--io-privileged" => a.io_privileged = true,
            "--stats" => a.stats = true,
            "--la57" => return Err(DumpError::FiveLevelPaging),
            "-h" | "--help" => a.help = true,
            other => {
                return Err(DumpError::BadArgument(format!(
                    "unknown argument {other:?} (see --help)"
                )))
            }
        }
    }
    if a.help {
        return Ok(a);
    }
    match (&a.core, &a.raw) {
        (Some(_), Some(_)) => {
            return Err(DumpError::BadArgument(
                "give either --core or --raw, not both".into(),
            ))
        }
        (None, None) => {
            return Err(DumpError::BadArgument(
                "give --core FILE or --raw FILE --cr3 ADDR".into(),
            ))
        }
        (None, Some(_)) if a.cr3.is_none() => {
            return Err(DumpError::BadArgument("--raw needs --cr3 ADDR".into()))
        }
        _ => {}
    }
    if !(a.mem || a.tlb || a.pin_report || !a.translate.is_empty()) {
        a.stats = true;
    }
    Ok(a)
}

/// The exit status for an error: 1 for I/O, 2 for bad input or usage.
pub fn exit_code(e: &DumpError) -> i32 {
    match e {
        DumpError::Io { .. } => 1,
        _ => 2,
    }
}

/// The message for an error of [`run`] with `args`: an error about the
/// dump's contents is prefixed with the file's path (the error itself names
/// the offset or address), so a refusal names all three: file, where, and
/// what was expected. Usage, argument and I/O errors are left as they are
/// (an I/O error names its file already).
pub fn error_message(args: &[String], e: &DumpError) -> String {
    let file = match (e, parse_args(args)) {
        // Not about the file's contents: I/O (names its file), a bad
        // argument or address given on the command line.
        (DumpError::Io { .. } | DumpError::BadArgument(_) | DumpError::NonCanonical { .. }, _)
        | (_, Err(_)) => None,
        (_, Ok(a)) => a.core.or(a.raw),
    };
    match file {
        Some(f) => format!("{}: {e}", f.display()),
        None => e.to_string(),
    }
}

fn io(e: std::io::Error) -> DumpError {
    DumpError::Io {
        what: "write output".into(),
        source: e,
    }
}

fn size_name(s: PageSize) -> &'static str {
    match s {
        PageSize::Size4K => "4K",
        PageSize::Size2M => "2M",
        PageSize::Size1G => "1G",
    }
}

fn bytes(n: u128) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

/// Print the statistics block.
pub fn write_stats(out: &mut dyn Write, s: &WalkStats) -> std::io::Result<()> {
    writeln!(
        out,
        "tables: L4 {}, L3 {}, L2 {}, L1 {} (shared {}, at two levels {})",
        s.tables[4], s.tables[3], s.tables[2], s.tables[1], s.shared_tables, s.multi_level_tables
    )?;
    writeln!(
        out,
        "leaves: 4K {}, 2M {}, 1G {} (outside RAM {}); mapped {}",
        s.leaves_4k,
        s.leaves_2m,
        s.leaves_1g,
        s.leaves_outside_ram,
        bytes(s.mapped_bytes)
    )?;
    let flags: Vec<String> = WalkStats::FLAG_NAMES
        .iter()
        .zip(s.leaf_flags)
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    writeln!(out, "leaf flags: {}", flags.join(", "))?;
    writeln!(
        out,
        "effective (all levels): user {}, writable {}",
        s.effective_user, s.effective_writable
    )
}

/// Print one translation, every level's entry.
pub fn write_translation(out: &mut dyn Write, t: &Translation) -> std::io::Result<()> {
    writeln!(out, "translate {:#x}:", t.va)?;
    for s in &t.steps {
        let e = s.entry;
        let present = e & 1 != 0;
        let what = if !present {
            "not present".to_string()
        } else if s.level == Level::L1 || (s.level != Level::L4 && e & (1 << 7) != 0) {
            let size = match s.level {
                Level::L1 => PageSize::Size4K,
                Level::L2 => PageSize::Size2M,
                _ => PageSize::Size1G,
            };
            format!(
                "{} page at {:#x}",
                size_name(size),
                e & 0x000f_ffff_ffff_f000 & !(size.bytes() - 1)
            )
        } else {
            format!("table at {:#x}", e & 0x000f_ffff_ffff_f000)
        };
        let mut flags = EntryFlags::from_bits_truncate(e);
        if s.level == Level::L1 {
            flags = flags.difference(EntryFlags::HUGE);
        } else if e & (1 << 7) != 0 && e & EntryFlags::PAT_LARGE.bits() != 0 {
            flags |= EntryFlags::PAT_LARGE;
        }
        let pat4k = if s.level == Level::L1 && e & EntryFlags::PAT_4K.bits() != 0 {
            "|PAT"
        } else {
            ""
        };
        writeln!(
            out,
            "  L{}[{:3}] @ {:#x} = {:#018x} {:?}{} -> {}",
            s.level.number(),
            s.index,
            s.entry_pa,
            e,
            flags,
            pat4k,
            what
        )?;
    }
    match (&t.leaf, t.phys) {
        (Some(l), Some(p)) => writeln!(
            out,
            "  => phys {:#x} ({} page, {}{}{}{})",
            p,
            size_name(l.size),
            if l.user { "user" } else { "kernel" },
            if l.writable { " rw" } else { " ro" },
            if l.nx { " nx" } else { " x" },
            if l.in_ram { "" } else { ", outside RAM" }
        ),
        _ => writeln!(
            out,
            "  => not mapped (L{} entry not present)",
            t.steps.last().map_or(4, |s| s.level.number())
        ),
    }
}

fn write_count(
    out: &mut dyn Write,
    r: &Result<PinCount, pagepin_engine::Error>,
) -> std::io::Result<()> {
    match r {
        Ok(c) => writeln!(
            out,
            "  engine, {:6}: {} multicall entries in {} hypercalls ({} multicalls, {} direct); \
             tables {}, L1 pins {}, max locks held {} [formula: {} entries, {} multicalls]",
            c.policy,
            c.entries,
            c.hypercalls,
            c.multicalls,
            c.direct_calls,
            c.tables,
            c.l1_pins,
            c.max_locks_held,
            c.formula_entries,
            c.formula_hypercalls()
        ),
        Err(e) => writeln!(out, "  engine: the engine refuses this table: {e}"),
    }
}

/// Run the inspector with `args` (without the program name), writing to
/// `out`.
pub fn run(args: &[String], out: &mut dyn Write) -> Result<(), DumpError> {
    let a = parse_args(args)?;
    if a.help {
        writeln!(out, "{USAGE}").map_err(io)?;
        return Ok(());
    }
    let dump = match (&a.core, &a.raw) {
        (Some(p), _) => Dump::open_core(p)?,
        (_, Some(p)) => Dump::open_raw(p)?,
        _ => unreachable_args(),
    };
    let cr3 = dump.cr3(a.cr3, a.cpu)?;
    let cr3 = match a.root.as_deref() {
        None | Some("cr3") => cr3,
        Some("kernel") => cr3 & !PTI_USER_BIT,
        Some("user") => cr3 | PTI_USER_BIT,
        Some(other) => {
            return Err(DumpError::BadArgument(format!(
                "--root {other:?}: expected cr3, kernel or user"
            )))
        }
    };
    let w = Walker::new(&dump.mem, cr3)?;
    let user_root = w.pti_user_root();
    if a.stats {
        let s = w.stats(0..512)?;
        let mut o = String::new();
        o += &format!(
            "dump: {} memory range(s), {}; {} CPU note(s)\n",
            dump.mem.regions().len(),
            bytes(dump.mem.total() as u128),
            dump.cpus.len()
        );
        o += &format!("root: {:#x} (CR3 {:#x})", w.root(), cr3);
        if let Some(u) = user_root {
            o += &format!("; PTI user root at {u:#x}");
        }
        out.write_all(o.as_bytes()).map_err(io)?;
        writeln!(out).map_err(io)?;
        write_stats(out, &s).map_err(io)?;
        let user = w.stats(0..256)?;
        writeln!(
            out,
            "user half: {} leaves, tables L3 {}, L2 {}, L1 {}",
            user.leaves(),
            user.tables[3],
            user.tables[2],
            user.tables[1]
        )
        .map_err(io)?;
    }
    if a.mem {
        qemu::write_info_mem(&w, out)?;
    }
    if a.tlb {
        qemu::write_info_tlb(&w, out)?;
    }
    for &va in &a.translate {
        let t = w.translate(va)?;
        write_translation(out, &t).map_err(io)?;
    }
    if a.pin_report {
        // The simulator and the engine follow every path of the user half:
        // refuse an exploding one before printing a partial report.
        w.census(0..256)?.check()?;
        let v = pin::xen_check(
            &w,
            XenOptions {
                io_privileged: a.io_privileged,
            },
        )?;
        writeln!(
            out,
            "pin report: user half of root {:#x}, Xen PV rules (DESIGN §6), {}",
            w.root(),
            if a.io_privileged {
                "domain with I/O resources"
            } else {
                "domain without I/O resources"
            }
        )
        .map_err(io)?;
        // The verdict is the simulated hypervisor's (XenSim pinning a copy
        // through the engine); the hand-written checks explain it (rule
        // number, what is wrong in words).
        #[cfg(feature = "xen")]
        let refused = pin::sim_check(
            &w,
            XenOptions {
                io_privileged: a.io_privileged,
            },
            user_root.is_some(),
            a.batch,
        )?
        .refused;
        // Built without the simulator: the hand-written checks decide.
        #[cfg(not(feature = "xen"))]
        let refused = v.broken.as_ref().map(|b| pin::SimRefusal {
            errno: b.errno,
            call: "hand-written checks (built without the xen feature)".into(),
            entry: Some((b.level, b.index, b.entry_pa, b.entry, b.va)),
        });
        match (&refused, &v.broken) {
            (None, _) => {
                writeln!(
                    out,
                    "  xen: ACCEPTED by the simulator ({} tables validated, {} leaves checked, {} writable references)",
                    v.tables_validated, v.leaves_checked, v.writable_refs
                )
                .map_err(io)?;
                if let Some(b) = &v.broken {
                    writeln!(
                        out,
                        "  note: the hand-written checks disagree (rule {} at {:#x}: {})",
                        b.rule, b.entry_pa, b.what
                    )
                    .map_err(io)?;
                }
            }
            (Some(r), b) => {
                let why = b
                    .as_ref()
                    .filter(|b| r.entry.is_some_and(|(_, _, pa, _, _)| pa == b.entry_pa));
                match (r.entry, why) {
                    (Some((level, index, pa, entry, va)), Some(b)) => writeln!(
                        out,
                        "  xen: REFUSED: rule {} (-{}): L{level} entry {index} at {pa:#x} = {entry:#018x} (VA {va:#x}): {}",
                        b.rule,
                        errno_name(r.errno),
                        b.what
                    ),
                    (Some((level, index, pa, entry, va)), None) => writeln!(
                        out,
                        "  xen: REFUSED (-{}): L{level} entry {index} at {pa:#x} = {entry:#018x} (VA {va:#x}){}",
                        errno_name(r.errno),
                        match b {
                            Some(b) => format!(
                                " [the hand-written checks name another entry first: rule {} at {:#x}: {}]",
                                b.rule, b.entry_pa, b.what
                            ),
                            None => String::new(),
                        }
                    ),
                    (None, _) => writeln!(
                        out,
                        "  xen: REFUSED (-{}){}",
                        errno_name(r.errno),
                        match b {
                            Some(b) => format!(
                                " [the hand-written checks: rule {} at {:#x}: {}]",
                                b.rule, b.entry_pa, b.what
                            ),
                            None => String::new(),
                        }
                    ),
                }
                .map_err(io)?;
                writeln!(out, "  simulator: {}", r.call).map_err(io)?;
            }
        }
        writeln!(
            out,
            "  table frames mapped writable by the kernel half: {} (the pin's read-only remaps remove these)",
            v.tables_mapped_writable_by_kernel
        )
        .map_err(io)?;
        let (split, global) = pin::engine_count(&w, user_root.is_some(), a.batch)?;
        writeln!(
            out,
            "  pinning at batch {}{}:",
            a.batch,
            if user_root.is_some() {
                " (with the PTI user root)"
            } else {
                ""
            }
        )
        .map_err(io)?;
        write_count(out, &split).map_err(io)?;
        write_count(out, &global).map_err(io)?;
    }
    Ok(())
}

fn errno_name(e: i32) -> &'static str {
    match e {
        0 => "engine",
        1 => "EPERM",
        13 => "EACCES",
        16 => "EBUSY",
        22 => "EINVAL",
        _ => "E?",
    }
}

#[cold]
fn unreachable_args() -> ! {
    // parse_args guarantees exactly one of --core / --raw.
    panic!("argument check let neither --core nor --raw through")
}
