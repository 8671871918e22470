//! Pin and unpin (docs/PROTOCOL.md §3), with a journal so a failure is undone.
//!
//! Every request the engine queues is a journal step, tagged with its index.
//! After a failure the batch reports which tags did not take effect; the
//! rest are undone in reverse order, holding each split PTE page's lock
//! across the undo of its read-only remap and its pin so no writer ever
//! sees a page read-only but not pinned.

use alloc::vec::Vec;

use crate::backend::{uvmf, Backend, ExtCmd, MmuExtOp};
use crate::batch::{Batch, Failure, FlushTarget, Tag, NO_TAG};
use crate::error::{Error, HypercallFailure, StepKind};
use crate::frame::Pfn;
use crate::journal::{Action, Journal, Step, SECOND};
use crate::lock::LockPolicy;
use crate::locking::{hold_pte_for_batch, unlock_after};
use crate::mode::{Level, PagingMode};
use crate::space::AddressSpace;
use crate::sync::Ordering;
use crate::walk::{self, Admit, Descend, Scope, Table, Visitor};

/// Counters of one pin or unpin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Table pages processed (remapped).
    pub tables: usize,
    /// Separate L1 pins (or unpins) issued.
    pub l1_ops: usize,
    /// Most locks held at once during the operation (space lock included).
    pub max_locks_held: u32,
}

/// Which protocol is running.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Pin,
    Unpin,
}

