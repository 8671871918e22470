//! Adversarial tables: raw entries written straight into the frames make
//! cycles, frames reachable at two levels or twice at one level, frames
//! outside the store, data frames linked as tables, reserved address bits,
//! PS bits at every level, and random garbage. Walk (`table_frames`),
//! `translate`, `map`, `pin` and `unpin` on the mock backend must give a
//! typed error or the correct result: never panic, never hang, and after
//! an error nothing has changed (every frame's entries, every pinned flag,
//! and the net effect of the calls the mock saw: every remap rolled back,
//! pins and unpins balanced).
//!
//! "Correct" is a reference model written here from docs/PROTOCOL.md §2 and §7: a
//! walk over every root slot but the hypervisor's hole (256..272), tables
//! before children, root last; a
//! present non-leaf entry must have no address bits at or above bit 46,
//! point into the store, at a table of the next level; PS is a leaf at L2
//! and L3 and reserved at L4. `translate` follows the CPU: no translation
//! through a malformed entry or to a leaf with reserved bits.

#[path = "support/native.rs"]
mod native_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use native_support::{random_space, Rng, Shape, STORE_BASE_PFN};
use pagepin::backends::mock::{MockBackend, NetEffect, RecordedBatch};
use pagepin::{
    walk, AddressSpace, Batch, EntryFlags, Error, Level, PageSize, PageTableEntry, PagingMode, Pfn,
    Split, X86_64,
};
use proptest::prelude::*;

type Space = AddressSpace<X86_64, Split, MockBackend>;

const FRAMES: usize = 96;
const TABLE: u64 = 0x67; // P | W | U | A | D

// ---------------------------------------------------------------- watchdog

static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Abort the whole test process if one case runs for more than 30 s (a
/// hang): a hanging walk would otherwise stall the suite silently.
fn watchdog() {
    static START: std::sync::Once = std::sync::Once::new();
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    PROGRESS.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    START.call_once(|| {
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let last = PROGRESS.load(Ordering::Relaxed);
            if epoch.elapsed().as_millis() as u64 > last + 30_000 {
                eprintln!("adversarial case made no progress for 30 s: hang");
                std::process::abort();
            }
        });
    });
}

// ---------------------------------------------------------------- reference

/// What kind of typed error the reference expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    Reserved,
    OutOfRange,
    LevelMismatch,
}

fn kind_of(e: &Error) -> Option<Bad> {
    match e {
        Error::ReservedBits { .. } => Some(Bad::Reserved),
        Error::FrameOutOfRange { .. } => Some(Bad::OutOfRange),
        Error::LevelMismatch { .. } => Some(Bad::LevelMismatch),
        _ => None,
    }
}

/// A present entry at `level`: leaf (`Ok(None)`), table, or malformed.
fn ref_classify(space: &Space, level: Level, e: u64) -> Result<Option<Pfn>, Bad> {
    let e = PageTableEntry::from_bits(e);
    if level == Level::L1 {
        return Ok(None);
    }
    if e.is_huge() {
        return if level == Level::L4 {
            Err(Bad::Reserved)
        } else {
            Ok(None)
        };
    }
    if e.bits() & PageTableEntry::RESERVED_ADDR_BITS != 0 {
        return Err(Bad::Reserved);
    }
    let pfn = Pfn(e.frame());
    let meta = space.store().meta(pfn).ok_or(Bad::OutOfRange)?;
    if meta.level() != level.child() {
        return Err(Bad::LevelMismatch);
    }
    Ok(Some(pfn))
}

fn entry(space: &Space, pfn: Pfn, i: usize) -> u64 {
    space.store().entry(pfn, i).unwrap().load(Ordering::Acquire)
}

