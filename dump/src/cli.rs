//! The `inspect` command line, as a library function so tests can run it.
//!
//! ```text
//! inspect (--core FILE | --raw FILE --cr3 ADDR) [--cr3 ADDR] [--cpu N]
//!         [--root cr3|kernel|user] [--mem] [--tlb] [--translate VA]...
//!         [--pin-report] [--batch N] [--io-privileged] [--stats] [--la57]
//! ```
//!
//! `--mem` and `--tlb` print exactly what QEMU's `info mem` / `info tlb`
//! print; with no action the statistics are printed.

use std::io::Write;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{ArgGroup, Parser, ValueEnum};

use pagepin_engine::{EntryFlags, Level, PageSize};

use super::pin::{self, PinCount, XenOptions};
use super::walk::{Translation, WalkStats, Walker};
use super::{qemu, Dump, DumpError, PTI_USER_BIT};

/// What `--root` walks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Root {
    /// CR3 as it is (what QEMU walks).
    #[default]
    Cr3,
    /// CR3 & !0x1000: PTI's kernel root.
    Kernel,
    /// CR3 | 0x1000: PTI's user root.
    User,
}

/// The command line of `inspect`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "inspect",
    version,
    about = "Read x86-64 page tables out of a QEMU ELF core or a raw memory image",
    after_help = "With no action flag the statistics are printed (--stats).\n\
                  Numbers are decimal or 0x hex; `_` separators are allowed.\n\
                  Exit status: 0 ok, 1 I/O error, 2 bad input or usage."
)]
#[command(group(ArgGroup::new("input").required(true).args(["core", "raw"])))]
pub struct Args {
    /// A QEMU dump-guest-memory ELF core (CR3 from its QEMU CPU note).
    #[arg(long, value_name = "FILE")]
    pub core: Option<PathBuf>,
    /// A raw physical image (pmemsave: byte n is guest-physical n); needs --cr3.
    #[arg(long, value_name = "FILE", requires = "cr3")]
    pub raw: Option<PathBuf>,
    /// The root table (overrides the core's note).
    #[arg(long, value_name = "ADDR", value_parser = parse_number)]
    pub cr3: Option<u64>,
    /// Which CPU's note gives CR3.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_cpu)]
    pub cpu: usize,
    /// Which root to walk: CR3 as is (as QEMU does), PTI's kernel root
    /// (CR3 & !0x1000) or its user root (CR3 | 0x1000).
    #[arg(long, value_name = "WHICH", value_enum, default_value_t = Root::Cr3)]
    pub root: Root,
    /// Print QEMU `info mem` lines.
    #[arg(long)]
    pub mem: bool,
    /// Print QEMU `info tlb` lines.
    #[arg(long)]
    pub tlb: bool,
    /// Print every level's entry for VA (repeatable).
    #[arg(long, value_name = "VA", value_parser = parse_number)]
    pub translate: Vec<u64>,
    /// Would Xen pin this as a PV guest's table; what pinning costs.
    #[arg(long)]
    pub pin_report: bool,
    /// Multicall batch size for --pin-report (1..=256).
    #[arg(long, value_name = "N", default_value = "32", value_parser = parse_batch)]
    pub batch: usize,
    /// Check --pin-report for a domain with I/O resources.
    #[arg(long)]
    pub io_privileged: bool,
    /// Tables per level, leaves per size, flag counts (the default action).
    #[arg(long)]
    pub stats: bool,
    /// The tables are 5-level (CR4.LA57): for a raw image, or a core whose
    /// note says otherwise. A core's note sets it by itself.
    #[arg(long)]
    pub la57: bool,
}

impl Args {
    /// Whether to print the statistics: asked for, or no other action.
    pub fn wants_stats(&self) -> bool {
        self.stats || !(self.mem || self.tlb || self.pin_report || !self.translate.is_empty())
    }
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

fn parse_number(s: &str) -> Result<u64, String> {
    parse_u64(s).map_err(|_| "expected a decimal or 0x hex number".into())
}

fn parse_cpu(s: &str) -> Result<usize, String> {
    usize::try_from(parse_number(s)?).map_err(|_| "too large".into())
}

fn parse_batch(s: &str) -> Result<usize, String> {
    match parse_number(s)? {
        n @ 1..=256 if n as usize <= pin::MAX_BATCH => Ok(n as usize),
        _ => Err(format!("expected 1..={}", pin::MAX_BATCH)),
    }
}

/// Parse `args` (without the program name) as the binary does. `--help`
/// and `--version` come back as `Ok(Err(text))`; a usage error is
/// [`DumpError::BadArgument`] with clap's message.
pub fn parse_args(args: &[String]) -> Result<Result<Args, String>, DumpError> {
    match Args::try_parse_from(std::iter::once("inspect").chain(args.iter().map(String::as_str))) {
        Ok(a) => Ok(Ok(a)),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Ok(Err(e.render().to_string()))
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(DumpError::BadArgument(
                first.strip_prefix("error: ").unwrap_or(first).to_string(),
            ))
        }
    }
}

/// The exit status for an error: 1 for I/O, 2 for bad input or usage.
pub fn exit_code(e: &DumpError) -> u8 {
    match e {
        DumpError::Io { .. } => 1,
        _ => 2,
    }
}

