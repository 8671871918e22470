//! Writer throughput: one thread rewriting PTEs (`set_pte`, plain store)
//! of a 1 GiB space, alone versus while another thread pins and unpins the
//! space in a loop, on the no-op trap (`NullBackend`), so the figure
//! measures locking, not emulation. Split versus global.
//!
//! Throughput is writes per second of the writer thread; the pinner runs
//! for the whole timed span of each sample, in a loop (`during_pin_unpin`:
//! a faster pinner runs more rounds) or one round every 30 µs
//! (`during_paced_pin_unpin`: the disturbance of a round, comparable
//! across builds).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagepin::backends::mock::NullBackend;
use pagepin::{
    AddressSpace, Batch, DefaultRawLock, EntryFlags, Global, LockPolicy, PageTableEntry, Split,
    WritePath, X86_64,
};
use pagepin_benches::*;

const MIB: u64 = 1024;
/// The paced pinner's period: slower than a pin + unpin of `MIB` under
/// either policy, so every build runs the same number of rounds.
const PACE: Duration = Duration::from_micros(30);

/// `iters` writes at pseudo-random mapped pages; returns the time taken.
fn write_loop<P: LockPolicy>(
    s: &AddressSpace<X86_64, P, NullBackend>,
    iters: u64,
    seed: &mut u64,
) -> Duration {
    let n = pages(MIB);
    let flags = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER;
    let t = Instant::now();
    for _ in 0..iters {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (*seed >> 33) % n;
        let v = PageTableEntry::new(table_frames(MIB) as u64 + i, flags);
        black_box(
            s.set_pte(BASE_VA + (i << 12), v, WritePath::Store)
                .expect("set_pte"),
        );
    }
    t.elapsed()
}

/// `iters` writes (as [`write_loop`]) while another thread runs `other`
/// until it is told to stop; returns the writes' time.
fn write_while<P: LockPolicy>(
    s: &AddressSpace<X86_64, P, NullBackend>,
    iters: u64,
    seed: &mut u64,
    other: impl FnOnce(&AtomicBool) + Send,
) -> Duration {
    let stop = AtomicBool::new(false);
    let started = AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            started.store(true, Ordering::Release);
            other(&stop);
        });
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let d = write_loop(s, iters, seed);
        stop.store(true, Ordering::Release);
        d
    })
}

/// One pin + unpin round, or (`due` given and not reached since `started`)
/// none; returns whether it ran.
fn pin_round<P: LockPolicy>(
    s: &AddressSpace<X86_64, P, NullBackend>,
    batch: &mut Batch,
    started: Instant,
    due: Option<Duration>,
) -> bool {
    if due.is_some_and(|d| started.elapsed() < d) {
        std::hint::spin_loop();
        return false;
    }
    s.pin(batch).expect("pin");
    s.unpin(batch).expect("unpin");
    true
}

fn group<P: LockPolicy<Lock = DefaultRawLock>>(c: &mut Criterion) {
    let s: AddressSpace<X86_64, P, NullBackend> = null_space(MIB);
    let mut g = c.benchmark_group(format!("writers/{}", P::NAME));
    g.throughput(Throughput::Elements(1));
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let mut seed = 1u64;
    g.bench_function(BenchmarkId::from_parameter("alone"), |b| {
        b.iter_custom(|iters| write_loop(&s, iters, &mut seed))
    });
    let rounds = AtomicU64::new(0);
    g.bench_function(BenchmarkId::from_parameter("during_pin_unpin"), |b| {
        b.iter_custom(|iters| {
            write_while(&s, iters, &mut seed, |stop| {
                let mut batch: Batch = Batch::new();
                let started = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    pin_round(&s, &mut batch, started, None);
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
    });
    // The same, with the pinner starting one round every `PACE`: how much a
    // pin/unpin round disturbs a writer, apart from how many rounds a
    // pinner in a loop fits in (a faster pinner runs more of them).
    g.bench_function(BenchmarkId::from_parameter("during_paced_pin_unpin"), |b| {
        b.iter_custom(|iters| {
            write_while(&s, iters, &mut seed, |stop| {
                let mut batch: Batch = Batch::new();
                let started = Instant::now();
                let mut next = Duration::ZERO;
                while !stop.load(Ordering::Acquire) {
                    if pin_round(&s, &mut batch, started, Some(next)) {
                        next += PACE;
                    }
                }
            })
        })
    });
    // Control: the same writer while the other thread runs a busy loop that
    // shares nothing with it. On a VM whose two vCPUs may land on one host
    // core, this shows how much of a slowdown is the host's, not pagepin's.
    g.bench_function(
        BenchmarkId::from_parameter("during_independent_spin"),
        |b| {
            b.iter_custom(|iters| {
                write_while(&s, iters, &mut seed, |stop| {
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1000 {
                            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                        }
                    }
                    black_box(x);
                })
            })
        },
    );
    eprintln!(
        "writers/{}: {} pin/unpin rounds ran against the writer",
        P::NAME,
        rounds.load(Ordering::Relaxed)
    );
    g.finish();
}

fn bench(c: &mut Criterion) {
    group::<Split<DefaultRawLock>>(c);
    group::<Global<DefaultRawLock>>(c);
}

criterion_group!(benches, bench);
criterion_main!(benches);
