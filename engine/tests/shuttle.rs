//! Randomized and PCT schedules of the pin protocol on a larger space
//! (shuttle): dozens of PTE pages, a pinner and three writers, batch 32.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" cargo test --release -p pagepin-engine --test shuttle`
//! Deeper: `SHUTTLE_ITERATIONS=20000` (default 300 per schedule kind).
#![cfg(all(shuttle, not(loom)))]

mod model;

use model::*;
use pagepin_engine::LockPolicy;

const PTE_PAGES: usize = 40;
const WRITERS: u64 = 3;

fn iterations() -> usize {
    std::env::var("SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// One schedule: pin and unpin twice while three writers each rewrite their
/// own pages (page % 3 == writer) twice and a fourth links, unmaps and
/// releases PTE pages in three fresh regions.
fn scenario<P: LockPolicy>(
    sabotage: Sabotage,
    found: Findings,
) -> impl Fn() + Send + Sync + 'static {
    move || {
        let s = tiny_space::<P>(PTE_PAGES, sabotage);
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let s = s.clone();
                thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
                    (0..PTE_PAGES as u64)
                        .filter(|p| p % WRITERS == w)
                        .step_by(3)
                        .map(|p| Ok((p, write(&s, p, 2)?)))
                        .collect()
                })
            })
            .collect();
        // A writer that links and frees PTE pages in fresh 2 MiB regions.
        let tables = {
            let s = s.clone();
            thread::spawn(move || (0..3).try_for_each(|k| map_release(&s, PTE_PAGES as u64 + k)))
        };
        let mut result = pin_unpin::<P, 32>(&s).and_then(|()| pin_unpin::<P, 32>(&s));
        result = result.and(tables.join().unwrap());
        let mut last = Vec::new();
        for h in handles {
            match h.join().unwrap() {
                Ok(v) => last.extend(v),
                Err(e) => result = result.and(Err(e)),
            }
        }
        found.record(result.and_then(|()| check_end(&s, &last)));
    }
}

fn explore<P: LockPolicy>(sabotage: Sabotage) -> (Findings, Findings) {
    let random = Findings::default();
    shuttle::check_random(scenario::<P>(sabotage, random.clone()), iterations());
    let pct = Findings::default();
    shuttle::check_pct(scenario::<P>(sabotage, pct.clone()), iterations(), 3);
    (random, pct)
}

#[test]
fn split_holds() {
    let (r, p) = explore::<SplitM>(Sabotage::default());
    assert_eq!(r.first().or(p.first()), None);
}

#[test]
fn global_holds() {
    let (r, p) = explore::<GlobalM>(Sabotage::default());
    assert_eq!(r.first().or(p.first()), None);
}

fn broken<P: LockPolicy>(sabotage: Sabotage, what: &str) {
    let (r, p) = explore::<P>(sabotage);
    eprintln!(
        "{what}: random found {} failing schedules, PCT {} (of {} each)",
        r.count(),
        p.count(),
        iterations()
    );
    assert!(
        r.count() + p.count() > 0,
        "shuttle found no failing schedule for: {what}"
    );
}

#[test]
fn negative_unlock_before_pin() {
    broken::<SplitM>(
        Sabotage {
            unlock_before_pin: true,
            ..Default::default()
        },
        "unlock before pin",
    );
}

#[test]
fn negative_skip_l1_pin() {
    broken::<SplitM>(
        Sabotage {
            skip_l1_pin: true,
            ..Default::default()
        },
        "skip L1 pin",
    );
}

#[test]
fn negative_root_first() {
    broken::<GlobalM>(
        Sabotage {
            root_first: true,
            ..Default::default()
        },
        "root first",
    );
}

#[test]
fn negative_publish_pin_state_unlocked() {
    broken::<SplitM>(
        Sabotage {
            publish_pin_state_unlocked: true,
            ..Default::default()
        },
        "pinned state published unlocked",
    );
}
