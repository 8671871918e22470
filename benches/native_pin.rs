//! Pin on the native backend (`PINNING = false`: pinning is the space's
//! bookkeeping only, no walk and no batch) at 1 GiB and 16 GiB mapped. Each
//! iteration is one pin and one unpin; per call = half the time shown.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagepin::backends::native::NativeBackend;
use pagepin::{AddressSpace, Batch, FrameStore, SpaceOptions, Split, X86_64};
use pagepin_benches::*;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("native_pin");
    g.sample_size(50)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    // Two calls (pin, unpin) per iteration.
    g.throughput(Throughput::Elements(2));
    for mib in [1024u64, 16 * 1024] {
        let frames = table_frames(mib);
        let store = Arc::new(FrameStore::new(frames, 0));
        let backend = Arc::new(NativeBackend::with_memory(store.clone()));
        let s: AddressSpace<X86_64, Split, NativeBackend> =
            AddressSpace::new(store, backend, SpaceOptions::default()).expect("space");
        populate(&s, mib, frames as u64);
        let mut b: Batch = Batch::new();
        g.bench_function(
            BenchmarkId::new("pin+unpin", format!("{}GiB", mib / 1024)),
            |bch| {
                bch.iter(|| {
                    s.pin(&mut b).expect("pin");
                    s.unpin(&mut b).expect("unpin");
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
