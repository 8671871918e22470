//! A probe of how pinning different spaces on the simulated hypervisor
//! scales across threads (ignored by default: timing-dependent; run with
//! `cargo test --release --test xen_scaling -- --ignored --nocapture`).

#[path = "support/xen.rs"]
mod xen_common;

use std::time::{Duration, Instant};

use pagepin::{Batch, Split, X86_64};
use xen_common::*;

const SPACES: usize = 16;
const L1S: usize = 32;
const ROUNDS: usize = 40;

fn cycle(spaces: &[Space<X86_64, Split>]) {
    let mut b: Batch = Batch::new();
    for _ in 0..ROUNDS {
        for s in spaces {
            s.pin(&mut b).expect("pin");
        }
        for s in spaces {
            s.unpin(&mut b).expect("unpin");
        }
    }
}

#[test]
#[ignore = "timing probe"]
fn pin_scaling_probe() {
    let e = env_sized::<X86_64>(SPACES * (L1S + 8), SPACES * (L1S + 8) + 512, 41, 0);
    let spaces: Vec<Space<X86_64, Split>> = (0..SPACES)
        .map(|_| {
            let s = space(&e, true);
            populate(&s, L1S);
            s
        })
        .collect();
    cycle(&spaces); // warm up
    let t = Instant::now();
    cycle(&spaces);
    let serial = t.elapsed();
    let t = Instant::now();
    let (a, b) = spaces.split_at(SPACES / 2);
    std::thread::scope(|sc| {
        sc.spawn(|| cycle(a));
        sc.spawn(|| cycle(b));
    });
    let parallel = t.elapsed();
    let speedup = serial.as_secs_f64() / parallel.max(Duration::from_nanos(1)).as_secs_f64();
    eprintln!("serial {serial:?}, 2 threads {parallel:?}, speedup {speedup:.2}");
    // Control: pure arithmetic, to see what the machine gives right now.
    let work = || {
        let mut x = 1u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    };
    let t = Instant::now();
    work();
    work();
    let cs = t.elapsed();
    let t = Instant::now();
    std::thread::scope(|sc| {
        sc.spawn(work);
        sc.spawn(work);
    });
    let cp = t.elapsed();
    eprintln!(
        "control: serial {cs:?}, 2 threads {cp:?}, speedup {:.2}",
        cs.as_secs_f64() / cp.as_secs_f64()
    );
    assert_quiet(&e.sim);
}
