//! Batch-size sweep: pin + unpin of one space on the Xen simulator at batch
//! sizes 1..=256, split and global, at a given trap cost. Prints a table
//! (batch size × policy: multicalls, ns per table page, max locks held) and
//! writes an SVG plot of ns per table page and multicalls against batch
//! size.
//!
//! ```sh
//! cargo run --release --example batch_sweep -- [--trap-cost-ns 1000] [--mib 1024]
//!     [--rounds 7] [--p2m-extent 512] [--out docs/batch_sweep.svg] [--json]
//! ```
//!
//! `--p2m-extent 1` gives the simulator a fully random p2m instead of its
//! default of 2 MiB machine-contiguous extents placed at random.
//!
//! One compiled engine sweeps every size with `Batch::<256>::with_limit(n)`
//! (it flushes exactly as a `Batch<n>` does; `tests/engine_batch_counts.rs`).

use std::fmt::Write as _;

use clap::builder::RangedU64ValueParser;
use clap::Parser;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

use pagepin::backends::xen::{xen_env_with, SimConfig, XenBackend, XenSim, P2M_EXTENT};
use pagepin::{
    AddressSpace, Batch, DefaultRawLock, EntryFlags, Global, LockPolicy, PageSize, SpaceOptions,
    Split, X86_64,
};

type Xb = XenBackend<Arc<XenSim>>;

const BATCHES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
const BASE_VA: u64 = 0x10_0000_0000;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "batch_sweep",
    version,
    about = "Pin + unpin on the Xen simulator at batch sizes 1..=256, split and global: a table and an SVG plot"
)]
struct Args {
    /// Simulated cost of one trap into the hypervisor, in ns.
    #[arg(long, value_name = "NS", default_value_t = 1000)]
    trap_cost_ns: u64,
    /// MiB mapped (4 KiB pages).
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    mib: u64,
    /// Timed rounds per batch size (the median is reported).
    #[arg(long, value_name = "R", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Frames per machine-contiguous p2m extent (1: a fully random p2m).
    #[arg(long, value_name = "FRAMES", default_value_t = P2M_EXTENT, value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    p2m_extent: usize,
    /// Where to write the SVG plot.
    #[arg(long, value_name = "FILE.svg", default_value = "docs/batch_sweep.svg")]
    out: String,
    /// Print the report as one JSON object (settings and rows) instead of
    /// the table.
    #[arg(long)]
    json: bool,
}

/// The sweep's report: what `--json` prints.
#[derive(Debug, Serialize)]
struct Report<'a> {
    mib: u64,
    table_pages: usize,
    trap_cost_ns: u64,
    p2m_extent: usize,
    rounds: u32,
    split: &'a [Row],
    global: &'a [Row],
}

/// One row of the table (and of the JSON report).
#[derive(Clone, Copy, Debug, Serialize)]
struct Row {
    batch: usize,
    /// Traps per pin + unpin (multicalls and direct calls).
    multicalls: u64,
    ns_per_table: f64,
    max_locks: u32,
}

fn sweep<P: LockPolicy>(s: &AddressSpace<X86_64, P, Xb>, rounds: u32) -> Vec<Row> {
    BATCHES
        .iter()
        .map(|&n| {
            let mut b: Batch<256> = Batch::with_limit(n);
            // Warm up once (and count what one pin + unpin issues).
            let p = s.pin(&mut b).expect("pin");
            let u = s.unpin(&mut b).expect("unpin");
            let multicalls = b.stats().flushes;
            let mut max_locks = p.max_locks_held.max(u.max_locks_held);
            // The median round: the machine may be shared.
            let mut times: Vec<f64> = (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    let p = s.pin(&mut b).expect("pin");
                    let u = s.unpin(&mut b).expect("unpin");
                    let d = t.elapsed().as_nanos() as f64;
                    max_locks = max_locks.max(p.max_locks_held).max(u.max_locks_held);
                    d
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let ns = times[times.len() / 2] / p.tables as f64;
            Row {
                batch: n,
                multicalls,
                ns_per_table: ns,
                max_locks,
            }
        })
        .collect()
}

fn main() {
    // Usage errors: clap's message, exit 2.
    let args = Args::parse();
    let pages = args.mib * 256;
    let l1 = pages.div_ceil(512) as usize;
    let tables = l1 + l1.div_ceil(512) + 8;
    let data = pages as usize * 2;
    let mut cfg = SimConfig::for_mode::<X86_64>(data + 2 * tables, 7);
    cfg.trap_cost_ns = args.trap_cost_ns;
    cfg.p2m_extent = args.p2m_extent;
    let e = xen_env_with::<DefaultRawLock>(2 * tables, cfg).expect("xen env");
    let flags = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER;
    let split: AddressSpace<X86_64, Split, Xb> =
        AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default()).unwrap();
    let global: AddressSpace<X86_64, Global, Xb> =
        AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default()).unwrap();
    for i in 0..pages {
        let va = BASE_VA + (i << 12);
        split.map(va, i << 12, PageSize::Size4K, flags).unwrap();
        global
            .map(va, (pages + i) << 12, PageSize::Size4K, flags)
            .unwrap();
    }
    let table_pages = split.table_frames().unwrap().len();
    let rs = sweep(&split, args.rounds);
    let rg = sweep(&global, args.rounds);
    let st = e.sim.stats();
    assert_eq!(st.invariant_breaks + st.refcount_errors + st.faults, 0);

    if args.json {
        let report = Report {
            mib: args.mib,
            table_pages,
            trap_cost_ns: args.trap_cost_ns,
            p2m_extent: args.p2m_extent,
            rounds: args.rounds,
            split: &rs,
            global: &rg,
        };
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
    } else {
        print_table(&args, table_pages, &rs, &rg);
    }
    let svg = plot(&rs, &rg, &args, table_pages);
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).expect("create output directory");
        }
    }
    std::fs::write(&args.out, svg).expect("write SVG");
    if !args.json {
        println!("wrote {}", args.out);
    }
}

