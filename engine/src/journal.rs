//! The journal of one pin or unpin: every request the operation queues is
//! a step, tagged with its index (a split PTE page's two requests are one
//! step of two), so a failure can be undone exactly (docs/PROTOCOL.md §7).
//! Its step buffer is kept by the per-CPU batch between operations; this
//! module sits below both the batch and the pin operation, so neither
//! names the other.

use alloc::vec::Vec;

use crate::frame::Pfn;
use crate::mode::Level;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    RemapRo,
    RemapRw,
    Pin(Level),
    Unpin(Level),
}

/// One step, packed in a word (speed: a pin writes one per table page,
/// so the journal's write traffic is 8 bytes a page; keep it packed): the
/// frame in bits 12.., the action in bits 0..2, the level in 2..5, the
/// two flags in bits 5 and 6, and in bit 7 whether the step is a split
/// PTE page's pair of requests (its action, then the one
/// [`Step::second_of`] names).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step(u64);

/// A request's tag is its step's index; the second request of a pair has
/// this bit set as well.
pub(crate) const SECOND: u32 = 1 << 31;

impl Step {
    const LOCKED: u64 = 1 << 5;
    const FLAG: u64 = 1 << 6;
    const PAIR: u64 = 1 << 7;

    #[inline(always)]
    fn new(pfn: Pfn, action: Action, locked_page: bool, flag: bool) -> Step {
        let (kind, level) = match action {
            Action::RemapRo => (0, 0),
            Action::RemapRw => (1, 0),
            Action::Pin(l) => (2, l as u64),
            Action::Unpin(l) => (3, l as u64),
        };
        Step(
            pfn.0 << 12
                | kind
                | level << 2
                | if locked_page { Self::LOCKED } else { 0 }
                | if flag { Self::FLAG } else { 0 },
        )
    }

    /// The second request of a pair: pin's read-only remap is followed by
    /// the L1 pin, unpin's L1 unpin by the writable remap.
    #[inline]
    fn second_of(first: Action) -> Action {
        match first {
            Action::RemapRo => Action::Pin(Level::L1),
            _ => Action::RemapRw,
        }
    }

    /// This step's first request (`second` false) or a pair's second, as
    /// a step of its own: a pair's first carries the flag, both the lock.
    #[inline]
    fn request(self, second: bool) -> Step {
        if self.0 & Self::PAIR == 0 {
            return self;
        }
        if second {
            Step::new(self.pfn(), Self::second_of(self.action()), true, false)
        } else {
            Step(self.0 & !Self::PAIR)
        }
    }

    /// The table frame.
    #[inline]
    pub(crate) fn pfn(self) -> Pfn {
        Pfn(self.0 >> 12)
    }

    /// What was queued for it.
    #[inline]
    pub(crate) fn action(self) -> Action {
        let level = || Level::from_u8((self.0 >> 2 & 7) as u8).unwrap_or(Level::L1);
        match self.0 & 3 {
            0 => Action::RemapRo,
            1 => Action::RemapRw,
            2 => Action::Pin(level()),
            _ => Action::Unpin(level()),
        }
    }

    /// The page is an L1 under the split policy: its lock must be held
    /// while its mapping and its own type change together.
    #[inline]
    pub(crate) fn locked_page(self) -> bool {
        self.0 & Self::LOCKED != 0
    }

    /// The page's first step: the operation flipped its pinned flag just
    /// before queueing it (pin set it, unpin cleared it). Undoing the step
    /// flips the flag back, whether or not the request took effect.
    #[inline]
    pub(crate) fn flag(self) -> bool {
        self.0 & Self::FLAG != 0
    }
}

/// The journal of one pin or unpin.
///
/// Its step buffer is borrowed from the batch (a per-context object) for
/// the operation and handed back after, so a pin allocates only while the
/// buffer grows to the largest space the context has pinned.
#[derive(Default)]
pub(crate) struct Journal {
    pub(crate) steps: Vec<Step>,
    /// The batch's flush count when the operation started, so failures are
    /// reported relative to the operation.
    pub(crate) flush_base: u64,
}

impl Journal {
    /// A journal over a reusable step buffer (the batch's, see
    /// `Batch::take_journal_buffer`), for an operation that starts at the
    /// batch's flush count `flush_base`.
    #[inline]
    pub(crate) fn over(mut steps: Vec<Step>, flush_base: u64) -> Self {
        steps.clear();
        Journal { steps, flush_base }
    }

