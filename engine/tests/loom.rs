//! Exhaustive interleavings of the pin protocol (loom).
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release -p pagepin-engine --test loom`
//! (deeper: raise LOOM_MAX_PREEMPTIONS to 3; the state space grows fast).
#![cfg(loom)]

mod model;

use model::*;
use pagepin_engine::{Batch, LockPolicy};

/// Run `one` (an execution: it returns what it found wrong, if anything)
/// under loom over every interleaving; `what` names the model in the
/// report. Returns what loom found.
fn check_all(what: &str, one: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Findings {
    let found = Findings::default();
    let f = found.clone();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    let mut builder = loom::model::Builder::new();
    // Three threads need more branches than loom's default allows.
    // LOOM_MAX_BRANCHES still overrides.
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        builder.max_branches = 20_000;
    }
    builder.check(move || {
        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f.record(one());
    });
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("loom: {runs} interleavings explored ({what})");
    assert!(runs > 10, "loom explored only {runs} interleavings");
    found
}

/// A pinner pinning then unpinning a space of two PTE pages against
/// `writers` writers (1: one writer rewriting both pages; 2: one per page).
/// Returns what loom found over every interleaving.
fn explore<P: LockPolicy, const N: usize>(sabotage: Sabotage, writers: u64) -> Findings {
    let what = format!("{writers} writer(s), batch {N}, {}", P::NAME);
    check_all(&what, move || {
        let s = tiny_space::<P>(2, sabotage);
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let s = s.clone();
                thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
                    let pages: Vec<u64> = if writers == 1 { vec![0, 1] } else { vec![w] };
                    pages
                        .into_iter()
                        .map(|p| Ok((p, write(&s, p, 1)?)))
                        .collect()
                })
            })
            .collect();
        let mut result = pin_unpin::<P, N>(&s);
        let mut last = Vec::new();
        for h in handles {
            match h.join().unwrap() {
                Ok(v) => last.extend(v),
                Err(e) => result = result.and(Err(e)),
            }
        }
        result.and_then(|()| check_end(&s, &last))
    })
}

fn holds<P: LockPolicy, const N: usize>(writers: u64) {
    let found = explore::<P, N>(Sabotage::default(), writers);
    assert_eq!(found.first(), None);
}

fn broken<P: LockPolicy, const N: usize>(sabotage: Sabotage, what: &str) {
    let found = explore::<P, N>(sabotage, 1);
    assert!(
        found.count() > 0,
        "loom found no failing interleaving for: {what}"
    );
    eprintln!(
        "{what}: loom found {} failing interleavings, e.g. {}",
        found.count(),
        found.first().unwrap()
    );
}

#[test]
fn split_batch_1() {
    holds::<SplitM, 1>(1);
}

#[test]
fn split_batch_2() {
    holds::<SplitM, 2>(1);
}

#[test]
fn global_batch_1() {
    holds::<GlobalM, 1>(1);
}

#[test]
fn global_batch_2() {
    holds::<GlobalM, 2>(1);
}

#[test]
fn split_two_writers() {
    holds::<SplitM, 2>(2);
}

#[test]
fn global_two_writers() {
    holds::<GlobalM, 2>(2);
}

/// Negative control: the PTE lock released between the read-only remap and
/// the L1 pin: loom finds the interleaving where the writer faults.
#[test]
fn negative_unlock_before_pin() {
    broken::<SplitM, 2>(
        Sabotage {
            unlock_before_pin: true,
            ..Default::default()
        },
        "unlock before pin",
    );
}

/// Negative control: the root visited first, so its flushing remap does
/// not cover the later ones when the root is pinned.
#[test]
fn negative_root_first() {
    broken::<GlobalM, 2>(
        Sabotage {
            root_first: true,
            ..Default::default()
        },
        "root first",
    );
}

/// Negative control: the separate L1 pin skipped under split.
#[test]
fn negative_skip_l1_pin() {
    broken::<SplitM, 2>(
        Sabotage {
            skip_l1_pin: true,
            ..Default::default()
        },
        "skip L1 pin",
    );
}

/// A split PTE page's second request refused, against a writer of that
/// page: under pin (`PIN`) the L1 pin of the first PTE page (frame 3),
/// under unpin its writable remap. The page's lock stays held from the
/// flush that met the failure until the rollback has restored the page,
/// so the writer never finds it read-only but not pinned. Batch 2 queues
/// the page's two requests in one go, batch 1 one by one.
fn explore_failed_second<const PIN: bool, const N: usize>(sabotage: Sabotage) -> Findings {
    let op = if PIN { "pin" } else { "unpin" };
    let what = format!("failed {op} against a writer, batch {N}, split");
    check_all(&what, move || {
        let s = tiny_space::<SplitM>(2, sabotage);
        let mut b: Batch<N> = Batch::new();
        if !PIN {
            if let Err(e) = s.pin(&mut b) {
                return Err(format!("pin: {e:?}"));
            }
        }
        {
            let mut st = s.backend().state.lock().unwrap();
            if PIN {
                st.fail_l1_pin_of = Some(3);
            } else {
                st.fail_writable_remap_of = Some(3);
            }
        }
        let w = {
            let s = s.clone();
            thread::spawn(move || write(&s, 0, 1))
        };
        let done = if PIN { s.pin(&mut b) } else { s.unpin(&mut b) };
        let mut result = match done {
            Err(pagepin_engine::Error::Hypercall(h)) if h.errno == EINVAL => Ok(()),
            other => Err(format!("{op}: {other:?}, expected EINVAL")),
        };
        if !PIN {
            // The rollback left the space pinned; unpin it for the end check.
            s.backend().state.lock().unwrap().fail_writable_remap_of = None;
            if let Err(e) = s.unpin(&mut b) {
                result = result.and(Err(format!("unpin after the rollback: {e:?}")));
            }
        }
        if b.preempt().held() != 0 {
            result = result.and(Err("locks still counted".into()));
        }
        let last = w.join().unwrap();
        result
            .and(last.map(|v| vec![(0, v)]))
            .and_then(|last| check_end(&s, &last))
    })
}

#[test]
fn split_failed_second() {
    let none = Sabotage::default();
    assert_eq!(explore_failed_second::<true, 1>(none).first(), None);
    assert_eq!(explore_failed_second::<true, 2>(none).first(), None);
    assert_eq!(explore_failed_second::<false, 1>(none).first(), None);
    assert_eq!(explore_failed_second::<false, 2>(none).first(), None);
}

/// Negative control: the lock released with the flush that met the
/// failure, whichever request failed: loom finds the writer faulting on
/// the read-only, unpinned page before the rollback takes the lock again.
#[test]
fn negative_release_on_failed_second() {
    let broken = Sabotage {
        release_on_failed_second: true,
        ..Default::default()
    };
    for found in [
        explore_failed_second::<true, 1>(broken),
        explore_failed_second::<true, 2>(broken),
        explore_failed_second::<false, 1>(broken),
        explore_failed_second::<false, 2>(broken),
    ] {
        assert!(found.count() > 0, "loom found no failing interleaving");
        eprintln!(
            "release on failed second: loom found {} failing interleavings, e.g. {}",
            found.count(),
            found.first().unwrap()
        );
    }
}

/// A pinner pinning then unpinning a space of one PTE page against a
/// writer that links a new PTE page (`map` into a fresh 2 MiB region),
/// unmaps and releases it.
fn explore_tables<P: LockPolicy, const N: usize>(sabotage: Sabotage) -> Findings {
    let what = format!("table-linking writer, batch {N}, {}", P::NAME);
    check_all(&what, move || {
        let s = tiny_space::<P>(1, sabotage);
        let w = {
            let s = s.clone();
            thread::spawn(move || map_release(&s, 1))
        };
        let result = pin_unpin::<P, N>(&s).and(w.join().unwrap());
        result.and_then(|()| check_end(&s, &[]))
    })
}

#[test]
fn split_map_release() {
    assert_eq!(
        explore_tables::<SplitM, 2>(Sabotage::default()).first(),
        None
    );
}

#[test]
fn global_map_release() {
    assert_eq!(
        explore_tables::<GlobalM, 2>(Sabotage::default()).first(),
        None
    );
}

/// Negative control: the pinned state published after the space lock is
/// released: a writer links a table by the state before the walk.
#[test]
fn negative_publish_pin_state_unlocked() {
    for (name, found) in [
        (
            "split",
            explore_tables::<SplitM, 2>(Sabotage {
                publish_pin_state_unlocked: true,
                ..Default::default()
            }),
        ),
        (
            "global",
            explore_tables::<GlobalM, 2>(Sabotage {
                publish_pin_state_unlocked: true,
                ..Default::default()
            }),
        ),
    ] {
        assert!(
            found.count() > 0,
            "{name}: loom found no failing interleaving for the state published unlocked"
        );
        eprintln!(
            "publish unlocked ({name}): loom found {} failing interleavings, e.g. {}",
            found.count(),
            found.first().unwrap()
        );
    }
}
