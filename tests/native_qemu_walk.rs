//! A CPU's page walk as the judge of the engine's tables, 5-level and
//! 4-level: QEMU TCG (`-cpu max`, which has LA57) is started paused with
//! the engine's table frames loaded into its RAM, CR4 (PAE, LA57), EFER
//! and CR3 set through its gdbstub and paging turned on; then QEMU's
//! `info tlb` must list exactly the pages the engine mapped, each with the
//! engine's `translate` (address and all nine flag letters), and QEMU's
//! `gva2gpa` must agree with `translate` on a sample of mapped, unmapped
//! and non-canonical addresses. KVM here cannot run 5-level paging (the
//! host CPU has no LA57), so for 5-level QEMU is the only CPU; for 4-level
//! it is a second oracle beside `tests/native_kvm.rs`.
//!
//! Negative control: the same comparison over the image with one bit
//! flipped (a leaf's present bit, an address bit of a table entry) must
//! report mismatches.
//!
//! Skips loudly without QEMU; fails under `CI=true`. Bounded: a few
//! hundred pages and a few hundred `gva2gpa` probes per mode.

#[path = "support/native.rs"]
mod native_support;
#[path = "support/qemu.rs"]
mod qemu;

use std::collections::BTreeMap;
use std::sync::Arc;

use native_support::Rng;
use pagepin::backends::native::NativeBackend;
use pagepin::{
    AddressSpace, EntryFlags, Error, FrameStore, La57, PageSize, PagingMode, SpaceOptions, Split,
    X86_64,
};

/// Table frames start at 1 MiB of the guest's RAM.
const STORE_BASE_PFN: u64 = 0x100;
const FRAMES: usize = 512;
const RAM_MIB: u32 = 16;

/// What the engine mapped: page base -> (size, expected flag letters).
type Expected = BTreeMap<u64, (PageSize, u64)>;

fn letters(flags: EntryFlags, size: PageSize) -> String {
    let has = |f: EntryFlags| flags.contains(f);
    [
        (has(EntryFlags::NO_EXECUTE), 'X'),
        (has(EntryFlags::GLOBAL), 'G'),
        (size != PageSize::Size4K, 'P'),
        (has(EntryFlags::DIRTY), 'D'),
        (has(EntryFlags::ACCESSED), 'A'),
        (has(EntryFlags::PCD), 'C'),
        (has(EntryFlags::PWT), 'T'),
        (has(EntryFlags::USER), 'U'),
        (has(EntryFlags::WRITABLE), 'W'),
    ]
    .iter()
    .map(|&(on, c)| if on { c } else { '-' })
    .collect()
}

