//! `mmu_update`: one checked page-table entry update request.

use pagepin_engine::{errno, mmu_cmd};

use crate::sync::Ordering;

use crate::xen::abi::MmuUpdateAbi;

use super::stats::Local;
use super::types::{hold, FrameType, COUNT_MASK};
use super::{XenSim, R};

impl XenSim {
    /// One `mmu_update` request.
    pub(super) fn do_mmu_update(&self, req: MmuUpdateAbi, l: &mut Local) -> R {
        l.mmu_update_reqs += 1;
        // The sub-command is the low three bits (Xen masks with the entry
        // size): 0 normal, 1 machphys, 2 preserve A/D, 3 no-translate (the
        // same as 0 for a PV guest); 4..7 are unknown (`-ENOSYS`).
        let cmd = req.ptr & 7;
        if cmd >= 4 {
            return Err(errno::ENOSYS);
        }
        if cmd == mmu_cmd::MACHPHYS_UPDATE {
            // Sets the m2p entry of a frame the domain owns (real Xen
            // 4.17: 0 for the guest's own frame). The simulator keeps its
            // m2p: the guest's view of it is not modelled.
            return if self.owned(req.ptr >> 12) {
                Ok(())
            } else {
                Err(errno::EINVAL)
            };
        }
        let mfn = req.ptr >> 12;
        let index = ((req.ptr & 0xfff) >> 3) as usize;
        let f = self.frame(mfn)?;
        let frame = self.table_memory(mfn)?;
        let slot = frame.entry(index);
        for _ in 0..64 {
            let x = f.type_info.load(Ordering::Acquire);
            let ty = FrameType::from_bits(x);
            if let (Some(level), true) = (ty.level(), x & COUNT_MASK != 0) {
                if !self.get_existing(mfn, ty)? {
                    continue;
                }
                let r = {
                    let _g = hold(f.lock);
                    // PRESERVE_AD ors the old A/D bits in (real Xen 4.17:
                    // 0x67 over 0x00 stays 0x67).
                    let preserve = cmd == mmu_cmd::PT_UPDATE_PRESERVE_AD;
                    self.update_entry(mfn, level, index, req.val, slot, preserve, false, l)
                };
                self.put_type(mfn, l);
                return r;
            }
            // Not a table: a plain write under a transient writable reference.
            match self.get_type(mfn, FrameType::Writable, true, l) {
                Ok(()) => {
                    {
                        let _g = hold(f.lock);
                        slot.store(req.val, Ordering::Release);
                    }
                    self.put_type(mfn, l);
                    return Ok(());
                }
                Err(_) => continue, // became a table meanwhile: retry
            }
        }
        Err(errno::EBUSY)
    }
}
