//! Map 1M 4 KiB pages and translate 1M addresses: pagepin (no-op backend,
//! split and global) versus the `x86_64` crate's `OffsetPageTable` (the
//! two sides are in the bench library, `pagepin_benches::vs_crate`). The
//! `_cursor` rows map through one `AddressSpace::cursor_mut` and translate
//! through one `AddressSpace::reader`. The `_la57` rows do the same on
//! 5-level tables (`La57`): the extra level's cost is their ratio to the
//! matching 4-level row. `vs_x86_64_ratio` gives the per-call ratios from
//! interleaved rounds.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use pagepin::{DefaultRawLock, Global, La57, Split, X86_64};
use pagepin_benches::vs_crate::*;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("vs_x86_64/map_1M+translate_1M");
    g.throughput(Throughput::Elements(2 * PAGES));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for way in [Way::PerCall, Way::OneSection, Way::Cursor] {
        let sfx = way.suffix();
        g.bench_function(
            BenchmarkId::from_parameter(format!("pagepin_split{sfx}")),
            |b| {
                b.iter_batched(
                    pagepin_space::<X86_64, Split<DefaultRawLock>>,
                    |s| black_box(pagepin_run(s, way)),
                    BatchSize::PerIteration,
                )
            },
        );
        g.bench_function(
            BenchmarkId::from_parameter(format!("pagepin_global{sfx}")),
            |b| {
                b.iter_batched(
                    pagepin_space::<X86_64, Global<DefaultRawLock>>,
                    |s| black_box(pagepin_run(s, way)),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    // The fifth level's cost: per call and through the cursor and reader.
    for way in [Way::PerCall, Way::Cursor] {
        let sfx = way.suffix();
        g.bench_function(
            BenchmarkId::from_parameter(format!("pagepin_split_la57{sfx}")),
            |b| {
                b.iter_batched(
                    pagepin_space::<La57, Split<DefaultRawLock>>,
                    |s| black_box(pagepin_run(s, way)),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.bench_function(BenchmarkId::from_parameter("x86_64_crate"), |b| {
        b.iter_batched(
            x86_64_tables,
            |buf| black_box(x86_64_run(buf)),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
