//! The main job: build address spaces, pin and unpin them in rounds while
//! writer threads keep updating entries, and report what it took.
//!
//! ```text
//! cargo run --release --example simulate -- [--backend xen|native|mock]
//!     [--policy split|global] [--mode x86_64|pae] [--batch 1..=256]
//!     [--spaces N] [--mapped-mib N] [--writers N] [--rounds N]
//!     [--trap-cost-ns N] [--seed N] [--json]
//! ```

#[path = "simulate/platform.rs"]
mod platform;

use std::io::IsTerminal;

use clap::builder::RangedU64ValueParser;
use clap::{CommandFactory, Parser, ValueEnum};
use serde::Serialize;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepin::backends::SplitMix64;
use pagepin::{
    AddressSpace, Batch, DefaultRawLock, EntryFlags, Error, Global, LockPolicy, Pae, PageSize,
    PageTableEntry, PagingMode, SpaceOptions, Split, WritePath, X86_64,
};
use platform::{Platform, PlatformKind};

const MAX_BATCH: usize = 256;

/// The command line (the README's flags).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "simulate",
    version,
    about = "Pin and unpin address spaces in rounds while writer threads update entries, and report",
    after_help = "Exit status: 0 clean, 1 faults, lost updates, leaked frames or invariant \
                  breaks (or a failed run), 2 usage."
)]
struct Args {
    /// The backend: the Xen backend over the simulated hypervisor, native
    /// x86-64 (no pinning), or the recording mock.
    #[arg(long, value_name = "xen|native|mock", default_value = "xen", value_parser = parse_backend)]
    backend: PlatformKind,
    /// Lock policy: split PTE locks or one space lock.
    #[arg(long, value_enum, default_value_t = Policy::Split)]
    policy: Policy,
    /// Paging mode.
    #[arg(long, value_enum, default_value_t = Mode::X86_64)]
    mode: Mode,
    /// Multicall batch size.
    #[arg(long, default_value_t = 32, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_BATCH as u64))]
    batch: usize,
    /// Address spaces.
    #[arg(long, default_value_t = 8, value_parser = RangedU64ValueParser::<usize>::new().range(1..=4096))]
    spaces: usize,
    /// MiB mapped per space (4 KiB pages; PAE: at most 3072).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=64 * 1024))]
    mapped_mib: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 2, value_parser = RangedU64ValueParser::<usize>::new().range(0..=64))]
    writers: usize,
    /// Pin/unpin rounds.
    #[arg(long, default_value_t = 16, value_parser = RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    rounds: usize,
    /// Simulated cost of one trap into the hypervisor, in ns.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    trap_cost_ns: u64,
    /// Seed of the writers' and the simulator's pseudo-random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// `--policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Policy {
    Split,
    Global,
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    #[value(name = "x86_64")]
    X86_64,
    Pae,
}

fn parse_backend(s: &str) -> Result<PlatformKind, String> {
    PlatformKind::parse(s).ok_or_else(|| "expected xen, native or mock".into())
}

/// Parse the flags (without the program name); checks across flags
/// included. A usage error or `--help` is clap's error (exit 2 or 0).
fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Args, clap::Error> {
    let a = Args::try_parse_from(std::iter::once("simulate".to_string()).chain(argv))?;
    if a.mode == Mode::Pae && a.mapped_mib > 3 * 1024 {
        return Err(Args::command().error(
            clap::error::ErrorKind::ValueValidation,
            "--mapped-mib: PAE user space is 3 GiB (at most 3072)",
        ));
    }
    Ok(a)
}

/// The report: its fields, in order, are the JSON object's (serde) and the
/// table's rows.
#[derive(Debug, Default, Serialize)]
struct Report {
    backend: &'static str,
    policy: &'static str,
    mode: &'static str,
    batch: usize,
    spaces: usize,
    mapped_pages: u64,
    table_pages: u64,
    entries: u64,
    multicalls: u64,
    hypercalls: u64,
    pins_l1: u64,
    pins_root: u64,
    unpins: u64,
    tlb_flushes: u64,
    max_locks_held: u32,
    emulated_stores: u64,
    faults: u64,
    lost_updates: u64,
    leaked_frames: u64,
    invariant_violations: u64,
    elapsed_ms: u64,
}

impl Report {
    fn json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    fn ok(&self) -> bool {
        self.faults == 0
            && self.lost_updates == 0
            && self.leaked_frames == 0
            && self.invariant_violations == 0
    }

