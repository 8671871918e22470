//! Native x86-64 tables checked against the CPU's page walk in KVM.
//!
//! Runs whenever `/dev/kvm` opens and a VM can be created; otherwise
//! prints one line `SKIP: kvm unavailable (<reason>)` and passes.
#![cfg(target_os = "linux")]

#[path = "support/native.rs"]
mod native_support;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};

use native_support::{random_space, snapshot, Mapped, Rng, Shape};
use pagepin::backends::native::kvm::{
    self, pf, Access, CheckOptions, CheckReport, KvmChecker, Mismatch, Probe, ProbeOutcome,
};
use pagepin::backends::native::NativeBackend;
use pagepin::{AddressSpace, EntryFlags, PageSize, Split, X86_64};

type Space = AddressSpace<X86_64, Split, NativeBackend>;

/// The checker, or `None` after printing the skip line (once per process).
fn checker() -> Option<KvmChecker> {
    static SKIP: Once = Once::new();
    let reason = match kvm::unavailable_reason() {
        None => match KvmChecker::open() {
            Ok(c) => return Some(c),
            Err(e) => e.to_string(),
        },
        Some(r) => r,
    };
    SKIP.call_once(|| {
        // Straight to the process's stdout, past the test harness's capture.
        let _ = writeln!(std::io::stdout(), "SKIP: kvm unavailable ({reason})");
    });
    None
}

/// Probes that cover every outcome the space allows: loads and stores
/// through 4 KiB and 2 MiB pages, stores to read-only pages, jumps into
/// NX and executable pages, and accesses to unmapped addresses.
fn probes_for(space: &Space, mapped: &[Mapped], rng: &mut Rng) -> Vec<Probe> {
    let mut probes = Vec::new();
    let pick = |pred: &dyn Fn(&Mapped) -> bool,
                access: Access,
                n: usize,
                probes: &mut Vec<Probe>,
                rng: &mut Rng| {
        let cands: Vec<&Mapped> = mapped.iter().filter(|m| pred(m)).collect();
        for _ in 0..n.min(cands.len()) {
            let m = cands[rng.below(cands.len() as u64) as usize];
            let off = rng.below(m.size.bytes()) & !7;
            probes.push(Probe {
                va: m.va + off,
                access,
            });
        }
    };
    let small = |m: &Mapped| m.size == PageSize::Size4K;
    let large = |m: &Mapped| m.size == PageSize::Size2M;
    let w = |m: &Mapped| m.flags.contains(EntryFlags::WRITABLE);
    let nx = |m: &Mapped| m.flags.contains(EntryFlags::NO_EXECUTE);
    pick(&|m| small(m), Access::Read, 4, &mut probes, rng);
    pick(&|m| large(m), Access::Read, 2, &mut probes, rng);
    pick(&|m| small(m) && w(m), Access::Write, 4, &mut probes, rng);
    pick(&|m| large(m) && w(m), Access::Write, 2, &mut probes, rng);
    pick(&|m| small(m) && !w(m), Access::Write, 3, &mut probes, rng);
    pick(&|m| large(m) && !w(m), Access::Write, 1, &mut probes, rng);
    pick(&|m| small(m) && nx(m), Access::Execute, 3, &mut probes, rng);
    pick(&|m| large(m) && nx(m), Access::Execute, 1, &mut probes, rng);
    pick(
        &|m| small(m) && !nx(m),
        Access::Execute,
        3,
        &mut probes,
        rng,
    );
    pick(
        &|m| large(m) && !nx(m),
        Access::Execute,
        1,
        &mut probes,
        rng,
    );
    // Unmapped addresses (pagepin says so; checked again by the checker).
    let mut unmapped = 0;
    while unmapped < 3 {
        let va = native_support::slot_va(rng.below(511), rng.next()) & !7;
        if space.translate(va).is_none() {
            probes.push(Probe {
                va,
                access: [Access::Read, Access::Write, Access::Execute][unmapped],
            });
            unmapped += 1;
        }
    }
    probes
}

fn fault_codes(report: &CheckReport) -> BTreeSet<u64> {
    report
        .probes
        .iter()
        .filter_map(|p| match p.seen {
            ProbeOutcome::PageFault { error_code, .. } => Some(error_code),
            _ => None,
        })
        .collect()
}

