//! The engine's pin + unpin on the no-op trap (`NullBackend`) against the
//! irreducible work of a pin and an unpin written as plain loops over the
//! same space: read every entry of every non-leaf table and, for each table
//! page found, write its multicall entries (Xen ABI `multicall_entry`s, and
//! the `mmuext_op` an L1 pin / unpin points to) into a buffer of batch size,
//! "issued" (handed to `black_box`) when full. No locks, no pinned flags,
//! no callbacks, no journal, no validation beyond present / large bits.
//!
//! Under split a third row, "floor+locks", adds the protocol's own atomics:
//! each PTE page's lock taken when its entries are written and released
//! when the buffer is issued.
//!
//! Sizes: 1 GiB and 16 GiB mapped with 4 KiB pages; batch 32; split (L1s
//! get a separate pin) and global (they do not).

mod common;

use std::hint::black_box;
use std::time::Duration;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagepin::backends::mock::NullBackend;
use pagepin::backends::xen::abi::hypercall;
use pagepin::backends::xen::{MmuExtOpAbi, MulticallEntry, DOMID_SELF};
use pagepin::PteLock;
use pagepin::{
    AddressSpace, Batch, DefaultRawLock, EntryFlags, ExtCmd, FrameStore, Global, LockPolicy, Pfn,
    Split, X86_64,
};

const N: usize = 32;
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
const USER_SLOTS: usize = 256;

/// A multicall buffer of `N` entries and the `mmuext_op`s they point to.
struct Buf<'s> {
    entries: [MulticallEntry; N],
    ops: [MmuExtOpAbi; N],
    len: usize,
    /// PTE locks taken since the last issue, released by it (the
    /// "floor + locks" variant only).
    held: Vec<PteLock<'s>>,
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
fn floor<'s>(
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

fn group<P: LockPolicy<Lock = DefaultRawLock>>(c: &mut Criterion, mib: u64) {
    let s: AddressSpace<X86_64, P, NullBackend> = null_space(mib);
    let mut g = c.benchmark_group(format!("floor/{}GiB/{}", mib / 1024, P::NAME));
    g.throughput(Throughput::Elements(table_pages(mib)));
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function(BenchmarkId::from_parameter("engine"), |b| {
        let mut batch: Batch<N> = Batch::new();
        b.iter(|| {
            s.pin(&mut batch).expect("pin");
            s.unpin(&mut batch).expect("unpin");
        })
    });
    let mut buf = Buf {
        entries: [MulticallEntry::default(); N],
        ops: [MmuExtOpAbi::default(); N],
        len: 0,
        held: Vec::with_capacity(N),
    };
    let root = s.root().0;
    g.bench_function(BenchmarkId::from_parameter("floor"), |b| {
        b.iter(|| {
            floor(
                s.store(),
                black_box(root),
                P::SPLIT_PTE_LOCKS,
                false,
                &mut buf,
            )
        })
    });
    if P::SPLIT_PTE_LOCKS {
        g.bench_function(BenchmarkId::from_parameter("floor+locks"), |b| {
            b.iter(|| floor(s.store(), black_box(root), true, true, &mut buf))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    for mib in [1024, 16 * 1024] {
        group::<Split<DefaultRawLock>>(c, mib);
        group::<Global<DefaultRawLock>>(c, mib);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