fn print_table(args: &Args, table_pages: usize, rs: &[Row], rg: &[Row]) {
    println!(
        "pin + unpin on the Xen simulator: {} MiB mapped ({} table pages), trap cost {} ns, \
         p2m extent {} frames, median of {} rounds",
        args.mib, table_pages, args.trap_cost_ns, args.p2m_extent, args.rounds
    );
    println!(
        "{:>6} | {:>10} {:>14} {:>9} | {:>10} {:>14} {:>9}",
        "batch", "split:", "", "", "global:", "", ""
    );
    println!(
        "{:>6} | {:>10} {:>14} {:>9} | {:>10} {:>14} {:>9}",
        "N", "multicalls", "ns/table page", "max locks", "multicalls", "ns/table page", "max locks"
    );
    for (s, g) in rs.iter().zip(rg) {
        println!(
            "{:>6} | {:>10} {:>14.0} {:>9} | {:>10} {:>14.0} {:>9}",
            s.batch,
            s.multicalls,
            s.ns_per_table,
            s.max_locks,
            g.multicalls,
            g.ns_per_table,
            g.max_locks
        );
    }
}

// ---------------------------------------------------------------------------
// A hand-written SVG: two panels, log2 batch size on x, log10 y. Kept by
// hand: one fixed figure of two panels is ~150 lines of string formatting,
// where a plotting crate would add a large dependency tree (fonts,
// rasterisers) to a tool whose output is checked in.

const W: f64 = 1010.0;
const H: f64 = 430.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 290.0;
const TOP: f64 = 70.0;
const SPLIT_COLOR: &str = "#1f77b4";
const GLOBAL_COLOR: &str = "#d62728";

fn plot(split: &[Row], global: &[Row], a: &Args, table_pages: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Arial, Helvetica, sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">pagepin pin + unpin on the Xen simulator: {} MiB mapped ({} table pages), trap cost {} ns</text>"#,
        W / 2.0,
        a.mib,
        table_pages,
        a.trap_cost_ns
    );
    let ns = |r: &Row| r.ns_per_table;
    let mc = |r: &Row| r.multicalls as f64;
    panel(&mut s, 80.0, "ns per table page", split, global, ns);
    panel(
        &mut s,
        80.0 + PANEL_W + 90.0,
        "multicalls (traps) per pin + unpin",
        split,
        global,
        mc,
    );
    // Legend.
    let ly = H - 22.0;
    for (i, (name, color)) in [
        ("split PTE locks", SPLIT_COLOR),
        ("global lock", GLOBAL_COLOR),
    ]
    .iter()
    .enumerate()
    {
        let x = W / 2.0 - 170.0 + i as f64 * 190.0;
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><circle cx="{}" cy="{ly}" r="4" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            x + 30.0,
            x + 15.0,
            x + 38.0,
            ly + 5.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn panel(
    s: &mut String,
    x0: f64,
    title: &str,
    split: &[Row],
    global: &[Row],
    f: impl Fn(&Row) -> f64,
) {
    let vals: Vec<f64> = split
        .iter()
        .chain(global)
        .map(&f)
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3);
    let hi = vals.iter().copied().fold(0.0, f64::max).max(lo);
    let dlo = lo.log10().floor();
    let dhi = hi.log10().ceil().max(dlo + 1.0);
    let xpos = |n: usize| x0 + (n as f64).log2() / 8.0 * PANEL_W;
    let ypos = |v: f64| TOP + PANEL_H - (v.log10() - dlo) / (dhi - dlo) * PANEL_H;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="14" font-weight="bold">{title}</text>"#,
        x0 + PANEL_W / 2.0,
        TOP - 12.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#333"/>"##
    );
    // Y grid: decades (and 2x, 5x minor lines).
    let mut d = dlo;
    while d <= dhi {
        let v = 10f64.powf(d);
        let y = ypos(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#ccc"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            x0 + PANEL_W,
            x0 - 6.0,
            y + 4.0,
            fmt_num(v)
        );
        for m in [2.0, 5.0] {
            let vm = v * m;
            if d < dhi {
                let ym = ypos(vm);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x0}" y1="{ym}" x2="{}" y2="{ym}" stroke="#eee"/>"##,
                    x0 + PANEL_W
                );
            }
        }
        d += 1.0;
    }
    // X ticks.
    for n in BATCHES {
        let x = xpos(n);
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{n}</text>"##,
            TOP + PANEL_H,
            TOP + PANEL_H + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">batch size N (entries per multicall)</text>"#,
        x0 + PANEL_W / 2.0,
        TOP + PANEL_H + 38.0
    );
    for (rows, color) in [(split, SPLIT_COLOR), (global, GLOBAL_COLOR)] {
        let pts: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", xpos(r.batch), ypos(f(r))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#,
            pts.join(" ")
        );
        for r in rows {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                xpos(r.batch),
                ypos(f(r))
            );
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{v}")
    } else {
        format!("{v:.2}")
    }
}
