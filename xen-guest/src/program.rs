//! Random PV MMU programs, written once and run twice: inside the PV test
//! guest on real Xen and in the host test (`tests/real_xen_diff.rs`, which
//! includes this file) on `XenSim`. Only `core` and `alloc`.
//!
//! A program works on a pool of [`POOL`] frames of the domain's own memory
//! (a few pre-built as L1..L4 tables by its `setup` stores) and names every
//! frame symbolically ([`Sym`]), so the two sides, whose machine frame
//! numbers differ, print the same text for the same behaviour. [`run`]
//! issues each operation through a [`Target`], reads every pool entry and
//! direct-map entry back after it, and folds results and read-backs into
//! one hash per program (with `detail`, one line per operation).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use pagepin_backends::xen::abi::hypercall;
use pagepin_backends::xen::{MmuExtOpAbi, MmuUpdateAbi, MulticallEntry, XenHypercalls, DOMID_SELF};
use pagepin_engine::Mfn;

/// Frames in a program's pool.
pub const POOL: usize = 32;
/// Prefix of the per-program lines.
pub const LINE: &str = "PAGEPIN-DIFF";
/// Machine frame used as I/O memory (beyond the RAM of a 512 MiB machine).
pub const IO_MFN: u64 = 0x10_0000;
/// Machine frame beyond any machine's address width (address bit 51).
pub const FAR_MFN: u64 = 1 << 39;
/// Bits of an entry that hold its frame (12..=51).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Xen's `MMUEXT_*` command numbers this file uses by name.
pub mod cmd {
    /// Pin an L1 table (L2..L4 are 1..=3).
    pub const PIN_L1: u32 = 0;
    /// Unpin.
    pub const UNPIN: u32 = 4;
    /// Load a kernel base pointer.
    pub const NEW_BASEPTR: u32 = 5;
    /// Invalidate one address on this vCPU.
    pub const INVLPG_LOCAL: u32 = 7;
    /// Flush a vCPU set's TLBs (arg2: mask pointer).
    pub const TLB_FLUSH_MULTI: u32 = 8;
    /// Invalidate one address on a vCPU set (arg2: mask pointer).
    pub const INVLPG_MULTI: u32 = 9;
    /// Set the LDT (arg1 address, arg2 entries).
    pub const SET_LDT: u32 = 13;
    /// Load a user base pointer (0: none).
    pub const NEW_USER_BASEPTR: u32 = 15;
    /// Zero a page.
    pub const CLEAR_PAGE: u32 = 16;
    /// Copy a page (arg2: source mfn).
    pub const COPY_PAGE: u32 = 17;
    /// One past the largest command number Xen 4.17 defines.
    pub const END: u32 = 21;
}

/// A frame named independently of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sym {
    /// Pool frame `i`.
    Pool(u8),
    /// The guest's running L4 (its boot page tables' root).
    Boot,
    /// A frame of I/O memory ([`IO_MFN`]).
    Io,
    /// A frame beyond the address width ([`FAR_MFN`]).
    Far,
    /// A frame of the hypervisor's own (real Xen: the L3 an L4's Xen slot
    /// points to; simulator: a frame it does not give the domain).
    Xen,
}

impl Sym {
    fn code(self) -> u64 {
        match self {
            Sym::Pool(i) => i as u64,
            Sym::Boot => 1000,
            Sym::Io => 1001,
            Sym::Far => 1002,
            Sym::Xen => 1003,
        }
    }
    fn from_code(c: u64) -> Option<Sym> {
        Some(match c {
            c if c < POOL as u64 => Sym::Pool(c as u8),
            1000 => Sym::Boot,
            1001 => Sym::Io,
            1002 => Sym::Far,
            1003 => Sym::Xen,
            _ => return None,
        })
    }
    fn name(self) -> String {
        match self {
            Sym::Pool(i) => format!("P{i}"),
            Sym::Boot => String::from("Boot"),
            Sym::Io => String::from("Io"),
            Sym::Far => String::from("Far"),
            Sym::Xen => String::from("Xen"),
        }
    }
}

/// An entry value: a frame and the other 24 bits (0..=11, 52..=63).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ent {
    /// The frame.
    pub frame: Sym,
    /// Every bit outside [`ADDR_MASK`].
    pub flags: u64,
}

/// One `mmu_update` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Req {
    /// The table written.
    pub table: Sym,
    /// Entry index.
    pub index: u16,
    /// The low three bits of `ptr` (the sub-command and bit 2).
    pub cmd: u8,
    /// The new value (for `MMU_MACHPHYS_UPDATE`: the frame's pfn).
    pub ent: Ent,
}

