//! The `floor` bench's ratios, measured in interleaved rounds: each round
//! times a batch of engine pin + unpin runs, then the floor, then (split)
//! the floor with locks, on the same space; the report gives each row's
//! fastest round and the engine / floor ratio of those. Interleaving puts
//! both sides of a ratio under the same machine conditions, and the
//! minimum drops rounds a noisy neighbour slowed down, so the ratios vary
//! less between runs than criterion's separate groups do.
//!
//! `cargo bench -p pagepin-benches --bench floor_ratio [-- ROUNDS]`
//! (default 100 rounds; bounded by count, not time).

use std::hint::black_box;
use std::time::Instant;

use pagepin::backends::mock::NullBackend;
use pagepin::{AddressSpace, Batch, DefaultRawLock, Global, LockPolicy, Split, X86_64};
use pagepin_benches::floor::{floor, Buf, N};
use pagepin_benches::*;

/// Nanoseconds per run of `f`, over `runs` runs.
fn per_run(runs: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..runs {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(runs)
}

fn report<P: LockPolicy<Lock = DefaultRawLock>>(mib: u64, rounds: u32) {
    let s: AddressSpace<X86_64, P, NullBackend> = null_space(mib);
    let mut batch: Batch<N> = Batch::new();
    let mut buf = Buf::default();
    let root = s.root().0;
    // About a millisecond per side and round.
    let runs = if mib > 2048 { 10 } else { 150 };
    let split = P::SPLIT_PTE_LOCKS;
    let (mut engine, mut bare, mut locked) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..rounds {
        engine = engine.min(per_run(runs, || {
            s.pin(&mut batch).expect("pin");
            s.unpin(&mut batch).expect("unpin");
        }));
        bare = bare.min(per_run(runs, || {
            floor(s.store(), black_box(root), split, false, &mut buf)
        }));
        if split {
            locked = locked.min(per_run(runs, || {
                floor(s.store(), black_box(root), true, true, &mut buf)
            }));
        }
    }
    let us = |ns: f64| ns / 1000.0;
    let mut line = format!(
        "| {} GiB | {} | {:.2} µs | {:.2} µs | {:.2}× |",
        mib / 1024,
        P::NAME,
        us(engine),
        us(bare),
        engine / bare
    );
    if split {
        line += &format!(" {:.2} µs | {:.2}× |", us(locked), engine / locked);
    } else {
        line += " | |";
    }
    println!("{line}");
}

fn main() {
    let rounds = rounds_arg(100);
    println!("floor ratios: fastest of {rounds} interleaved rounds (pin + unpin, NullBackend, batch {N})");
    println!();
    println!("| mapped | policy | engine | floor | ratio | floor+locks | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for mib in [1024, 16 * 1024] {
        report::<Split<DefaultRawLock>>(mib, rounds);
        report::<Global<DefaultRawLock>>(mib, rounds);
    }
}
