//! Raw hypercalls of a 64-bit PV guest: the `syscall` instruction from guest
//! kernel mode, number in `rax`, arguments in `rdi`, `rsi`, `rdx`, `r10`,
//! `r8`; Xen clobbers `rcx` and `r11` and returns in `rax`.

use core::arch::asm;

/// Hypercall numbers used by the guest (public `xen.h`).
pub mod nr {
    /// `set_trap_table`.
    pub const SET_TRAP_TABLE: u64 = 0;
    /// `vcpu_op`.
    pub const VCPU_OP: u64 = 24;
    /// `mmu_update`.
    pub const MMU_UPDATE: u64 = 1;
    /// `console_io`.
    pub const CONSOLE_IO: u64 = 18;
    /// `multicall`.
    pub const MULTICALL: u64 = 13;
    /// `update_va_mapping`.
    pub const UPDATE_VA_MAPPING: u64 = 14;
    /// `mmuext_op`.
    pub const MMUEXT_OP: u64 = 26;
    /// `sched_op`.
    pub const SCHED_OP: u64 = 29;
    /// `physdev_op`.
    pub const PHYSDEV_OP: u64 = 33;
}

/// Issue hypercall `nr` with up to five arguments.
///
/// # Safety
/// The arguments must be valid for hypercall `nr`: every pointer argument
/// must point to memory of the size and layout that hypercall reads or
/// writes, mapped in the current page tables, and not otherwise accessed
/// during the call.
#[inline(always)]
pub unsafe fn hypercall5(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // SAFETY: the caller guarantees the arguments; `syscall` from a PV guest
    // kernel enters Xen, which clobbers rcx and r11 besides rax. The
    // argument registers are clobbered too: when Xen preempts a hypercall
    // (or finishes a failed pin through a continuation, as real Xen 4.17
    // does inside a multicall) it rewrites them and re-executes `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            inlateout("r10") a4 => _,
            inlateout("r8") a5 => _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

/// `console_io(CONSOLEIO_write, len, buf)`: print on Xen's console (the
/// serial line, for dom0).
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(1024) {
        // SAFETY: `chunk` is a live, readable buffer of `chunk.len()` bytes.
        unsafe {
            hypercall5(
                nr::CONSOLE_IO,
                0,
                chunk.len() as u64,
                chunk.as_ptr() as u64,
                0,
                0,
            );
        }
    }
}

/// `update_va_mapping(va, pte, flags)` on the current page tables.
pub fn update_va_mapping(va: u64, pte: u64, flags: u64) -> i64 {
    // SAFETY: no pointer arguments: Xen checks the address and the entry
    // and refuses what the guest may not do.
    unsafe { hypercall5(nr::UPDATE_VA_MAPPING, va, pte, flags, 0, 0) }
}

/// `sched_op(SCHEDOP_shutdown, {reason})`: 0 power off, 3 crash.
pub fn shutdown(reason: u32) -> ! {
    let arg: u32 = reason;
    loop {
        // SAFETY: `arg` is a live `struct sched_shutdown { u32 reason }`.
        unsafe {
            hypercall5(nr::SCHED_OP, 2, &arg as *const u32 as u64, 0, 0, 0);
        }
    }
}

/// Raise the guest kernel's I/O privilege level
/// (`physdev_op(PHYSDEVOP_set_iopl, {iopl})`) so port I/O is allowed.
pub fn set_iopl(level: u32) -> i64 {
    let arg: u32 = level;
    // SAFETY: `arg` is a live `struct physdev_set_iopl { u32 iopl }`.
    unsafe { hypercall5(nr::PHYSDEV_OP, 6, &arg as *const u32 as u64, 0, 0, 0) }
}

/// End QEMU through its `isa-debug-exit` device at port 0xf4: QEMU exits
/// with status `value << 1 | 1`. Falls back to powering off.
pub fn qemu_exit(value: u8) -> ! {
    if set_iopl(3) == 0 {
        // SAFETY: with IOPL 3 Xen lets dom0 write the port; the device ends
        // the machine and touches no guest memory.
        unsafe { asm!("out dx, al", in("dx") 0xf4u16, in("al") value, options(nomem, nostack)) };
    }
    shutdown(0)
}