impl<M: PagingMode, P: LockPolicy, B: Backend> AddressSpace<M, P, B> {
    /// `pfn` as a walk would hand it over (none if it is outside the
    /// store).
    fn table_of(&self, pfn: Pfn) -> Option<Table<'_>> {
        self.store.meta(pfn).map(|meta| Table {
            pfn,
            owner: meta.owner(),
            meta,
        })
    }

    /// The tables a pin or unpin walk admits: the space's own and
    /// unowned ones.
    fn walk_admit(&self) -> Admit {
        if self.sabotage().admit_foreign_tables {
            return Admit::any();
        }
        Admit::owner(self.owner)
    }

    /// Flip a page's pinned flag to `pinned` outside a PTE lock; returns
    /// whether it already had that value. The space's own pages (all a pin
    /// walk admits besides unowned ones) change only under its space lock,
    /// which pin and unpin hold: a plain load and store. Unowned pages, which
    /// another space may reach too, take the atomic read-modify-write.
    #[inline]
    fn flip_flag(
        &self,
        meta: &crate::frame::FrameMeta<'_>,
        owner: crate::frame::Owner,
        pinned: bool,
    ) -> bool {
        if owner == self.owner {
            // SAFETY: the space lock is held by the caller (pin, unpin, or a
            // table's preparation or retirement under `map` / `release_table`,
            // or their rollback), and the frame belongs to this space; no
            // writer writes a frame's state byte (its PTE lock is a byte of
            // its own).
            unsafe { meta.set_pinned_exclusive(pinned) }
        } else if pinned {
            meta.test_and_set_pinned()
        } else {
            !meta.test_and_clear_pinned()
        }
    }

    /// Pin the space with batch `b`: every table page read-only (PTE pages
    /// pinned as L1 under split), the root last with the only TLB flush,
    /// then the root pinned (and the user root). On any failure everything
    /// is undone and the first failure is returned.
    ///
    /// The space's pinned state changes inside the critical section that
    /// walks the tables (the space lock), so a writer that links or
    /// releases a table under that lock (`map`, a cursor, `release_table`)
    /// always sees either the state before the walk or the state after it.
    ///
    /// On a backend without pinning (`Backend::PINNING == false`, e.g.
    /// native x86-64) there is nothing to walk or tell the hardware: `pin`
    /// and `unpin` only record the state with one compare-exchange, so of
    /// two threads pinning one space at the same instant exactly one
    /// succeeds and the other gets [`Error::AlreadyPinned`], as on a
    /// pinning backend.
    pub fn pin<const N: usize>(&self, b: &mut Batch<N>) -> Result<PinStats, Error> {
        if !B::PINNING {
            return self.flip_pinned_unlocked(true);
        }
        self.pin_or_unpin(b, Dir::Pin)
    }

    /// Unpin the space: the root unpinned first (while it is pinned the
    /// hypervisor holds type references on every child), then the user
    /// root, the PAE kernel PMD, and every page made writable, the root last.
    /// The pinned state changes under the space lock, as for [`Self::pin`].
    ///
    /// A space some CPU still runs on (its base pointer, CR3, is this root)
    /// cannot be unpinned: the hypervisor keeps the root typed through that
    /// reference (docs/PROTOCOL.md §6 rule 6), so the writable remap of its
    /// first child is refused with `EBUSY`. `unpin` then returns
    /// [`Error::Hypercall`] with `step: RemapWritable, errno: 16`, undoes
    /// what it did and leaves the space pinned exactly as before; switch
    /// that CPU to another root (and flush) first, then unpin again. Checked
    /// on real Xen with a second vCPU running on the root
    /// (`tests/real_xen_smp.rs`) and on the simulator.
    pub fn unpin<const N: usize>(&self, b: &mut Batch<N>) -> Result<PinStats, Error> {
        if !B::PINNING {
            return self.flip_pinned_unlocked(false);
        }
        self.pin_or_unpin(b, Dir::Unpin)
    }

    /// The state change of a backend without pinning: one compare-exchange,
    /// no lock (nothing else depends on the state there: every table-linking
    /// path checks `B::PINNING` first).
    #[inline]
    fn flip_pinned_unlocked(&self, pinned: bool) -> Result<PinStats, Error> {
        self.pinned
            .compare_exchange(!pinned, pinned, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| PinStats::default())
            .map_err(|_| {
                if pinned {
                    Error::AlreadyPinned
                } else {
                    Error::NotPinned
                }
            })
    }

    /// Pin or unpin under the space lock, the pinned state published before
    /// the lock is released (never after: see [`Self::pin`]).
    fn pin_or_unpin<const N: usize>(&self, b: &mut Batch<N>, dir: Dir) -> Result<PinStats, Error> {
        let pinned = dir == Dir::Pin;
        b.preempt_mut().acquire()?;
        let space = self.lock_space();
        b.preempt_mut().reset_max();
        let r = if self.pinned.load(Ordering::Acquire) == pinned {
            Err(if pinned {
                Error::AlreadyPinned
            } else {
                Error::NotPinned
            })
        } else {
            self.run(b, dir)
        };
        let publish_unlocked = self.sabotage().publish_pin_state_unlocked;
        if r.is_ok() && !publish_unlocked {
            self.pinned.store(pinned, Ordering::Release);
        }
        drop(space);
        if r.is_ok() && publish_unlocked {
            // Broken on purpose: a writer that takes the space lock now
            // links or releases a table by the old state. Outside the model
            // checkers (which schedule every step themselves) the window is
            // held open a little so a stress test meets it.
            #[cfg(not(any(loom, shuttle)))]
            for _ in 0..2_000 {
                core::hint::spin_loop();
            }
            self.pinned.store(pinned, Ordering::Release);
        }
        let max = b.preempt().max();
        b.preempt_mut().release();
        r.map(|mut s| {
            s.max_locks_held = max;
            s
        })
    }

    fn run<const N: usize>(&self, b: &mut Batch<N>, dir: Dir) -> Result<PinStats, Error> {
        let mut op = PinOp::new(self, b);
        let walked = match dir {
            Dir::Pin => op.pin_steps(),
            Dir::Unpin => op.unpin_steps(),
        };
        op.complete(walked)
    }

    /// Make a new table page ready to link into this pinned space:
    /// read-only, and pinned as L1 under split.
    pub(crate) fn prepare_new_table(&self, pfn: Pfn, level: Level) -> Result<(), Error> {
        let mut b: Batch<4> = Batch::new();
        let mut op = PinOp::new(self, &mut b);
        let done = op.by_frame::<true>(pfn, level, false).map(|_| ());
        op.complete(done).map(|_| ())
    }

    /// An unlinked table page of a pinned space: (split) unpin it, make it
    /// writable, then retire the frame.
    pub(crate) fn retire_table_pinned(&self, pfn: Pfn, level: Level) -> Result<(), Error> {
        let mut b: Batch<4> = Batch::new();
        let mut op = PinOp::new(self, &mut b);
        let done = op.by_frame::<false>(pfn, level, false).map(|_| ());
        op.complete(done)?;
        self.store.retire(pfn);
        Ok(())
    }
}