/// An `mmuext_op` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// 0.
    Zero,
    /// A frame's mfn.
    Mfn(Sym),
    /// The direct-map address of pool frame `i`.
    Va(u8),
    /// A vCPU-mask pointer: valid (mask = vCPU 0) or not (non-canonical).
    Mask(bool),
    /// A number.
    Num(u64),
}

/// One `mmuext_op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext {
    /// Command number.
    pub cmd: u32,
    /// `arg1`.
    pub arg1: Arg,
    /// `arg2`.
    pub arg2: Arg,
}

/// One operation of a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `mmu_update` of the requests.
    Mmu(Vec<Req>),
    /// `update_va_mapping` of pool frame `frame`'s direct-map address to
    /// itself with `flags`; `uvmf` the flush flags, `mask` a mask pointer
    /// put in them (`None`: `uvmf` alone).
    Uvm {
        /// Pool frame.
        frame: u8,
        /// The entry's bits outside the frame.
        flags: u64,
        /// `UVMF_*` (flush type | ALL).
        uvmf: u64,
        /// A vCPU-mask pointer in the flags instead of LOCAL/ALL.
        mask: Option<bool>,
    },
    /// `mmuext_op` of the operations.
    Ext(Vec<Ext>),
    /// A plain 8-byte store into entry `index` of pool frame `frame`.
    Store {
        /// Pool frame.
        frame: u8,
        /// Entry index.
        index: u16,
        /// The value.
        ent: Ent,
    },
    /// A multicall of these entries (`Mmu`, `Uvm`, `Ext`, `Other`,
    /// `Multi` nested).
    Multi(Vec<Op>),
    /// Another hypercall number, no arguments (only inside a multicall).
    Other(u64),
}

/// A program: stores into the (untyped, writable, zeroed) pool first,
/// then the operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// The seed it was generated from (0: hand-written or shrunk).
    pub seed: u64,
    /// `(frame, index, value)` stored before the operations.
    pub setup: Vec<(u8, u16, Ent)>,
    /// The operations.
    pub ops: Vec<Op>,
}

// ---------------------------------------------------------------------------
// generation

// The project's one seeded generator (`no_std`, shared with the tests).
use pagepin_backends::SplitMix64 as Rng;

/// The generator of `seed`, mixed as it always was: a seed replays the
/// same program.
fn rng(seed: u64) -> Rng {
    Rng::new(seed ^ 0x5851_f42d_4c95_7f2d)
}

/// Roles the setup gives pool frames (by position in a per-program
/// permutation): one L4 → L3 → L2 → L1 chain, spare tables, data frames.
struct Roles {
    perm: [u8; POOL],
}