fn ref_walk(space: &Space) -> Result<Vec<(Pfn, Level)>, Bad> {
    fn table(
        space: &Space,
        pfn: Pfn,
        level: Level,
        out: &mut Vec<(Pfn, Level)>,
    ) -> Result<(), Bad> {
        out.push((pfn, level));
        if level == Level::L1 {
            return Ok(());
        }
        for i in 0..512 {
            let e = entry(space, pfn, i);
            if e & 1 == 0 {
                continue;
            }
            if let Some(c) = ref_classify(space, level, e)? {
                table(space, c, level.child().unwrap(), out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    let slots = (0..X86_64::ROOT_ENTRIES).filter(|s| !X86_64::HYPERVISOR_HOLE.contains(s));
    for slot in slots {
        let e = entry(space, space.root(), slot);
        if e & 1 == 0 {
            continue;
        }
        if let Some(c) = ref_classify(space, Level::L4, e)? {
            table(space, c, Level::L3, &mut out)?;
        }
    }
    out.push((space.root(), Level::L4));
    Ok(out)
}

/// The CPU's translation, with the engine's validity rules for tables.
fn ref_translate(space: &Space, va: u64) -> Option<(u64, PageSize)> {
    if !X86_64::is_canonical(va) {
        return None;
    }
    let mut pfn = space.root();
    let mut level = Level::L4;
    loop {
        let e = entry(space, pfn, X86_64::index(va, level));
        if e & 1 == 0 {
            return None;
        }
        match ref_classify(space, level, e).ok()? {
            Some(c) => {
                pfn = c;
                level = level.child()?;
            }
            None => {
                let size = match level {
                    Level::L1 => PageSize::Size4K,
                    Level::L2 => PageSize::Size2M,
                    _ => PageSize::Size1G,
                };
                let addr = e & PageTableEntry::ADDR_MASK;
                let pat = if size == PageSize::Size4K { 0 } else { 1 << 12 };
                if addr & PageTableEntry::RESERVED_ADDR_BITS != 0
                    || addr & !pat & (size.bytes() - 1) != 0
                {
                    return None;
                }
                return Some(((addr & !pat) + (va & (size.bytes() - 1)), size));
            }
        }
    }
}

// ---------------------------------------------------------------- state

/// The store's state (the tests' one snapshot): entries, and each frame's
/// level, pinned flag, allocation and lock.
fn state(space: &Space) -> native_support::StoreImage {
    native_support::snapshot(space.store())
}

/// The net effect of the calls the mock accepted: the last read-only state
/// of each remapped frame, and the pin balance of each frame.
fn net_effect(batches: &[RecordedBatch]) -> (BTreeMap<u64, bool>, BTreeMap<u64, i64>) {
    let n = NetEffect::replay(batches);
    (n.remapped, n.pins)
}

// ---------------------------------------------------------------- corruption

/// A corruption, chosen by proptest.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// An entry pointing to the root or to its own table.
    Cycle,
    /// An entry pointing to a table of a wrong level.
    TwoLevels,
    /// An entry pointing to a table of the right level that is already
    /// linked (reachable twice at one level).
    TwiceSameLevel,
    /// An entry pointing outside the store.
    OutOfStore,
    /// An address bit >= 46 set in a present entry.
    Reserved,
    /// PS set in an entry at a chosen level.
    Ps,
    /// A data frame linked as a table.
    DataFrame,
    /// Random garbage.
    Raw,
}

fn kinds() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Cycle),
        Just(Kind::TwoLevels),
        Just(Kind::TwiceSameLevel),
        Just(Kind::OutOfStore),
        Just(Kind::Reserved),
        Just(Kind::Ps),
        Just(Kind::DataFrame),
        Just(Kind::Raw),
    ]
}

/// Build the clean space of a case.
fn build(seed: u64) -> (Space, Pfn) {
    let mut rng = Rng::new(seed);
    let shape = Shape {
        pages_4k: 12 + rng.below(12) as usize,
        pages_2m: 1 + rng.below(3) as usize,
        pages_1g: rng.below(2) as usize,
        regions: 2,
    };
    let (space, _) =
        random_space::<Split, MockBackend>(Arc::new(MockBackend::new()), FRAMES, shape, &mut rng);
    let data = space.store().alloc_data().expect("a data frame");
    (space, data)
}

fn tables(space: &Space) -> Vec<(Pfn, Level)> {
    (0..FRAMES as u64)
        .map(|i| Pfn(STORE_BASE_PFN + i))
        .filter_map(|p| space.store().meta(p).unwrap().level().map(|l| (p, l)))
        .collect()
}