/// One pin or unpin (or one table's preparation or retirement) in progress:
/// it owns, for the call, the per-CPU batch, the journal of what it queued
/// and the space it works on, so each step is one method with no context
/// threaded through, and "flush, first failure, roll back" is written once
/// ([`Self::complete`]).
pub(crate) struct PinOp<'a, 'b, M: PagingMode, P: LockPolicy, B: Backend, const N: usize> {
    space: &'a AddressSpace<M, P, B>,
    /// What the batch flushes through, made once per operation (speed: not
    /// rebuilt for every queued request).
    target: crate::locking::Target<'a, P::Lock, B>,
    b: &'b mut Batch<N>,
    j: Journal,
    /// `mmuext_op` steps queued: every other step is a remap (a split PTE
    /// page's pair counts as its remap), so `PinStats::tables` is derived
    /// from the journal's length (speed: no counter written per table).
    ext_ops: u32,
    /// Separate L1 pin / unpin steps queued (`PinStats::l1_ops`).
    l1_ops: u32,
}

impl<'a, 'b, M: PagingMode, P: LockPolicy, B: Backend, const N: usize> PinOp<'a, 'b, M, P, B, N> {
    /// Start an operation on `space` with batch `b` (its journal buffer
    /// borrowed; failures from before are the caller's business).
    #[inline]
    pub(crate) fn new(space: &'a AddressSpace<M, P, B>, b: &'b mut Batch<N>) -> Self {
        let _ = b.take_failures();
        let j = Journal::over(b.take_journal_buffer(), b.stats().flushes);
        PinOp {
            space,
            target: space.target(),
            b,
            j,
            ext_ops: 0,
            l1_ops: 0,
        }
    }

    /// Issue what is still queued so every step has an outcome; on a
    /// failure (the walk's `walked` or a recorded hypercall failure) undo
    /// every step that took effect and return the first failure. Hands the
    /// journal buffer back to the batch.
    pub(crate) fn complete(mut self, walked: Result<(), Error>) -> Result<PinStats, Error> {
        let r = self.complete_inner(walked);
        let steps = core::mem::take(&mut self.j.steps);
        self.b.return_journal_buffer(steps);
        r
    }

    fn complete_inner(&mut self, walked: Result<(), Error>) -> Result<PinStats, Error> {
        self.b.flush(&self.target);
        let first = self.b.failures().first().map(|f| self.failure_of(f));
        // A recorded hypercall failure is the cause even when the walk
        // stopped because of it.
        let err = match (walked, first) {
            (Ok(()), None) => {
                let _ = self.b.take_failures();
                return Ok(PinStats {
                    tables: self.j.steps.len() - self.ext_ops as usize,
                    l1_ops: self.l1_ops as usize,
                    max_locks_held: 0,
                });
            }
            (_, Some(h)) => Error::Hypercall(h),
            (Err(e), None) => e,
        };
        self.rollback()?;
        Err(err)
    }

    fn failure_of(&self, f: &Failure) -> HypercallFailure {
        let step = self.j.request(f.tag);
        HypercallFailure {
            flush: f.flush.saturating_sub(self.j.flush_base),
            call: f.call,
            item: f.item,
            kind: f.kind,
            errno: f.errno,
            pfn: step.map(|s| s.pfn()),
            step: step.map(|s| match s.action() {
                Action::RemapRo => StepKind::RemapReadOnly,
                Action::RemapRw => StepKind::RemapWritable,
                Action::Pin(l) => StepKind::Pin(l),
                Action::Unpin(_) => StepKind::Unpin,
            }),
        }
    }

