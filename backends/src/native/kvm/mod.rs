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
//!
//! The code is laid out by object, as rust-vmm's kvm-ioctls does:
//! `system` (the `/dev/kvm` handle), `memory` (host-backed guest memory
//! and the checker's region, as rust-vmm's vm-memory), `vm` (what goes
//! into the VM's memory, and the VM), `vcpu` (long mode, registers,
//! running a probe), `probe` (what a probe is and the guest code behind
//! it), `walk` (the leaves of the space) and `check` (the comparison, step
//! by step).
//!
//! [`AddressSpace::translate`]: pagepin_engine::AddressSpace::translate

use std::fmt;

mod check;
mod memory;
mod probe;
mod system;
mod vcpu;
mod vm;
mod walk;

pub use check::{CheckOptions, CheckReport, Mismatch};
pub use probe::{
    expected_outcome, pf, sentinel, written_value, Access, Probe, ProbeOutcome, ProbeResult,
};
pub use system::{unavailable_reason, KvmChecker};

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

/// Wrap a kvm-ioctls error with the ioctl that failed.
fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Kvm { what, source }
}
