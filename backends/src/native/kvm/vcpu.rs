//! The vCPU: 64-bit long mode on the copied tables, `KVM_TRANSLATE`, and
//! running a probe (registers in, run to the reporting `out`, registers
//! out).

use kvm_bindings::{kvm_segment, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::memory::{CheckerRegion, GuestMemory};
use super::probe::{self, GuestReport, Probe, ProbeOutcome, EXEC_TARGET};
use super::{kvm_err, KvmError};

/// `EINTR`: `KVM_RUN` was interrupted by a signal before the guest
/// reported; run again.
const EINTR: i32 = 4;

/// GDT selector of the 64-bit code segment.
const GDT_CODE: u16 = 0x08;
/// GDT selector of the data segment.
const GDT_DATA: u16 = 0x10;

/// The GDT's descriptors by selector (after the null one): 64-bit code,
/// data; they match the segment registers [`Vcpu::enter_long_mode`] loads.
pub(super) const GDT: [(u16, u64); 2] = [
    (GDT_CODE, 0x00af_9b00_0000_ffff),
    (GDT_DATA, 0x00cf_9300_0000_ffff),
];

/// The 16-byte IDT entry (low, high) of a 64-bit interrupt gate to
/// `handler` in the code segment.
pub(super) fn idt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (GDT_CODE as u64) << 16
        | 0x8e << 40
        | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

/// The checker's one vCPU, running in the checker's region.
pub(super) struct Vcpu {
    fd: VcpuFd,
    region: CheckerRegion,
}

impl Vcpu {
    /// Create vCPU 0 of `vm` in 64-bit long mode with CR3 = `cr3`, its
    /// GDT and IDT in `region`.
    pub(super) fn enter_long_mode(
        vm: &VmFd,
        cpuid: &CpuId,
        cr3: u64,
        region: CheckerRegion,
    ) -> Result<Vcpu, KvmError> {
        let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
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
        sregs.gdt.base = region.page_va(CheckerRegion::GDT);
        sregs.gdt.limit = 0x17;
        sregs.idt.base = region.page_va(CheckerRegion::IDT);
        sregs.idt.limit = probe::VECTORS as u16 * 16 - 1;
        sregs.cr3 = cr3;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31); // PE ET NE WP PG
        sregs.efer = (1 << 8) | (1 << 10) | (1 << 11); // LME LMA NXE
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        Ok(Vcpu { fd, region })
    }

    /// The guest-physical address the CPU's walk gives `va` (`None`:
    /// invalid), with `KVM_TRANSLATE`.
    pub(super) fn translate(&self, va: u64) -> Result<Option<u64>, KvmError> {
        let tr = self
            .fd
            .translate_gva(va)
            .map_err(kvm_err("KVM_TRANSLATE"))?;
        Ok((tr.valid != 0).then_some(tr.physical_address))
    }

    /// Run one probe; `target` is the machine address pagepin translates
    /// the probe to (None: unmapped).
    pub(super) fn run_probe(
        &mut self,
        mem: &GuestMemory,
        probe: Probe,
        target: Option<u64>,
    ) -> Result<ProbeOutcome, KvmError> {
        if let Some(pa) = target {
            match probe.access {
                probe::Access::Read | probe::Access::Write => {
                    mem.write_u64(pa, probe::sentinel(probe.va))
                }
                probe::Access::Execute => mem.write(pa, &EXEC_TARGET),
            }
        }
        let routine =
            self.region.page_va(CheckerRegion::CODE) + probe::routine_offset(probe.access);
        let report = self.call(routine, probe.va, probe::written_value(probe.va))?;
        let at_target = target.and_then(|pa| mem.read_u64(pa));
        Ok(probe::outcome(probe, report, at_target))
    }

    /// Run the guest routine at `rip` with RDI = `rdi`, RSI = `rsi` on a
    /// fresh stack until it reports through a port (or stops otherwise).
    fn call(&mut self, rip: u64, rdi: u64, rsi: u64) -> Result<GuestReport, KvmError> {
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = rip;
        regs.rsp = self.region.stack_top();
        regs.rflags = 2;
        regs.rdi = rdi;
        regs.rsi = rsi;
        regs.rax = 0;
        regs.rbx = 0;
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let port = loop {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    break Some((port, data.first().copied().unwrap_or(0)))
                }
                // Host signals and interrupt windows: not the guest's doing.
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => continue,
                Ok(_) => break None,
                Err(e) if e.errno() == EINTR => continue,
                Err(e) => {
                    return Err(KvmError::Kvm {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            }
        };
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(GuestReport {
            port,
            rax: regs.rax,
            rbx: regs.rbx,
        })
    }
}