/// A random space of mode `M`: pages of every size in several regions of
/// both halves (for 5-level, above the 4-level range too), random flags.
fn build<M: PagingMode>(seed: u64) -> (AddressSpace<M, Split, NativeBackend>, Expected) {
    let store = Arc::new(FrameStore::new(FRAMES, STORE_BASE_PFN));
    let backend = Arc::new(NativeBackend::with_memory(store.clone()));
    let s = AddressSpace::new(store, backend, SpaceOptions::default()).unwrap();
    let mut rng = Rng::new(seed);
    let top = M::VA_BITS - 1; // bits of each half
    let mut regions = vec![0x4000_0000u64];
    while regions.len() < 6 {
        let raw = (rng.next() & ((1 << top) - 1)) & !((1 << 30) - 1);
        let va = if rng.chance(40) {
            // The kernel half, sign-extended.
            raw | !((1u64 << top) - 1)
        } else {
            raw
        };
        let slot = M::index(va, M::ROOT_LEVEL);
        if !M::HYPERVISOR_HOLE.contains(&slot) && slot != M::ROOT_ENTRIES - 1 {
            regions.push(va);
        }
    }
    let mut expected = Expected::new();
    for i in 0..400u64 {
        let region = regions[rng.below(regions.len() as u64) as usize];
        let size = match rng.below(20) {
            0 => PageSize::Size1G,
            1..=3 => PageSize::Size2M,
            _ => PageSize::Size4K,
        };
        let va = match size {
            PageSize::Size4K => region + (rng.below(8) << 21) + (rng.below(512) << 12),
            PageSize::Size2M => region + (rng.below(16) << 21),
            PageSize::Size1G => region + (rng.below(4) << 30),
        };
        let pa = (1u64 << 32) + rng.below(1 << 10) * size.bytes();
        let mut flags = EntryFlags::PRESENT;
        for (f, p) in [
            (EntryFlags::WRITABLE, 60),
            (EntryFlags::USER, 50),
            (EntryFlags::NO_EXECUTE, 40),
            (EntryFlags::GLOBAL, 20),
            (EntryFlags::PWT, 15),
            (EntryFlags::PCD, 15),
            (EntryFlags::ACCESSED, 50),
            (EntryFlags::DIRTY, 30),
        ] {
            if rng.chance(p) {
                flags |= f;
            }
        }
        if size != PageSize::Size4K && rng.chance(20) {
            flags |= EntryFlags::PAT_LARGE;
        }
        match s.map(va, pa, size, flags) {
            Ok(()) => {
                let t = s.translate(va).expect("just mapped");
                assert_eq!(t.phys, pa, "page {i}");
                expected.insert(va, (size, t.flags.bits()));
            }
            Err(Error::AlreadyMapped { .. }) => {}
            Err(e) => panic!("map {va:#x} {size:?}: {e:?}"),
        }
    }
    (s, expected)
}

/// The guest-physical image of the table frames.
fn image<M: PagingMode>(s: &AddressSpace<M, Split, NativeBackend>) -> Vec<u8> {
    let store = s.store();
    let mut img = Vec::with_capacity(FRAMES * 4096);
    for i in 0..FRAMES as u64 {
        let f = store.frame(pagepin::Pfn(STORE_BASE_PFN + i)).unwrap();
        for e in f.entries() {
            img.extend_from_slice(&e.load(std::sync::atomic::Ordering::Acquire).to_le_bytes());
        }
    }
    img
}

/// Compare QEMU's walk of `img` with the engine's tables; returns every
/// disagreement (and the counts compared).
fn compare<M: PagingMode>(
    qemu: &std::path::Path,
    s: &AddressSpace<M, Split, NativeBackend>,
    expected: &Expected,
    img: &[u8],
    seed: u64,
) -> (Vec<String>, usize, usize) {
    let la57 = M::LEVELS == 5;
    let mut m = qemu::Machine::start(qemu, RAM_MIB, img, STORE_BASE_PFN << 12);
    m.enter_long_mode(s.root().0 << 12, la57);
    let mut bad = Vec::new();
    let lines = qemu::parse_tlb(&m.hmp("info tlb"));
    let mut seen = BTreeMap::new();
    for l in &lines {
        seen.insert(l.va, l);
        match (expected.get(&l.va), s.translate(l.va)) {
            (Some(&(size, _)), Some(t)) => {
                let want = letters(t.flags, size);
                if l.pa != t.phys || l.flags != want || t.size != size {
                    bad.push(format!(
                        "{:#x}: qemu {:#x} {} engine {:#x} {} ({:?})",
                        l.va, l.pa, l.flags, t.phys, want, t.size
                    ));
                }
            }
            _ => bad.push(format!("{:#x}: qemu maps it, the engine does not", l.va)),
        }
    }
    for va in expected.keys() {
        if !seen.contains_key(va) {
            bad.push(format!("{va:#x}: the engine maps it, qemu does not"));
        }
    }
    // gva2gpa on a sample: inside mapped pages, next to them, random and
    // non-canonical addresses.
    let mut rng = Rng::new(seed ^ 0x9e37);
    let mut probes: Vec<u64> = expected
        .iter()
        .step_by(3)
        .map(|(va, (size, _))| va + rng.below(size.bytes()))
        .collect();
    let keys: Vec<u64> = expected.keys().copied().collect();
    for _ in 0..80 {
        let k = keys[rng.below(keys.len() as u64) as usize];
        probes.push(k.wrapping_add(1 << 30).wrapping_sub(4096));
        probes.push(rng.next());
    }
    let half = 1u64 << (M::VA_BITS - 1);
    probes.extend([half, half - 1, !(half - 1), !(half - 1) - 1, u64::MAX, 0]);
    let n_probes = probes.len();
    for va in probes {
        let want = s.translate(va).map(|t| t.phys);
        let got = m.gva2gpa(va);
        if got != want {
            bad.push(format!("gva2gpa {va:#x}: qemu {got:x?} engine {want:x?}"));
        }
    }
    (bad, lines.len(), n_probes)
}

