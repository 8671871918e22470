//! The VM and its memory: which guest-physical ranges are backed, the copy
//! of the space's tables, the checker's region mapped through a free root
//! slot, and the VM booted on them.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use pagepin_engine::FRAME_SIZE;
use pagepin_engine::{
    AddressSpace, Backend, EntryFlags, FrameStore, LockPolicy, PageSize, PageTableEntry, Pfn,
    RawLock, X86_64,
};

use super::memory::{frame_gpa, machine_address, CheckerRegion, GuestMemory};
use super::probe::{self, Probe};
use super::system::KvmChecker;
use super::vcpu::{self, Vcpu};
use super::{kvm_err, KvmError};

/// Every frame of `store`, table or not.
pub(super) fn store_frames<L: RawLock>(store: &FrameStore<L>) -> impl Iterator<Item = Pfn> {
    let base = store.base().0;
    (base..base + store.len() as u64).map(Pfn)
}

/// Where the guest's memory goes, and the machine address of each probe.
pub(super) struct MemoryPlan {
    /// Page-aligned guest-physical ranges to back (they may touch).
    ranges: Vec<(u64, u64)>,
    /// Each probe's machine address (`None`: pagepin says unmapped).
    pub(super) probe_targets: Vec<Option<u64>>,
    /// The checker's own pages.
    pub(super) region: CheckerRegion,
}

impl MemoryPlan {
    /// Plan the memory of a check of `space` with the checker mapped
    /// through root slot `slot`: the store's frames at their machine
    /// addresses, every probe's target page, then the checker's region
    /// 2 MiB-aligned above everything else.
    pub(super) fn new<P: LockPolicy, B: Backend>(
        space: &AddressSpace<X86_64, P, B>,
        probes: &[Probe],
        slot: usize,
    ) -> Result<Self, KvmError> {
        let backend: &B = space.backend();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut table_pages: BTreeSet<u64> = BTreeSet::new();
        for pfn in store_frames(space.store()) {
            let gpa = frame_gpa(backend, pfn);
            table_pages.insert(gpa);
            ranges.push((gpa, gpa + FRAME_SIZE as u64));
        }
        let mut probe_targets = Vec::with_capacity(probes.len());
        for probe in probes {
            let target = probe_target(space, &table_pages, probe)?;
            if let Some(t) = target {
                ranges.push(t.page);
            }
            probe_targets.push(target.map(|t| t.address));
        }
        let top = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let gpa = (top + (2 << 20) - 1) & !((2 << 20) - 1);
        let region = CheckerRegion::new(gpa, slot);
        ranges.push((gpa, gpa + CheckerRegion::BYTES));
        Ok(MemoryPlan {
            ranges,
            probe_targets,
            region,
        })
    }

    /// Host memory for the plan, holding a copy of `space`'s store and the
    /// checker's region (linked into the copy of the root only).
    pub(super) fn back<P: LockPolicy, B: Backend>(
        &self,
        space: &AddressSpace<X86_64, P, B>,
    ) -> GuestMemory {
        let backend: &B = space.backend();
        let mem = GuestMemory::new(self.ranges.clone());
        copy_store(&mem, space.store(), backend);
        install_region(&mem, self.region, frame_gpa(backend, space.root()));
        mem
    }
}

/// Where pagepin says a probe's access lands.
#[derive(Clone, Copy)]
struct ProbeTarget {
    /// The machine address.
    address: u64,
    /// The page holding it, `(start, end)`: backed so the access has
    /// memory to hit.
    page: (u64, u64),
}

