//! Check a native x86-64 space against the CPU's own page walk, in KVM.
//!
//! [`KvmChecker::check_space`] builds a one-vCPU virtual machine whose
//! guest-physical memory holds a **copy** of the space's frame store (each
//! frame at `mfn * 4096`), enters 64-bit long mode with CR3 = the space's
//! root (EFER.LME|LMA|NXE, CR0.PE|PG|WP, CR4.PAE, CPUID from
//! `KVM_GET_SUPPORTED_CPUID`), and then:
//!
//! 1. translates every mapped page (its base, a random inner address and
//!    its last byte) with `KVM_TRANSLATE` and compares the guest-physical
//!    address with pagepin's [`AddressSpace::translate`]; random and
//!    neighbouring unmapped addresses must be invalid for both;
//! 2. compares every table entry of the copy with the store afterwards:
//!    only the accessed/dirty bits (which the CPU's walk sets) may differ;
//! 3. runs [`Probe`]s: a tiny hand-assembled guest routine loads, stores
//!    or jumps through a mapping, and a #PF handler reports CR2 and the
//!    error code through an I/O port write. The outcome is compared with
//!    what pagepin's translation implies ([`expected_outcome`]).
//!
//! The checker's own pages (GDT, IDT, code, stack) live in a private
//! guest-physical region above everything else and are mapped through one
//! root slot that is **free** in the space: the slot is filled in the
//! guest's copy of the root only, so the space itself is never touched,
//! and no address the space maps is shadowed.
//!
//! The copy is sound to hand to KVM: it is a private heap allocation that
//! outlives the VM, and the host reads or writes it only between (never
//! during) the synchronous `KVM_RUN` / `KVM_TRANSLATE` ioctls.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use pagepin_engine::backend::Backend;
use pagepin_engine::entry::{EntryFlags, PageTableEntry};
use pagepin_engine::frame::{Pfn, ENTRIES_PER_FRAME, FRAME_SIZE};
use pagepin_engine::lock::LockPolicy;
use pagepin_engine::mode::{Level, PageSize, PagingMode, X86_64};
use pagepin_engine::space::{AddressSpace, Translation};
use pagepin_engine::walk;

/// What went wrong setting up or running the checker (not a mismatch:
/// mismatches are reported in [`CheckReport`]).
#[derive(Debug)]
pub enum KvmError {
    /// A KVM ioctl failed.
    Kvm {
        /// What the checker was doing.
        what: &'static str,
        /// The error from kvm-ioctls (an errno).
        source: kvm_ioctls::Error,
    },
    /// Every root slot of the space is in use: nowhere to map the checker.
    NoFreeRootSlot,
    /// The space's tables are malformed (the checker expects a valid space).
    Malformed(pagepin_engine::Error),
    /// A probe's target page overlaps the table frames.
    ProbeOverlapsTables {
        /// The probed address.
        va: u64,
    },
    /// A probe targets a 1 GiB page (not backed: KVM here lacks 1 GiB pages).
    ProbeOn1G {
        /// The probed address.
        va: u64,
    },
}

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmError::Kvm { what, source } => write!(f, "{what}: {source}"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

impl std::error::Error for KvmError {}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Kvm { what, source }
}

/// How a probe touches its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `mov rax, [va]`.
    Read,
    /// `mov [va], rsi`.
    Write,
    /// `jmp va` (the target holds `out 0xe3, al; hlt`).
    Execute,
}

/// One guest access to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    /// The virtual address (8-byte aligned for reads and writes).
    pub va: u64,
    /// The access.
    pub access: Access,
}

/// What a probe did inside the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The load completed and read this value (the checker's sentinel).
    Loaded(u64),
    /// The store completed and the value landed at the translated address.
    Stored,
    /// The store completed but the value is not at the translated address.
    StoredElsewhere,
    /// The jump reached the code the checker placed at the target.
    Executed,
    /// A page fault with its CR2 and error code.
    PageFault {
        /// The faulting linear address.
        cr2: u64,
        /// The error code (P=1, W=2, U=4, RSVD=8, I/D=16).
        error_code: u64,
    },
    /// Another exception vector.
    Exception(u8),
    /// The vCPU stopped some other way (triple fault, emulation failure).
    Stopped,
}

