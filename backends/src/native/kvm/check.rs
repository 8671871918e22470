//! The check: the engine's view of a space (its tables, `translate`)
//! against the CPU's (`KVM_TRANSLATE`, its walk's writes, probes), step by
//! step.

use std::sync::atomic::Ordering;

use pagepin_engine::{
    AddressSpace, Backend, EntryFlags, Error, Level, LockPolicy, PageSize, PagingMode, Pfn, X86_64,
};
use pagepin_engine::{ENTRIES_PER_FRAME, FRAME_SIZE};

use crate::SplitMix64;

use super::memory::{frame_gpa, machine_address, GuestMemory};
use super::probe::{expected_outcome, Probe, ProbeResult};
use super::system::KvmChecker;
use super::vm::{store_frames, Machine, MemoryPlan};
use super::walk::{self, Leaf};
use super::KvmError;

/// A difference between pagepin and the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// `KVM_TRANSLATE` and pagepin disagree on an address.
    Translation {
        /// The address.
        va: u64,
        /// pagepin's machine address (`None`: unmapped).
        pagepin: Option<u64>,
        /// The CPU's guest-physical address (`None`: invalid).
        cpu: Option<u64>,
    },
    /// A table entry of the guest copy differs from the store in more
    /// than the accessed/dirty bits after the CPU walked it.
    TableEntry {
        /// The table frame.
        pfn: Pfn,
        /// The entry index.
        index: usize,
        /// The store's entry.
        store: u64,
        /// The guest copy's entry.
        guest: u64,
    },
    /// A probe's outcome differs from the prediction.
    Probe(ProbeResult),
}

/// Options of one check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Guest accesses to run (their target pages are backed with memory).
    pub probes: Vec<Probe>,
    /// Random canonical addresses to translate besides the mapped pages.
    pub random_samples: usize,
    /// Seed for the random addresses.
    pub seed: u64,
    /// Negative control: XOR this mask into the guest's copy of the first
    /// 4 KiB leaf, so the CPU sees different tables than pagepin (the
    /// report must then show mismatches). `0` in real checks.
    #[doc(hidden)]
    pub corrupt_copy: u64,
}

/// What one check compared and found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// The free root slot the checker's own pages went through.
    pub checker_slot: usize,
    /// Leaves (mapped pages) found in the space, by size: 4K, 2M, 1G.
    pub leaves: [usize; 3],
    /// Addresses inside mapped pages compared (translated by both).
    pub mapped_compared: usize,
    /// Addresses pagepin says are unmapped that the CPU was asked about.
    pub unmapped_compared: usize,
    /// 1 GiB leaves not compared because the vCPU lacks 1 GiB pages.
    pub skipped_1g: usize,
    /// Table entries the CPU's walk marked accessed.
    pub accessed_bits_set: usize,
    /// Table entries compared after the walks.
    pub entries_compared: usize,
    /// Every probe with its prediction and outcome.
    pub probes: Vec<ProbeResult>,
    /// Every disagreement.
    pub mismatches: Vec<Mismatch>,
}

impl KvmChecker {
    /// Check `space` (see the [module docs](super)).
    pub fn check_space<P: LockPolicy, B: Backend>(
        &self,
        space: &AddressSpace<X86_64, P, B>,
        options: &CheckOptions,
    ) -> Result<CheckReport, KvmError> {
        let backend: &B = space.backend();
        let leaves = walk::leaves(space).map_err(KvmError::Malformed)?;
        let slot = free_root_slot(space)?;
        let plan = MemoryPlan::new(space, &options.probes, slot)?;
        let mem = plan.back(space);
        if options.corrupt_copy != 0 {
            corrupt_first_4k_leaf(&mem, backend, &leaves, options.corrupt_copy);
        }
        let cr3 = frame_gpa(backend, space.root());
        let mut check = Check {
            space,
            leaves: &leaves,
            machine: Machine::boot(self, mem, cr3, plan.region)?,
            slot,
            report: CheckReport {
                checker_slot: slot,
                leaves: count_by_size(&leaves),
                ..Default::default()
            },
        };
        check.compare_translations(options, self.page_1g)?;
        check.compare_entries();
        check.run_probes(&options.probes, &plan.probe_targets)?;
        Ok(check.report)
    }
}

/// The highest root slot the space leaves free, for the checker's own
/// pages.
fn free_root_slot<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
) -> Result<usize, KvmError> {
    let root = space
        .store()
        .frame(space.root())
        .ok_or(KvmError::Malformed(Error::NoTable {
            va: 0,
            level: X86_64::ROOT_LEVEL,
        }))?;
    (0..ENTRIES_PER_FRAME)
        .rev()
        .find(|&i| root.entry(i).load(Ordering::Acquire) & EntryFlags::PRESENT.bits() == 0)
        .ok_or(KvmError::NoFreeRootSlot)
}

/// Leaves by size: 4K, 2M, 1G (the order of [`CheckReport::leaves`]).
fn count_by_size(leaves: &[Leaf]) -> [usize; 3] {
    let mut counts = [0; 3];
    for leaf in leaves {
        counts[leaf.size.level().number() as usize - 1] += 1;
    }
    counts
}