    /// Queue a step's remap; returns whether a flush it made left a
    /// failure recorded (then the walk stops after this page: see
    /// [`Batch::update_va_mapping`]).
    #[inline(always)]
    fn queue_remap(&mut self, pfn: Pfn, ro: bool, flush: bool, locked: bool, flag: bool) -> bool {
        let tag = self.j.push(
            pfn,
            if ro { Action::RemapRo } else { Action::RemapRw },
            locked,
            flag,
        );
        let flags = if flush {
            uvmf::TLB_FLUSH | uvmf::LOCAL
        } else {
            uvmf::NONE
        };
        self.b.update_va_mapping(
            &self.target,
            self.space.direct_map_va(pfn),
            self.space.direct_map_pte(pfn, !ro),
            flags,
            tag,
        )
    }

    /// Queue a step's `mmuext_op`; returns its tag, and whether a flush it
    /// made left a failure recorded (as [`Self::queue_remap`]).
    #[inline(always)]
    fn queue_ext(&mut self, pfn: Pfn, action: Action, locked: bool, flag: bool) -> (Tag, bool) {
        let cmd = match action {
            Action::Pin(l) => ExtCmd::pin(l),
            _ => ExtCmd::UnpinTable,
        };
        self.ext_ops += 1;
        if let Action::Pin(Level::L1) | Action::Unpin(Level::L1) = action {
            self.l1_ops += 1;
        }
        let tag = self.j.push(pfn, action, locked, flag);
        let failed = self.b.mmuext(
            &self.target,
            MmuExtOp::on(cmd, self.space.backend.pfn_to_mfn(pfn)),
            tag,
        );
        (tag, failed)
    }

    #[inline]
    fn take_lock(&mut self, pfn: Pfn) -> Result<(), Error> {
        self.b.preempt_mut().acquire()?;
        if let Some(m) = self.space.store.meta(pfn) {
            m.lock().lock();
        }
        Ok(())
    }

    /// Pin (`PIN`) or unpin frame `pfn` outside a walk (an extra root, the
    /// PAE kernel PMD, a table linked or retired by a writer); a frame
    /// outside the store is left alone.
    fn by_frame<const PIN: bool>(
        &mut self,
        pfn: Pfn,
        level: Level,
        flush: bool,
    ) -> Result<Descend, Error> {
        match self.space.table_of(pfn) {
            Some(t) if PIN => self.pin_page(t, level, flush),
            Some(t) => self.unpin_page(t, level, flush),
            None => Ok(Descend::No),
        }
    }

    /// Pin one page (as the walk read it): set its flag, remap it
    /// read-only and, under split for an L1, pin it, holding its lock
    /// across the flushes that issue the two.
    #[inline(always)]
    fn pin_page(&mut self, table: Table<'a>, level: Level, flush: bool) -> Result<Descend, Error> {
        let Table { pfn, owner, meta } = table;
        if self.space.flip_flag(&meta, owner, true) {
            return Ok(Descend::No);
        }
        // `SPLIT_PTE_LOCKS` is a constant: under Global this block is gone.
        let split_l1 =
            P::SPLIT_PTE_LOCKS && level == Level::L1 && !self.space.sabotage().skip_l1_pin;
        if split_l1 {
            // The page's lock is counted (refused, with the flag put back,
            // past the preempt limit) and taken before its first request
            // is queued, as Linux's `xen_pin_page` does: no flush can issue
            // the remap without it. (Speed: taken here, where the page's
            // metadata is at hand, not gathered for the flush to take;
            // the locked instruction overlaps the queueing around it.)
            if let Err(e) = self.b.preempt_mut().acquire() {
                self.space.flip_flag(&meta, owner, false);
                return Err(e.into());
            }
            hold_pte_for_batch(&meta);
            if !flush
                && !self.space.sabotage().unlock_before_pin
                && self.queue_held_pair::<true>(pfn)
            {
                return Ok(Descend::Yes);
            }
        }
        let mut failed = self.queue_remap(pfn, true, flush, split_l1, true);
        if split_l1 {
            if self.space.sabotage().unlock_before_pin {
                // Broken on purpose: the page is read-only and unlocked
                // before it is pinned.
                self.b.flush(&self.target);
                // SAFETY: taken above, for this context.
                unsafe { meta.lock().unlock() };
                self.b.preempt_mut().release();
                failed |= self.stopped_by_failure();
                failed |= self.queue_ext(pfn, Action::Pin(Level::L1), false, false).1;
            } else {
                let (tag, f) = self.queue_ext(pfn, Action::Pin(Level::L1), true, false);
                failed |= f;
                let watch = self.watch(tag - 1, tag);
                failed |= self.b.defer(&self.target, unlock_after(pfn, watch));
            }
        }
        Ok(Self::after_page(failed))
    }

