//! The engine's pin + unpin on the no-op trap (`NullBackend`) against the
//! irreducible work of a pin and an unpin written as plain loops over the
//! same space (`pagepin_benches::floor`, which says what the loop does and
//! leaves out). Under split a third row, "floor+locks", adds the
//! protocol's own atomics: each PTE page's lock.
//!
//! Sizes: 1 GiB and 16 GiB mapped with 4 KiB pages; batch 32; split (L1s
//! get a separate pin) and global (they do not).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagepin::backends::mock::NullBackend;
use pagepin::{AddressSpace, Batch, DefaultRawLock, Global, LockPolicy, Split, X86_64};
use pagepin_benches::floor::{floor, Buf, N};
use pagepin_benches::*;

fn group<P: LockPolicy<Lock = DefaultRawLock>>(c: &mut Criterion, mib: u64) {
    let s: AddressSpace<X86_64, P, NullBackend> = null_space(mib);
    let mut g = c.benchmark_group(format!("floor/{}GiB/{}", mib / 1024, P::NAME));
    g.throughput(Throughput::Elements(table_pages(mib)));
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function(BenchmarkId::from_parameter("engine"), |b| {
        let mut batch: Batch<N> = Batch::new();
        b.iter(|| {
            s.pin(&mut batch).expect("pin");
            s.unpin(&mut batch).expect("unpin");
        })
    });
    let mut buf = Buf::default();
    let root = s.root().0;
    g.bench_function(BenchmarkId::from_parameter("floor"), |b| {
        b.iter(|| {
            floor(
                s.store(),
                black_box(root),
                P::SPLIT_PTE_LOCKS,
                false,
                &mut buf,
            )
        })
    });
    if P::SPLIT_PTE_LOCKS {
        g.bench_function(BenchmarkId::from_parameter("floor+locks"), |b| {
            b.iter(|| floor(s.store(), black_box(root), true, true, &mut buf))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    for mib in [1024, 16 * 1024] {
        group::<Split<DefaultRawLock>>(c, mib);
        group::<Global<DefaultRawLock>>(c, mib);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