/// Negative control: XOR `mask` into the guest's copy of the first 4 KiB
/// leaf entry.
fn corrupt_first_4k_leaf<B: Backend>(mem: &GuestMemory, backend: &B, leaves: &[Leaf], mask: u64) {
    if let Some(leaf) = leaves.iter().find(|l| l.size == PageSize::Size4K) {
        let gpa = frame_gpa(backend, leaf.table) + 8 * leaf.index as u64;
        let v = mem.read_u64(gpa).expect("table copy is backed");
        mem.write_u64(gpa, v ^ mask);
    }
}

/// One check in progress: the space, the VM running on its copy, and what
/// was found so far.
struct Check<'a, P: LockPolicy, B: Backend> {
    space: &'a AddressSpace<X86_64, P, B>,
    leaves: &'a [Leaf],
    machine: Machine,
    /// The root slot of the checker's region (not the space's).
    slot: usize,
    report: CheckReport,
}

impl<P: LockPolicy, B: Backend> Check<'_, P, B> {
    /// Step 1: translate every mapped page's base, a random inner address
    /// and its last byte, its neighbours, and random addresses, with both
    /// pagepin and the CPU.
    fn compare_translations(
        &mut self,
        options: &CheckOptions,
        page_1g: bool,
    ) -> Result<(), KvmError> {
        let mut rng = SplitMix64::new(options.seed);
        for leaf in self.leaves {
            let (va, bytes) = (leaf.va, leaf.size.bytes());
            if leaf.size == PageSize::Size1G && !page_1g {
                self.report.skipped_1g += 1;
                continue;
            }
            let inner = va + (rng.next() % bytes);
            for a in [va, inner, va + bytes - 1] {
                self.compare_translation(a)?;
            }
            // The neighbours may be unmapped: both must agree either way.
            for a in [va.wrapping_sub(FRAME_SIZE as u64), va + bytes] {
                let a = canonical(a);
                if X86_64::is_canonical(a) {
                    self.compare_translation(a)?;
                }
            }
        }
        for _ in 0..options.random_samples {
            let r = rng.next();
            // Half the samples near the low end of each half, where maps live.
            let va = if r & 1 == 0 {
                canonical(r >> 1)
            } else {
                canonical((r >> 16) & ((1 << 40) - 1))
            };
            self.compare_translation(va & !7)?;
        }
        Ok(())
    }

    /// Compare pagepin's and the CPU's translation of `va` (addresses in
    /// the checker's slot are the checker's, not the space's: skipped).
    fn compare_translation(&mut self, va: u64) -> Result<(), KvmError> {
        if X86_64::index(va, Level::L4) == self.slot {
            return Ok(());
        }
        let backend: &B = self.space.backend();
        let ours = self
            .space
            .translate(va)
            .map(|t| machine_address(backend, t.phys));
        let cpu = self.machine.vcpu.translate(va)?;
        match ours {
            Some(_) => self.report.mapped_compared += 1,
            None => self.report.unmapped_compared += 1,
        }
        if ours != cpu {
            self.report.mismatches.push(Mismatch::Translation {
                va,
                pagepin: ours,
                cpu,
            });
        }
        Ok(())
    }

    /// Step 2: every entry of every table frame against the guest's copy,
    /// which the CPU's walks have written to; only A/D may differ.
    fn compare_entries(&mut self) {
        let ad = EntryFlags::ACCESSED.bits() | EntryFlags::DIRTY.bits();
        let store = self.space.store();
        let backend: &B = self.space.backend();
        for pfn in store_frames(store) {
            let Some(meta) = store.meta(pfn) else {
                continue;
            };
            if meta.level().is_none() {
                continue;
            }
            let frame = store.frame(pfn).expect("frame in range");
            for index in 0..ENTRIES_PER_FRAME {
                if pfn == self.space.root() && index == self.slot {
                    continue;
                }
                let ours = frame.entry(index).load(Ordering::Acquire);
                let guest = self
                    .machine
                    .mem
                    .read_u64(frame_gpa(backend, pfn) + 8 * index as u64)
                    .expect("table copy is backed");
                self.report.entries_compared += 1;
                if (ours ^ guest) & !ad != 0 {
                    self.report.mismatches.push(Mismatch::TableEntry {
                        pfn,
                        index,
                        store: ours,
                        guest,
                    });
                } else if ours & EntryFlags::ACCESSED.bits() == 0
                    && guest & EntryFlags::ACCESSED.bits() != 0
                {
                    self.report.accessed_bits_set += 1;
                }
            }
        }
    }

    /// Step 3: run each probe against its target (`targets`, from the
    /// memory plan) and compare with pagepin's prediction.
    fn run_probes(&mut self, probes: &[Probe], targets: &[Option<u64>]) -> Result<(), KvmError> {
        for (&probe, &target) in probes.iter().zip(targets) {
            let translation = self.space.translate(probe.va);
            // Rights matter only where pagepin translates, and there the
            // walk found the leaf.
            let rights = walk::leaf_at(self.leaves, probe.va).map(|l| l.rights);
            let (writable, nx) = rights.map_or((true, false), |r| (r.writable, r.no_execute));
            let expected = expected_outcome(probe, translation, writable, nx);
            let seen = self
                .machine
                .vcpu
                .run_probe(&self.machine.mem, probe, target)?;
            let result = ProbeResult {
                probe,
                expected,
                seen,
            };
            if expected != seen {
                self.report.mismatches.push(Mismatch::Probe(result));
            }
            self.report.probes.push(result);
        }
        Ok(())
    }
}

/// `va` sign-extended from bit 47.
fn canonical(va: u64) -> u64 {
    ((va << 16) as i64 >> 16) as u64
}