    /// A held split L1 page's two requests and its release, queued in one
    /// go when the batch has room for all of them (no flush, so no failure
    /// to answer): pin (`PIN`) remaps it read-only, then pins it; unpin
    /// unpins it, then remaps it writable. Returns false, having queued
    /// and journalled nothing, when they do not fit: the caller queues
    /// them one by one. (Speed: one room check for the pair; keep it.)
    #[inline(always)]
    fn queue_held_pair<const PIN: bool>(&mut self, pfn: Pfn) -> bool {
        let first = if PIN {
            Action::RemapRo
        } else {
            Action::Unpin(Level::L1)
        };
        let tag = self.j.push_pair(pfn, first);
        let second = tag | SECOND;
        // Pin: the remap, then the pin, whose failure keeps the lock.
        // Unpin: the unpin, then the remap, whose failure keeps it.
        let (uvm_tag, ext_tag) = if PIN { (tag, second) } else { (second, tag) };
        let cmd = if PIN {
            ExtCmd::pin(Level::L1)
        } else {
            ExtCmd::UnpinTable
        };
        let queued = self.b.queue_held_pair(
            pfn,
            self.space.direct_map_va(pfn),
            self.space.direct_map_pte(pfn, !PIN),
            uvm_tag,
            MmuExtOp::on(cmd, self.space.backend.pfn_to_mfn(pfn)),
            ext_tag,
            !PIN,
            self.watch(tag, second),
        );
        if queued {
            // The step counts as one table (its remap), and its mmuext_op
            // is not a step of its own: `ext_ops` stays as it is.
            self.l1_ops += 1;
        } else {
            self.j.pop_pair();
        }
        queued
    }

    /// The request whose failure keeps a split PTE page's lock held after
    /// the flush: the page's `second` (its `first` took effect, so the page
    /// is read-only and not pinned until the rollback undoes it).
    #[inline(always)]
    fn watch(&self, first: Tag, second: Tag) -> Tag {
        if self.space.sabotage().release_on_failed_second {
            // Broken on purpose: the lock goes with the flush.
            return first;
        }
        second
    }

    /// Whether a failure recorded so far ends the operation: the answer a
    /// queueing call gives after its own flush, asked once where steps are
    /// queued outside the walk.
    fn stopped_by_failure(&self) -> bool {
        self.b.has_failures() && self.target.stop_on_failure()
    }

    /// How the walk goes on after a page whose requests are all queued: a
    /// failure recorded by a flush they made ends it (the rest is undone),
    /// so nothing more is queued after the page that met the failure.
    #[inline(always)]
    fn after_page(failed: bool) -> Descend {
        // (`Sabotage::walk_on_after_failure` acts in the flush's answer,
        // out of this path: speed.)
        if failed {
            Descend::Stop
        } else {
            Descend::Yes
        }
    }