#[test]
fn random_spaces_match_the_cpu() {
    let Some(checker) = checker() else { return };
    let started = std::time::Instant::now();
    let mut totals = [0usize; 5];
    let mut codes = BTreeSet::new();
    for seed in [1u64, 2, 3, 0xfeed] {
        let mut rng = Rng::new(seed);
        let backend = Arc::new(NativeBackend::new());
        let shape = Shape {
            pages_4k: 300,
            pages_2m: 40,
            pages_1g: 0,
            regions: 6,
        };
        let (space, mapped): (Space, _) = random_space(backend.clone(), 1024, shape, &mut rng);
        assert!(
            mapped.len() > 250,
            "seed {seed}: only {} mappings",
            mapped.len()
        );
        let n4k = mapped.iter().filter(|m| m.size == PageSize::Size4K).count();
        let n2m = mapped.len() - n4k;
        assert!(n2m >= 20, "seed {seed}: only {n2m} 2 MiB pages");
        // Native stores are accounted: one invalidation per changed entry.
        let c = backend.counters();
        assert_eq!(c.invalidations, c.stores - c.unchanged_stores);
        assert!(c.stores as usize >= mapped.len());

        let before = snapshot(space.store());
        let probes = probes_for(&space, &mapped, &mut rng);
        let opts = CheckOptions {
            probes,
            random_samples: 2000,
            seed,
            ..Default::default()
        };
        let report = checker.check_space(&space, &opts).expect("KVM check runs");
        assert_eq!(
            snapshot(space.store()),
            before,
            "the check must not touch the space"
        );

        assert!(
            report.mismatches.is_empty(),
            "seed {seed}: {:#x?}",
            &report.mismatches[..report.mismatches.len().min(8)]
        );
        assert_eq!(
            report.leaves,
            [n4k, n2m, 0],
            "seed {seed}: leaves found by the checker"
        );
        assert!(
            report.mapped_compared >= 3 * mapped.len(),
            "seed {seed}: {report:?}"
        );
        assert!(report.unmapped_compared >= 1000, "seed {seed}: {report:?}");
        assert!(report.entries_compared > 0);
        // Leaves mapped without A got it from the CPU's walk.
        let without_a = mapped
            .iter()
            .filter(|m| !m.flags.contains(EntryFlags::ACCESSED))
            .count();
        assert!(
            report.accessed_bits_set >= without_a,
            "seed {seed}: {} < {without_a}",
            report.accessed_bits_set
        );
        assert!(report.probes.len() >= 20);
        totals[0] += report.mapped_compared;
        totals[1] += report.unmapped_compared;
        totals[2] += report.probes.len();
        totals[3] += report.entries_compared;
        totals[4] += report.accessed_bits_set;
        codes.extend(fault_codes(&report));
        for p in &report.probes {
            if let ProbeOutcome::PageFault { cr2, .. } = p.seen {
                assert_eq!(cr2, p.probe.va, "CR2 is the probed address");
            }
        }
    }
    // Every kind of fault was seen: not present (read, write, fetch),
    // write to read-only, fetch from NX.
    for code in [
        0,
        pf::WRITE,
        pf::FETCH,
        pf::PRESENT | pf::WRITE,
        pf::PRESENT | pf::FETCH,
    ] {
        assert!(
            codes.contains(&code),
            "fault code {code:#x} never seen: {codes:x?}"
        );
    }
    let _ = writeln!(
        std::io::stdout(),
        "kvm: {} mapped + {} unmapped translations, {} probes, {} entries compared, {} A bits set, fault codes {:x?}, {:?}",
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4],
        codes,
        started.elapsed()
    );
}

#[test]
fn outcomes_cover_loads_stores_and_execution() {
    let Some(checker) = checker() else { return };
    let backend = Arc::new(NativeBackend::new());
    let store = Arc::new(pagepin::FrameStore::new(64, native_support::STORE_BASE_PFN));
    let space: Space = AddressSpace::new(store, backend, Default::default()).unwrap();
    let rw = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::NO_EXECUTE;
    let ro_x = EntryFlags::PRESENT;
    let va4 = 0x4000_0000u64;
    let va2 = 0xffff_c000_0020_0000u64;
    space.map(va4, 0x1_0000_0000, PageSize::Size4K, rw).unwrap();
    space
        .map(va4 + 0x1000, 0x1_0000_1000, PageSize::Size4K, ro_x)
        .unwrap();
    space.map(va2, 0x1_0040_0000, PageSize::Size2M, rw).unwrap();
    let probes = vec![
        Probe {
            va: va4 + 8,
            access: Access::Read,
        },
        Probe {
            va: va4 + 16,
            access: Access::Write,
        },
        Probe {
            va: va4 + 0x1ff8,
            access: Access::Write,
        },
        Probe {
            va: va4 + 0x1010,
            access: Access::Execute,
        },
        Probe {
            va: va4 + 0x20,
            access: Access::Execute,
        },
        Probe {
            va: va2 + 0x1f_fff8,
            access: Access::Write,
        },
        Probe {
            va: va2 + 0x12_3450,
            access: Access::Read,
        },
        Probe {
            va: va2 + 0x40_0000,
            access: Access::Read,
        },
    ];
    let report = checker
        .check_space(
            &space,
            &CheckOptions {
                probes,
                ..Default::default()
            },
        )
        .unwrap();
    let seen: Vec<ProbeOutcome> = report.probes.iter().map(|p| p.seen).collect();
    assert_eq!(
        seen,
        [
            ProbeOutcome::Loaded(kvm::sentinel(va4 + 8)),
            ProbeOutcome::Stored,
            ProbeOutcome::PageFault {
                cr2: va4 + 0x1ff8,
                error_code: pf::PRESENT | pf::WRITE
            },
            ProbeOutcome::Executed,
            ProbeOutcome::PageFault {
                cr2: va4 + 0x20,
                error_code: pf::PRESENT | pf::FETCH
            },
            ProbeOutcome::Stored,
            ProbeOutcome::Loaded(kvm::sentinel(va2 + 0x12_3450)),
            ProbeOutcome::PageFault {
                cr2: va2 + 0x40_0000,
                error_code: 0
            },
        ]
    );
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
}