impl Roles {
    fn new(r: &mut Rng) -> Roles {
        let mut perm: [u8; POOL] = core::array::from_fn(|i| i as u8);
        for i in (1..POOL).rev() {
            let j = r.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        Roles { perm }
    }
    /// Table of `level` number `k` (k < 2), or a data frame.
    fn table(&self, level: usize, k: usize) -> u8 {
        self.perm[(level - 1) * 2 + k]
    }
    fn data(&self, k: usize) -> u8 {
        self.perm[8 + k % (POOL - 8)]
    }
    fn any_table(&self, r: &mut Rng) -> u8 {
        self.perm[r.below(8) as usize]
    }
    fn any(&self, r: &mut Rng) -> u8 {
        if r.odds(2, 3) {
            self.any_table(r)
        } else {
            r.below(POOL as u64) as u8
        }
    }
}

/// Present | RW | A | D.
const PRW: u64 = 0x63;
/// Present | A | D.
const PRO: u64 = 0x61;

fn rand_flags(r: &mut Rng) -> u64 {
    let base = match r.below(8) {
        0 => PRO,
        1 => PRO | 0x4,
        2 => PRW | 0x4,
        3 => 0x0,
        4 => r.next() & !ADDR_MASK,
        _ => PRW,
    };
    let mut f = base;
    if r.odds(1, 3) {
        // One more bit anywhere outside the frame: PWT, PCD, PS/PAT, G,
        // available bits, NX, the high software bits.
        let bit = match r.below(24) {
            b if b < 12 => b,
            b => b + 40,
        };
        f ^= 1 << bit;
    }
    f
}

fn rand_ent(r: &mut Rng, roles: &Roles) -> Ent {
    let frame = match r.below(20) {
        0 => Sym::Io,
        1 => Sym::Far,
        2 => Sym::Xen,
        3 => Sym::Boot,
        _ => Sym::Pool(roles.any(r)),
    };
    Ent {
        frame,
        flags: rand_flags(r),
    }
}

fn rand_index(r: &mut Rng) -> u16 {
    if r.odds(3, 4) {
        r.below(4) as u16
    } else {
        r.below(512) as u16
    }
}

fn rand_req(r: &mut Rng, roles: &Roles) -> Req {
    let table = if r.odds(1, 30) {
        Sym::Xen
    } else {
        Sym::Pool(roles.any(r))
    };
    let cmd = match r.below(16) {
        0 => 1,
        1 => 3,
        2 => 4 | r.below(4) as u8,
        3..=5 => 2,
        _ => 0,
    };
    let mut ent = rand_ent(r, roles);
    if cmd == 1 {
        // MMU_MACHPHYS_UPDATE: keep the m2p right (its pfn).
        ent.frame = table;
    }
    Req {
        table,
        index: rand_index(r),
        cmd,
        ent,
    }
}

fn rand_mfn_arg(r: &mut Rng, roles: &Roles) -> Arg {
    match r.below(16) {
        0 => Arg::Mfn(Sym::Io),
        1 => Arg::Mfn(Sym::Far),
        2 => Arg::Mfn(Sym::Xen),
        _ => Arg::Mfn(Sym::Pool(roles.any(r))),
    }
}

fn rand_ext(r: &mut Rng, roles: &Roles) -> Ext {
    let c = match r.below(24) {
        0..=7 => r.below(4) as u32,
        8..=10 => cmd::UNPIN,
        11..=19 => 5 + r.below(cmd::END as u64 - 5) as u32,
        _ => cmd::END + r.below(3) as u32,
    };
    let mut e = Ext {
        cmd: c,
        arg1: Arg::Zero,
        arg2: Arg::Zero,
    };
    match c {
        0..=4 | cmd::CLEAR_PAGE | 18..=20 => e.arg1 = rand_mfn_arg(r, roles),
        cmd::NEW_BASEPTR => {
            // Only onto the running L4 or frames that cannot be an L4.
            e.arg1 = match r.below(4) {
                0 => Arg::Mfn(Sym::Far),
                1 => Arg::Mfn(Sym::Io),
                _ => Arg::Mfn(Sym::Boot),
            }
        }
        7 | 9 | 11 => e.arg1 = Arg::Va(roles.any(r)),
        cmd::SET_LDT if r.odds(1, 2) => {
            e.arg1 = Arg::Va(roles.data(r.below(8) as usize));
            e.arg2 = Arg::Num([1, 16, 512, 8192, 8193][r.below(5) as usize]);
        }
        cmd::NEW_USER_BASEPTR if r.odds(2, 3) => e.arg1 = rand_mfn_arg(r, roles),
        cmd::COPY_PAGE => {
            e.arg1 = rand_mfn_arg(r, roles);
            e.arg2 = rand_mfn_arg(r, roles);
        }
        _ => {}
    }
    if c == cmd::TLB_FLUSH_MULTI || c == cmd::INVLPG_MULTI {
        e.arg2 = Arg::Mask(r.odds(3, 4));
    }
    e
}

fn rand_uvm(r: &mut Rng, roles: &Roles) -> Op {
    let frame = roles.any(r);
    let mut flags = if r.odds(1, 2) { PRO } else { PRW };
    if r.odds(1, 4) {
        flags |= rand_flags(r) & !0x1;
    }
    let mask = match r.below(8) {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    };
    Op::Uvm {
        frame,
        flags: flags | 1,
        uvmf: r.below(8),
        mask,
    }
}

fn rand_simple(r: &mut Rng, roles: &Roles, in_multi: bool) -> Op {
    match r.below(20) {
        0..=4 => rand_uvm(r, roles),
        5..=10 => {
            let n = if r.odds(1, 2) { 1 } else { 1 + r.below(4) };
            Op::Ext((0..n).map(|_| rand_ext(r, roles)).collect())
        }
        11..=15 => {
            let n = if r.odds(1, 2) { 1 } else { 1 + r.below(5) };
            Op::Mmu((0..n).map(|_| rand_req(r, roles)).collect())
        }
        16 if in_multi => Op::Other([17, 60, 63][r.below(3) as usize]),
        17 if in_multi => Op::Multi(Vec::new()),
        _ => {
            let frame = roles.any(r);
            Op::Store {
                frame,
                index: rand_index(r),
                ent: rand_ent(r, roles),
            }
        }
    }
}

/// The program of `seed` with `ops` operations.
pub fn generate(seed: u64, ops: usize) -> Program {
    let mut r = rng(seed);
    let roles = Roles::new(&mut r);
    let mut setup = Vec::new();
    // The chain L4 → L3 → L2 → L1 → data, and a second table per level
    // pointing down the chain too.
    for level in 2..=4 {
        for k in 0..2 {
            let child = roles.table(level - 1, k);
            setup.push((
                roles.table(level, k),
                r.below(4) as u16,
                Ent {
                    frame: Sym::Pool(child),
                    flags: PRW | 0x4,
                },
            ));
        }
    }
    for k in 0..2 {
        for j in 0..(1 + r.below(4)) {
            let flags = if r.odds(1, 2) { PRW } else { PRO };
            setup.push((
                roles.table(1, k),
                j as u16,
                Ent {
                    frame: Sym::Pool(roles.data(r.below(24) as usize)),
                    flags: flags | (r.below(2) << 2),
                },
            ));
        }
    }
    for _ in 0..r.below(4) {
        setup.push((
            roles.any(&mut r),
            rand_index(&mut r),
            rand_ent(&mut r, &roles),
        ));
    }
    let mut list = Vec::with_capacity(ops);
    while list.len() < ops {
        let op = if r.odds(1, 7) {
            let n = 1 + r.below(6);
            Op::Multi((0..n).map(|_| rand_simple(&mut r, &roles, true)).collect())
        } else {
            rand_simple(&mut r, &roles, false)
        };
        list.push(op);
    }
    Program {
        seed,
        setup,
        ops: list,
    }
}

/// The seed of program `k` of a run seeded `seed`.
pub fn program_seed(seed: u64, k: u64) -> u64 {
    let mut r = rng(seed.wrapping_mul(0x1000_0000_01b3) ^ k);
    r.next() | 1
}

/// Operations of a program, multicall entries included.
pub fn op_count(p: &Program) -> usize {
    fn n(o: &Op) -> usize {
        match o {
            Op::Multi(v) => 1 + v.iter().map(n).sum::<usize>(),
            _ => 1,
        }
    }
    p.ops.iter().map(n).sum()
}

// ---------------------------------------------------------------------------
// encoding (programs travel to the guest as a boot module of u64 words)

fn put_ent(w: &mut Vec<u64>, e: Ent) {
    w.push(e.frame.code());
    w.push(e.flags);
}

fn put_arg(w: &mut Vec<u64>, a: Arg) {
    let (t, v) = match a {
        Arg::Zero => (0, 0),
        Arg::Mfn(s) => (1, s.code()),
        Arg::Va(i) => (2, i as u64),
        Arg::Mask(ok) => (3, ok as u64),
        Arg::Num(n) => (4, n),
    };
    w.push(t);
    w.push(v);
}

fn put_op(w: &mut Vec<u64>, o: &Op) {
    match o {
        Op::Mmu(reqs) => {
            w.extend([1, reqs.len() as u64]);
            for q in reqs {
                w.extend([q.table.code(), q.index as u64, q.cmd as u64]);
                put_ent(w, q.ent);
            }
        }
        Op::Uvm {
            frame,
            flags,
            uvmf,
            mask,
        } => {
            let m = match mask {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            };
            w.extend([2, *frame as u64, *flags, *uvmf, m]);
        }
        Op::Ext(ops) => {
            w.extend([3, ops.len() as u64]);
            for e in ops {
                w.push(e.cmd as u64);
                put_arg(w, e.arg1);
                put_arg(w, e.arg2);
            }
        }
        Op::Store { frame, index, ent } => {
            w.extend([4, *frame as u64, *index as u64]);
            put_ent(w, *ent);
        }
        Op::Multi(v) => {
            w.extend([5, v.len() as u64]);
            for o in v {
                put_op(w, o);
            }
        }
        Op::Other(nr) => w.extend([6, *nr]),
    }
}

/// A program as words.
pub fn encode(p: &Program) -> Vec<u64> {
    let mut w = vec![p.seed, p.setup.len() as u64];
    for &(f, i, e) in &p.setup {
        w.extend([f as u64, i as u64]);
        put_ent(&mut w, e);
    }
    w.push(p.ops.len() as u64);
    for o in &p.ops {
        put_op(&mut w, o);
    }
    w
}

/// Programs as words (a count, then each program's length and words).
pub fn encode_all(ps: &[Program]) -> Vec<u64> {
    let mut w = vec![ps.len() as u64];
    for p in ps {
        let e = encode(p);
        w.push(e.len() as u64);
        w.extend(e);
    }
    w
}

struct Words<'a>(&'a [u64]);