/// The message for an error of [`run_args`] with `args`: an error about
/// the dump's contents is prefixed with the file's path (the error itself
/// names the offset or address), so a refusal names all three: file, where,
/// and what was expected. Argument and I/O errors are left as they are (an
/// I/O error names its file already).
pub fn error_message(args: &Args, e: &DumpError) -> String {
    let file = match e {
        // Not about the file's contents: I/O (names its file), a bad
        // argument or address given on the command line.
        DumpError::Io { .. } | DumpError::BadArgument(_) | DumpError::NonCanonical { .. } => None,
        _ => args.core.as_ref().or(args.raw.as_ref()),
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
    // L5 only when there is one (5-level paging).
    let l5 = if s.tables[5] > 0 {
        format!("L5 {}, ", s.tables[5])
    } else {
        String::new()
    };
    writeln!(
        out,
        "tables: {l5}L4 {}, L3 {}, L2 {}, L1 {} (shared {}, at two levels {})",
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
        } else if s.level == Level::L1
            || (matches!(s.level, Level::L2 | Level::L3) && e & (1 << 7) != 0)
        {
            let size = PageSize::of_leaf(s.level);
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
/// `out`: [`parse_args`], then [`run_args`] (`--help` and `--version` write
/// their text to `out`).
pub fn run(args: &[String], out: &mut dyn Write) -> Result<(), DumpError> {
    match parse_args(args)? {
        Ok(a) => run_args(&a, out),
        Err(text) => out.write_all(text.as_bytes()).map_err(io),
    }
}

/// Run the inspector with parsed arguments, writing to `out`.
pub fn run_args(a: &Args, out: &mut dyn Write) -> Result<(), DumpError> {
    let dump = match (&a.core, &a.raw) {
        (Some(p), _) => Dump::open_core(p)?,
        (_, Some(p)) => Dump::open_raw(p)?,
        _ => unreachable_args(),
    };
    let cr3 = dump.cr3(a.cr3, a.cpu)?;
    let cr3 = match a.root {
        Root::Cr3 => cr3,
        Root::Kernel => cr3 & !PTI_USER_BIT,
        Root::User => cr3 | PTI_USER_BIT,
    };
    let la57 = a.la57 || dump.la57(a.cpu);
    let w = Walker::with_levels(&dump.mem, cr3, la57)?;
    let user_root = w.pti_user_root();
    if a.wants_stats() {
        let s = w.stats(0..512)?;
        let mut o = String::new();
        o += &format!(
            "dump: {} memory range(s), {}; {} CPU note(s)\n",
            dump.mem.regions().len(),
            bytes(dump.mem.total() as u128),
            dump.cpus.len()
        );
        o += &format!(
            "root: {:#x} (CR3 {:#x}, {}-level paging)",
            w.root(),
            cr3,
            w.top().number()
        );
        if let Some(u) = user_root {
            o += &format!("; PTI user root at {u:#x}");
        }
        out.write_all(o.as_bytes()).map_err(io)?;
        writeln!(out).map_err(io)?;
        write_stats(out, &s).map_err(io)?;
        let user = w.stats(0..256)?;
        // Below the root: L4 .. L1 under 5-level paging, L3 .. L1 under 4.
        let levels: Vec<String> = (1..w.top().number())
            .rev()
            .map(|l| format!("L{l} {}", user.tables[usize::from(l)]))
            .collect();
        writeln!(
            out,
            "user half: {} leaves, tables {}",
            user.leaves(),
            levels.join(", ")
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
    if a.pin_report && w.la57() {
        write_pin_report_la57(out, &w, user_root.is_some(), a.batch)?;
    } else if a.pin_report {
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
            "pin report: user half of root {:#x}, Xen PV rules (docs/PROTOCOL.md §6), {}",
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

/// `--pin-report` for 5-level tables: Xen PV cannot run them at all (a PV
/// guest's root is an L4: `MMUEXT_PIN_L4_TABLE`, and the engine's Xen
/// backend refuses a 5-level space at compile time), so there is no rule
/// check; the engine's own cost of pinning them on a hypervisor that could
/// is still counted.
fn write_pin_report_la57(
    out: &mut dyn Write,
    w: &Walker<'_>,
    user_root: bool,
    batch: usize,
) -> Result<(), DumpError> {
    w.census(0..256)?.check()?;
    writeln!(
        out,
        "pin report: user half of root {:#x}, 5-level paging (CR4.LA57)",
        w.root()
    )
    .map_err(io)?;
    writeln!(
        out,
        "  xen: CANNOT RUN: Xen PV guests are 4-level only (the root is pinned with \
         MMUEXT_PIN_L4_TABLE; there is no L5 pin), so Xen cannot pin or run a 5-level table"
    )
    .map_err(io)?;
    let (split, global) = pin::engine_count(w, false, batch)?;
    writeln!(
        out,
        "  pinning at batch {batch} on a 5-level capable hypervisor (the engine's La57 mode{}):",
        if user_root {
            "; the PTI user root is not counted: a separate user root is 64-bit PV's"
        } else {
            ""
        }
    )
    .map_err(io)?;
    write_count(out, &split).map_err(io)?;
    write_count(out, &global).map_err(io)
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
    // The `input` argument group guarantees exactly one of --core / --raw.
    panic!("argument check let neither --core nor --raw through")
}