/// Negative control: when the CPU's tables differ from pagepin's by one
/// frame bit, the checker reports it (so the comparison above can fail).
#[test]
fn a_corrupted_copy_is_reported() {
    let Some(checker) = checker() else { return };
    let mut rng = Rng::new(7);
    let shape = Shape {
        pages_4k: 40,
        pages_2m: 4,
        pages_1g: 0,
        regions: 2,
    };
    let (space, _): (Space, _) = random_space(Arc::new(NativeBackend::new()), 256, shape, &mut rng);
    let opts = CheckOptions {
        corrupt_copy: 1 << 12,
        seed: 7,
        ..Default::default()
    };
    let report = checker.check_space(&space, &opts).unwrap();
    let translations = report
        .mismatches
        .iter()
        .filter(|m| matches!(m, Mismatch::Translation { .. }))
        .count();
    let entries = report
        .mismatches
        .iter()
        .filter(|m| matches!(m, Mismatch::TableEntry { .. }))
        .count();
    assert_eq!(
        translations, 3,
        "base, inner and last byte of the corrupted page: {:?}",
        report.mismatches
    );
    assert_eq!(entries, 1, "{:?}", report.mismatches);
}

/// Reserved bits: the CPU refuses a leaf with address bits above its
/// MAXPHYADDR, and a 2 MiB leaf with bits 13..=20 set; pagepin's translate
/// must not report a translation the CPU would not make.
#[test]
fn reserved_bits_agree_with_the_cpu() {
    let Some(checker) = checker() else { return };
    let store = Arc::new(pagepin::FrameStore::new(64, native_support::STORE_BASE_PFN));
    let space: Space =
        AddressSpace::new(store, Arc::new(NativeBackend::new()), Default::default()).unwrap();
    let f = EntryFlags::PRESENT | EntryFlags::WRITABLE;
    let va4 = 0x4000_0000u64;
    let va2 = 0x8000_0000u64;
    space.map(va4, 0x1_0000_0000, PageSize::Size4K, f).unwrap();
    space.map(va2, 0x1_0020_0000, PageSize::Size2M, f).unwrap();
    // Bit 51 in the 4 KiB leaf (reserved on every CPU: MAXPHYADDR <= 52
    // and pagepin models 46); bit 13 in the 2 MiB leaf.
    space
        .set_pte(
            va4,
            pagepin::PageTableEntry::from_bits((1 << 51) | 0x1_0000_0000 | f.bits()),
            pagepin::WritePath::Store,
        )
        .unwrap();
    // The 2 MiB leaf: find its L2 slot by hand and set bit 13 of it.
    let store = space.store();
    let mut pfn = space.root();
    for level in [pagepin::Level::L4, pagepin::Level::L3] {
        let e = store
            .entry(pfn, <X86_64 as pagepin::PagingMode>::index(va2, level))
            .unwrap()
            .load(Ordering::Acquire);
        pfn = pagepin::Pfn(pagepin::PageTableEntry::from_bits(e).frame());
    }
    let slot = store
        .entry(
            pfn,
            <X86_64 as pagepin::PagingMode>::index(va2, pagepin::Level::L2),
        )
        .unwrap();
    slot.fetch_or(1 << 13, Ordering::AcqRel);
    assert_eq!(space.translate(va2), None, "2 MiB leaf with bit 13 set");
    assert_eq!(space.translate(va4), None, "4 KiB leaf with bit 51 set");
    let report = checker
        .check_space(&space, &CheckOptions::default())
        .unwrap();
    assert_eq!(report.leaves, [1, 1, 0]);
    assert!(report.unmapped_compared >= 6, "{report:?}");
    let cpu_refuses: Vec<u64> = report
        .mismatches
        .iter()
        .filter_map(|m| match *m {
            Mismatch::Translation { va, cpu: None, .. } => Some(va),
            _ => None,
        })
        .collect();
    assert!(
        report.mismatches.is_empty(),
        "pagepin translates what the CPU refuses at {cpu_refuses:#x?}: {:#x?}",
        report.mismatches
    );
}
