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
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagepin::{
    AddressSpace, Batch, DefaultRawLock, EntryFlags, Error, Global, LockPolicy, Pae, PageSize,
    PageTableEntry, PagingMode, SpaceOptions, Split, WritePath, X86_64,
};
use platform::{Platform, PlatformKind};

const MAX_BATCH: usize = 256;

#[derive(Clone, Debug)]
struct Args {
    backend: PlatformKind,
    split: bool,
    pae: bool,
    batch: usize,
    spaces: usize,
    mapped_mib: u64,
    writers: usize,
    rounds: usize,
    trap_cost_ns: u64,
    seed: u64,
    json: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            backend: PlatformKind::default_kind(),
            split: true,
            pae: false,
            batch: 32,
            spaces: 8,
            mapped_mib: 256,
            writers: 2,
            rounds: 16,
            trap_cost_ns: 0,
            seed: 1,
            json: false,
        }
    }
}

const USAGE: &str = "usage: simulate [--backend xen|native|mock] [--policy split|global] [--mode x86_64|pae] \
[--batch 1..=256] [--spaces N] [--mapped-mib N] [--writers N] [--rounds N] [--trap-cost-ns N] [--seed N] [--json]";

fn parse_args(argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = argv.peekable();
    fn num<T>(flag: &str, v: Option<String>, lo: T, hi: T) -> Result<T, String>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        let n: T = v
            .parse()
            .map_err(|_| format!("{flag}: '{v}' is not a number"))?;
        if n < lo || n > hi {
            return Err(format!("{flag}: {n} is outside {lo}..={hi}"));
        }
        Ok(n)
    }
    while let Some(flag) = it.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        let mut value = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "--backend" => {
                let v = value().ok_or("--backend needs a value")?;
                a.backend = PlatformKind::parse(&v)
                    .ok_or_else(|| format!("--backend: unknown backend '{v}'"))?;
            }
            "--policy" => match value().as_deref() {
                Some("split") => a.split = true,
                Some("global") => a.split = false,
                Some(v) => return Err(format!("--policy: unknown policy '{v}' (split|global)")),
                None => return Err("--policy needs a value".into()),
            },
            "--mode" => match value().as_deref() {
                Some("x86_64") => a.pae = false,
                Some("pae") => a.pae = true,
                Some(v) => return Err(format!("--mode: unknown mode '{v}' (x86_64|pae)")),
                None => return Err("--mode needs a value".into()),
            },
            "--batch" => a.batch = num("--batch", value(), 1, MAX_BATCH)?,
            "--spaces" => a.spaces = num("--spaces", value(), 1, 4096)?,
            "--mapped-mib" => a.mapped_mib = num("--mapped-mib", value(), 1, 64 * 1024)?,
            "--writers" => a.writers = num("--writers", value(), 0, 64)?,
            "--rounds" => a.rounds = num("--rounds", value(), 1, 1_000_000)?,
            "--trap-cost-ns" => a.trap_cost_ns = num("--trap-cost-ns", value(), 0, 10_000_000)?,
            "--seed" => a.seed = num("--seed", value(), 0, u64::MAX)?,
            "--json" => a.json = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag '{other}'")),
        }
    }
    if a.pae && a.mapped_mib > 3 * 1024 {
        return Err("--mapped-mib: PAE user space is 3 GiB".into());
    }
    Ok(a)
}

/// The report, with exactly the fields of the JSON object.
#[derive(Debug, Default)]
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
        serde_json::json!({
            "backend": self.backend,
            "policy": self.policy,
            "mode": self.mode,
            "batch": self.batch,
            "spaces": self.spaces,
            "mapped_pages": self.mapped_pages,
            "table_pages": self.table_pages,
            "entries": self.entries,
            "multicalls": self.multicalls,
            "hypercalls": self.hypercalls,
            "pins_l1": self.pins_l1,
            "pins_root": self.pins_root,
            "unpins": self.unpins,
            "tlb_flushes": self.tlb_flushes,
            "max_locks_held": self.max_locks_held,
            "emulated_stores": self.emulated_stores,
            "faults": self.faults,
            "lost_updates": self.lost_updates,
            "leaked_frames": self.leaked_frames,
            "invariant_violations": self.invariant_violations,
            "elapsed_ms": self.elapsed_ms,
        })
        .to_string()
    }

    fn table(&self) -> String {
        let rows: [(&str, String); 21] = [
            ("backend", self.backend.into()),
            ("policy", self.policy.into()),
            ("mode", self.mode.into()),
            ("batch", self.batch.to_string()),
            ("spaces", self.spaces.to_string()),
            ("mapped pages", self.mapped_pages.to_string()),
            ("table pages", self.table_pages.to_string()),
            ("multicall entries", self.entries.to_string()),
            ("multicalls", self.multicalls.to_string()),
            ("hypercalls", self.hypercalls.to_string()),
            ("L1 pins", self.pins_l1.to_string()),
            ("root pins", self.pins_root.to_string()),
            ("unpins", self.unpins.to_string()),
            ("TLB flushes", self.tlb_flushes.to_string()),
            ("max locks held", self.max_locks_held.to_string()),
            ("emulated stores", self.emulated_stores.to_string()),
            ("faults", self.faults.to_string()),
            ("lost updates", self.lost_updates.to_string()),
            ("leaked frames", self.leaked_frames.to_string()),
            (
                "invariant violations",
                self.invariant_violations.to_string(),
            ),
            ("elapsed", format!("{} ms", self.elapsed_ms)),
        ];
        let mut out = String::from("pagepin simulate\n");
        for (k, v) in rows {
            out.push_str(&format!("  {k:<22} {v:>14}\n"));
        }
        let ok = self.faults == 0
            && self.lost_updates == 0
            && self.leaked_frames == 0
            && self.invariant_violations == 0;
        out.push_str(if ok {
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
    report.leaked_frames = backend.leaked_frames(&store) as u64;
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
    let mut rng = seed ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut n = 0u64;
    while !done.load(Ordering::Acquire) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = (rng % last.len().max(1) as u64) as usize;
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
            match (args.pae, args.split) {
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
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("simulate: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match dispatch(&args) {
        Ok(r) => {
            if args.json {
                println!("{}", r.json());
            } else {
                print!("{}", r.table());
            }
            let ok = r.faults == 0
                && r.lost_updates == 0
                && r.leaked_frames == 0
                && r.invariant_violations == 0;
            if ok {
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

    fn parse(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn flags() {
        let a = parse("--batch 7 --policy global --mode pae --spaces 2 --json").unwrap();
        assert_eq!(
            (a.batch, a.split, a.pae, a.spaces, a.json),
            (7, false, true, 2, true)
        );
        assert!(parse("--batch 0").is_err());
        assert!(parse("--batch 257").is_err());
        assert!(parse("--frobnicate").is_err());
        assert!(parse("--policy sometimes").is_err());
        assert!(parse("--backend=mock").is_ok());
        assert!(parse("--backend hyperv").is_err());
        assert!(parse("--mode pae --mapped-mib 4096").is_err());
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