/// Where `probe` lands, or `None` if pagepin says its address is
/// unmapped. The target page must not overlap the tables.
fn probe_target<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
    table_pages: &BTreeSet<u64>,
    probe: &Probe,
) -> Result<Option<ProbeTarget>, KvmError> {
    let Some(t) = space.translate(probe.va) else {
        return Ok(None);
    };
    if t.size == PageSize::Size1G {
        return Err(KvmError::ProbeOn1G { va: probe.va });
    }
    let backend: &B = space.backend();
    let pa = machine_address(backend, t.phys);
    let page = pa & !(t.size.bytes() - 1);
    let end = page + t.size.bytes();
    if table_pages.range(page..end).next().is_some() {
        return Err(KvmError::ProbeOverlapsTables { va: probe.va });
    }
    Ok(Some(ProbeTarget {
        address: pa,
        page: (page, end),
    }))
}

/// Copy every frame of `store` to its machine address in `mem`.
fn copy_store<L: RawLock, B: Backend>(mem: &GuestMemory, store: &FrameStore<L>, backend: &B) {
    for pfn in store_frames(store) {
        let frame = store.frame(pfn).expect("frame in range");
        let mut bytes = [0u8; FRAME_SIZE];
        for (i, e) in frame.entries().iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
        }
        mem.write(frame_gpa(backend, pfn), &bytes);
    }
}

/// Fill the checker's region (its tables, GDT, IDT, code) and link it
/// through its root slot into the copy of the root at `root_gpa`.
fn install_region(mem: &GuestMemory, region: CheckerRegion, root_gpa: u64) {
    let table = EntryFlags::PRESENT | EntryFlags::WRITABLE;
    let data = table | EntryFlags::NO_EXECUTE;
    let entry = |page: u64, flags: EntryFlags| {
        PageTableEntry::new(region.page_gpa(page) >> 12, flags).bits()
    };
    // The region is at its slot's base, so index 0 at every level below.
    mem.write_u64(
        root_gpa + 8 * region.slot as u64,
        entry(CheckerRegion::L3, table),
    );
    mem.write_u64(
        region.page_gpa(CheckerRegion::L3),
        entry(CheckerRegion::L2, table),
    );
    mem.write_u64(
        region.page_gpa(CheckerRegion::L2),
        entry(CheckerRegion::L1, table),
    );
    for page in CheckerRegion::GDT..CheckerRegion::PAGES {
        // Only the code page is executable; it need not be writable.
        let flags = if page == CheckerRegion::CODE {
            EntryFlags::PRESENT
        } else {
            data
        };
        mem.write_u64(
            region.page_gpa(CheckerRegion::L1) + 8 * page,
            entry(page, flags),
        );
    }
    for (selector, descriptor) in vcpu::GDT {
        mem.write_u64(
            region.page_gpa(CheckerRegion::GDT) + selector as u64,
            descriptor,
        );
    }
    let code = region.page_va(CheckerRegion::CODE);
    for vector in 0..probe::VECTORS {
        let gate = vcpu::idt_gate(code + probe::handler_offset(vector));
        let at = region.page_gpa(CheckerRegion::IDT) + 16 * vector as u64;
        mem.write_u64(at, gate[0]);
        mem.write_u64(at + 8, gate[1]);
    }
    mem.write(region.page_gpa(CheckerRegion::CODE), &probe::code_page());
}

/// A running VM: the vCPU, the VM, then the memory (dropped in that order,
/// so the memory outlives every KVM reference to it).
pub(super) struct Machine {
    pub(super) vcpu: Vcpu,
    _vm: VmFd,
    pub(super) mem: GuestMemory,
}

impl Machine {
    /// Create a VM on `mem` and its vCPU in long mode with CR3 = `cr3`.
    pub(super) fn boot(
        checker: &KvmChecker,
        mem: GuestMemory,
        cr3: u64,
        region: CheckerRegion,
    ) -> Result<Machine, KvmError> {
        let vm = checker.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_address(),
            };
            // SAFETY: the region is a live, page-aligned heap allocation of
            // `size` bytes owned by `mem`, which the returned `Machine`
            // keeps and drops after the VM; regions do not overlap.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = Vcpu::enter_long_mode(&vm, &checker.cpuid, cr3, region)?;
        Ok(Machine { vcpu, _vm: vm, mem })
    }
}
