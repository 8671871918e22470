//! `pin_all` + `unpin_all` of 64 spaces on the Xen simulator with trap cost
//! 0: the engine's serial `pin_all` versus `pagepin::parallel::pin_all_par`
//! on rayon's pool (one batch per worker). Two sizes: 16 MiB of 4 KiB pages
//! per space (the simulator's per-frame state of all 64 spaces, ~10 MB,
//! fits the L3 cache) and 64 MiB per space (~40 MB: it does not, and every
//! L1 validation is a random walk over the data frames' type counts).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagepin::parallel::{pin_all_par, unpin_all_par};
use pagepin::{
    pin_all, unpin_all, AddressSpace, Batch, DefaultRawLock, SpaceOptions, Split, X86_64,
};
use pagepin_benches::*;

const SPACES: usize = 64;

fn bench(c: &mut Criterion) {
    for mib in [16, 64] {
        group(c, mib);
    }
}

fn group(c: &mut Criterion, mib: u64) {
    let e = xen_env_for(mib, SPACES, 0);
    let owned: Vec<AddressSpace<X86_64, Split<DefaultRawLock>, Xb>> = (0..SPACES)
        .map(|k| {
            let s = AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default())
                .expect("space");
            populate(&s, mib, k as u64 * pages(mib));
            s
        })
        .collect();
    let spaces: Vec<&AddressSpace<X86_64, Split<DefaultRawLock>, Xb>> = owned.iter().collect();
    let mut g = c.benchmark_group(format!("pin_all/64x{mib}MiB"));
    g.throughput(Throughput::Elements(SPACES as u64 * table_pages(mib)));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::from_parameter("serial"), |b| {
        let mut batch: Batch = Batch::new();
        b.iter(|| {
            let set = pin_all(&spaces, &mut batch).expect("pin_all");
            unpin_all(&spaces, set, &mut batch).expect("unpin_all");
        })
    });
    g.bench_function(
        BenchmarkId::from_parameter(format!("rayon_{}_threads", rayon::current_num_threads())),
        |b| {
            b.iter(|| {
                let set = pin_all_par::<_, _, _, 32>(&spaces).expect("pin_all_par");
                unpin_all_par::<_, _, _, 32>(&spaces, set).expect("unpin_all_par");
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
