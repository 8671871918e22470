//! Pin + unpin on the Xen simulator, batch size 1..=256, split and global,
//! trap cost 0 and 1,000 ns, at 1 GiB and 16 GiB mapped (4 KiB pages).
//!
//! One compiled engine (`Batch<256>`) sweeps the batch size at run time with
//! `Batch::with_limit(n)`: it flushes at `n` calls, `n` callbacks and
//! `16 * n` bytes of requests, exactly like a `Batch<n>` (the engine's
//! `runtime_limit_behaves_like_a_smaller_capacity` test and
//! `tests/engine_batch_counts.rs` check this). Throughput is in table pages.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use pagepin::{
    AddressSpace, Batch, DefaultRawLock, Global, LockPolicy, SpaceOptions, Split, X86_64,
};
use pagepin_benches::*;

const SIZES_MIB: [u64; 2] = [1024, 16 * 1024];
const BATCHES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
const TRAP_NS: [u64; 2] = [0, 1000];

fn cycle<P: LockPolicy>(s: &AddressSpace<X86_64, P, Xb>, n: usize) {
    let mut b: Batch<256> = Batch::with_limit(n);
    s.pin(&mut b).expect("pin");
    s.unpin(&mut b).expect("unpin");
}

fn bench(c: &mut Criterion) {
    for mib in SIZES_MIB {
        // Both policies' spaces in one simulated domain, built once per size.
        let e = xen_env_for(mib, 2, 0);
        let split: AddressSpace<X86_64, Split<DefaultRawLock>, Xb> =
            AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default())
                .expect("space");
        populate(&split, mib, 0);
        let global: AddressSpace<X86_64, Global<DefaultRawLock>, Xb> =
            AddressSpace::new(e.store.clone(), e.backend.clone(), SpaceOptions::default())
                .expect("space");
        populate(&global, mib, pages(mib));
        for trap in TRAP_NS {
            e.sim.set_trap_cost_ns(trap);
            let mut g = c.benchmark_group(format!("batch_sweep/{}GiB/trap{trap}ns", mib / 1024));
            g.throughput(Throughput::Elements(table_pages(mib)));
            if mib > 1024 {
                g.sampling_mode(SamplingMode::Flat);
            }
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(if mib > 1024 { 2 } else { 1 }));
            for n in BATCHES {
                g.bench_with_input(BenchmarkId::new("split", n), &n, |bch, &n| {
                    bch.iter(|| cycle(&split, n))
                });
                g.bench_with_input(BenchmarkId::new("global", n), &n, |bch, &n| {
                    bch.iter(|| cycle(&global, n))
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
