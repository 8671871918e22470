//! What a platform thinks of a guest's page-table frames, asked the same way
//! of every platform: the recording mock, the simulated hypervisor, bare
//! hardware, and (in the test guest) real Xen.
//!
//! [`PinObserver`] is the one question; [`Expected`] and [`check_frame`]
//! are the one answer key that tests and examples hold it to (a table of a
//! pinned space is read-only, validated and, at the root and under split
//! PTE locks at each L1, pinned itself; a frame at rest is none of these).
//! `no_std`: the PV test guest implements it for real Xen.

use core::ops::Range;

use pagepin_engine::{Level, Pfn};

/// What a platform (a hypervisor model, a real hypervisor, bare hardware)
/// thinks of a guest frame: is it read-only, is it a page table, is it
/// pinned. Each answer is `None` where the platform cannot tell.
pub trait PinObserver {
    /// Whether the platform maps `pfn` read-only in the guest's direct map
    /// (`Some(false)`: writable); `None` when it cannot tell (the frame is
    /// not mapped there, or unknown to it).
    fn read_only(&self, pfn: Pfn) -> Option<bool>;

    /// The level of page table the platform holds `pfn` as (validated as a
    /// table: Xen's page type, pinned or referenced from a pinned table);
    /// `Some(None)` for an ordinary page; `None` when it cannot tell (it
    /// keeps no types, or cannot be asked).
    fn table_level(&self, pfn: Pfn) -> Option<Option<Level>>;

    /// Whether `pfn` carries a pin of its own; `None` when it cannot tell
    /// (real Xen cannot be asked).
    fn pinned(&self, pfn: Pfn) -> Option<bool>;

    /// Whether the platform still treats `pfn` as a page table in any way:
    /// read-only, typed as a table or pinned (an answer it cannot give
    /// counts as no).
    fn treats_as_table(&self, pfn: Pfn) -> bool {
        self.read_only(pfn) == Some(true)
            || matches!(self.table_level(pfn), Some(Some(_)))
            || self.pinned(pfn) == Some(true)
    }

    /// Of the frames `frames`, how many the platform still treats as page
    /// tables (typed, read-only or pinned): once everything is unpinned,
    /// the leaks.
    fn leaked(&self, frames: Range<Pfn>) -> usize {
        (frames.start.0..frames.end.0)
            .filter(|&p| self.treats_as_table(Pfn(p)))
            .count()
    }
}

/// Forwards every answer (so an observer can be passed by reference or
/// shared).
macro_rules! forward {
    ($($ty:ty),* $(,)?) => {$(
        impl<O: PinObserver + ?Sized> PinObserver for $ty {
            fn read_only(&self, pfn: Pfn) -> Option<bool> {
                O::read_only(&**self, pfn)
            }
            fn table_level(&self, pfn: Pfn) -> Option<Option<Level>> {
                O::table_level(&**self, pfn)
            }
            fn pinned(&self, pfn: Pfn) -> Option<bool> {
                O::pinned(&**self, pfn)
            }
            fn treats_as_table(&self, pfn: Pfn) -> bool {
                O::treats_as_table(&**self, pfn)
            }
            fn leaked(&self, frames: Range<Pfn>) -> usize {
                O::leaked(&**self, frames)
            }
        }
    )*};
}
forward!(&O, alloc::sync::Arc<O>);

/// What a platform must show for one table frame of a space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// Mapped read-only in the direct map.
    pub read_only: bool,
    /// Held as a page table of this level (`None`: an ordinary page).
    pub level: Option<Level>,
    /// Carrying a pin of its own.
    pub pinned: bool,
}

impl Expected {
    /// A frame at rest: writable, an ordinary page, not pinned (a table of
    /// an unpinned space, or any table on a platform that never pins).
    pub const AT_REST: Expected = Expected {
        read_only: false,
        level: None,
        pinned: false,
    };

