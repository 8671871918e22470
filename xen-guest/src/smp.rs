//! Several vCPUs: their stacks, per-vCPU state, the trap table, the page
//! fault handler, bringing vCPUs 1..k up, the clock, and a scoped "run this
//! on every vCPU" primitive the parallel scenarios use.
//!
//! Facts this relies on (docs/PROTOCOL.md §11): Xen delivers a guest-kernel #PF on
//! the interrupted stack, frame at `(rsp & ~15) - 64`, lowest first `rcx,
//! r11, error code, rip, cs, rflags, rsp, ss`; CR2 is in `vcpu_info[v]`
//! of the shared-info page; the `iret` hypercall returns. Events stay
//! masked on every vCPU, so nothing else ever interrupts the guest.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::hypercall::{self, hypercall5, nr};
use crate::rt::{self, Console};

/// vCPUs the guest can use (QEMU `-smp` at most this).
pub const MAX_VCPUS: usize = 4;
/// Bytes of stack per vCPU.
pub const STACK_BYTES: usize = 1024 * 1024;
/// Faults of one guarded store before it is given up (counted in
/// [`CpuState::skipped`]): a store Xen keeps refusing is a recorded
/// failure, never a hang.
pub const STORE_RETRY_LIMIT: u64 = 20_000;
/// How long one guarded store may keep faulting before it is given up.
/// (A broken protocol can make it wait for a lock its own writer holds:
/// the pinner's rollback needs the PTE lock the faulting writer took.)
pub const STORE_GIVE_UP_NS: u64 = 20_000_000;

#[repr(C, align(16))]
pub(crate) struct Stacks([[u8; STACK_BYTES]; MAX_VCPUS]);

/// Every vCPU's stack (vCPU 0 starts on `STACKS[0]`, see `rt.rs`). A
/// trap handler finds its vCPU from the stack it runs on.
#[no_mangle]
pub(crate) static mut STACKS: Stacks = Stacks([[0; STACK_BYTES]; MAX_VCPUS]);

/// The vCPU whose stack holds `rsp`, if any.
fn vcpu_of_sp(rsp: u64) -> Option<usize> {
    let base = core::ptr::addr_of!(STACKS) as u64;
    let off = rsp.checked_sub(base)?;
    let v = (off / STACK_BYTES as u64) as usize;
    (v < MAX_VCPUS).then_some(v)
}

/// The vCPU this code runs on.
pub fn this_vcpu() -> usize {
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    vcpu_of_sp(rsp).unwrap_or(0)
}

/// One vCPU's counters and records, alone on its cache lines.
#[repr(C, align(128))]
#[derive(Default)]
pub struct CpuState {
    /// Page faults taken at the guarded store.
    pub faults: AtomicU64,
    /// Of those, faults whose CR2 was the store's own target.
    pub cr2_match: AtomicU64,
    /// Stores given up after [`STORE_RETRY_LIMIT`] faults or
    /// [`STORE_GIVE_UP_NS`].
    pub skipped: AtomicU64,
    /// Faults of the store in progress.
    retries: AtomicU64,
    /// When the store in progress first faulted.
    first_fault_ns: AtomicU64,
    /// This vCPU's retry limit (0: [`STORE_RETRY_LIMIT`]).
    pub retry_limit: AtomicU64,
    /// The last fault: CR2, error code, rip.
    pub last_cr2: AtomicU64,
    /// Its error code.
    pub last_err: AtomicU64,
    /// Its rip.
    pub last_rip: AtomicU64,
    /// A counter the vCPU bumps while it works (parallelism check).
    pub progress: AtomicU64,
    /// The job generation this vCPU finished last.
    done: AtomicU64,
    /// Up and waiting for jobs.
    pub online: AtomicBool,
}