impl Words<'_> {
    fn next(&mut self) -> Option<u64> {
        let (&x, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(x)
    }
    fn pool(&mut self) -> Option<u8> {
        let x = self.next()?;
        (x < POOL as u64).then_some(x as u8)
    }
    fn sym(&mut self) -> Option<Sym> {
        Sym::from_code(self.next()?)
    }
    fn ent(&mut self) -> Option<Ent> {
        Some(Ent {
            frame: self.sym()?,
            flags: self.next()? & !ADDR_MASK,
        })
    }
    fn arg(&mut self) -> Option<Arg> {
        let (t, v) = (self.next()?, self.next()?);
        Some(match t {
            0 => Arg::Zero,
            1 => Arg::Mfn(Sym::from_code(v)?),
            2 => Arg::Va((v < POOL as u64).then_some(v as u8)?),
            3 => Arg::Mask(v != 0),
            4 => Arg::Num(v),
            _ => return None,
        })
    }
    fn len(&mut self) -> Option<usize> {
        let n = self.next()?;
        (n <= 1 << 20).then_some(n as usize)
    }
    fn op(&mut self, depth: u32) -> Option<Op> {
        Some(match self.next()? {
            1 => {
                let n = self.len()?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(Req {
                        table: self.sym()?,
                        index: (self.next()? & 511) as u16,
                        cmd: (self.next()? & 7) as u8,
                        ent: self.ent()?,
                    });
                }
                Op::Mmu(v)
            }
            2 => Op::Uvm {
                frame: self.pool()?,
                flags: self.next()? & !ADDR_MASK,
                uvmf: self.next()? & 7,
                mask: match self.next()? {
                    0 => None,
                    1 => Some(false),
                    _ => Some(true),
                },
            },
            3 => {
                let n = self.len()?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(Ext {
                        cmd: self.next()? as u32,
                        arg1: self.arg()?,
                        arg2: self.arg()?,
                    });
                }
                Op::Ext(v)
            }
            4 => Op::Store {
                frame: self.pool()?,
                index: (self.next()? & 511) as u16,
                ent: self.ent()?,
            },
            5 if depth < 2 => {
                let n = self.len()?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(self.op(depth + 1)?);
                }
                Op::Multi(v)
            }
            6 => Op::Other(self.next()?),
            _ => return None,
        })
    }
}

