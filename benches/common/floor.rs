//! The floor of one pin and one unpin, written as plain loops over a
//! space's tables: read every entry of every non-leaf table and, for each
//! table page found, write its multicall entries (Xen ABI
//! `multicall_entry`s, and the `mmuext_op` an L1 pin / unpin points to)
//! into a buffer of batch size, "issued" (handed to `black_box`) when full.
//! No locks, no pinned flags, no callbacks, no journal, no validation
//! beyond present / large bits. With `locks` (split only), each PTE page's
//! lock is also taken when its entries are written and released when the
//! buffer is issued: the protocol's own atomics.
//!
//! Shared by the `floor` bench (criterion) and the `floor_ratio` report
//! (interleaved rounds).

use std::hint::black_box;

use pagepin::backends::xen::abi::hypercall;
use pagepin::backends::xen::{MmuExtOpAbi, MulticallEntry, DOMID_SELF};
use pagepin::PteLock;
use pagepin::{DefaultRawLock, EntryFlags, ExtCmd, FrameStore, Pfn};

/// The batch size of the floor (and of the engine it is compared with).
pub const N: usize = 32;
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
const USER_SLOTS: usize = 256;

/// A multicall buffer of `N` entries and the `mmuext_op`s they point to.
pub struct Buf<'s> {
    entries: [MulticallEntry; N],
    ops: [MmuExtOpAbi; N],
    len: usize,
    /// PTE locks taken since the last issue, released by it (the
    /// "floor + locks" variant only).
    held: Vec<PteLock<'s>>,
}

impl Default for Buf<'_> {
    fn default() -> Self {
        Buf {
            entries: [MulticallEntry::default(); N],
            ops: [MmuExtOpAbi::default(); N],
            len: 0,
            held: Vec::with_capacity(N),
        }
    }
}

impl Buf<'_> {
    #[inline(always)]
    fn issue_if_full(&mut self) {
        if self.len == N {
            self.issue();
        }
    }
    #[inline(always)]
    fn issue(&mut self) {
        if self.len != 0 {
            black_box(&mut self.entries[..self.len]);
            black_box(&mut self.ops[..self.len]);
            self.len = 0;
        }
        for l in self.held.drain(..) {
            // SAFETY: taken by `floor` for this batch and not released yet.
            unsafe { l.unlock() };
        }
    }
    #[inline(always)]
    fn remap(&mut self, pfn: u64, writable: bool, flush: bool) {
        self.issue_if_full();
        let pte = (pfn << 12)
            | (EntryFlags::PRESENT
                | EntryFlags::ACCESSED
                | EntryFlags::DIRTY
                | EntryFlags::NO_EXECUTE)
                .bits()
            | if writable {
                EntryFlags::WRITABLE.bits()
            } else {
                0
            };
        self.entries[self.len] = MulticallEntry {
            op: hypercall::UPDATE_VA_MAPPING,
            result: 0,
            args: [DIRECT_MAP + (pfn << 12), pte, flush as u64, 0, 0, 0],
        };
        self.len += 1;
    }
    #[inline(always)]
    fn ext(&mut self, cmd: ExtCmd, mfn: u64) {
        self.issue_if_full();
        self.ops[self.len] = MmuExtOpAbi {
            cmd: cmd as u32,
            _pad: 0,
            arg1: mfn,
            arg2: 0,
        };
        let p = &self.ops[self.len] as *const MmuExtOpAbi as u64;
        self.entries[self.len] = MulticallEntry {
            op: hypercall::MMUEXT_OP,
            result: 0,
            args: [p, 1, 0, DOMID_SELF as u64, 0, 0],
        };
        self.len += 1;
    }
}

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Visit the non-leaf tables under `pfn` (at `level`, 1..=3) in pre-order.
#[inline(always)]
fn table(store: &FrameStore<DefaultRawLock>, pfn: u64, level: u8, f: &mut impl FnMut(u64, u8)) {
    f(pfn, level);
    if level == 1 {
        return;
    }
    let frame = store.frame(Pfn(pfn)).expect("frame");
    for e in frame.entries() {
        let e = e.load(std::sync::atomic::Ordering::Relaxed);
        if e & PRESENT != 0 && e & HUGE == 0 {
            table(store, (e & ADDR) >> 12, level - 1, f);
        }
    }
}

fn walk(store: &FrameStore<DefaultRawLock>, root: u64, f: &mut impl FnMut(u64, u8)) {
    let frame = store.frame(Pfn(root)).expect("root");
    for e in &frame.entries()[..USER_SLOTS] {
        let e = e.load(std::sync::atomic::Ordering::Relaxed);
        if e & PRESENT != 0 {
            table(store, (e & ADDR) >> 12, 3, f);
        }
    }
}

/// The floor of one pin and one unpin (identity p2m, as `NullBackend`).
/// With `locks` (split only), each PTE page's lock is also taken when its
/// entries are written and released when the buffer is issued: the
/// protocol's own atomics, which no implementation can drop.
pub fn floor<'s>(
    store: &'s FrameStore<DefaultRawLock>,
    root: u64,
    split: bool,
    locks: bool,
    buf: &mut Buf<'s>,
) {
    let lock = |buf: &mut Buf<'s>, pfn: u64| {
        if locks {
            let l = store.meta(Pfn(pfn)).expect("meta").lock();
            l.lock();
            buf.held.push(l);
        }
    };
    // Pin: every table read-only (split: L1s pinned), root last with the
    // flush, then the root pinned.
    walk(store, root, &mut |pfn, level| {
        if split && level == 1 {
            // Both entries in one batch, so the lock spans them.
            if locks && buf.len + 2 > N {
                buf.issue();
            }
            lock(buf, pfn);
        }
        buf.remap(pfn, false, false);
        if split && level == 1 {
            buf.ext(ExtCmd::PinL1Table, pfn);
        }
    });
    buf.remap(root, false, true);
    buf.ext(ExtCmd::PinL4Table, root);
    buf.issue();
    // Unpin: the root unpinned first, every table writable (split: L1s
    // unpinned first), the root last.
    buf.ext(ExtCmd::UnpinTable, root);
    walk(store, root, &mut |pfn, level| {
        if split && level == 1 {
            if locks && buf.len + 2 > N {
                buf.issue();
            }
            lock(buf, pfn);
            buf.ext(ExtCmd::UnpinTable, pfn);
        }
        buf.remap(pfn, true, false);
    });
    buf.remap(root, true, true);
    buf.issue();
}