/// Page-fault error-code bits.
pub mod pf {
    /// The page was present (protection violation).
    pub const PRESENT: u64 = 1;
    /// The access was a write.
    pub const WRITE: u64 = 2;
    /// The access was from user mode.
    pub const USER: u64 = 4;
    /// A reserved bit was set in an entry.
    pub const RSVD: u64 = 8;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 16;
}

/// One probe with what pagepin predicts and what the CPU did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe.
    pub probe: Probe,
    /// The outcome pagepin's translation implies.
    pub expected: ProbeOutcome,
    /// The outcome the CPU produced.
    pub seen: ProbeOutcome,
}

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

/// A handle on `/dev/kvm` and the CPUID the vCPUs get.
pub struct KvmChecker {
    kvm: Kvm,
    cpuid: CpuId,
    page_1g: bool,
}

impl fmt::Debug for KvmChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmChecker")
            .field("page_1g", &self.page_1g)
            .finish()
    }
}

// Guest-physical layout of the checker's private region, in pages.
const CHK_L3: u64 = 0;
const CHK_L2: u64 = 1;
const CHK_L1: u64 = 2;
const CHK_GDT: u64 = 3;
const CHK_IDT: u64 = 4;
const CHK_CODE: u64 = 5;
const CHK_STACK: u64 = 6;
const CHK_PAGES: u64 = CHK_STACK + 2;

// Offsets of the routines in the code page.
const CODE_LOAD: u64 = 0x000;
const CODE_STORE: u64 = 0x010;
const CODE_EXEC: u64 = 0x020;
const CODE_PF: u64 = 0x100;
const CODE_VEC: u64 = 0x200;

// I/O ports the guest reports through.
const PORT_DONE: u16 = 0xe0;
const PORT_EXECUTED: u16 = 0xe3;
const PORT_PF: u16 = 0xee;
const PORT_VECTOR: u16 = 0xef;

/// What the jump target of an execute probe holds: `out 0xe3, al; hlt`.
const EXEC_TARGET: [u8; 3] = [0xe6, PORT_EXECUTED as u8, 0xf4];

const GDT_CODE: u16 = 0x08;
const GDT_DATA: u16 = 0x10;

fn code_page() -> [u8; FRAME_SIZE] {
    let mut c = [0xf4u8; FRAME_SIZE]; // hlt everywhere else
    let put = |c: &mut [u8; FRAME_SIZE], at: u64, bytes: &[u8]| {
        c[at as usize..at as usize + bytes.len()].copy_from_slice(bytes)
    };
    // mov rax, [rdi]; out 0xe0, al; hlt
    put(
        &mut c,
        CODE_LOAD,
        &[0x48, 0x8b, 0x07, 0xe6, PORT_DONE as u8, 0xf4],
    );
    // mov [rdi], rsi; out 0xe0, al; hlt
    put(
        &mut c,
        CODE_STORE,
        &[0x48, 0x89, 0x37, 0xe6, PORT_DONE as u8, 0xf4],
    );
    // jmp rdi
    put(&mut c, CODE_EXEC, &[0xff, 0xe7]);
    // #PF: mov rbx, cr2; mov rax, [rsp] (error code); out 0xee, al; hlt
    put(
        &mut c,
        CODE_PF,
        &[
            0x0f,
            0x20,
            0xd3,
            0x48,
            0x8b,
            0x04,
            0x24,
            0xe6,
            PORT_PF as u8,
            0xf4,
        ],
    );
    // Other vectors v: mov al, v; out 0xef, al; hlt
    for v in 0..32u8 {
        put(
            &mut c,
            CODE_VEC + 8 * v as u64,
            &[0xb0, v, 0xe6, PORT_VECTOR as u8, 0xf4],
        );
    }
    c
}