/// Apply the corruption; returns a description.
fn corrupt(space: &Space, data: Pfn, kind: Kind, picks: [u64; 4]) -> String {
    let all = tables(space);
    // Targets: mostly tables the user walk reaches (where pin looks).
    let walked = ref_walk(space).expect("the clean space is valid");
    let targets = if picks[3] & 8 == 0 { &walked } else { &all };
    let pick = |v: &[(Pfn, Level)], r: u64| v[(r % v.len() as u64) as usize];
    let upper: Vec<_> = targets
        .iter()
        .copied()
        .filter(|t| t.1 >= Level::L2)
        .collect();
    let slot_of = |pfn: Pfn, r: u64| -> usize {
        // Prefer a present entry (most corruptions modify one), else any slot.
        let present: Vec<usize> = (0..512)
            .filter(|&i| entry(space, pfn, i) & 1 != 0)
            .collect();
        if present.is_empty() || r & 1 == 1 {
            ((r >> 1) % 512) as usize
        } else {
            present[((r >> 1) % present.len() as u64) as usize]
        }
    };
    let (t, level) = match kind {
        Kind::Ps => {
            let want = Level::from_u8(1 + (picks[3] % 4) as u8).unwrap();
            let at: Vec<_> = targets.iter().copied().filter(|t| t.1 == want).collect();
            if at.is_empty() {
                pick(targets, picks[0])
            } else {
                pick(&at, picks[0])
            }
        }
        Kind::Reserved if picks[3] & 16 == 0 => pick(&upper, picks[0]),
        Kind::Reserved | Kind::Raw => pick(targets, picks[0]),
        _ => pick(&upper, picks[0]),
    };
    let i = slot_of(t, picks[1]);
    let link = |p: Pfn| (p.0 << 12) | TABLE;
    let value = match kind {
        Kind::Cycle => link(if picks[2] & 1 == 0 { space.root() } else { t }),
        Kind::TwoLevels => {
            let wrong: Vec<_> = all
                .iter()
                .copied()
                .filter(|x| Some(x.1) != level.child())
                .collect();
            link(pick(&wrong, picks[2]).0)
        }
        Kind::TwiceSameLevel => {
            let right: Vec<_> = all
                .iter()
                .copied()
                .filter(|x| Some(x.1) == level.child())
                .collect();
            if right.is_empty() {
                link(space.root())
            } else {
                link(pick(&right, picks[2]).0)
            }
        }
        Kind::OutOfStore => {
            let mfn = match picks[2] % 3 {
                0 => STORE_BASE_PFN - 1 - picks[3] % STORE_BASE_PFN,
                1 => STORE_BASE_PFN + FRAMES as u64 + picks[3] % 1000,
                _ => (1 << 33) + picks[3] % (1 << 20),
            };
            (mfn << 12) | TABLE
        }
        Kind::Reserved => {
            let old = entry(space, t, i);
            (if old & 1 == 0 {
                link(space.root())
            } else {
                old
            }) | 1 << (46 + picks[2] % 6)
        }
        Kind::Ps => {
            let old = entry(space, t, i);
            (if old & 1 == 0 { link(t) } else { old }) | EntryFlags::HUGE.bits()
        }
        Kind::DataFrame => link(data),
        Kind::Raw => picks[2],
    };
    space
        .store()
        .entry(t, i)
        .unwrap()
        .store(value, Ordering::Release);
    format!("{kind:?}: {t:?} ({level:?}) [{i}] = {value:#x}")
}

// ---------------------------------------------------------------- checks

/// Walk and translate against the reference.
fn check_walk_and_translate(space: &Space, rng: &mut Rng, what: &str) {
    let before = state(space);
    match (space.table_frames(), ref_walk(space)) {
        (Ok(got), Ok(want)) => assert_eq!(got, want, "{what}: walk"),
        (Err(e), Err(bad)) => assert_eq!(kind_of(&e), Some(bad), "{what}: walk error {e:?}"),
        (got, want) => panic!("{what}: walk gave {got:?}, reference {want:?}"),
    }
    // Addresses: every leaf of the tables before corruption is in some
    // region; sample around the root slots in use and at random.
    let mut vas: Vec<u64> = Vec::new();
    for slot in 0..512u64 {
        if entry(space, space.root(), slot as usize) & 1 != 0 {
            for _ in 0..24 {
                vas.push(native_support::slot_va(
                    slot,
                    rng.below(1 << 39) & !((1 << 30) - 1) | rng.below(8 << 21),
                ));
            }
        }
    }
    for _ in 0..16 {
        vas.push(rng.next()); // mostly non-canonical
    }
    // One reader across all the addresses: its remembered path must never
    // stand in for a walk the reference refuses.
    let mut reader = space.reader();
    for va in vas {
        let got = space.translate(va).map(|t| (t.phys, t.size));
        assert_eq!(got, ref_translate(space, va), "{what}: translate {va:#x}");
        if X86_64::is_canonical(va) {
            // The public descent refuses exactly what `translate` refuses,
            // with the same error.
            let stop = walk::descend::<X86_64, _, _>(
                space.store(),
                &**space.backend(),
                space.root(),
                va,
                Level::L1,
            );
            match (stop, space.try_translate(va)) {
                (Err(a), Err(b)) => assert_eq!(a, b, "{what}: descend {va:#x}"),
                (Ok(_), Ok(_)) => {}
                (a, b) => panic!("{what}: descend {va:#x} gave {a:?}, try_translate {b:?}"),
            }
        }
        assert_eq!(
            reader.translate(va).map(|t| (t.phys, t.size)),
            got,
            "{what}: reader {va:#x}"
        );
    }
    drop(reader);
    assert_eq!(
        state(space),
        before,
        "{what}: walk/translate changed the tables"
    );
}