    /// The table: one row per field of the JSON object, in its order
    /// (serde_json's `preserve_order`), labelled by its name.
    fn table(&self) -> String {
        let value = serde_json::to_value(self).expect("a report serializes");
        let mut out = String::from("pagepin simulate\n");
        for (k, v) in value.as_object().into_iter().flatten() {
            // A few names read better spelled out.
            let label = match k.as_str() {
                "entries" => "multicall entries".to_string(),
                "pins_l1" => "L1 pins".to_string(),
                "pins_root" => "root pins".to_string(),
                "tlb_flushes" => "TLB flushes".to_string(),
                "elapsed_ms" => "elapsed (ms)".to_string(),
                other => other.replace('_', " "),
            };
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("  {label:<22} {v:>14}\n"));
        }
        out.push_str(if self.ok() {
            "  verdict: OK\n"
        } else {
            "  verdict: PROBLEMS FOUND\n"
        });
        out
    }
}

/// Where user mappings start (well inside the user half of both modes).
const BASE_VA: u64 = 0x1000_0000;

fn run<M: PagingMode, P: LockPolicy<Lock = DefaultRawLock>, B: Platform>(
    args: &Args,
) -> Result<Report, String> {
    let pages_per_space = args.mapped_mib * 256;
    // Tables: one L1 per 512 pages, one L2 per 512 L1s, plus the upper levels.
    let tables_per_space = pages_per_space.div_ceil(512) + pages_per_space.div_ceil(512 * 512) + 8;
    let store_frames = (tables_per_space * args.spaces as u64 + 64) as usize;
    // Every space maps the same data pages (as processes share a file).
    let platform::Env {
        store,
        backend,
        data_base,
    } = B::build::<M>(store_frames, pages_per_space, args.trap_cost_ns, args.seed)?;

    let started = Instant::now();
    let mut spaces: Vec<AddressSpace<M, P, B>> = Vec::with_capacity(args.spaces);
    for _ in 0..args.spaces {
        let s = AddressSpace::new(
            store.clone(),
            backend.clone(),
            SpaceOptions { user_root: true },
        )
        .map_err(|e| format!("creating a space: {e}"))?;
        for i in 0..pages_per_space {
            let flags = EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::WRITABLE;
            s.map(
                BASE_VA + (i << 12),
                (data_base + i) << 12,
                PageSize::Size4K,
                flags,
            )
            .map_err(|e| format!("mapping: {e}"))?;
        }
        spaces.push(s);
    }
    let mut table_pages = 0u64;
    for s in &spaces {
        table_pages += s.table_frames().map_err(|e| e.to_string())?.len() as u64;
        table_pages += s.user_root().is_some() as u64 + s.kernel_pmd().is_some() as u64;
    }

    let done = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let faults = AtomicU64::new(0);
    let lost = AtomicU64::new(0);
    let mut report = Report {
        backend: B::NAME,
        policy: P::NAME,
        mode: M::NAME,
        batch: args.batch,
        spaces: args.spaces,
        mapped_pages: pages_per_space * args.spaces as u64,
        table_pages,
        ..Report::default()
    };

    let bar = Progress::new(args.rounds as u64, args.json);
    /// Stops the writers however the pinner leaves (a panic included), so
    /// the thread scope can always join them.
    struct StopWriters<'a>(&'a AtomicBool);
    impl Drop for StopWriters<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    std::thread::scope(|scope| -> Result<(), String> {
        let _stop = StopWriters(&done);
        for w in 0..args.writers {
            let (spaces, done, writes, faults, lost) = (&spaces, &done, &writes, &faults, &lost);
            let writers = args.writers as u64;
            let seed = args.seed;
            scope.spawn(move || {
                writer(
                    w as u64,
                    writers,
                    seed,
                    spaces,
                    data_base,
                    pages_per_space,
                    done,
                    writes,
                    faults,
                    lost,
                )
            });
        }
        let mut batch: Batch<MAX_BATCH> = Batch::with_limit(args.batch);
        let result = (|| {
            for round in 0..args.rounds {
                for s in &spaces {
                    let st = s
                        .pin(&mut batch)
                        .map_err(|e| format!("pin (round {round}): {e}"))?;
                    report.pins_l1 += st.l1_ops as u64;
                    report.pins_root += 1 + s.user_root().is_some() as u64;
                    report.max_locks_held = report.max_locks_held.max(st.max_locks_held);
                }
                for s in &spaces {
                    let st = s
                        .unpin(&mut batch)
                        .map_err(|e| format!("unpin (round {round}): {e}"))?;
                    report.unpins += st.l1_ops as u64 + 1 + s.user_root().is_some() as u64;
                    report.max_locks_held = report.max_locks_held.max(st.max_locks_held);
                }
                bar.tick(round as u64 + 1, started.elapsed());
            }
            Ok(())
        })();
        done.store(true, Ordering::Release);
        let st = batch.stats();
        report.entries = st.calls;
        report.multicalls = st.multicalls;
        report.hypercalls = st.flushes;
        // Every pin and unpin remaps each root with the one flushing request.
        report.tlb_flushes = (args.rounds * args.spaces * 2) as u64;
        result
    })?;
    bar.finish();

    report.faults = faults.load(Ordering::Relaxed);
    report.lost_updates = lost.load(Ordering::Relaxed);
    let pc = backend.counters();
    if let Some(h) = pc.hypercalls {
        report.hypercalls = h;
    }
    if let Some(t) = pc.tlb_flushes {
        report.tlb_flushes = t;
    }
    report.emulated_stores = pc.emulated_stores;
    report.faults = report.faults.max(pc.faults);
    report.invariant_violations = pc.invariant_violations;
    // Table frames the platform still treats as page tables.
    let (first, frames) = (store.base().0, store.len() as u64);
    report.leaked_frames = backend.leaked(pagepin::Pfn(first)..pagepin::Pfn(first + frames)) as u64;
    // A frame the engine still flags pinned after the final unpin is leaked too.
    for i in 0..store.len() {
        let pfn = pagepin::Pfn(store.base().0 + i as u64);
        if store
            .meta(pfn)
            .is_some_and(|m| m.is_pinned() || m.lock().is_locked())
        {
            report.leaked_frames += 1;
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let _ = writes;
    Ok(report)
}

/// A writer: owns every page whose index is `w` mod `writers`, in every
/// space, and rewrites them in turn (flipping RW and an available-bits
/// counter, some through the hypervisor) until the pinner is done. Then it
/// checks that each of its entries holds the last value it wrote.
#[allow(clippy::too_many_arguments)]
fn writer<M: PagingMode, P: LockPolicy, B: Platform>(
    w: u64,
    writers: u64,
    seed: u64,
    spaces: &[AddressSpace<M, P, B>],
    data_base: u64,
    pages: u64,
    done: &AtomicBool,
    writes: &AtomicU64,
    faults: &AtomicU64,
    lost: &AtomicU64,
) {
    // Each writer touches a window of pages so its entries stay hot.
    let mine: Vec<u64> = (0..pages).filter(|i| i % writers == w).take(4096).collect();
    let mut last = vec![None::<u64>; mine.len() * spaces.len()];
    // The project's one seeded generator (not `rand`): `--seed` replays the
    // same choices whatever version of a crate is resolved.
    let mut rng = SplitMix64::new(seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut n = 0u64;
    while !done.load(Ordering::Acquire) {
        let k = rng.below(last.len() as u64) as usize;
        let (si, pi) = (k / mine.len(), mine[k % mine.len()]);
        let va = BASE_VA + (pi << 12);
        // User leaves carry GLOBAL already, as 64-bit PV Xen would add it;
        // the software-available bits 9..=11 carry a write counter (Xen
        // refuses entries with bits 52 and up).
        let mut flags =
            EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::ACCESSED | EntryFlags::GLOBAL;
        if n & 1 == 0 {
            flags |= EntryFlags::WRITABLE;
        }
        let tag = ((n >> 1) & 0x7) << 9;
        // Entries hold machine frames: the platform translates.
        let mfn = spaces[si]
            .backend()
            .pfn_to_mfn(pagepin::Pfn(data_base + pi));
        let value = PageTableEntry::from_bits(PageTableEntry::new(mfn.0, flags).bits() | tag);
        let path = if n % 8 == 7 {
            WritePath::Hypercall
        } else {
            WritePath::Store
        };
        match spaces[si].set_pte(va, value, path) {
            Ok(_) => last[k] = Some(value.bits()),
            Err(Error::Fault(_)) => {
                faults.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                faults.fetch_add(1, Ordering::Relaxed);
            }
        }
        n += 1;
    }
    writes.fetch_add(n, Ordering::Relaxed);
    for (k, v) in last.iter().enumerate() {
        if let Some(v) = v {
            let (si, pi) = (k / mine.len(), mine[k % mine.len()]);
            if spaces[si].read_pte(BASE_VA + (pi << 12)).map(|e| e.bits()) != Ok(*v) {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A progress bar on a terminal, shown only once a run passes one second.
struct Progress {
    total: u64,
    enabled: bool,
    bar: std::sync::OnceLock<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: u64, json: bool) -> Self {
        Progress {
            total,
            enabled: !json && std::io::stderr().is_terminal(),
            bar: std::sync::OnceLock::new(),
        }
    }
    fn tick(&self, done: u64, elapsed: Duration) {
        if !self.enabled || (elapsed < Duration::from_secs(1) && self.bar.get().is_none()) {
            return;
        }
        let bar = self.bar.get_or_init(|| {
            let b = indicatif::ProgressBar::new(self.total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} rounds ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message("pin/unpin");
            b
        });
        bar.set_position(done);
    }
    fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish_and_clear();
        }
    }
}

fn dispatch(args: &Args) -> Result<Report, String> {
    macro_rules! go {
        ($b:ty) => {
            match (args.mode == Mode::Pae, args.policy == Policy::Split) {
                (false, true) => run::<X86_64, Split, $b>(args),
                (false, false) => run::<X86_64, Global, $b>(args),
                (true, true) => run::<Pae, Split, $b>(args),
                (true, false) => run::<Pae, Global, $b>(args),
            }
        };
    }
    platform::dispatch!(args.backend, go)
}

fn main() -> ExitCode {
    // Usage errors exit 2 with clap's message and usage line; `--help` and
    // `--version` print and exit 0.
    let args = parse_args(std::env::args().skip(1)).unwrap_or_else(|e| e.exit());
    match dispatch(&args) {
        Ok(r) => {
            if args.json {
                println!("{}", r.json());
            } else {
                print!("{}", r.table());
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("simulate: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, clap::Error> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn flags() {
        let a = parse("--batch 7 --policy global --mode pae --spaces 2 --json").unwrap();
        assert_eq!(
            (a.batch, a.policy, a.mode, a.spaces, a.json),
            (7, Policy::Global, Mode::Pae, 2, true)
        );
        let d = parse("").unwrap();
        assert_eq!(
            (d.backend, d.policy, d.mode, d.batch, d.spaces, d.mapped_mib),
            (PlatformKind::Xen, Policy::Split, Mode::X86_64, 32, 8, 256)
        );
        assert_eq!((d.writers, d.rounds, d.trap_cost_ns, d.seed), (2, 16, 0, 1));
        use clap::error::ErrorKind;
        // Usage errors are clap's (exit 2); help and version are not errors
        // of the user (exit 0).
        for bad in [
            "--batch 0",
            "--batch x",
            "--frobnicate",
            "--mode pae --mapped-mib 4096",
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
        assert_eq!(parse("--help").unwrap_err().kind(), ErrorKind::DisplayHelp);
        assert_eq!(parse("--version").unwrap_err().exit_code(), 0);
        assert!(parse("--batch 0").is_err());
        assert!(parse("--batch 257").is_err());
        assert!(parse("--frobnicate").is_err());
        assert!(parse("--policy sometimes").is_err());
        assert!(parse("--backend=mock").is_ok());
        assert!(parse("--backend hyperv").is_err());
        assert!(parse("--mode pae --mapped-mib 4096").is_err());
        assert!(parse("--mode pae --mapped-mib 3072").is_ok());
    }

    /// The JSON object has the README's fields, in its order, and the table
    /// one row per field.
    #[test]
    fn report_fields() {
        let r = Report {
            backend: "xen",
            faults: 3,
            ..Report::default()
        };
        let json = r.json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            names.join(", "),
            "backend, policy, mode, batch, spaces, mapped_pages, table_pages, entries, \
             multicalls, hypercalls, pins_l1, pins_root, unpins, tlb_flushes, max_locks_held, \
             emulated_stores, faults, lost_updates, leaked_frames, invariant_violations, elapsed_ms"
        );
        assert!(json.contains(r#""faults":3"#), "{json}");
        let table = r.table();
        assert_eq!(table.lines().count(), 1 + 21 + 1, "{table}");
        assert!(table.contains("  multicall entries"), "{table}");
        assert!(table.ends_with("verdict: PROBLEMS FOUND\n"), "{table}");
    }

    /// A small run on every backend, policy and mode: the invariants hold
    /// and the counts are consistent.
    #[test]
    fn small_runs_are_clean() {
        for backend in ["xen", "native", "mock"] {
            for policy in ["split", "global"] {
                for mode in ["x86_64", "pae"] {
                    let a = parse(&format!(
                        "--backend {backend} --policy {policy} --mode {mode} --spaces 2 --mapped-mib 4 --rounds 3 --batch 5"
                    ))
                    .unwrap();
                    let r = dispatch(&a).unwrap();
                    let what = format!("{backend}/{policy}/{mode}: {r:?}");
                    assert_eq!(
                        (
                            r.faults,
                            r.lost_updates,
                            r.leaked_frames,
                            r.invariant_violations
                        ),
                        (0, 0, 0, 0),
                        "{what}"
                    );
                    assert_eq!(r.mapped_pages, 2 * 1024, "{what}");
                    if backend != "native" {
                        assert_eq!(r.pins_l1 > 0, policy == "split", "{what}");
                        assert!(r.max_locks_held <= 5 / 2 + 2, "{what}");
                        assert!(r.multicalls > 0 && r.entries >= r.multicalls, "{what}");
                    } else {
                        assert_eq!(r.entries, 0, "{what}: native pins without any call");
                    }
                }
            }
        }
    }
}