    /// Unpin one page (as for [`Self::pin_page`]): clear its flag, under
    /// split for an L1 unpin it, and remap it writable, holding its lock
    /// across the flushes that issue the two.
    #[inline(always)]
    fn unpin_page(
        &mut self,
        table: Table<'a>,
        level: Level,
        flush: bool,
    ) -> Result<Descend, Error> {
        let Table { pfn, owner, meta } = table;
        if self.space.flip_flag(&meta, owner, false) {
            return Ok(Descend::No);
        }
        let split_l1 =
            P::SPLIT_PTE_LOCKS && level == Level::L1 && !self.space.sabotage().skip_l1_pin;
        let mut failed = false;
        if split_l1 {
            if let Err(e) = self.b.preempt_mut().acquire() {
                self.space.flip_flag(&meta, owner, true);
                return Err(e.into());
            }
            hold_pte_for_batch(&meta);
            if !flush && self.queue_held_pair::<false>(pfn) {
                return Ok(Descend::Yes);
            }
            failed = self.queue_ext(pfn, Action::Unpin(Level::L1), true, true).1;
        }
        let tag = self.j.steps.len() as Tag;
        failed |= self.queue_remap(pfn, false, flush, split_l1, !split_l1);
        if split_l1 {
            let watch = self.watch(tag.wrapping_sub(1), tag);
            failed |= self.b.defer(&self.target, unlock_after(pfn, watch));
        }
        Ok(Self::after_page(failed))
    }

    /// The root's turn in the pin walk (once, out of the walk's loop):
    /// extra roots first, so the root's remap (the one carrying the TLB
    /// flush) is the last remap of the pin.
    #[inline(never)]
    fn pin_root(&mut self, root: Table<'a>) -> Result<Descend, Error> {
        let space = self.space;
        if let Some(u) = space.user_root {
            self.by_frame::<true>(u, M::ROOT_LEVEL, false)?;
        }
        if let Some(k) = space.kernel_pmd {
            self.by_frame::<true>(k, Level::L2, false)?;
        }
        self.pin_page(root, M::ROOT_LEVEL, true)
    }

    fn pin_steps(&mut self) -> Result<(), Error> {
        let root = self.space.root;
        if self.space.sabotage().root_first {
            self.by_frame::<true>(root, M::ROOT_LEVEL, true)?;
        }
        if self.stopped_by_failure() {
            return Ok(());
        }
        // The space by its own reference, so the visitor may borrow `self`.
        let space = self.space;
        walk::walk_as::<M, P::Lock, B, _>(
            &space.store,
            &space.backend,
            root,
            space.walk_admit(),
            Scope::Full,
            &mut OpWalk::<M, P, B, N, true>(self),
        )?;
        if self.b.has_failures() {
            return Ok(());
        }
        self.queue_ext(root, Action::Pin(M::ROOT_LEVEL), false, false);
        if let Some(u) = self.space.user_root {
            self.queue_ext(u, Action::Pin(M::ROOT_LEVEL), false, false);
        }
        Ok(())
    }

    fn unpin_steps(&mut self) -> Result<(), Error> {
        let root = self.space.root;
        self.queue_ext(root, Action::Unpin(M::ROOT_LEVEL), false, false);
        if let Some(u) = self.space.user_root {
            self.queue_ext(u, Action::Unpin(M::ROOT_LEVEL), false, false);
            self.by_frame::<false>(u, M::ROOT_LEVEL, false)?;
        }
        if let Some(k) = self.space.kernel_pmd {
            if self.space.sabotage().pae_kpmd_pin_on_unpin {
                // The pre-2008 bug: the pin routine called on unpin.
                self.by_frame::<true>(k, Level::L2, false)?;
            } else {
                self.by_frame::<false>(k, Level::L2, false)?;
            }
        }
        if self.stopped_by_failure() {
            // A flush of the steps above failed: nothing more is queued.
            return Ok(());
        }
        // The space by its own reference, so the visitor may borrow `self`.
        let space = self.space;
        walk::walk_as::<M, P::Lock, B, _>(
            &space.store,
            &space.backend,
            root,
            space.walk_admit(),
            Scope::Full,
            &mut OpWalk::<M, P, B, N, false>(self),
        )
    }