/// Per-vCPU state.
pub static CPUS: [CpuState; MAX_VCPUS] = [const {
    CpuState {
        faults: AtomicU64::new(0),
        cr2_match: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        first_fault_ns: AtomicU64::new(0),
        retry_limit: AtomicU64::new(0),
        last_cr2: AtomicU64::new(0),
        last_err: AtomicU64::new(0),
        last_rip: AtomicU64::new(0),
        progress: AtomicU64::new(0),
        done: AtomicU64::new(0),
        online: AtomicBool::new(false),
    }
}; MAX_VCPUS];

/// Page faults and given-up stores over every vCPU.
pub fn fault_totals() -> (u64, u64) {
    CPUS.iter().fold((0, 0), |(f, s), c| {
        (
            f + c.faults.load(Ordering::Relaxed),
            s + c.skipped.load(Ordering::Relaxed),
        )
    })
}

// ---------------------------------------------------------------------------
// shared info and the clock

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// A page of the image whose mapping is replaced by the shared-info page.
static mut SHARED: Page = Page([0; 4096]);

fn shared_word<T>(off: usize) -> *const T {
    // SAFETY: only the address is formed.
    (core::ptr::addr_of!(SHARED) as usize + off) as *const T
}

/// CR2 of vCPU `v` (exact: Xen writes it before delivering the #PF).
fn cr2_of(v: usize) -> u64 {
    // SAFETY: `SHARED` maps the shared-info page after `init`; vcpu_info[v]
    // is at 64 * v and its `arch.cr2` at +16 (docs/PROTOCOL.md §11).
    unsafe { core::ptr::read_volatile(shared_word::<u64>(64 * v + 16)) }
}

