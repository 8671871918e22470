//! `pin_all` / `unpin_all` over many address spaces in parallel, on rayon's
//! thread pool (the suspend / resume path of a machine with many spaces).
//!
//! Semantics are those of the engine's [`pin_all`](crate::pin_all) and
//! [`unpin_all`](crate::unpin_all): only spaces that are not pinned are
//! pinned, the returned [`PinnedSet`] names exactly those, and on a failure
//! every space this call pinned is unpinned again and the first failure (in
//! slice order) is returned. Each worker thread has its own [`Batch`] (a
//! per-CPU object in a kernel), so batches are never shared; each space's
//! own lock is still taken before any of its PTE locks, by `pin` itself.
//!
//! The engine is `no_std`, so this lives in the facade, behind the default
//! `parallel` feature.

use rayon::prelude::*;

use crate::{AddressSpace, Backend, Batch, Error, LockPolicy, PagingMode, PinnedSet};

/// What one space's pin attempt came to.
enum Outcome {
    /// Pinned by someone else (before or during the call): not ours.
    Skipped,
    /// Pinned by this call.
    Pinned,
    /// Failed (nothing of this space is left pinned by the engine's rollback).
    Failed(Error),
}

/// Pin every unpinned space of `spaces` in parallel, each rayon worker with
/// its own `Batch<N>`.
///
/// Returns the indices of the spaces it pinned. On a failure, the spaces it
/// pinned are unpinned again (in parallel) and the failure of the
/// lowest-indexed failing space is returned.
pub fn pin_all_par<M, P, B, const N: usize>(
    spaces: &[&AddressSpace<M, P, B>],
) -> Result<PinnedSet, Error>
where
    M: PagingMode,
    P: LockPolicy,
    B: Backend,
{
    let outcomes: Vec<Outcome> = spaces
        .par_iter()
        .map_init(Batch::<N>::new, |b, s| match s.pin(b) {
            Ok(_) => Outcome::Pinned,
            // Pinned already or by another thread meanwhile (decided under
            // the space lock): its pin, not ours, as in the engine's pin_all.
            Err(Error::AlreadyPinned) => Outcome::Skipped,
            Err(e) => Outcome::Failed(e),
        })
        .collect();
    let indices: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Outcome::Pinned))
        .map(|(i, _)| i)
        .collect();
    let first_err = outcomes.into_iter().find_map(|o| match o {
        Outcome::Failed(e) => Some(e),
        _ => None,
    });
    match first_err {
        None => Ok(PinnedSet { indices }),
        Some(e) => {
            // Best effort, as the engine's pin_all: the first error wins.
            let _ = unpin_all_par::<M, P, B, N>(spaces, PinnedSet { indices });
            Err(e)
        }
    }
}

/// Unpin exactly the spaces `set` names (what [`pin_all_par`] or the
/// engine's `pin_all` pinned), in parallel, each worker with its own
/// `Batch<N>`. Every space is attempted; the failure of the first failing
/// space in `set`'s order is returned.
pub fn unpin_all_par<M, P, B, const N: usize>(
    spaces: &[&AddressSpace<M, P, B>],
    set: PinnedSet,
) -> Result<(), Error>
where
    M: PagingMode,
    P: LockPolicy,
    B: Backend,
{
    let errors: Vec<Option<Error>> = set
        .indices
        .par_iter()
        .map_init(Batch::<N>::new, |b, &i| {
            spaces.get(i).and_then(|s| s.unpin(b).err())
        })
        .collect();
    errors.into_iter().flatten().next().map_or(Ok(()), Err)
}