    /// Undo every step that took effect, newest first.
    fn rollback(&mut self) -> Result<(), Error> {
        let target = self.space.target();
        self.b.flush(&target);
        let first = self.b.failures().first().map(|f| self.failure_of(f));
        let mut failed: Vec<Tag> = self.b.not_applied().to_vec();
        failed.sort_unstable();
        let mut kept = self.b.take_kept_locks();
        let _ = self.b.take_failures();
        let applied = |tag: Tag| failed.binary_search(&tag).is_err();

        let mut held: Option<Pfn> = None;
        // A read-only remap queued since the last TLB flush: its stale
        // writable TLB entries must be flushed before a table that the
        // hypervisor validates recursively (L2 and up) is pinned again, as
        // the root's remap carries the flush before the root pin on the
        // forward path.
        let mut unflushed = false;
        // Every request as a step of its own (a pair as two), for the loop
        // (which queues through `self`).
        let steps = self.j.requests();
        for i in (0..steps.len()).rev() {
            let (s, tag) = steps[i];
            let Some(meta) = self.space.store.meta(s.pfn()) else {
                continue;
            };
            // The flag flipped just before this (the page's first) step is
            // flipped back after the step's own undo.
            let restore_flag = |s: &Step| {
                if s.flag() {
                    match s.action() {
                        Action::RemapRo | Action::Pin(_) => meta.test_and_clear_pinned(),
                        Action::RemapRw | Action::Unpin(_) => meta.test_and_set_pinned(),
                    };
                }
            };
            if !applied(tag) {
                restore_flag(&s);
                continue;
            }
            let pfn = s.pfn();
            if s.locked_page() && held != Some(pfn) {
                if let Some(k) = kept.iter().position(|p| *p == pfn) {
                    kept.swap_remove(k);
                } else {
                    self.take_lock(pfn)?;
                }
                held = Some(pfn);
            }
            let mfn = self.space.backend.pfn_to_mfn(pfn);
            match s.action() {
                Action::RemapRo => {
                    let flush = pfn == self.space.root;
                    let flags = if flush { uvmf::TLB_FLUSH } else { uvmf::NONE };
                    self.b.update_va_mapping(
                        &target,
                        self.space.direct_map_va(pfn),
                        self.space.direct_map_pte(pfn, true),
                        flags,
                        NO_TAG,
                    );
                }
                Action::RemapRw => {
                    unflushed = true;
                    self.b.update_va_mapping(
                        &target,
                        self.space.direct_map_va(pfn),
                        self.space.direct_map_pte(pfn, false),
                        uvmf::NONE,
                        NO_TAG,
                    );
                }
                Action::Pin(_) => {
                    self.b
                        .mmuext(&target, MmuExtOp::on(ExtCmd::UnpinTable, mfn), NO_TAG);
                }
                Action::Unpin(l) => {
                    if unflushed && l != Level::L1 {
                        self.b.mmuext(
                            &target,
                            MmuExtOp {
                                cmd: ExtCmd::TlbFlushLocal,
                                arg1: 0,
                                arg2: 0,
                            },
                            NO_TAG,
                        );
                        unflushed = false;
                    }
                    self.b
                        .mmuext(&target, MmuExtOp::on(ExtCmd::pin(l), mfn), NO_TAG);
                }
            }
            restore_flag(&s);
            if held == Some(pfn) {
                // Keep holding while the next-older step is another applied
                // request on the same page (its remap/pin pair).
                let continues = i > 0 && {
                    let (p, ptag) = steps[i - 1];
                    p.pfn() == pfn && applied(ptag)
                };
                if !continues {
                    self.b.defer(&target, unlock_after(pfn, NO_TAG));
                    held = None;
                }
            }
        }
        // Locks kept for pages where nothing took effect: release them now.
        for pfn in kept {
            if let Some(m) = self.space.store.meta(pfn) {
                // SAFETY: the batch handed ownership of this held lock to us.
                unsafe { m.lock().unlock() };
                self.b.preempt_mut().release();
            }
        }
        if unflushed {
            self.b.mmuext(
                &target,
                MmuExtOp {
                    cmd: ExtCmd::TlbFlushLocal,
                    arg1: 0,
                    arg2: 0,
                },
                NO_TAG,
            );
        }
        self.b.flush(&target);
        if let Some(f) = self.b.failures().first() {
            let rollback = self.failure_of(f);
            let _ = self.b.take_failures();
            return Err(Error::RollbackFailed {
                first: first.unwrap_or(rollback),
                rollback,
            });
        }
        Ok(())
    }
}

