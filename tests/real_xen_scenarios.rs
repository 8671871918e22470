//! pagepin inside a real Xen PV guest, and the simulator held to what real
//! Xen answers.
//!
//! `guest_on_real_xen` builds the test guest (`xen-guest/`), boots Xen 4.17
//! with it as dom0 in QEMU (TCG), parses the guest's scenario lines, fails
//! on a failed scenario, a Xen or guest panic or a hang, then runs the same
//! scenarios (`xen-guest/src/scenarios.rs`, included below) against
//! `XenSim` and requires identical per-entry results, page states and
//! counts. Without QEMU or Xen it prints one `SKIP:` line and passes,
//! unless `CI=true`, where it fails.
//!
//! `scenarios_on_the_simulator` runs the scenarios against the simulator
//! alone, everywhere.

extern crate alloc;

#[path = "support/real_xen.rs"]
mod real_xen;
#[path = "support/sim_dom0.rs"]
mod sim_dom0;
use sim_dom0::{Dom0, SimH, SimPlatform, BOOT_ALIAS_VA, DATA_BASE};
#[allow(dead_code)]
#[path = "../xen-guest/src/scenarios.rs"]
mod scenarios;
use real_xen::{available_or_skip, boot, build_guest, one_at_a_time, xen_elf, BootOptions};

use std::collections::BTreeMap;
use std::time::Duration;

use pagepin_engine::SpinLock;
use pagepin_engine::{
    AddressSpace, Batch, EntryFlags, Mfn, PageSize, PageTableEntry, Pfn, SpaceOptions, Split,
    WritePath, X86_64,
};
use scenarios::{Platform, Report, MAGIC, MAGIC_PAGE};

/// How long the whole boot may take before it counts as a hang.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Scenario lines the guest must print.
const SCENARIOS: usize = 6;

// ---------------------------------------------------------------------------
// the simulator as a platform

/// The part of the guest's layout scenario 3 clones.
struct Layout {
    span: (u64, u64),
    /// Pages of the span the guest's layout leaves out.
    holes: Vec<u64>,
}

type Sim = SimPlatform<Layout>;

impl Sim {
    /// A simulated dom0 like the real one running on a pinned "boot" space,
    /// with scenario 3 cloning `span`.
    fn new(span: (u64, u64), holes: Vec<u64>) -> Sim {
        let dom = Dom0::new(1, 0);
        dom.rec.set_recording(true);
        SimPlatform {
            dom,
            own: Layout { span, holes },
        }
    }
}

impl Platform for Sim {
    sim_dom0::dom0_platform!();
    fn kernel_layout(&self) -> Vec<(u64, Pfn, EntryFlags)> {
        let Layout { span, holes } = &self.own;
        (span.0..span.1)
            .step_by(4096)
            .filter(|va| !holes.contains(va))
            .map(|va| {
                (
                    va,
                    Pfn(va >> 12),
                    EntryFlags::PRESENT
                        | EntryFlags::WRITABLE
                        | EntryFlags::USER
                        | EntryFlags::ACCESSED,
                )
            })
            .collect()
    }
    fn read_current(&self, _va: u64, root: Mfn, expect: Option<Pfn>) -> Option<u64> {
        // The simulator cannot execute a load: the word is the magic one
        // when the loaded base pointer is the space's root and the space
        // maps the address to the magic page.
        (self.sim.base_pointer(0) == Some(root) && expect == Some(self.data_pfn(MAGIC_PAGE)))
            .then_some(MAGIC)
    }
    fn alias_writable(&self, victim: Pfn) -> u64 {
        self.rec.set_recording(false);
        let mfn = self.sim.mfn_of(victim).expect("victim mfn");
        let e = PageTableEntry::new(
            mfn.0,
            EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::ACCESSED | EntryFlags::DIRTY,
        );
        self.boot
            .set_pte(BOOT_ALIAS_VA, e, WritePath::Hypercall)
            .expect("alias");
        self.rec.set_recording(true);
        0
    }
    fn unalias(&self, _token: u64) {
        self.rec.set_recording(false);
        let mfn = self.sim.mfn_of(Pfn(DATA_BASE + 100)).expect("mfn");
        let e = PageTableEntry::new(
            mfn.0,
            EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER,
        );
        self.boot
            .set_pte(BOOT_ALIAS_VA, e, WritePath::Hypercall)
            .expect("unalias");
        self.rec.set_recording(true);
    }
}

fn run_sim(span: (u64, u64), holes: &[u64]) -> (bool, Vec<Report>) {
    let sim = Sim::new(span, holes.to_vec());
    let mut reports = Vec::new();
    let all = scenarios::run_all(&sim, &mut |r| reports.push(r.clone()));
    let breaks = sim.sim.stats().invariant_breaks;
    assert_eq!(breaks, 0, "the simulator's invariant broke");
    (all, reports)
}

#[test]
fn scenarios_on_the_simulator() {
    let _one_at_a_time = one_at_a_time();
    let (all, reports) = run_sim((0, 0x40_0000), &[]);
    for r in &reports {
        println!("{}", r.line());
    }
    assert_eq!(reports.len(), SCENARIOS);
    assert!(all, "a scenario failed on the simulator");
}

