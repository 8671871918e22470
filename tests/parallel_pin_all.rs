//! `pagepin::parallel::{pin_all_par, unpin_all_par}` against the engine's
//! serial `pin_all` / `unpin_all` on the Xen simulator: two identical
//! domains, the same operations, and the same end states (every frame's
//! type, count, pin and mapping; the engine's pinned flags; each space's
//! pinned state; the simulator's pins per level and unpins), including a
//! failure in the middle that must leave only the pre-pinned space pinned.
#![cfg(feature = "parallel")]

#[path = "support/xen.rs"]
mod xen_common;

use pagepin::parallel::{pin_all_par, unpin_all_par};
use pagepin::{pin_all, unpin_all, Batch, Error, PageTableEntry, Split, X86_64};
use xen_common::*;

const SPACES: usize = 12;

type S = Space<X86_64, Split>;

/// A domain with `SPACES` spaces of 1..=4 PTE pages (some with a user
/// root); space 3 is pinned beforehand. With `bad`, space `bad` has an L2
/// entry pointing outside the domain, so its pin fails.
fn domain(bad: Option<usize>) -> (Env, Vec<S>) {
    let e = env_sized::<X86_64>(SPACES * 12, SPACES * 12 + 512, 77, 0);
    let spaces: Vec<S> = (0..SPACES)
        .map(|k| {
            let s: S = space(&e, k % 3 == 0);
            populate(&s, 1 + k % 4);
            s
        })
        .collect();
    let mut b: Batch = Batch::new();
    spaces[3].pin(&mut b).unwrap();
    if let Some(k) = bad {
        let l2 = tables_at(&spaces[k], pagepin::Level::L2)[0];
        let bad_entry = PageTableEntry::from_bits((0xff_ffff << 12) | 0x67);
        e.store
            .entry(l2, 400)
            .unwrap()
            .store(bad_entry.bits(), std::sync::atomic::Ordering::Release);
    }
    (e, spaces)
}

/// Everything the two runs must agree on.
#[derive(Debug, PartialEq, Eq)]
struct State {
    frames: Snap,
    spaces_pinned: Vec<bool>,
    pins_per_level: [u64; 4],
    unpins: u64,
    errors: u64,
}

fn state(e: &Env, spaces: &[S]) -> State {
    let st = e.sim.stats();
    State {
        frames: snap(e, &spaces[0]),
        spaces_pinned: spaces.iter().map(|s| s.is_pinned()).collect(),
        pins_per_level: st.pins,
        unpins: st.unpins,
        errors: st.errors,
    }
}

fn refs(spaces: &[S]) -> Vec<&S> {
    spaces.iter().collect()
}

#[test]
fn parallel_matches_serial() {
    let (es, ss) = domain(None);
    let (ep, sp) = domain(None);
    let mut b: Batch = Batch::new();

    let set_s = pin_all(&refs(&ss), &mut b).unwrap();
    let set_p = pin_all_par::<_, _, _, 32>(&refs(&sp)).unwrap();
    assert_eq!(set_s, set_p);
    assert_eq!(
        set_p.indices.len(),
        SPACES - 1,
        "the pre-pinned space is not ours"
    );
    assert!(!set_p.indices.contains(&3));
    let (a, p) = (state(&es, &ss), state(&ep, &sp));
    assert_eq!(a, p);
    assert!(p.spaces_pinned.iter().all(|x| *x));
    // One L4 pin per root (and user root), one L1 pin per PTE page.
    let l1s: usize = (0..SPACES).map(|k| 1 + k % 4).sum();
    let roots = SPACES + (0..SPACES).filter(|k| k % 3 == 0).count();
    assert_eq!(p.pins_per_level, [l1s as u64, 0, 0, roots as u64]);

    unpin_all(&refs(&ss), set_s, &mut b).unwrap();
    unpin_all_par::<_, _, _, 32>(&refs(&sp), set_p).unwrap();
    let (a, p) = (state(&es, &ss), state(&ep, &sp));
    assert_eq!(a, p);
    let pinned: Vec<usize> = (0..SPACES).filter(|&k| p.spaces_pinned[k]).collect();
    assert_eq!(pinned, [3], "only the space pinned before stays pinned");
    assert_eq!(p.errors, 0);
    for (k, s) in sp.iter().enumerate() {
        for (pfn, _) in s.table_frames().unwrap() {
            let i = ep.sim.frame_info(pfn).unwrap();
            assert_eq!(
                i.pinned || i.ty.is_table(),
                k == 3,
                "space {k} {pfn:?}: {i:?}"
            );
        }
    }
    sp[3].unpin(&mut b).unwrap();
    assert_quiet(&ep.sim);
}

#[test]
fn a_failure_unpins_what_it_pinned_like_serial() {
    let (es, ss) = domain(Some(7));
    let (ep, sp) = domain(Some(7));
    let mut b: Batch = Batch::new();
    let es_err = pin_all(&refs(&ss), &mut b).unwrap_err();
    let ep_err = pin_all_par::<_, _, _, 32>(&refs(&sp)).unwrap_err();
    assert_eq!(es_err, ep_err);
    assert!(
        matches!(ep_err, Error::FrameOutOfRange { .. }),
        "{ep_err:?}"
    );
    let p = state(&ep, &sp);
    let pinned: Vec<usize> = (0..SPACES).filter(|&k| p.spaces_pinned[k]).collect();
    assert_eq!(pinned, [3]);
    // Frame states agree with serial; pin counts differ only by the
    // spaces serial never reached (it stops at the first failure).
    assert_eq!(state(&es, &ss).frames, p.frames);
    assert!(!any_lock_held(&ep, &sp[0]));
    assert_eq!(p.errors, 0, "no request was refused: the walk failed first");
    sp[3].unpin(&mut b).unwrap();
    assert_quiet(&ep.sim);
}

#[test]
fn unpin_all_par_reports_a_failure_and_still_unpins_the_rest() {
    let (ep, sp) = domain(None);
    let set = pin_all_par::<_, _, _, 8>(&refs(&sp)).unwrap();
    // Unpin one space behind the set's back: unpinning it again fails.
    let mut b: Batch = Batch::new();
    sp[5].unpin(&mut b).unwrap();
    let err = unpin_all_par::<_, _, _, 8>(&refs(&sp), set).unwrap_err();
    assert_eq!(err, Error::NotPinned);
    let pinned: Vec<usize> = (0..SPACES).filter(|&k| sp[k].is_pinned()).collect();
    assert_eq!(pinned, [3]);
    sp[3].unpin(&mut b).unwrap();
    assert_quiet(&ep.sim);
}