/// `map` with bad input is refused and changes nothing; `map` of a good
/// address either works or is refused and changes nothing.
fn check_map(space: &Space, rng: &mut Rng, what: &str) {
    let f = EntryFlags::PRESENT | EntryFlags::WRITABLE;
    for (va, pa, size) in [
        (0x0000_8000_0000_0000u64, 0x1000u64, PageSize::Size4K),
        (0x1234_5678_9000_0000, 0x1000, PageSize::Size4K),
        (0x4000_0800, 0x1000, PageSize::Size4K),
        (0x4000_1000, 0x1000, PageSize::Size2M),
        (
            native_support::slot_va(rng.below(256), rng.next()) & !0xfff,
            0x5000,
            PageSize::Size4K,
        ),
    ] {
        let before = state(space);
        let calls = space.backend().batch_count();
        // A cursor over the page first: the same outcome as `map`.
        let by_cursor = space
            .cursor_mut(va..va.wrapping_add(size.bytes()))
            .and_then(|mut c| c.map(pa, size, f));
        match by_cursor {
            Ok(()) => {
                assert_eq!(
                    space.translate(va).map(|t| t.phys),
                    Some(pa),
                    "{what}: cursor map {va:#x} then translate"
                );
                space.unmap(va).expect("unmap what the cursor mapped");
            }
            Err(e) => {
                assert_eq!(
                    state(space),
                    before,
                    "{what}: cursor map {va:#x} failed with {e:?} but changed the tables"
                );
                assert_eq!(
                    space.backend().batch_count(),
                    calls,
                    "{what}: failed cursor map issued calls"
                );
            }
        }
        let before = state(space);
        let calls = space.backend().batch_count();
        let by_map = space.map(va, pa, size, f);
        assert_eq!(
            by_map.err(),
            by_cursor.err(),
            "{what}: cursor and map disagree at {va:#x}"
        );
        match by_map {
            Ok(()) => {
                assert_eq!(
                    space.translate(va).map(|t| t.phys),
                    Some(pa),
                    "{what}: map {va:#x} then translate"
                );
                space.unmap(va).expect("unmap what was just mapped");
            }
            Err(e) => {
                assert_eq!(
                    state(space),
                    before,
                    "{what}: map {va:#x} failed with {e:?} but changed the tables"
                );
                assert_eq!(
                    space.backend().batch_count(),
                    calls,
                    "{what}: failed map issued calls"
                );
            }
        }
    }
}