    /// Record a split PTE page's two requests as one step (speed: one word
    /// a page, not two: the journal's writes cost a tenth of a 16 GiB split
    /// pin; keep it): `first` (pin's read-only remap, or unpin's L1 unpin;
    /// the page's flag was flipped just before it), then its second (the L1
    /// pin, or the writable remap), both under the page's lock. Returns
    /// the step's index, the first request's tag; the second's is that
    /// with [`SECOND`] set.
    #[inline(always)]
    pub(crate) fn push_pair(&mut self, pfn: Pfn, first: Action) -> u32 {
        let tag = self.steps.len() as u32;
        self.steps
            .push(Step(Step::new(pfn, first, true, true).0 | Step::PAIR));
        tag
    }

    /// Forget the pair just recorded (its requests were not queued).
    #[inline]
    pub(crate) fn pop_pair(&mut self) {
        self.steps.pop();
    }

    /// The request tagged `tag`, as a step of its own.
    pub(crate) fn request(&self, tag: u32) -> Option<Step> {
        let s = self.steps.get((tag & !SECOND) as usize)?;
        Some(s.request(tag & SECOND != 0))
    }

    /// Every request in the order queued, each as a step of its own (a
    /// pair as two), with its tag.
    pub(crate) fn requests(&self) -> Vec<(Step, u32)> {
        let mut out = Vec::with_capacity(self.steps.len() * 2);
        for (i, s) in self.steps.iter().enumerate() {
            out.push((s.request(false), i as u32));
            if s.0 & Step::PAIR != 0 {
                out.push((s.request(true), i as u32 | SECOND));
            }
        }
        out
    }

    /// Record a step; returns its index, the batch tag of its request.
    #[inline(always)]
    pub(crate) fn push(&mut self, pfn: Pfn, action: Action, locked_page: bool, flag: bool) -> u32 {
        let tag = self.steps.len() as u32;
        self.steps.push(Step::new(pfn, action, locked_page, flag));
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field survives the packing, at the largest frame number.
    #[test]
    fn steps_pack_and_unpack() {
        let levels = [Level::L1, Level::L2, Level::L3, Level::L4, Level::L5];
        let mut actions = alloc::vec![Action::RemapRo, Action::RemapRw];
        for l in levels {
            actions.push(Action::Pin(l));
            actions.push(Action::Unpin(l));
        }
        for pfn in [0, 1, 0x1234_5678, (1 << 52) - 1] {
            for &action in &actions {
                for (locked, flag) in [(false, false), (false, true), (true, false), (true, true)] {
                    let s = Step::new(Pfn(pfn), action, locked, flag);
                    assert_eq!(
                        (s.pfn(), s.action(), s.locked_page(), s.flag()),
                        (Pfn(pfn), action, locked, flag)
                    );
                }
            }
        }
        let mut j = Journal::over(Vec::new(), 3);
        assert_eq!(j.push(Pfn(9), Action::RemapRo, false, true), 0);
        assert_eq!(j.push(Pfn(9), Action::Pin(Level::L1), true, false), 1);
        assert_eq!(j.steps.len(), 2);
    }

    /// A pair is one step and two requests, each read back as the step it
    /// stands for: the first with the flag, both locked.
    #[test]
    fn a_pair_is_one_step_of_two_requests() {
        let mut j = Journal::over(Vec::new(), 0);
        assert_eq!(j.push(Pfn(1), Action::RemapRo, false, true), 0);
        assert_eq!(j.push_pair(Pfn(7), Action::RemapRo), 1);
        assert_eq!(j.push_pair(Pfn(8), Action::Unpin(Level::L1)), 2);
        assert_eq!(j.steps.len(), 3);
        let read = |s: Step| (s.pfn().0, s.action(), s.locked_page(), s.flag());
        let all: Vec<_> = j
            .requests()
            .into_iter()
            .map(|(s, t)| (read(s), t))
            .collect();
        assert_eq!(
            all,
            [
                ((1, Action::RemapRo, false, true), 0),
                ((7, Action::RemapRo, true, true), 1),
                ((7, Action::Pin(Level::L1), true, false), 1 | SECOND),
                ((8, Action::Unpin(Level::L1), true, true), 2),
                ((8, Action::RemapRw, true, false), 2 | SECOND),
            ]
        );
        for (s, t) in j.requests() {
            assert_eq!(read(j.request(t).unwrap()), read(s));
        }
        assert!(j.request(3).is_none());
    }
}