    /// A table of `level` in a space that is `pinned` (read-only, held as
    /// `level`, pinned itself when `own_pin`: the root, and under split PTE
    /// locks each L1), or [`Self::AT_REST`] when it is not.
    pub fn table(pinned: bool, level: Level, own_pin: bool) -> Expected {
        if pinned {
            Expected {
                read_only: true,
                level: Some(level),
                pinned: own_pin,
            }
        } else {
            Self::AT_REST
        }
    }
}

/// Check what `obs` says of `pfn` against `want`: the read-only answer must
/// be given and match; the type and the pin are judged only where the
/// platform can tell. `Err` names the first answer that differs:
/// `"read-only"`, `"type"` or `"pin"`.
pub fn check_frame<O: PinObserver + ?Sized>(
    obs: &O,
    pfn: Pfn,
    want: Expected,
) -> Result<(), &'static str> {
    if obs.read_only(pfn) != Some(want.read_only) {
        return Err("read-only");
    }
    if obs.table_level(pfn).is_some_and(|l| l != want.level) {
        return Err("type");
    }
    if obs.pinned(pfn).is_some_and(|p| p != want.pinned) {
        return Err("pin");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// the platforms of this crate

/// The mock's model: a frame is read-only when the last accepted remap of
/// it dropped `WRITABLE`, pinned when its pins and unpins do not balance.
/// It keeps no page types.
#[cfg(feature = "mock")]
impl PinObserver for crate::mock::NetEffect {
    fn read_only(&self, pfn: Pfn) -> Option<bool> {
        Some(self.remapped.get(&pfn.0).copied().unwrap_or(false))
    }
    fn table_level(&self, _pfn: Pfn) -> Option<Option<Level>> {
        None
    }
    fn pinned(&self, pfn: Pfn) -> Option<bool> {
        Some(self.pins.contains_key(&pfn.0))
    }
}

/// Answers from the net effect of the calls recorded so far (each query
/// replays them; [`MockBackend::net_effect`] once for many).
///
/// [`MockBackend::net_effect`]: crate::mock::MockBackend::net_effect
#[cfg(feature = "mock")]
impl PinObserver for crate::mock::MockBackend {
    fn read_only(&self, pfn: Pfn) -> Option<bool> {
        PinObserver::read_only(&self.net_effect(), pfn)
    }
    fn table_level(&self, pfn: Pfn) -> Option<Option<Level>> {
        self.net_effect().table_level(pfn)
    }
    fn pinned(&self, pfn: Pfn) -> Option<bool> {
        self.net_effect().pinned(pfn)
    }
    fn leaked(&self, frames: Range<Pfn>) -> usize {
        self.net_effect().leaked(frames)
    }
}

/// Bare hardware has no pinning: nothing is ever read-only, typed or
/// pinned.
#[cfg(feature = "native")]
impl PinObserver for crate::native::NativeBackend {
    fn read_only(&self, _pfn: Pfn) -> Option<bool> {
        Some(false)
    }
    fn table_level(&self, _pfn: Pfn) -> Option<Option<Level>> {
        Some(None)
    }
    fn pinned(&self, _pfn: Pfn) -> Option<bool> {
        Some(false)
    }
    fn leaked(&self, _frames: Range<Pfn>) -> usize {
        0
    }
}

/// The simulated hypervisor's per-frame state ([`XenSim::frame_info`]):
/// its direct-map entry, its `type_info` type and pin bit. A frame outside
/// the domain: `None`.
///
/// [`XenSim::frame_info`]: crate::xen::XenSim::frame_info
#[cfg(all(feature = "xen", feature = "std"))]
impl PinObserver for crate::xen::XenSim {
    fn read_only(&self, pfn: Pfn) -> Option<bool> {
        self.frame_info(pfn)?.direct_map_writable.map(|w| !w)
    }
    fn table_level(&self, pfn: Pfn) -> Option<Option<Level>> {
        Some(self.frame_info(pfn)?.ty.level())
    }
    fn pinned(&self, pfn: Pfn) -> Option<bool> {
        Some(self.frame_info(pfn)?.pinned)
    }
    fn treats_as_table(&self, pfn: Pfn) -> bool {
        self.frame_info(pfn)
            .is_some_and(|f| f.ty.is_table() || f.pinned || f.direct_map_writable == Some(false))
    }
}

/// A Xen backend answers what its hypervisor answers (the simulator, or in
/// a guest whatever stands for real Xen).
#[cfg(feature = "xen")]
impl<H: crate::xen::XenHypercalls + PinObserver, F: crate::xen::FrameMap> PinObserver
    for crate::xen::XenBackend<H, F>
{
    fn read_only(&self, pfn: Pfn) -> Option<bool> {
        self.hypercalls().read_only(pfn)
    }
    fn table_level(&self, pfn: Pfn) -> Option<Option<Level>> {
        self.hypercalls().table_level(pfn)
    }
    fn pinned(&self, pfn: Pfn) -> Option<bool> {
        self.hypercalls().pinned(pfn)
    }
    fn treats_as_table(&self, pfn: Pfn) -> bool {
        self.hypercalls().treats_as_table(pfn)
    }
    fn leaked(&self, frames: Range<Pfn>) -> usize {
        self.hypercalls().leaked(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frame 1 a pinned L1, frame 2 read-only only; no pin answers.
    struct Stub;

    impl PinObserver for Stub {
        fn read_only(&self, pfn: Pfn) -> Option<bool> {
            (pfn.0 < 4).then_some(pfn.0 == 1 || pfn.0 == 2)
        }
        fn table_level(&self, pfn: Pfn) -> Option<Option<Level>> {
            Some((pfn.0 == 1).then_some(Level::L1))
        }
        fn pinned(&self, _pfn: Pfn) -> Option<bool> {
            None
        }
    }

    #[test]
    fn check_frame_judges_what_the_platform_tells() {
        let pinned_l1 = Expected::table(true, Level::L1, true);
        assert_eq!(check_frame(&Stub, Pfn(1), pinned_l1), Ok(()));
        assert_eq!(check_frame(&Stub, Pfn(0), Expected::AT_REST), Ok(()));
        assert_eq!(
            check_frame(&Stub, Pfn(1), Expected::AT_REST),
            Err("read-only")
        );
        assert_eq!(check_frame(&Stub, Pfn(2), pinned_l1), Err("type"));
        let pinned_l2 = Expected::table(true, Level::L2, false);
        assert_eq!(check_frame(&Stub, Pfn(1), pinned_l2), Err("type"));
        // No read-only answer is a mismatch; no pin answer is not judged.
        assert_eq!(
            check_frame(&Stub, Pfn(9), Expected::AT_REST),
            Err("read-only")
        );
        assert_eq!(Expected::table(false, Level::L4, true), Expected::AT_REST);
    }

    #[test]
    fn leaked_counts_each_frame_once() {
        assert_eq!(Stub.leaked(Pfn(0)..Pfn(16)), 2);
        assert_eq!(PinObserver::leaked(&&Stub, Pfn(2)..Pfn(16)), 1);
        assert!(!Stub.treats_as_table(Pfn(3)));
    }

    #[cfg(feature = "mock")]
    #[test]
    fn mock_net_effect() {
        use crate::mock::NetEffect;
        let mut n = NetEffect::default();
        n.remapped.insert(5, true);
        n.remapped.insert(6, false);
        n.pins.insert(7, 1);
        assert_eq!(PinObserver::read_only(&n, Pfn(5)), Some(true));
        assert_eq!(PinObserver::read_only(&n, Pfn(6)), Some(false));
        assert_eq!(PinObserver::read_only(&n, Pfn(8)), Some(false));
        assert_eq!(n.pinned(Pfn(7)), Some(true));
        assert_eq!(n.table_level(Pfn(7)), None);
        assert_eq!(n.leaked(Pfn(0)..Pfn(10)), 2);
    }
}