// ---------------------------------------------------------------------------
// real Xen

fn fields(line: &str) -> (String, BTreeMap<String, String>) {
    let (name, f) = scenarios::parse_line(line).expect("scenario line");
    (name, f.into_iter().collect())
}

#[test]
fn guest_on_real_xen() {
    let _one_at_a_time = one_at_a_time();
    if !available_or_skip("the guest scenarios") {
        return;
    }
    let guest = build_guest();
    let xen = xen_elf();
    let b = boot(
        &xen,
        &guest,
        &BootOptions {
            vcpus: 1,
            args: "",
            modules: &[],
            timeout: BOOT_TIMEOUT,
            echo: false,
        },
    );
    let console = b.console();
    println!(
        "boot took {:.2} s, QEMU status {:?}",
        b.elapsed.as_secs_f64(),
        b.status
    );
    let ours: Vec<&String> = b
        .lines
        .iter()
        .filter(|l| l.starts_with("PAGEPIN"))
        .collect();
    for l in &ours {
        println!("{l}");
    }
    b.assert_alive(BOOT_TIMEOUT);
    let xen_lines: Vec<(String, BTreeMap<String, String>)> = b
        .lines
        .iter()
        .filter(|l| l.starts_with(scenarios::LINE_PREFIX))
        .map(|l| fields(l))
        .collect();
    assert_eq!(xen_lines.len(), SCENARIOS, "scenario lines:\n{console}");
    for (name, f) in &xen_lines {
        assert_eq!(
            f.get("verdict").map(String::as_str),
            Some("pass"),
            "scenario {name} failed on real Xen: {f:?}"
        );
    }
    b.assert_passed();

    // The same scenarios on the simulator, with the guest's layout.
    let span = xen_lines
        .iter()
        .find(|(n, _)| n == "base_pointer")
        .and_then(|(_, f)| f.get("info"))
        .and_then(|i| i.split(',').find_map(|kv| kv.strip_prefix("span=")))
        .and_then(|s| s.split_once('-'))
        .map(|(a, b)| {
            let p = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).expect("hex");
            (p(a), p(b))
        })
        .expect("guest reports its span");
    let holes: Vec<u64> = xen_lines
        .iter()
        .find(|(n, _)| n == "base_pointer")
        .and_then(|(_, f)| f.get("info"))
        .and_then(|i| i.split(',').find_map(|kv| kv.strip_prefix("holes=")))
        .filter(|h| *h != "-")
        .map(|h| {
            h.split(';')
                .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).expect("hex"))
                .collect()
        })
        .unwrap_or_default();
    let (_, sim_reports) = run_sim(span, &holes);
    let mut diffs = Vec::new();
    for ((name, xf), sr) in xen_lines.iter().zip(&sim_reports) {
        let (sname, sf) = fields(&sr.line());
        assert_eq!(name, &sname);
        for key in ["verdict", "results", "states", "counts"] {
            if xf.get(key) != sf.get(key) {
                diffs.push(format!(
                    "{name}.{key}:\n  xen: {}\n  sim: {}",
                    xf.get(key).map_or("-", String::as_str),
                    sf.get(key).map_or("-", String::as_str)
                ));
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "simulator differs from real Xen:\n{}",
        diffs.join("\n")
    );
}

/// Found by holding the simulator to real Xen (scenario 2): Xen 4.17 stores
/// a 64-bit PV guest's USER leaf with GLOBAL added and marks a kernel leaf
/// USER | GUEST_KERNEL (bit 52), on `mmu_update` and on emulated stores.
#[test]
fn simulator_adjusts_pv_entries_like_xen() {
    let _one_at_a_time = one_at_a_time();
    let sim = Sim::new((0, 0), Vec::new());
    let s: AddressSpace<X86_64, Split<SpinLock>, scenarios::Backend<SimH>> = AddressSpace::new(
        sim.store.clone(),
        sim.backend.clone(),
        SpaceOptions::default(),
    )
    .expect("space");
    let va = 0x4000_0000;
    let user = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::USER | EntryFlags::ACCESSED;
    s.map(va, sim.data_pfn(0).0 << 12, PageSize::Size4K, user)
        .expect("map");
    s.pin(&mut Batch::<32>::new()).expect("pin");
    let mfn = sim.sim.mfn_of(sim.data_pfn(1)).expect("mfn").0;
    for path in [WritePath::Hypercall, WritePath::Store] {
        s.set_pte(va, PageTableEntry::new(mfn, user), path)
            .expect("user leaf");
        assert_eq!(
            s.read_pte(va).expect("read").bits(),
            PageTableEntry::new(mfn, user | EntryFlags::GLOBAL).bits(),
            "{path:?}"
        );
        let kernel = EntryFlags::PRESENT | EntryFlags::WRITABLE | EntryFlags::ACCESSED;
        s.set_pte(va, PageTableEntry::new(mfn, kernel), path)
            .expect("kernel leaf");
        assert_eq!(
            s.read_pte(va).expect("read").bits(),
            PageTableEntry::new(mfn, kernel | EntryFlags::USER).bits() | (1 << 52),
            "{path:?}"
        );
    }
    s.unpin(&mut Batch::<32>::new()).expect("unpin");
}