/// Pin then unpin; check the outcome against the reference walk.
fn check_pin(space: &Space, what: &str) {
    let before = state(space);
    let reference = ref_walk(space);
    space.backend().clear();
    let mut b: Batch = Batch::new();
    match space.pin(&mut b) {
        Err(e) => {
            assert!(
                reference.is_err(),
                "{what}: pin failed ({e:?}) on a valid tree"
            );
            assert_eq!(kind_of(&e), reference.err(), "{what}: pin error {e:?}");
            assert_eq!(
                state(space),
                before,
                "{what}: failed pin changed frames or flags"
            );
            let (ro, pins) = net_effect(&space.backend().batches());
            assert!(
                ro.values().all(|r| !r),
                "{what}: a remap was not rolled back: {ro:x?}"
            );
            assert!(pins.is_empty(), "{what}: unbalanced pins {pins:x?}");
            assert!(!space.is_pinned());
        }
        Ok(_) => {
            let frames = reference
                .unwrap_or_else(|bad| panic!("{what}: pin succeeded where the walk is {bad:?}"));
            let (ro, pins) = net_effect(&space.backend().batches());
            for (pfn, level) in &frames {
                assert!(
                    space.store().meta(*pfn).unwrap().is_pinned(),
                    "{what}: {pfn:?} not flagged"
                );
                assert_eq!(ro.get(&pfn.0), Some(&true), "{what}: {pfn:?} not read-only");
                if *level == Level::L1 {
                    assert_eq!(pins.get(&pfn.0), Some(&1), "{what}: L1 {pfn:?} not pinned");
                }
            }
            assert_eq!(
                pins.get(&space.root().0),
                Some(&1),
                "{what}: root not pinned"
            );
            space.unpin(&mut b).expect("unpin of what was just pinned");
            assert_eq!(state(space), before, "{what}: pin + unpin is not neutral");
            let (ro, pins) = net_effect(&space.backend().batches());
            assert!(
                ro.values().all(|r| !r) && pins.is_empty(),
                "{what}: pin + unpin calls not neutral"
            );
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The public descent from a root outside the store is a typed error
/// naming the root's entry, not a read out of bounds; from a frame of the
/// store it descends.
#[test]
fn descend_refuses_a_root_outside_the_store() {
    let (space, _) = build(7);
    let va = native_support::slot_va(3, 5 << 21);
    for root in [Pfn(0), Pfn(STORE_BASE_PFN + FRAMES as u64), Pfn(u64::MAX)] {
        let got =
            walk::descend::<X86_64, _, _>(space.store(), &**space.backend(), root, va, Level::L1);
        assert!(
            matches!(
                got,
                Err(Error::FrameOutOfRange {
                    level: Level::L4,
                    index: 3,
                    ..
                })
            ),
            "root {root:?}: {got:?}"
        );
    }
    let inside = walk::descend::<X86_64, _, _>(
        space.store(),
        &**space.backend(),
        space.root(),
        va,
        Level::L1,
    );
    assert!(inside.is_ok(), "{inside:?}");
}

proptest! {
    #![proptest_config(config())]

    /// An unpinned space with one corruption: walk, translate, map, pin.
    #[test]
    fn corrupted_unpinned_space(seed in any::<u64>(), kind in kinds(), picks in any::<[u64; 4]>()) {
        watchdog();
        let (space, data) = build(seed);
        let mut rng = Rng::new(seed ^ 0xadd);
        check_walk_and_translate(&space, &mut rng, "clean");
        let what = corrupt(&space, data, kind, picks);
        check_walk_and_translate(&space, &mut rng, &what);
        check_map(&space, &mut rng, &what);
        check_pin(&space, &what);
    }

    /// A pinned space corrupted afterwards: unpin either succeeds on what
    /// it can reach or fails and leaves the space pinned exactly as before.
    #[test]
    fn corrupted_pinned_space(seed in any::<u64>(), kind in kinds(), picks in any::<[u64; 4]>()) {
        watchdog();
        let (space, data) = build(seed);
        let mut b: Batch = Batch::new();
        space.pin(&mut b).expect("a clean space pins");
        let what = corrupt(&space, data, kind, picks);
        let reference = ref_walk(&space);
        let before = state(&space);
        space.backend().clear();
        match space.unpin(&mut b) {
            Err(e) => {
                prop_assert!(reference.is_err(), "{}: unpin failed ({:?}) on a valid tree", what, e);
                prop_assert_eq!(kind_of(&e), reference.err(), "{}: {:?}", what, e);
                prop_assert_eq!(state(&space), before, "{}: failed unpin changed frames or flags", what);
                let (ro, pins) = net_effect(&space.backend().batches());
                prop_assert!(ro.values().all(|r| *r), "{}: a frame was left writable: {:x?}", what, ro);
                prop_assert!(pins.is_empty(), "{}: unbalanced pins {:x?}", what, pins);
                prop_assert!(space.is_pinned());
            }
            Ok(_) => {
                let frames = reference.map_err(|bad| TestCaseError::fail(format!("{what}: unpin succeeded where the walk is {bad:?}")))?;
                for (pfn, _) in &frames {
                    prop_assert!(!space.store().meta(*pfn).unwrap().is_pinned(), "{}: {:?} still flagged", what, pfn);
                }
                let (ro, _) = net_effect(&space.backend().batches());
                prop_assert!(ro.values().all(|r| !r), "{}: unpin left a frame read-only", what);
                prop_assert!(!space.is_pinned());
            }
        }
    }
}