fn judge<M: PagingMode>(seed: u64) {
    let Some(qemu) = qemu::qemu_or_skip(&format!("{} tables against QEMU's walk", M::NAME)) else {
        return;
    };
    let (s, expected) = build::<M>(seed);
    assert!(expected.len() > 200, "{} pages mapped", expected.len());
    let img = image(&s);
    let (bad, lines, probes) = compare(&qemu, &s, &expected, &img, seed);
    println!(
        "{}: {} pages mapped, {lines} info tlb lines compared, {probes} gva2gpa probes, {} mismatches",
        M::NAME,
        expected.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{}: {:#?}",
        M::NAME,
        &bad[..bad.len().min(10)]
    );

    // Negative controls: one bit flipped in the image QEMU walks.
    let tables = s.table_frames().unwrap();
    let (&leaf_va, _) = expected
        .iter()
        .find(|(_, (size, _))| *size == PageSize::Size4K)
        .expect("a 4 KiB page");
    let l1 = tables
        .iter()
        .find(|(_, l)| *l == pagepin::Level::L1)
        .map(|t| t.0)
        .unwrap();
    // (a) a 4 KiB leaf's present bit; (b) an address bit of an entry in
    // the first L1 (the page it maps moves).
    let leaf_slot = {
        let mut off = None;
        for (pfn, level) in &tables {
            if *level != pagepin::Level::L1 {
                continue;
            }
            let idx = M::index(leaf_va, pagepin::Level::L1);
            let e = s
                .store()
                .entry(*pfn, idx)
                .unwrap()
                .load(std::sync::atomic::Ordering::Acquire);
            let t = s.translate(leaf_va).unwrap();
            if e & 1 != 0 && (e & 0x000f_ffff_ffff_f000) == t.phys {
                off = Some(((pfn.0 - STORE_BASE_PFN) * 4096) as usize + idx * 8);
                break;
            }
        }
        off.expect("the leaf's slot")
    };
    let first_present = (0..512)
        .map(|i| ((l1.0 - STORE_BASE_PFN) * 4096) as usize + i * 8)
        .find(|&o| img[o] & 1 != 0)
        .unwrap();
    for (what, offset, bit) in [
        ("a leaf's present bit cleared", leaf_slot, 0u32),
        ("an address bit of a leaf flipped", first_present, 13),
    ] {
        let mut broken = img.clone();
        broken[offset + (bit / 8) as usize] ^= 1 << (bit % 8);
        let (bad, _, _) = compare(&qemu, &s, &expected, &broken, seed);
        println!(
            "{} negative control ({what}): {} mismatches",
            M::NAME,
            bad.len()
        );
        assert!(!bad.is_empty(), "{}: {what} went unnoticed", M::NAME);
    }
}

#[test]
fn five_level_tables_agree_with_qemu() {
    judge::<La57>(57);
}

#[test]
fn four_level_tables_agree_with_qemu() {
    judge::<X86_64>(48);
}
