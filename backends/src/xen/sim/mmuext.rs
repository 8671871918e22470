//! `mmuext_op`: pin and unpin, base pointers, TLB flushes, and the
//! commands the engine never sends, answered as real Xen 4.17 does.

use pagepin_engine::ENTRIES_PER_FRAME;
use pagepin_engine::{errno, ExtCmd};

use crate::sync::Ordering;

use crate::xen::abi::MmuExtOpAbi;

use super::stats::Local;
use super::types::{FrameType, PINNED};
use super::{XenSim, CURRENT_VCPU, R};

/// `EOPNOTSUPP`: Xen 4.17's answer to MMUEXT_MARK_SUPER / UNMARK_SUPER.
const EOPNOTSUPP: i32 = 95;
/// Largest LDT (entries) `MMUEXT_SET_LDT` accepts.
const LDT_ENTRIES_MAX: u64 = 8192;

/// Whether `p` is a canonical x86-64 address (bits 63..47 all equal).
/// The simulator cannot check that a guest pointer is mapped: a vCPU-mask
/// pointer is refused (`-EFAULT`) only when no guest could pass it.
pub(super) fn canonical(p: u64) -> bool {
    let top = p >> 47;
    top == 0 || top == 0x1_ffff
}

impl XenSim {
    /// One `mmuext_op`.
    pub(super) fn do_mmuext(&self, op: MmuExtOpAbi, l: &mut Local) -> R {
        l.mmuext_ops += 1;
        if let Some(c) = l.ext_cmds.get_mut(op.cmd as usize) {
            *c += 1;
        }
        let Some(cmd) = ExtCmd::from_u32(op.cmd) else {
            return self.do_mmuext_other(op, l);
        };
        match cmd {
            // Not a Xen command: what Xen answers an unknown one.
            ExtCmd::PinL5Table => Err(errno::ENOSYS),
            ExtCmd::PinL1Table | ExtCmd::PinL2Table | ExtCmd::PinL3Table | ExtCmd::PinL4Table => {
                let level = cmd.pin_level().ok_or(errno::EINVAL)?;
                if level > self.cfg.root_level {
                    return Err(errno::EINVAL);
                }
                let mfn = op.arg1;
                let f = self.frame(mfn)?;
                self.get_type(mfn, FrameType::table(level), true, l)?;
                if f.type_info.fetch_or(PINNED, Ordering::AcqRel) & PINNED != 0 {
                    self.put_type(mfn, l);
                    return Err(errno::EINVAL);
                }
                l.pins[level as usize - 1] += 1;
                self.check_frame(mfn, l);
                Ok(())
            }
            ExtCmd::UnpinTable => {
                let mfn = op.arg1;
                let f = self.frame(mfn)?;
                let x = f.type_info.fetch_and(!PINNED, Ordering::AcqRel);
                if x & PINNED == 0 {
                    return Err(errno::EINVAL);
                }
                self.put_type(mfn, l);
                l.unpins += 1;
                Ok(())
            }
            ExtCmd::NewBaseptr | ExtCmd::NewUserBaseptr => {
                let which = usize::from(cmd == ExtCmd::NewUserBaseptr);
                let vcpu = CURRENT_VCPU.with(|c| c.get());
                let slot = &self.bases.get(vcpu).ok_or(errno::EINVAL)?[which];
                let mfn = op.arg1;
                if which == 1 && mfn == 0 {
                    let old = slot.swap(0, Ordering::AcqRel);
                    if old != 0 {
                        self.put_type(old - 1, l);
                    }
                    return Ok(());
                }
                self.get_type(mfn, FrameType::table(self.cfg.root_level), true, l)?;
                let old = slot.swap(mfn + 1, Ordering::AcqRel);
                if old != 0 {
                    self.put_type(old - 1, l);
                }
                // Loading CR3 flushes the TLB (the user base pointer is
                // loaded only on a switch to user mode).
                if self.cfg.exact_tlb && which == 0 {
                    self.flush_all(l);
                }
                self.check_frame(mfn, l);
                Ok(())
            }
            // A vCPU mask that cannot be read: -EINVAL (real Xen 4.17).
            ExtCmd::TlbFlushMulti | ExtCmd::InvlpgMulti if !canonical(op.arg2) => {
                Err(errno::EINVAL)
            }
            ExtCmd::TlbFlushLocal | ExtCmd::TlbFlushMulti | ExtCmd::TlbFlushAll => {
                self.flush_all(l);
                Ok(())
            }
            ExtCmd::InvlpgLocal | ExtCmd::InvlpgMulti | ExtCmd::InvlpgAll => {
                self.invlpg(op.arg1, l);
                Ok(())
            }
        }
    }

    /// The `mmuext_op` commands the engine never sends, answered as real
    /// Xen 4.17 answers a 64-bit PV domain (found by the differential
    /// programs, `tests/real_xen_diff.rs`).
    fn do_mmuext_other(&self, op: MmuExtOpAbi, l: &mut Local) -> R {
        const FLUSH_CACHE: u32 = 12;
        const SET_LDT: u32 = 13;
        const CLEAR_PAGE: u32 = 16;
        const COPY_PAGE: u32 = 17;
        const FLUSH_CACHE_GLOBAL: u32 = 18;
        const MARK_SUPER: u32 = 19;
        const UNMARK_SUPER: u32 = 20;
        match op.cmd {
            // Cache flushes: allowed to a domain with I/O resources.
            FLUSH_CACHE | FLUSH_CACHE_GLOBAL if self.cfg.io_privileged => Ok(()),
            FLUSH_CACHE | FLUSH_CACHE_GLOBAL => Err(errno::EACCES),
            // The LDT is not modelled beyond the argument checks (its
            // pages are mapped lazily, on first use).
            SET_LDT => {
                let (va, ents) = (op.arg1, op.arg2);
                if va & 0xfff != 0 || ents > LDT_ENTRIES_MAX || !canonical(va) {
                    Err(errno::EINVAL)
                } else {
                    Ok(())
                }
            }
            CLEAR_PAGE => self.with_writable(op.arg1, l, |frame| {
                for i in 0..ENTRIES_PER_FRAME {
                    frame.entry(i).store(0, Ordering::Release);
                }
            }),
            COPY_PAGE => {
                if !self.owned(op.arg2) {
                    return Err(errno::EINVAL);
                }
                let src: Option<Vec<u64>> = self.table_memory(op.arg2).ok().map(|f| {
                    (0..ENTRIES_PER_FRAME)
                        .map(|i| f.entry(i).load(Ordering::Acquire))
                        .collect()
                });
                self.with_writable(op.arg1, l, |frame| {
                    for i in 0..ENTRIES_PER_FRAME {
                        let v = src.as_ref().map_or(0, |s| s[i]);
                        frame.entry(i).store(v, Ordering::Release);
                    }
                })
            }
            MARK_SUPER | UNMARK_SUPER => Err(EOPNOTSUPP),
            _ => Err(errno::ENOSYS),
        }
    }

    /// Run `f` on the memory of `mfn` (if it is table memory) under a
    /// transient writable type reference: `-EINVAL` when the domain does
    /// not own it or it is a page table.
    fn with_writable(&self, mfn: u64, l: &mut Local, f: impl FnOnce(&pagepin_engine::Frame)) -> R {
        if !self.owned(mfn) {
            return Err(errno::EINVAL);
        }
        self.get_type(mfn, FrameType::Writable, true, l)
            .map_err(|_| errno::EINVAL)?;
        if let Ok(frame) = self.table_memory(mfn) {
            f(frame);
        }
        self.put_type(mfn, l);
        Ok(())
    }
}