static TSC_MUL: AtomicU64 = AtomicU64::new(0);
static TSC_SHIFT: AtomicU64 = AtomicU64::new(0);

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: reads the time-stamp counter; PV guests may (CR4.TSD clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// Nanoseconds since an arbitrary origin (TSC scaled by Xen's factors).
pub fn now_ns() -> u64 {
    let t = rdtsc();
    let shift = TSC_SHIFT.load(Ordering::Relaxed) as i8;
    let mul = TSC_MUL.load(Ordering::Relaxed);
    if mul == 0 {
        return t;
    }
    let t = if shift >= 0 {
        t << shift
    } else {
        t >> (-shift)
    };
    ((t as u128 * mul as u128) >> 32) as u64
}

// ---------------------------------------------------------------------------
// traps

/// The words the #PF entry saves, lowest first: what it pushed, then Xen's
/// frame.
#[repr(C)]
pub struct TrapFrame {
    r10: u64,
    r9: u64,
    r8: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rax: u64,
    rcx: u64,
    r11: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// The guarded store and the trap entries.
//
// `pagepin_store(slot, value) -> 0 stored / 1 given up`: the one
// instruction that may fault on purpose, at a known address, so the #PF
// handler can tell it from a bug and can skip it.
//
// `pagepin_pf_entry`: saves the caller-saved registers and the SSE state
// (the handler is compiled code), calls `pf_handler` with the frame,
// restores, and returns with the `iret` hypercall, whose stack is
// `{rax, r11, rcx, flags, rip, cs, rflags, rsp, ss}`.
//
// `pagepin_fatal_N`: any other exception; reports and ends the run.
global_asm!(
    ".section .text.pagepin_traps, \"ax\", @progbits",
    ".global pagepin_store",
    "pagepin_store:",
    "    xor %eax, %eax",
    ".global pagepin_store_insn",
    "pagepin_store_insn:",
    "    mov %rsi, (%rdi)",
    ".global pagepin_store_end",
    "pagepin_store_end:",
    "    ret",
    "",
    ".global pagepin_pf_entry",
    "pagepin_pf_entry:",
    "    push %rax",
    "    push %rdi",
    "    push %rsi",
    "    push %rdx",
    "    push %r8",
    "    push %r9",
    "    push %r10",
    "    push %rbx",
    "    mov %rsp, %rbx",
    "    sub $512, %rsp",
    "    and $-16, %rsp",
    "    fxsave64 (%rsp)",
    "    lea 8(%rbx), %rdi",
    "    call {pf}",
    "    fxrstor64 (%rsp)",
    "    mov %rbx, %rsp",
    "    pop %rbx",
    "    pop %r10",
    "    pop %r9",
    "    pop %r8",
    "    pop %rdx",
    "    pop %rsi",
    "    pop %rdi",
    "    pop %rax",
    "    pop %rcx",
    "    pop %r11",
    "    add $8, %rsp",
    "    push $0",
    "    push %rcx",
    "    push %r11",
    "    push %rax",
    "    mov $23, %eax",
    "    syscall",
    "    ud2",
    "",
    ".macro fatal vec",
    ".global pagepin_fatal_\\vec",
    "pagepin_fatal_\\vec:",
    "    mov %rsp, %rsi",
    "    mov $\\vec, %edi",
    "    and $-16, %rsp",
    "    call {fatal}",
    "    ud2",
    ".endm",
    "fatal 0",
    "fatal 1",
    "fatal 3",
    "fatal 4",
    "fatal 5",
    "fatal 6",
    "fatal 7",
    "fatal 8",
    "fatal 10",
    "fatal 11",
    "fatal 12",
    "fatal 13",
    "fatal 16",
    "fatal 17",
    "fatal 19",
    ".purgem fatal",
    ".text",
    pf = sym pf_handler,
    fatal = sym fatal_trap,
    options(att_syntax)
);

extern "C" {
    fn pagepin_store(slot: *mut u64, value: u64) -> u64;
    static pagepin_store_insn: u8;
    static pagepin_store_end: u8;
    fn pagepin_pf_entry();
    fn pagepin_fatal_0();
    fn pagepin_fatal_1();
    fn pagepin_fatal_3();
    fn pagepin_fatal_4();
    fn pagepin_fatal_5();
    fn pagepin_fatal_6();
    fn pagepin_fatal_7();
    fn pagepin_fatal_8();
    fn pagepin_fatal_10();
    fn pagepin_fatal_11();
    fn pagepin_fatal_12();
    fn pagepin_fatal_13();
    fn pagepin_fatal_16();
    fn pagepin_fatal_17();
    fn pagepin_fatal_19();
}

/// A plain 8-byte store into `slot` that may fault: the #PF handler
/// retries it up to the vCPU's limit, then gives it up. Returns whether it
/// was stored.
pub fn guarded_store(slot: &AtomicU64, value: u64) -> bool {
    let cpu = &CPUS[this_vcpu()];
    cpu.retries.store(0, Ordering::Relaxed);
    // SAFETY: `slot` is a live, aligned 8-byte word; the stub stores with
    // one `mov` (an atomic store on x86-64, release-ordered by TSO) and
    // touches nothing else; a fault in it is handled by `pf_handler`.
    unsafe { pagepin_store(slot.as_ptr(), value) == 0 }
}

extern "C" fn pf_handler(f: &mut TrapFrame) {
    let v = vcpu_of_sp(f.rsp).unwrap_or(MAX_VCPUS);
    let cr2 = if v < MAX_VCPUS { cr2_of(v) } else { 0 };
    let insn = core::ptr::addr_of!(pagepin_store_insn) as u64;
    if v >= MAX_VCPUS || f.rip != insn {
        let _ = writeln!(
            Console,
            "PAGEPIN-GUEST panic verdict=fail msg=\"unexpected page fault vcpu={v} cr2={cr2:#x} err={:#x} rip={:#x} rsp={:#x}\"",
            f.error, f.rip, f.rsp
        );
        hypercall::qemu_exit(rt::EXIT_FAIL);
    }
    let cpu = &CPUS[v];
    cpu.faults.fetch_add(1, Ordering::Relaxed);
    if cr2 == f.rdi {
        cpu.cr2_match.fetch_add(1, Ordering::Relaxed);
    }
    cpu.last_cr2.store(cr2, Ordering::Relaxed);
    cpu.last_err.store(f.error, Ordering::Relaxed);
    cpu.last_rip.store(f.rip, Ordering::Relaxed);
    let limit = match cpu.retry_limit.load(Ordering::Relaxed) {
        0 => STORE_RETRY_LIMIT,
        l => l,
    };
    let tries = cpu.retries.fetch_add(1, Ordering::Relaxed) + 1;
    let now = now_ns();
    if tries == 1 {
        cpu.first_fault_ns.store(now, Ordering::Relaxed);
    }
    let faulting_for = now.wrapping_sub(cpu.first_fault_ns.load(Ordering::Relaxed));
    if tries >= limit || faulting_for > STORE_GIVE_UP_NS {
        // Give the store up: resume after it with "not stored" in rax.
        cpu.skipped.fetch_add(1, Ordering::Relaxed);
        f.rip = core::ptr::addr_of!(pagepin_store_end) as u64;
        f.rax = 1;
    } else {
        // Retry the store after a pause that doubles with each fault (up
        // to ~4k spins): the window closes when the other vCPU's
        // hypercall returns, and a fault storm would only slow it down.
        for _ in 0..64u32 << tries.min(6) {
            core::hint::spin_loop();
        }
    }
}

extern "C" fn fatal_trap(vec: u64, sp: *const u64) -> ! {
    let mut words = [0u64; 5];
    for (i, w) in words.iter_mut().enumerate() {
        // SAFETY: `sp` is the trap's stack; the frame Xen wrote there has
        // at least five words above it.
        *w = unsafe { sp.add(i).read_volatile() };
    }
    let _ = writeln!(
        Console,
        "PAGEPIN-GUEST panic verdict=fail msg=\"exception {vec} on vcpu {} frame={words:x?}\"",
        vcpu_of_sp(sp as u64).unwrap_or(MAX_VCPUS)
    );
    hypercall::qemu_exit(rt::EXIT_FAIL)
}

/// `struct trap_info` (public `arch-x86/xen.h`).
#[repr(C)]
#[derive(Clone, Copy)]
struct TrapInfo {
    vector: u8,
    /// Bits 0-1: DPL; bit 2: mask events on entry.
    flags: u8,
    cs: u16,
    address: u64,
}

/// Guest kernel code selector of a 64-bit PV guest.
const KERNEL_CS: u16 = 0xe033;
/// Guest kernel stack selector.
const KERNEL_SS: u64 = 0xe02b;

/// Load this vCPU's trap table (Xen keeps one per vCPU).
fn load_trap_table() -> i64 {
    let entries: [(u8, unsafe extern "C" fn()); 16] = [
        (0, pagepin_fatal_0),
        (1, pagepin_fatal_1),
        (3, pagepin_fatal_3),
        (4, pagepin_fatal_4),
        (5, pagepin_fatal_5),
        (6, pagepin_fatal_6),
        (7, pagepin_fatal_7),
        (8, pagepin_fatal_8),
        (10, pagepin_fatal_10),
        (11, pagepin_fatal_11),
        (12, pagepin_fatal_12),
        (13, pagepin_fatal_13),
        (14, pagepin_pf_entry),
        (16, pagepin_fatal_16),
        (17, pagepin_fatal_17),
        (19, pagepin_fatal_19),
    ];
    let mut table = [TrapInfo {
        vector: 0,
        flags: 0,
        cs: 0,
        address: 0,
    }; 17];
    for (t, (vec, f)) in table.iter_mut().zip(entries) {
        *t = TrapInfo {
            vector: vec,
            flags: 4,
            cs: KERNEL_CS,
            address: f as usize as u64,
        };
    }
    // SAFETY: a live array of `trap_info` ending with a zero address.
    unsafe { hypercall5(nr::SET_TRAP_TABLE, table.as_ptr() as u64, 0, 0, 0, 0) }
}

// ---------------------------------------------------------------------------
// bring-up

/// `vcpu_guest_context` of x86-64 (docs/PROTOCOL.md §11): 5168 bytes.
const CTX_BYTES: usize = 5168;

#[repr(C, align(16))]
struct Ctx([u8; CTX_BYTES]);

impl Ctx {
    fn put(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

// vCPUs 1..: Xen loads every register from the context; `rdi` carries
// the vCPU number and `rsp` the top of its own stack.
global_asm!(
    ".section .text.pagepin_ap, \"ax\", @progbits",
    ".global pagepin_ap_entry",
    "pagepin_ap_entry:",
    "    xor %ebp, %ebp",
    "    call {main}",
    "    ud2",
    ".text",
    main = sym ap_main,
    options(att_syntax)
);

extern "C" {
    fn pagepin_ap_entry();
}

/// Map the shared-info page, load vCPU 0's trap table, read the clock's
/// factors, then bring up vCPUs `1..=k`. Returns the vCPUs up (1 + k on
/// success) or a message.
pub fn init(shared_info_maddr: u64, boot_l4_mfn: u64, k: usize) -> Result<usize, &'static str> {
    let va = core::ptr::addr_of!(SHARED) as u64;
    // P | RW | A | D: the shared-info page over a page of our own.
    let rc = hypercall::update_va_mapping(va, shared_info_maddr | 0x63, 2);
    if rc != 0 {
        return Err("map shared_info");
    }
    // SAFETY: the shared-info page is mapped at `SHARED`: vcpu_time_info
    // of vCPU 0 at +32, its tsc_to_system_mul at +24 and tsc_shift at +28.
    let (mul, shift) = unsafe {
        (
            core::ptr::read_volatile(shared_word::<u32>(32 + 24)),
            core::ptr::read_volatile(shared_word::<i8>(32 + 28)),
        )
    };
    TSC_MUL.store(mul as u64, Ordering::Relaxed);
    TSC_SHIFT.store(shift as u8 as u64, Ordering::Relaxed);
    if load_trap_table() != 0 {
        return Err("set_trap_table");
    }
    CPUS[0].online.store(true, Ordering::Release);
    let k = k.min(MAX_VCPUS - 1);
    let t0 = now_ns();
    for (v, cpu) in CPUS.iter().enumerate().take(k + 1).skip(1) {
        // Each context lives until the vCPU runs (Xen copies it during the
        // hypercall, but a static costs nothing here).
        let mut ctx = alloc::boxed::Box::new(Ctx([0; CTX_BYTES]));
        // SAFETY: only the address of this vCPU's stack is taken.
        let top = unsafe { core::ptr::addr_of!(STACKS.0[v]) } as u64 + STACK_BYTES as u64;
        let regs = 520;
        ctx.put(512, 1 << 2); // VGCF_in_kernel
        ctx.put(regs + 14 * 8, v as u64); // rdi
        ctx.put(regs + 128, pagepin_ap_entry as *const () as u64); // rip
        ctx.put(regs + 136, KERNEL_CS as u64); // cs
        ctx.put(regs + 144, 0x2); // rflags
        ctx.put(regs + 152, top); // rsp: the entry's `call` aligns it as the ABI wants
        ctx.put(regs + 160, KERNEL_SS); // ss
        ctx.put(4968, KERNEL_SS); // kernel_ss
        ctx.put(4976, top); // kernel_sp
        ctx.put(4984 + 3 * 8, boot_l4_mfn << 12); // ctrlreg[3]
                                                  // SAFETY: a live `vcpu_guest_context` of the documented size.
        let rc = unsafe { hypercall5(nr::VCPU_OP, 0, v as u64, ctx.0.as_ptr() as u64, 0, 0) };
        if rc != 0 {
            let _ = writeln!(Console, "PAGEPIN-GUEST VCPUOP_initialise({v}) = {rc}");
            return Err("VCPUOP_initialise");
        }
        // SAFETY: no pointer argument.
        let rc = unsafe { hypercall5(nr::VCPU_OP, 1, v as u64, 0, 0, 0) };
        if rc != 0 {
            return Err("VCPUOP_up");
        }
        let start = now_ns();
        while !cpu.online.load(Ordering::Acquire) {
            if now_ns() - start > 5_000_000_000 {
                return Err("a vCPU did not come up");
            }
            core::hint::spin_loop();
        }
    }
    ONLINE.store(1 + k, Ordering::Release);
    BRINGUP_NS.store(now_ns() - t0, Ordering::Relaxed);
    Ok(1 + k)
}

/// How long bringing vCPUs 1..=k up took.
pub static BRINGUP_NS: AtomicU64 = AtomicU64::new(0);

/// vCPUs up (vCPU 0 included).
static ONLINE: AtomicUsize = AtomicUsize::new(1);

/// vCPUs up (vCPU 0 included).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

extern "C" fn ap_main(v: usize) -> ! {
    if load_trap_table() != 0 {
        let _ = writeln!(
            Console,
            "PAGEPIN-GUEST panic verdict=fail msg=\"vcpu {v}: set_trap_table\""
        );
        hypercall::qemu_exit(rt::EXIT_FAIL);
    }
    CPUS[v].online.store(true, Ordering::Release);
    worker_loop(v)
}

// ---------------------------------------------------------------------------
// jobs

type Job = *const (dyn Fn(usize) + Sync);

/// The job in progress: written by vCPU 0 before it bumps [`GEN`], read by
/// the others after they see the new generation, and live until every one
/// has reported that generation done.
struct JobCell(UnsafeCell<Option<Job>>);

// SAFETY: written only by vCPU 0 while no job is in flight (every vCPU
// has reported the previous generation), read only after a release/acquire
// handshake on `GEN`.
unsafe impl Sync for JobCell {}

static JOB: JobCell = JobCell(UnsafeCell::new(None));
static GEN: AtomicU64 = AtomicU64::new(0);

fn worker_loop(v: usize) -> ! {
    let mut seen = 0;
    loop {
        let g = GEN.load(Ordering::Acquire);
        if g == seen {
            core::hint::spin_loop();
            continue;
        }
        seen = g;
        // SAFETY: published before `GEN` (release) and kept alive by
        // `run_parallel` until this vCPU stores `done = g` below.
        if let Some(job) = unsafe { *JOB.0.get() } {
            // SAFETY: as above: the closure outlives this call.
            unsafe { (*job)(v) };
        }
        CPUS[v].done.store(g, Ordering::Release);
    }
}

/// Run `f(0)` here and `f(v)` on every other vCPU up, in parallel; return
/// when all are done. A vCPU that does not finish within `limit_ns` ends
/// the run as a hang.
pub fn run_parallel(f: &(dyn Fn(usize) + Sync), limit_ns: u64) {
    let n = online();
    let job: *const (dyn Fn(usize) + Sync + '_) = f;
    // SAFETY: only the lifetime is erased; the pointer is withdrawn below,
    // after every vCPU has reported this generation done.
    let job: Job = unsafe { core::mem::transmute(job) };
    // SAFETY: no job is in flight (the previous call waited for all).
    unsafe { *JOB.0.get() = Some(job) };
    let g = GEN.fetch_add(1, Ordering::AcqRel) + 1;
    f(0);
    let start = now_ns();
    for (v, cpu) in CPUS.iter().enumerate().take(n).skip(1) {
        while cpu.done.load(Ordering::Acquire) != g {
            if now_ns().wrapping_sub(start) > limit_ns {
                let _ = writeln!(
                    Console,
                    "PAGEPIN-GUEST panic verdict=fail msg=\"vcpu {v} hung in a job (progress {})\"",
                    cpu.progress.load(Ordering::Relaxed)
                );
                hypercall::qemu_exit(rt::EXIT_FAIL);
            }
            core::hint::spin_loop();
        }
    }
    // SAFETY: every vCPU is done with it.
    unsafe { *JOB.0.get() = None };
}