/// A program from words.
pub fn decode(w: &[u64]) -> Option<Program> {
    let mut w = Words(w);
    let seed = w.next()?;
    let n = w.len()?;
    let mut setup = Vec::new();
    for _ in 0..n {
        setup.push((w.pool()?, (w.next()? & 511) as u16, w.ent()?));
    }
    let n = w.len()?;
    let mut ops = Vec::new();
    for _ in 0..n {
        ops.push(w.op(0)?);
    }
    Some(Program { seed, setup, ops })
}

/// Programs from [`encode_all`]'s words.
pub fn decode_all(w: &[u64]) -> Option<Vec<Program>> {
    let mut ws = Words(w);
    let n = ws.len()?;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = ws.len()?;
        let body = ws.0.get(..len)?;
        out.push(decode(body)?);
        ws.0 = &ws.0[len..];
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// running

/// What a program runs against: real Xen in the guest, `XenSim` on the host.
pub trait Target {
    /// The hypercall trap.
    type H: XenHypercalls;
    /// It.
    fn hv(&self) -> &Self::H;
    /// The machine frame of `s`.
    fn mfn(&self, s: Sym) -> u64;
    /// The pseudo-physical frame of pool frame `i`.
    fn pfn(&self, i: usize) -> u64;
    /// The direct-map (kernel virtual) address of pool frame `i`.
    fn va(&self, i: usize) -> u64;
    /// Entry `index` of pool frame `i`.
    fn slot(&self, i: usize, index: usize) -> &AtomicU64;
    /// The direct-map entry mapping pool frame `i` now.
    fn dm_entry(&self, i: usize) -> u64;
    /// A vCPU-mask pointer: a readable mask naming vCPU 0, or an address
    /// no guest can pass.
    fn mask_ptr(&self, ok: bool) -> u64;
}

/// What one program did, in compact form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Hash over every result and read-back, and the probe.
    pub hash: u64,
    /// Operations run (multicall entries included).
    pub ops: usize,
    /// The final probe: per pool frame, the pin result at L1..L4.
    pub probe: String,
}

