//! The `/dev/kvm` handle: what every VM of the checker is created from.

use std::fmt;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::{kvm_err, KvmError};

/// A handle on `/dev/kvm` and the CPUID the vCPUs get.
pub struct KvmChecker {
    pub(super) kvm: Kvm,
    pub(super) cpuid: CpuId,
    pub(super) page_1g: bool,
}

impl fmt::Debug for KvmChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmChecker")
            .field("page_1g", &self.page_1g)
            .finish()
    }
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
