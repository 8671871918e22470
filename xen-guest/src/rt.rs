//! The guest's runtime: entry, Xen ELF notes, stack, console, heap,
//! panic handler and the C memory functions the compiler calls.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::hypercall;

/// `isa-debug-exit` value for a passing run (QEMU exits with 33).
pub const EXIT_PASS: u8 = 0x10;
/// `isa-debug-exit` value for a failing run (QEMU exits with 35).
pub const EXIT_FAIL: u8 = 0x11;

// Entry: Xen starts the guest with %rsi = start_info and a small stack;
// switch to vCPU 0's own (the first of `smp::STACKS`) and call Rust.
global_asm!(
    ".section .text._start, \"ax\", @progbits",
    ".global _start",
    "_start:",
    "    lea {stack}+{size}(%rip), %rsp",
    "    mov %rsi, %rdi",
    "    xor %ebp, %ebp",
    "    call guest_main",
    "    ud2",
    stack = sym crate::smp::STACKS,
    size = const crate::smp::STACK_BYTES,
    options(att_syntax)
);

// Xen ELF notes (public elfnote.h): GUEST_OS (6), XEN_VERSION (5) and
// LOADER (8) "generic", which lets Xen load a non-Linux kernel.
global_asm!(
    ".section .note.Xen, \"a\", @note",
    ".macro xennote type, desc",
    "    .balign 4",
    "    .long 4f - 3f, 6f - 5f, \\type",
    "3:  .asciz \"Xen\"",
    "4:  .balign 4",
    "5:  .asciz \"\\desc\"",
    "6:  .balign 4",
    ".endm",
    "xennote 6, pagepin",
    "xennote 5, xen-3.0",
    "xennote 8, generic",
    ".purgem xennote",
    ".text",
);

/// Writes to Xen's console.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        hypercall::console_write(s.as_bytes());
        Ok(())
    }
}

/// Bytes of heap.
const HEAP_BYTES: usize = 16 * 1024 * 1024;

#[repr(C, align(4096))]
struct Heap([u8; HEAP_BYTES]);

static mut HEAP: Heap = Heap([0; HEAP_BYTES]);

/// Size classes: blocks of 16 B << c for c in 0..CLASSES (up to 64 KiB).
const CLASSES: usize = 13;

/// A static arena carved by a bump pointer, with a free list per power-of-
/// two size class so freed blocks are reused (the parallel scenarios
/// allocate per hypercall batch for minutes). Blocks above the largest
/// class are never reused. One spin lock guards the lists: allocation is
/// rare next to hypercalls, and events stay masked so nothing re-enters.
struct Arena {
    next: AtomicUsize,
    locked: AtomicBool,
    free: UnsafeCell<[usize; CLASSES]>,
}

// SAFETY: `free` is only touched with `locked` held (see `with_lists`);
// every block handed out is a distinct range of the static arena.
unsafe impl Sync for Arena {}

impl Arena {
    /// The size class of `layout`, if it has one.
    fn class(layout: Layout) -> Option<usize> {
        let size = layout
            .size()
            .max(layout.align())
            .max(16)
            .next_power_of_two();
        let c = (size.trailing_zeros() - 4) as usize;
        (c < CLASSES).then_some(c)
    }

    fn with_lists<R>(&self, f: impl FnOnce(&mut [usize; CLASSES]) -> R) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.free.get() });
        self.locked.store(false, Ordering::Release);
        r
    }

    /// `size` fresh bytes aligned to `align`, or null when the arena is spent.
    fn bump(&self, size: usize, align: usize) -> *mut u8 {
        let base = core::ptr::addr_of_mut!(HEAP) as usize;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(align) - base;
            let end = match start.checked_add(size) {
                Some(e) if e <= HEAP_BYTES => e,
                _ => return core::ptr::null_mut(),
            };
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }
}

// SAFETY: a block of class c is 16 << c bytes aligned to its size, which
// covers the layout's size and alignment; a freed block is only reused
// for the same class, and its first word links the free list while it is
// free (it is at least 16 bytes).
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = Self::class(layout) else {
            return self.bump(layout.size(), layout.align());
        };
        let head = self.with_lists(|l| {
            let head = l[c];
            if head != 0 {
                // SAFETY: a free block's first word is the next free block.
                l[c] = unsafe { (head as *const usize).read() };
            }
            head
        });
        if head != 0 {
            return head as *mut u8;
        }
        self.bump(16 << c, 16 << c)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(c) = Self::class(layout) {
            self.with_lists(|l| {
                // SAFETY: the block is ours again (the caller freed it) and
                // at least 16 bytes: its first word links the list.
                unsafe { (ptr as *mut usize).write(l[c]) };
                l[c] = ptr as usize;
            });
        }
    }
}

#[global_allocator]
static ALLOC: Arena = Arena {
    next: AtomicUsize::new(0),
    locked: AtomicBool::new(false),
    free: UnsafeCell::new([0; CLASSES]),
};

/// Bytes of the arena carved so far (its high-water mark).
pub fn heap_used() -> usize {
    ALLOC.next.load(Ordering::Relaxed)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let _ = writeln!(Console, "PAGEPIN-GUEST panic verdict=fail msg=\"{info}\"");
    hypercall::qemu_exit(EXIT_FAIL)
}

/// libcore is built with unwinding tables and names this symbol; with
/// panic=abort it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The prebuilt liballoc has landing pads that resume unwinding; with
/// panic=abort nothing ever unwinds, so this is never reached.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    hypercall::qemu_exit(EXIT_FAIL)
}

// The C memory functions. Written with `rep` string instructions, so the
// compiler cannot turn them back into calls to themselves.

/// Copy `n` bytes (non-overlapping).
///
/// # Safety
/// C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `n` readable bytes at `src` and `n`
    // writable bytes at `dst`; the direction flag is clear (ABI).
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// Copy `n` bytes (ranges may overlap).
///
/// # Safety
/// C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or the
        // ranges do not overlap; same contract as memcpy otherwise.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: copy backwards from the last byte with the direction
        // flag set, restoring it afterwards as the ABI requires.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack));
        }
        dst
    }
}

/// Fill `n` bytes with `c`.
///
/// # Safety
/// C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `n` writable bytes at `dst`.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// Compare `n` bytes.
///
/// # Safety
/// C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and the caller guarantees `n` readable bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// Whether `n` bytes differ (0: equal).
///
/// # Safety
/// C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