fn fnv(h: &mut u64, s: &[u8]) {
    for &b in s {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

/// `v` with its frame replaced by a symbol's code (+1; unknown frames
/// become 0xfffff), so both sides agree.
pub fn symbolize<T: Target>(t: &T, v: u64) -> u64 {
    if v & ADDR_MASK == 0 {
        return v;
    }
    let mfn = (v & ADDR_MASK) >> 12;
    let mut code = 0xfffff;
    for i in 0..POOL {
        if t.mfn(Sym::Pool(i as u8)) == mfn {
            code = i as u64 + 1;
        }
    }
    for s in [Sym::Boot, Sym::Io, Sym::Far, Sym::Xen] {
        if t.mfn(s) == mfn {
            code = s.code() + 1;
        }
    }
    (v & !ADDR_MASK) | (code << 12)
}

/// How a symbolized entry prints: `P3|0x67` (frame | other bits).
pub fn show_entry(v: u64) -> String {
    if v & ADDR_MASK == 0 {
        return format!("{v:#x}");
    }
    let code = (v & ADDR_MASK) >> 12;
    let name = code
        .checked_sub(1)
        .and_then(Sym::from_code)
        .map_or(String::from("?"), Sym::name);
    format!("{name}|{:#x}", v & !ADDR_MASK)
}

fn value<T: Target>(t: &T, e: Ent) -> u64 {
    ((t.mfn(e.frame) << 12) & ADDR_MASK) | (e.flags & !ADDR_MASK)
}

fn arg<T: Target>(t: &T, a: Arg) -> u64 {
    match a {
        Arg::Zero => 0,
        Arg::Mfn(s) => t.mfn(s),
        Arg::Va(i) => t.va(i as usize),
        Arg::Mask(ok) => t.mask_ptr(ok),
        Arg::Num(n) => n,
    }
}

fn mmu_reqs<T: Target>(t: &T, reqs: &[Req]) -> Vec<MmuUpdateAbi> {
    reqs.iter()
        .map(|q| {
            let ptr = (t.mfn(q.table) << 12) + q.index as u64 * 8 + q.cmd as u64;
            let val = if q.cmd & 3 == 1 {
                // MMU_MACHPHYS_UPDATE: the pfn of the frame.
                match q.table {
                    Sym::Pool(i) => t.pfn(i as usize),
                    _ => 0,
                }
            } else {
                value(t, q.ent)
            };
            MmuUpdateAbi { ptr, val }
        })
        .collect()
}

fn ext_ops<T: Target>(t: &T, ops: &[Ext]) -> Vec<MmuExtOpAbi> {
    ops.iter()
        .map(|e| MmuExtOpAbi {
            cmd: e.cmd,
            _pad: 0,
            arg1: arg(t, e.arg1),
            arg2: arg(t, e.arg2),
        })
        .collect()
}

fn uvm_args<T: Target>(t: &T, frame: u8, flags: u64, uvmf: u64, mask: Option<bool>) -> [u64; 3] {
    let i = frame as usize;
    let pte = ((t.mfn(Sym::Pool(frame)) << 12) & ADDR_MASK) | (flags & !ADDR_MASK);
    let f = match mask {
        None => uvmf,
        Some(ok) => (uvmf & 3) | t.mask_ptr(ok),
    };
    [t.va(i), pte, f]
}

/// Buffers a multicall entry's pointers point into (kept alive across
/// the call).
#[derive(Default)]
struct Bufs {
    mmu: Vec<Vec<MmuUpdateAbi>>,
    ext: Vec<Vec<MmuExtOpAbi>>,
    multi: Vec<Vec<MulticallEntry>>,
    done: Vec<u32>,
}

/// Encode `o` as a multicall entry (its arrays in `b`).
fn entry<T: Target>(t: &T, o: &Op, b: &mut Bufs) -> MulticallEntry {
    let mut e = MulticallEntry::default();
    match o {
        Op::Mmu(reqs) => {
            let v = mmu_reqs(t, reqs);
            e.op = hypercall::MMU_UPDATE;
            e.args[0] = v.as_ptr() as u64;
            e.args[1] = v.len() as u64;
            e.args[3] = DOMID_SELF as u64;
            b.mmu.push(v);
        }
        Op::Ext(ops) => {
            let v = ext_ops(t, ops);
            e.op = hypercall::MMUEXT_OP;
            e.args[0] = v.as_ptr() as u64;
            e.args[1] = v.len() as u64;
            e.args[3] = DOMID_SELF as u64;
            b.ext.push(v);
        }
        Op::Uvm {
            frame,
            flags,
            uvmf,
            mask: m,
        } => {
            e.op = hypercall::UPDATE_VA_MAPPING;
            e.args[..3].copy_from_slice(&uvm_args(t, *frame, *flags, *uvmf, *m));
        }
        Op::Multi(inner) => {
            let v: Vec<MulticallEntry> = inner.iter().map(|o| entry(t, o, b)).collect();
            e.op = hypercall::MULTICALL;
            e.args[0] = v.as_ptr() as u64;
            e.args[1] = v.len() as u64;
            b.multi.push(v);
        }
        Op::Other(nr) => e.op = *nr,
        Op::Store { .. } => e.op = 63,
    }
    e
}

/// Run one operation; its result as text.
fn run_op<T: Target>(t: &T, o: &Op) -> String {
    let h = t.hv();
    match o {
        Op::Mmu(reqs) => {
            let v = mmu_reqs(t, reqs);
            let mut done = u32::MAX;
            // SAFETY: `v` holds `v.len()` live requests and `done` is a
            // live counter; neither is touched during the call.
            let rc = unsafe { h.mmu_update(v.as_ptr(), v.len(), &mut done, DOMID_SELF) };
            format!("m{rc}/{done}")
        }
        Op::Ext(ops) => {
            let v = ext_ops(t, ops);
            let mut done = u32::MAX;
            // SAFETY: as for `mmu_update`; pointer arguments inside the ops
            // (vCPU masks) are live or deliberately invalid addresses the
            // hypervisor must refuse.
            let rc = unsafe { h.mmuext_op(v.as_ptr(), v.len(), &mut done, DOMID_SELF) };
            format!("x{rc}/{done}")
        }
        Op::Uvm {
            frame,
            flags,
            uvmf,
            mask: m,
        } => {
            let [va, pte, f] = uvm_args(t, *frame, *flags, *uvmf, *m);
            format!("u{}", h.update_va_mapping(va, pte, f))
        }
        Op::Store { frame, index, ent } => {
            let (i, idx) = (*frame as usize, *index as usize);
            // Known gap, by design: a read-only remap without a flush
            // leaves a stale writable TLB entry that real hardware may or
            // may not still hold at the store (QEMU's TLB keeps it until
            // evicted, which depends on every access the guest made), so
            // a store through it is not reproducible. Drop the frame's
            // translation first (INVLPG, no flush-clock tick): the store
            // meets the current mapping, and Xen's answer is what counts.
            let inv = MmuExtOpAbi {
                cmd: cmd::INVLPG_LOCAL,
                _pad: 0,
                arg1: t.va(i),
                arg2: 0,
            };
            let mut done = 0;
            // SAFETY: one live op and counter.
            unsafe { h.mmuext_op(&inv, 1, &mut done, DOMID_SELF) };
            let r = h.guest_store(
                t.slot(i, idx),
                Mfn(t.mfn(Sym::Pool(*frame))),
                idx,
                value(t, *ent),
            );
            String::from(if r.is_ok() { "s0" } else { "sF" })
        }
        Op::Multi(v) => {
            let mut b = Bufs::default();
            let mut es: Vec<MulticallEntry> = v.iter().map(|o| entry(t, o, &mut b)).collect();
            // Each mmu_update / mmuext_op entry gets a done counter.
            b.done = vec![u32::MAX; es.len()];
            for (k, e) in es.iter_mut().enumerate() {
                if e.op == hypercall::MMU_UPDATE || e.op == hypercall::MMUEXT_OP {
                    e.args[2] = &mut b.done[k] as *mut u32 as u64;
                }
            }
            // SAFETY: `es` and every array and counter its entries point
            // to live in `b` and `es` until after the call.
            let rc = unsafe { h.multicall(es.as_mut_ptr(), es.len()) };
            let mut s = format!("M{rc}[");
            for (k, e) in es.iter().enumerate() {
                if k > 0 {
                    s.push(',');
                }
                let _ = write!(s, "{}", e.result as i64);
                if e.op == hypercall::MMU_UPDATE || e.op == hypercall::MMUEXT_OP {
                    let _ = write!(s, "/{}", b.done[k] as i32);
                }
            }
            s.push(']');
            s
        }
        Op::Other(nr) => {
            // Direct other hypercalls are not generated; inside a
            // multicall only.
            format!("o{nr}")
        }
    }
}

/// Every pool entry and direct-map entry, symbolized.
fn snapshot<T: Target>(t: &T, out: &mut Vec<u64>) {
    out.clear();
    for i in 0..POOL {
        for k in 0..512 {
            out.push(symbolize(t, t.slot(i, k).load(Ordering::Acquire)));
        }
        out.push(symbolize(t, t.dm_entry(i)));
    }
}

/// Read-back buffers [`run`] reuses (the guest's heap does not reuse
/// blocks this large).
#[derive(Default)]
pub struct Scratch {
    prev: Vec<u64>,
    now: Vec<u64>,
}

impl Scratch {
    /// Buffers for a pool's read-backs.
    pub fn new() -> Scratch {
        Scratch {
            prev: Vec::with_capacity(POOL * 513),
            now: Vec::with_capacity(POOL * 513),
        }
    }
}

/// Store the setup, run the program, probe; `line(text)` gets one line
/// per operation when `detail` is set.
pub fn run<T: Target>(
    t: &T,
    p: &Program,
    detail: bool,
    scratch: &mut Scratch,
    line: &mut dyn FnMut(&str),
) -> Outcome {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &(f, i, e) in &p.setup {
        let r = t.hv().guest_store(
            t.slot(f as usize, i as usize),
            Mfn(t.mfn(Sym::Pool(f))),
            i as usize,
            value(t, e),
        );
        fnv(&mut hash, if r.is_ok() { b"s0" } else { b"sF" });
    }
    let Scratch { prev, now } = scratch;
    snapshot(t, prev);
    if detail {
        let mut s = format!("{LINE}-OP k=init");
        for (j, &w) in prev.iter().enumerate() {
            if w != 0 && j % 513 != 512 {
                let _ = write!(s, " P{}[{}]={}", j / 513, j % 513, show_entry(w));
            }
        }
        // Direct-map entries: one sample is enough (all alike at start).
        let _ = write!(s, " dm0={}", show_entry(prev[512]));
        line(&s);
    }
    for (k, o) in p.ops.iter().enumerate() {
        let res = run_op(t, o);
        snapshot(t, now);
        fnv(&mut hash, res.as_bytes());
        // Word-wise (cheap under TCG): position and value mixed.
        let mut sh = 0xcbf2_9ce4_8422_2325u64;
        for (j, &w) in now.iter().enumerate() {
            if w != 0 {
                sh = (sh ^ w ^ (j as u64) << 48).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                sh ^= sh >> 29;
            }
        }
        fnv(&mut hash, &sh.to_le_bytes());
        if detail {
            let mut s = format!("{LINE}-OP k={k} r={res} s={:08x}", sh as u32);
            for (j, (a, b)) in prev.iter().zip(now.iter()).enumerate() {
                if a != b {
                    let (f, e) = (j / 513, j % 513);
                    if e == 512 {
                        let _ = write!(s, " dm{f}={}", show_entry(*b));
                    } else {
                        let _ = write!(s, " P{f}[{e}]={}", show_entry(*b));
                    }
                }
            }
            line(&s);
        }
        core::mem::swap(prev, now);
    }
    // The probe: can each pool frame be pinned at each level now?
    let mut probe = String::new();
    for i in 0..POOL {
        if i > 0 {
            probe.push('.');
        }
        for level in 0..4u32 {
            let op = MmuExtOpAbi {
                cmd: cmd::PIN_L1 + level,
                _pad: 0,
                arg1: t.mfn(Sym::Pool(i as u8)),
                arg2: 0,
            };
            let mut done = 0;
            // SAFETY: one live op and counter.
            let rc = unsafe { t.hv().mmuext_op(&op, 1, &mut done, DOMID_SELF) };
            probe.push(match rc {
                0 => 'p',
                -22 => 'i',
                -16 => 'b',
                _ => '?',
            });
            if rc == 0 {
                let un = MmuExtOpAbi {
                    cmd: cmd::UNPIN,
                    ..op
                };
                // SAFETY: as above.
                let rc = unsafe { t.hv().mmuext_op(&un, 1, &mut done, DOMID_SELF) };
                if rc != 0 {
                    probe.push('!');
                }
            }
        }
    }
    fnv(&mut hash, probe.as_bytes());
    if detail {
        line(&format!("{LINE}-PROBE {probe}"));
    }
    Outcome {
        hash,
        ops: op_count(p),
        probe,
    }
}

/// Every pool frame's and direct-map entry's symbolized value now, for a
/// check after a reset.
pub fn pool_clean<T: Target>(t: &T, dm_rest: &[u64]) -> bool {
    (0..POOL).all(|i| {
        (0..512).all(|k| t.slot(i, k).load(Ordering::Acquire) == 0)
            && dm_rest.get(i).is_none_or(|&d| t.dm_entry(i) == d)
    })
}
