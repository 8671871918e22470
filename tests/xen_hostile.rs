//! A hostile guest: writers store entries that map the space's own table
//! frames (writable and read-only) while another thread pins and unpins.
//! Xen must refuse what breaks its rules; the engine must report typed
//! errors, never hang, and leave a clean space once the writers stop.

#[path = "support/xen.rs"]
mod xen_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pagepin::{Batch, EntryFlags, Global, LockPolicy, Split, WritePath, X86_64};
use xen_common::*;

const L1S: usize = 8;
const ROUNDS: usize = 30;

fn hostile<P: LockPolicy<Lock = pagepin::DefaultRawLock>>(seed: u64) -> (usize, usize) {
    let e = env_sized::<X86_64>(64, 512, seed, 0);
    let s: Space<X86_64, P> = space(&e, true);
    populate(&s, L1S);
    let tables: Vec<u64> = s.table_frames().unwrap().iter().map(|t| t.0 .0).collect();
    let done = AtomicBool::new(false);
    let (mut pin_errors, mut pins) = (0, 0);
    std::thread::scope(|sc| {
        for w in 0..2usize {
            let (s, done, tables) = (&s, &done, &tables);
            sc.spawn(move || {
                let mut n = 0usize;
                while !done.load(Ordering::Acquire) && n < 200_000 {
                    let j = (n * 7 + w) % L1S;
                    let target = tables[(n / 3 + w) % tables.len()];
                    let mut f = EntryFlags::PRESENT | EntryFlags::USER | EntryFlags::GLOBAL;
                    if n.is_multiple_of(2) {
                        f |= EntryFlags::WRITABLE;
                    }
                    let path = if n.is_multiple_of(3) {
                        WritePath::Hypercall
                    } else {
                        WritePath::Store
                    };
                    let _ = s.set_pte(va_of::<X86_64>(j, 1 + w), leaf(s, target, f), path);
                    n += 1;
                }
            });
        }
        let mut b: Batch<4> = Batch::new();
        for _ in 0..ROUNDS {
            match s.pin(&mut b) {
                Ok(_) => {
                    pins += 1;
                    if s.unpin(&mut b).is_err() {
                        pin_errors += 1;
                    }
                }
                Err(_) => pin_errors += 1,
            }
        }
        done.store(true, Ordering::Release);
    });
    let mut b: Batch<4> = Batch::new();
    if s.is_pinned() {
        s.unpin(&mut b)
            .expect("final unpin once the writers stopped");
    }
    assert_eq!(e.sim.check_all(), vec![], "invariant");
    assert!(e.sim.stats().invariant_breaks == 0);
    (pins, pin_errors)
}

fn within(limit: Duration, f: impl FnOnce() -> (usize, usize) + Send + 'static) -> (usize, usize) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("hostile writers made pin/unpin or a writer hang")
}

#[test]
fn hostile_writers_split() {
    let (pins, errors) = within(Duration::from_secs(120), || hostile::<Split>(3));
    eprintln!("split: {pins} pins, {errors} refused");
}

#[test]
fn hostile_writers_global() {
    let (pins, errors) = within(Duration::from_secs(120), || hostile::<Global>(4));
    eprintln!("global: {pins} pins, {errors} refused");
}