/// Host memory backing guest-physical ranges: heap allocations handed to
/// KVM as memory slots.
struct GuestMemory {
    regions: Vec<Region>,
}

struct Region {
    gpa: u64,
    size: u64,
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed(layout)` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl GuestMemory {
    /// Back the page-aligned ranges `ranges` (merged where they touch).
    fn new(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let regions = merged
            .into_iter()
            .map(|(start, end)| {
                let size = end - start;
                let layout = Layout::from_size_align(size as usize, FRAME_SIZE)
                    .expect("guest region layout");
                // SAFETY: `size` is non-zero (ranges are whole pages).
                let raw = unsafe { std::alloc::alloc_zeroed(layout) };
                let ptr =
                    NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
                Region {
                    gpa: start,
                    size,
                    ptr,
                    layout,
                }
            })
            .collect();
        GuestMemory { regions }
    }

    /// The host pointer of `len` bytes at `gpa`, if backed.
    fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.size)?;
        // SAFETY: the offset is inside the region's allocation (checked above).
        Some(unsafe { r.ptr.as_ptr().add((gpa - r.gpa) as usize) })
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self
            .host(gpa, bytes.len())
            .expect("write to unbacked guest memory");
        // SAFETY: `p..p+len` is inside one region we own; no vCPU runs
        // while the host touches guest memory, and no Rust reference into
        // the region exists.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) }
    }

    fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let p = self.host(gpa, 8)?;
        let mut b = [0u8; 8];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), 8) };
        Some(u64::from_le_bytes(b))
    }
}

/// A running VM: the vCPU, the VM, then the memory (dropped in that order,
/// so the memory outlives every KVM reference to it).
struct Machine {
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemory,
    chk_va: u64,
}

/// The leaves of a space: (va, size, entry).
fn leaves<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
) -> Result<Vec<(u64, PageSize, u64)>, pagepin_engine::Error> {
    fn rec<P: LockPolicy, B: Backend>(
        space: &AddressSpace<X86_64, P, B>,
        pfn: Pfn,
        level: Level,
        base: u64,
        out: &mut Vec<(u64, PageSize, u64)>,
    ) -> Result<(), pagepin_engine::Error> {
        let store = space.store();
        let Some(frame) = store.frame(pfn) else {
            return Ok(());
        };
        for index in 0..ENTRIES_PER_FRAME {
            let e = PageTableEntry::from_bits(frame.entry(index).load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            let va = if level == X86_64::ROOT_LEVEL {
                X86_64::root_slot_base(index)
            } else {
                base + ((index as u64) << level.shift())
            };
            match walk::classify::<X86_64, P::Lock, B>(store, space.backend(), level, index, e)? {
                Some(child) => rec(
                    space,
                    child,
                    level.child().expect("table below L1"),
                    va,
                    out,
                )?,
                None => {
                    let size = match level {
                        Level::L1 => PageSize::Size4K,
                        Level::L2 => PageSize::Size2M,
                        _ => PageSize::Size1G,
                    };
                    out.push((va, size, e.bits()));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    rec(space, space.root(), X86_64::ROOT_LEVEL, 0, &mut out)?;
    Ok(out)
}

/// The L1 frame and index of the 4 KiB leaf at `va`.
fn leaf_slot<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
    va: u64,
) -> Result<(Pfn, usize), pagepin_engine::Error> {
    let store = space.store();
    let mut pfn = space.root();
    let mut level = X86_64::ROOT_LEVEL;
    while level != Level::L1 {
        let index = X86_64::index(va, level);
        let e = PageTableEntry::from_bits(
            store
                .entry(pfn, index)
                .map_or(0, |s| s.load(Ordering::Acquire)),
        );
        if !e.is_present() {
            return Err(pagepin_engine::Error::NotMapped { va });
        }
        match walk::classify::<X86_64, P::Lock, B>(store, space.backend(), level, index, e)? {
            Some(child) => pfn = child,
            None => return Err(pagepin_engine::Error::NotMapped { va }),
        }
        level = level.child().expect("above L1");
    }
    Ok((pfn, X86_64::index(va, Level::L1)))
}

/// The rights the whole path to `va` grants: (all levels writable, some
/// level no-execute).
fn path_rights<P: LockPolicy, B: Backend>(
    space: &AddressSpace<X86_64, P, B>,
    va: u64,
) -> (bool, bool) {
    let store = space.store();
    let mut pfn = space.root();
    let mut level = X86_64::ROOT_LEVEL;
    let (mut w, mut nx) = (true, false);
    loop {
        let index = X86_64::index(va, level);
        let Some(slot) = store.entry(pfn, index) else {
            return (w, nx);
        };
        let e = PageTableEntry::from_bits(slot.load(Ordering::Acquire));
        if !e.is_present() {
            return (w, nx);
        }
        w &= e.is_writable();
        nx |= e.flags().contains(EntryFlags::NO_EXECUTE);
        match walk::classify::<X86_64, P::Lock, B>(store, space.backend(), level, index, e) {
            Ok(Some(child)) => match level.child() {
                Some(l) => {
                    pfn = child;
                    level = l;
                }
                None => return (w, nx),
            },
            _ => return (w, nx),
        }
    }
}

/// The value a read probe finds at its target (set by the checker).
pub fn sentinel(va: u64) -> u64 {
    va.rotate_left(17) ^ 0x5eed_cafe_f00d_d00d
}

/// The value a write probe stores.
pub fn written_value(va: u64) -> u64 {
    !sentinel(va)
}

/// The outcome pagepin predicts for `probe`, from the translation of its
/// address and the rights of the path (`writable` on every level, `nx` on
/// some level). Supervisor accesses with CR0.WP and EFER.NXE.
pub fn expected_outcome(
    probe: Probe,
    translation: Option<Translation>,
    writable: bool,
    nx: bool,
) -> ProbeOutcome {
    let fault = |error_code| ProbeOutcome::PageFault {
        cr2: probe.va,
        error_code,
    };
    let access_bits = match probe.access {
        Access::Read => 0,
        Access::Write => pf::WRITE,
        Access::Execute => pf::FETCH,
    };
    match translation {
        None => fault(access_bits),
        Some(_) => match probe.access {
            Access::Read => ProbeOutcome::Loaded(sentinel(probe.va)),
            Access::Write if writable => ProbeOutcome::Stored,
            Access::Execute if !nx => ProbeOutcome::Executed,
            _ => fault(pf::PRESENT | access_bits),
        },
    }
}

/// Tiny deterministic generator for the sampled addresses (SplitMix64).
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn canonical(va: u64) -> u64 {
    ((va << 16) as i64 >> 16) as u64
}

impl KvmChecker {
    /// Open `/dev/kvm` and read the supported CPUID.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let page_1g = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0);
        Ok(KvmChecker {
            kvm,
            cpuid,
            page_1g,
        })
    }

    /// Whether the vCPU offers 1 GiB pages (CPUID 0x80000001 EDX.26).
    pub fn has_1g_pages(&self) -> bool {
        self.page_1g
    }

    /// Check `space` (see the [module docs](self)).
    pub fn check_space<P: LockPolicy, B: Backend>(
        &self,
        space: &AddressSpace<X86_64, P, B>,
        options: &CheckOptions,
    ) -> Result<CheckReport, KvmError> {
        let store = space.store();
        let backend = space.backend();
        let leaves = leaves(space).map_err(KvmError::Malformed)?;
        let mut report = CheckReport::default();
        for (_, size, _) in &leaves {
            report.leaves[match size {
                PageSize::Size4K => 0,
                PageSize::Size2M => 1,
                PageSize::Size1G => 2,
            }] += 1;
        }

        // A root slot the space leaves free, for the checker's own pages.
        let root_frame = store.frame(space.root()).ok_or(KvmError::Malformed(
            pagepin_engine::Error::NoTable {
                va: 0,
                level: X86_64::ROOT_LEVEL,
            },
        ))?;
        let slot = (0..ENTRIES_PER_FRAME)
            .rev()
            .find(|&i| {
                root_frame.entry(i).load(Ordering::Acquire) & EntryFlags::PRESENT.bits() == 0
            })
            .ok_or(KvmError::NoFreeRootSlot)?;
        report.checker_slot = slot;

        // Guest-physical ranges: the store's frames at their machine
        // addresses, every probe's target page, then the checker region.
        let table_gpa = |pfn: Pfn| backend.pfn_to_mfn(pfn).0 * FRAME_SIZE as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let base = store.base().0;
        let mut table_pages: BTreeSet<u64> = BTreeSet::new();
        for pfn in base..base + store.len() as u64 {
            let gpa = table_gpa(Pfn(pfn));
            table_pages.insert(gpa);
            ranges.push((gpa, gpa + FRAME_SIZE as u64));
        }
        let mut probe_targets = Vec::new();
        for probe in &options.probes {
            let t = space.translate(probe.va);
            if let Some(t) = t {
                if t.size == PageSize::Size1G {
                    return Err(KvmError::ProbeOn1G { va: probe.va });
                }
                let pa =
                    backend.pfn_to_mfn(Pfn(t.phys >> 12)).0 * FRAME_SIZE as u64 + (t.phys & 0xfff);
                let page = pa & !(t.size.bytes() - 1);
                let overlap = table_pages
                    .range(page..page + t.size.bytes())
                    .next()
                    .is_some();
                if overlap {
                    return Err(KvmError::ProbeOverlapsTables { va: probe.va });
                }
                ranges.push((page, page + t.size.bytes()));
                probe_targets.push(Some(pa));
            } else {
                probe_targets.push(None);
            }
        }
        let top = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let chk_gpa = (top + (2 << 20) - 1) & !((2 << 20) - 1);
        ranges.push((chk_gpa, chk_gpa + CHK_PAGES * FRAME_SIZE as u64));
        let mem = GuestMemory::new(ranges);

        // Copy the store, frame by frame.
        for pfn in base..base + store.len() as u64 {
            let frame = store.frame(Pfn(pfn)).expect("frame in range");
            let mut bytes = [0u8; FRAME_SIZE];
            for (i, e) in frame.entries().iter().enumerate() {
                bytes[i * 8..i * 8 + 8].copy_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
            }
            mem.write(table_gpa(Pfn(pfn)), &bytes);
        }
        if options.corrupt_copy != 0 {
            if let Some(&(va, _, _)) = leaves.iter().find(|l| l.1 == PageSize::Size4K) {
                let (l1, index) = leaf_slot(space, va).map_err(KvmError::Malformed)?;
                let gpa = table_gpa(l1) + 8 * index as u64;
                let v = mem.read_u64(gpa).expect("table copy is backed");
                mem.write_u64(gpa, v ^ options.corrupt_copy);
            }
        }
        // The checker region and its mapping through the free slot.
        let page = |n: u64| chk_gpa + n * FRAME_SIZE as u64;
        let chk_va = X86_64::root_slot_base(slot);
        let table = EntryFlags::PRESENT | EntryFlags::WRITABLE;
        let data = table | EntryFlags::NO_EXECUTE;
        mem.write_u64(
            table_gpa(space.root()) + 8 * slot as u64,
            PageTableEntry::new(page(CHK_L3) >> 12, table).bits(),
        );
        mem.write_u64(
            page(CHK_L3),
            PageTableEntry::new(page(CHK_L2) >> 12, table).bits(),
        );
        mem.write_u64(
            page(CHK_L2),
            PageTableEntry::new(page(CHK_L1) >> 12, table).bits(),
        );
        for n in CHK_GDT..CHK_PAGES {
            let flags = if n == CHK_CODE {
                EntryFlags::PRESENT
            } else {
                data
            };
            mem.write_u64(
                page(CHK_L1) + 8 * n,
                PageTableEntry::new(page(n) >> 12, flags).bits(),
            );
        }
        // GDT: null, 64-bit code, data.
        mem.write_u64(page(CHK_GDT) + GDT_CODE as u64, 0x00af_9b00_0000_ffff);
        mem.write_u64(page(CHK_GDT) + GDT_DATA as u64, 0x00cf_9300_0000_ffff);
        // IDT: 32 interrupt gates; #PF to its handler.
        for v in 0..32u64 {
            let off = chk_va
                + CHK_CODE * FRAME_SIZE as u64
                + if v == 14 { CODE_PF } else { CODE_VEC + 8 * v };
            let lo = (off & 0xffff)
                | (GDT_CODE as u64) << 16
                | 0x8e << 40
                | ((off >> 16) & 0xffff) << 48;
            mem.write_u64(page(CHK_IDT) + 16 * v, lo);
            mem.write_u64(page(CHK_IDT) + 16 * v + 8, off >> 32);
        }
        mem.write(page(CHK_CODE), &code_page());

        let machine = self.boot(mem, space.root(), table_gpa, chk_va)?;

        // 1. Translations of mapped pages and sampled addresses.
        let to_machine = |t: Translation| {
            backend.pfn_to_mfn(Pfn(t.phys >> 12)).0 * FRAME_SIZE as u64 + (t.phys & 0xfff)
        };
        let mut rng = SplitMix(options.seed);
        let compare = |va: u64, report: &mut CheckReport| -> Result<(), KvmError> {
            if X86_64::index(va, Level::L4) == slot {
                return Ok(());
            }
            let ours = space.translate(va).map(to_machine);
            let tr = machine
                .vcpu
                .translate_gva(va)
                .map_err(kvm_err("KVM_TRANSLATE"))?;
            let cpu = (tr.valid != 0).then_some(tr.physical_address);
            match ours {
                Some(_) => report.mapped_compared += 1,
                None => report.unmapped_compared += 1,
            }
            if ours != cpu {
                report.mismatches.push(Mismatch::Translation {
                    va,
                    pagepin: ours,
                    cpu,
                });
            }
            Ok(())
        };
        for &(va, size, _) in &leaves {
            if size == PageSize::Size1G && !self.page_1g {
                report.skipped_1g += 1;
                continue;
            }
            let inner = va + (rng.next() % size.bytes());
            for a in [va, inner, va + size.bytes() - 1] {
                compare(a, &mut report)?;
            }
            // The neighbours may be unmapped: both must agree either way.
            for a in [va.wrapping_sub(FRAME_SIZE as u64), va + size.bytes()] {
                let a = canonical(a);
                if X86_64::is_canonical(a) {
                    compare(a, &mut report)?;
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
            compare(va & !7, &mut report)?;
        }

        // 2. Table entries after the CPU walked them.
        let ad = EntryFlags::ACCESSED.bits() | EntryFlags::DIRTY.bits();
        for pfn in base..base + store.len() as u64 {
            let pfn = Pfn(pfn);
            let Some(meta) = store.meta(pfn) else {
                continue;
            };
            if meta.level().is_none() {
                continue;
            }
            let frame = store.frame(pfn).expect("frame in range");
            for index in 0..ENTRIES_PER_FRAME {
                if pfn == space.root() && index == slot {
                    continue;
                }
                let ours = frame.entry(index).load(Ordering::Acquire);
                let guest = machine
                    .mem
                    .read_u64(table_gpa(pfn) + 8 * index as u64)
                    .expect("table copy is backed");
                report.entries_compared += 1;
                if (ours ^ guest) & !ad != 0 {
                    report.mismatches.push(Mismatch::TableEntry {
                        pfn,
                        index,
                        store: ours,
                        guest,
                    });
                } else if ours & EntryFlags::ACCESSED.bits() == 0
                    && guest & EntryFlags::ACCESSED.bits() != 0
                {
                    report.accessed_bits_set += 1;
                }
            }
        }

        // 3. Probes.
        let mut machine = machine;
        for (probe, target) in options.probes.iter().zip(probe_targets) {
            let translation = space.translate(probe.va);
            let (w, nx) = path_rights(space, probe.va);
            let expected = expected_outcome(*probe, translation, w, nx);
            let seen = machine.run_probe(*probe, target)?;
            let r = ProbeResult {
                probe: *probe,
                expected,
                seen,
            };
            if expected != seen {
                report.mismatches.push(Mismatch::Probe(r));
            }
            report.probes.push(r);
        }
        Ok(report)
    }

    fn boot(
        &self,
        mem: GuestMemory,
        root: Pfn,
        table_gpa: impl Fn(Pfn) -> u64,
        chk_va: u64,
    ) -> Result<Machine, KvmError> {
        let vm = self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, r) in mem.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.ptr.as_ptr() as u64,
            };
            // SAFETY: the region is a live, page-aligned heap allocation of
            // `size` bytes owned by `mem`, which the returned `Machine`
            // keeps and drops after the VM; regions do not overlap.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: GDT_CODE,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: GDT_DATA,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            selector: 0,
            type_: 0xb,
            s: 0,
            db: 0,
            l: 0,
            g: 0,
            limit: 0x67,
            ..code
        };
        sregs.gdt.base = chk_va + CHK_GDT * FRAME_SIZE as u64;
        sregs.gdt.limit = 0x17;
        sregs.idt.base = chk_va + CHK_IDT * FRAME_SIZE as u64;
        sregs.idt.limit = 32 * 16 - 1;
        sregs.cr3 = table_gpa(root);
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE ET NE WP PG
        sregs.efer = (1 << 8) | (1 << 10) | (1 << 11); // LME LMA NXE
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        Ok(Machine {
            vcpu,
            _vm: vm,
            mem,
            chk_va,
        })
    }
}

impl Machine {
    /// Run one probe; `target` is the machine address pagepin translates
    /// the probe to (None: unmapped).
    fn run_probe(&mut self, probe: Probe, target: Option<u64>) -> Result<ProbeOutcome, KvmError> {
        let entry = match probe.access {
            Access::Read => CODE_LOAD,
            Access::Write => CODE_STORE,
            Access::Execute => CODE_EXEC,
        };
        if let Some(pa) = target {
            match probe.access {
                Access::Read | Access::Write => self.mem.write_u64(pa, sentinel(probe.va)),
                Access::Execute => self.mem.write(pa, &EXEC_TARGET),
            }
        }
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = self.chk_va + CHK_CODE * FRAME_SIZE as u64 + entry;
        regs.rsp = self.chk_va + (CHK_STACK + 2) * FRAME_SIZE as u64 - 64;
        regs.rflags = 2;
        regs.rdi = probe.va;
        regs.rsi = written_value(probe.va);
        regs.rax = 0;
        regs.rbx = 0;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let port = loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => break Some((port, data.first().copied().unwrap_or(0))),
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => continue,
                Ok(_) => break None,
                Err(e) if e.errno() == 4 /* EINTR */ => continue,
                Err(e) => return Err(KvmError::Kvm { what: "KVM_RUN", source: e }),
            }
        };
        let regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(match port {
            Some((PORT_DONE, _)) => match probe.access {
                Access::Read => ProbeOutcome::Loaded(regs.rax),
                _ => match target.and_then(|pa| self.mem.read_u64(pa)) {
                    Some(v) if v == written_value(probe.va) => ProbeOutcome::Stored,
                    _ => ProbeOutcome::StoredElsewhere,
                },
            },
            Some((PORT_EXECUTED, _)) => ProbeOutcome::Executed,
            Some((PORT_PF, _)) => ProbeOutcome::PageFault {
                cr2: regs.rbx,
                error_code: regs.rax,
            },
            Some((PORT_VECTOR, v)) => ProbeOutcome::Exception(v),
            _ => ProbeOutcome::Stopped,
        })
    }
}

/// Why KVM cannot be used here, or `None` when `/dev/kvm` opens and a VM
/// can be created.
pub fn unavailable_reason() -> Option<String> {
    match Kvm::new() {
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
        Ok(kvm) => match kvm.create_vm() {
            Err(e) => Some(format!("cannot create a VM: {e}")),
            Ok(_) => None,
        },
    }
}
