//! Rollback under the simulated hypervisor: for every entry of every trap
//! of a pin (and of an unpin) of a small table, make that entry fail and
//! check that the operation reports it and leaves everything as it was.

#[path = "support/xen.rs"]
mod xen_common;

use pagepin::engine::errno;
use pagepin::{Batch, DefaultRawLock, Error, Global, LockPolicy, Split, X86_64};
use xen_common::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Pin,
    Unpin,
}

fn run<P: LockPolicy<Lock = DefaultRawLock>, const N: usize>(
    s: &Space<X86_64, P>,
    op: Op,
) -> Result<(), Error> {
    let mut b: Batch<N> = Batch::new();
    match op {
        Op::Pin => s.pin(&mut b).map(|_| ()),
        Op::Unpin => s.unpin(&mut b).map(|_| ()),
    }
}

fn inverse(op: Op) -> Op {
    match op {
        Op::Pin => Op::Unpin,
        Op::Unpin => Op::Pin,
    }
}

/// Returns how many injected failures were checked.
fn sweep<P: LockPolicy<Lock = DefaultRawLock>, const N: usize>(op: Op, seed: u64) -> usize {
    let e = env::<X86_64>(seed);
    let s: Space<X86_64, P> = space(&e, true);
    populate(&s, 3);
    if op == Op::Unpin {
        run::<P, N>(&s, Op::Pin).unwrap();
    }
    // The traps of a clean run, and how many entries each carries.
    e.sim.log_traps(true);
    run::<P, N>(&s, op).unwrap();
    e.sim.log_traps(false);
    let log = e.sim.trap_log();
    run::<P, N>(&s, inverse(op)).unwrap();
    assert!(log.len() >= 2 || N >= 32, "{log:?}");
    let mut checked = 0;
    for (m, &entries) in log.iter().enumerate() {
        for k in 0..entries {
            let before = snap(&e, &s);
            let breaks = e.sim.stats().invariant_breaks;
            let t0 = e.sim.trap_count();
            e.sim.fail_entry(t0 + m as u64, k, 0, errno::ENOMEM);
            let what = format!("{} {op:?} N={N} trap {m} entry {k}", P::NAME);
            match run::<P, N>(&s, op) {
                Err(Error::Hypercall(h)) => {
                    assert_eq!(h.errno, errno::ENOMEM, "{what}: {h:?}");
                    assert_eq!((h.flush, h.call, h.item), (m as u64, k, 0), "{what}: {h:?}");
                }
                other => panic!("{what}: expected the injected failure, got {other:?}"),
            }
            assert_eq!(
                e.sim.stats().injected as usize,
                checked + 1,
                "{what}: injection not consumed"
            );
            assert_eq!(snap(&e, &s), before, "{what}: state changed");
            assert!(!any_lock_held(&e, &s), "{what}: a lock is still held");
            assert_eq!(
                e.sim.stats().invariant_breaks,
                breaks,
                "{what}: invariant broken by the rollback"
            );
            // The space still works.
            run::<P, N>(&s, op).unwrap();
            run::<P, N>(&s, inverse(op)).unwrap();
            assert_eq!(snap(&e, &s), before, "{what}: clean cycle after rollback");
            checked += 1;
        }
    }
    if s.is_pinned() {
        run::<P, N>(&s, Op::Unpin).unwrap();
    }
    assert_quiet(&e.sim);
    assert_eq!(e.sim.stats().invariant_breaks, 0);
    assert_eq!(e.sim.stats().refcount_errors, 0);
    checked
}

#[test]
fn rollback_every_entry_split() {
    let n = sweep::<Split, 4>(Op::Pin, 31)
        + sweep::<Split, 4>(Op::Unpin, 32)
        + sweep::<Split, 32>(Op::Pin, 33);
    assert!(n > 20);
}

#[test]
fn rollback_every_entry_global() {
    let n = sweep::<Global, 4>(Op::Pin, 34)
        + sweep::<Global, 4>(Op::Unpin, 35)
        + sweep::<Global, 32>(Op::Unpin, 36);
    assert!(n > 20);
}