/// The visitor of the pin walk (`PIN`) or of the unpin walk: inlined
/// into the walk's loop (speed: keep `#[inline(always)]`).
struct OpWalk<'o, 'a, 'b, M, P, B, const N: usize, const PIN: bool>(
    &'o mut PinOp<'a, 'b, M, P, B, N>,
)
where
    M: PagingMode,
    P: LockPolicy,
    B: Backend;

impl<'a, M: PagingMode, P: LockPolicy, B: Backend, const N: usize, const PIN: bool> Visitor<'a>
    for OpWalk<'_, 'a, '_, M, P, B, N, PIN>
{
    #[inline(always)]
    fn visit(&mut self, table: Table<'a>, level: Level, is_root: bool) -> Result<Descend, Error> {
        // No check of the batch's failures here (speed: it cost 10 %): a
        // page whose queueing met a failure answers `Stop` itself, and the
        // steps before the walk check once.
        if !PIN {
            return self.0.unpin_page(table, level, is_root);
        }
        if is_root {
            return self.0.pin_root(table);
        }
        self.0.pin_page(table, level, false)
    }
}

/// What [`pin_all`] pinned, so [`unpin_all`] unpins exactly those.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[must_use = "unpin_all needs to know which spaces pin_all pinned"]
pub struct PinnedSet {
    /// Indices (into the slice given to `pin_all`) of the spaces it pinned.
    pub indices: Vec<usize>,
}

/// Pin every unpinned space (suspend path). Each space's own lock is taken
/// before any of its PTE locks. On a failure the spaces pinned so far are
/// unpinned again and the failure is returned.
///
/// The returned set names exactly the spaces this call pinned: a space
/// that is pinned already, or that another thread pins while this call
/// runs, is skipped (its pin belongs to that thread), decided under the
/// space's lock by [`AddressSpace::pin`]'s own answer, not by a check
/// beforehand. Until [`unpin_all`], the spaces in the set belong to the
/// caller: another thread that unpins one of them (and pins it again)
/// takes it over, and `unpin_all` would then undo that thread's pin.
pub fn pin_all<M: PagingMode, P: LockPolicy, B: Backend, const N: usize>(
    spaces: &[&AddressSpace<M, P, B>],
    b: &mut Batch<N>,
) -> Result<PinnedSet, Error> {
    let mut set = PinnedSet::default();
    for (i, s) in spaces.iter().enumerate() {
        match s.pin(b) {
            Ok(_) => set.indices.push(i),
            // Pinned already, or by another thread meanwhile: its pin, not
            // ours (unpin_all must not undo it).
            Err(Error::AlreadyPinned) => {}
            Err(e) => {
                for &k in set.indices.iter().rev() {
                    let _ = spaces[k].unpin(b);
                }
                return Err(e);
            }
        }
    }
    Ok(set)
}

/// Unpin exactly the spaces `pin_all` pinned (resume path).
pub fn unpin_all<M: PagingMode, P: LockPolicy, B: Backend, const N: usize>(
    spaces: &[&AddressSpace<M, P, B>],
    set: PinnedSet,
    b: &mut Batch<N>,
) -> Result<(), Error> {
    let mut first = None;
    for i in set.indices {
        if let Some(s) = spaces.get(i) {
            if let Err(e) = s.unpin(b) {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}
