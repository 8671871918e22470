//! The `vs_x86_64` ratios from interleaved rounds: each round runs, on
//! fresh table memory, per-call `map` + `translate` under split and under
//! global, the cursor-and-reader way under both, and the `x86_64` crate,
//! one after the other; the report gives each row's fastest round and its
//! ratio to the crate's fastest. Both sides of every ratio run under the
//! same machine conditions, in the same binary, which criterion's separate
//! rows do not promise.
//!
//! `cargo bench -p pagepin-benches --bench vs_x86_64_ratio [-- ROUNDS]`
//! (default 20 rounds; bounded by count, not time).

use std::hint::black_box;
use std::time::{Duration, Instant};

use pagepin::backends::mock::NullBackend;
use pagepin::{AddressSpace, DefaultRawLock, Global, LockPolicy, Split, X86_64};
use pagepin_benches::rounds_arg;
use pagepin_benches::vs_crate::*;

/// A row of the report: its name and one timed run.
type Row = (&'static str, fn() -> Duration);

/// Time one pagepin run on a fresh space (made and dropped untimed).
fn pagepin_once<P: LockPolicy<Lock = DefaultRawLock>>(way: Way) -> Duration {
    let s: AddressSpace<X86_64, P, NullBackend> = pagepin_space();
    let t = Instant::now();
    let out = black_box(pagepin_run(s, way));
    let d = t.elapsed();
    drop(out);
    d
}

fn main() {
    let rounds = rounds_arg(20);
    let rows: [Row; 5] = [
        ("pagepin split, per call", || {
            pagepin_once::<Split<DefaultRawLock>>(Way::PerCall)
        }),
        ("pagepin global, per call", || {
            pagepin_once::<Global<DefaultRawLock>>(Way::PerCall)
        }),
        ("pagepin split, cursor + reader", || {
            pagepin_once::<Split<DefaultRawLock>>(Way::Cursor)
        }),
        ("pagepin global, cursor + reader", || {
            pagepin_once::<Global<DefaultRawLock>>(Way::Cursor)
        }),
        ("`x86_64` crate", || {
            let buf = x86_64_tables();
            let t = Instant::now();
            let out = black_box(x86_64_run(buf));
            let d = t.elapsed();
            drop(out);
            d
        }),
    ];
    let mut best = [Duration::MAX; 5];
    for _ in 0..rounds {
        for (b, (_, run)) in best.iter_mut().zip(&rows) {
            *b = (*b).min(run());
        }
    }
    let crate_best = best[4].as_secs_f64();
    println!(
        "vs_x86_64 ratios: fastest of {rounds} interleaved rounds (map {PAGES} + translate {PAGES})"
    );
    println!();
    println!("| way | fastest | vs crate |");
    println!("|---|---|---|");
    for (b, (name, _)) in best.iter().zip(&rows) {
        println!(
            "| {name} | {:.2} ms | {:.2}× |",
            b.as_secs_f64() * 1e3,
            b.as_secs_f64() / crate_best
        );
    }
}
