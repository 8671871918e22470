//! `update_va_mapping` on the guest's direct map, and single-address TLB
//! invalidation.

use pagepin_engine::Level;
use pagepin_engine::PageTableEntry;
use pagepin_engine::{errno, uvmf};

use crate::sync::Ordering;

use super::mmuext::canonical;
use super::stats::Local;
use super::types::hold;
use super::validate::FAST_PATH_BITS;
use super::{XenSim, R};

impl XenSim {
    fn dm_pfn(&self, va: u64) -> Option<usize> {
        let off = va.checked_sub(self.cfg.direct_map_base)?;
        let pfn = usize::try_from(off >> 12).ok()?;
        (pfn < self.cfg.nr_pages).then_some(pfn)
    }

    pub(super) fn invlpg(&self, va: u64, l: &mut Local) {
        l.tlb_flushes += 1;
        if let Some(pfn) = self.dm_pfn(va) {
            let mfn = self.p2m[pfn] as usize;
            self.cold[mfn].stale.store(0, Ordering::Release);
        }
    }

    pub(super) fn do_uvm(&self, va: u64, new: u64, flags: u64, l: &mut Local) -> R {
        l.uvm += 1;
        let pfn = self.dm_pfn(va).ok_or(errno::EINVAL)?;
        let own = self.p2m[pfn];
        // Xen adjusts the entry as for `mmu_update` (found by the
        // differential programs: real Xen 4.17 stores 0x61 as USER |
        // GUEST_KERNEL | 0x61).
        let new = self.adjust_guest_entry(Level::L1, new);
        let nw = PageTableEntry::from_bits(new);
        if nw.is_present() && nw.frame() != own {
            // The direct map is linear: slot pfn maps p2m[pfn] only.
            return Err(errno::EINVAL);
        }
        let slot = &self.dm[pfn];
        {
            let _g = hold(&slot.lock);
            let old = slot.pte.load(Ordering::Acquire);
            let o = PageTableEntry::from_bits(old);
            if o.is_present()
                && nw.is_present()
                && o.addr() == nw.addr()
                && (old ^ new) & !FAST_PATH_BITS == 0
            {
                self.check_flags_only(Level::L1, new)?;
                slot.pte.store(new, Ordering::Release);
                l.fast_path_updates += 1;
            } else {
                let new = self.get_entry_refs(Level::L1, new, u64::MAX, true, l)?;
                slot.pte.store(new, Ordering::Release);
                if o.is_present() && o.is_writable() && !(nw.is_present() && nw.is_writable()) {
                    // The old writable translation may linger in TLBs.
                    let gen = self.flush_gen.0.load(Ordering::Acquire);
                    self.cold[o.frame() as usize]
                        .stale
                        .store(gen + 1, Ordering::Release);
                }
                self.put_entry_refs(Level::L1, old, u64::MAX, l);
                l.full_updates += 1;
            }
        }
        // Above the flush type: LOCAL (0), ALL (4) or a vCPU-mask pointer,
        // read only when there is a flush; a bad pointer fails the call
        // after the entry was written (real Xen 4.17).
        let ft = flags & uvmf::FLUSHTYPE_MASK;
        let mask = flags & !uvmf::FLUSHTYPE_MASK;
        // (Flush type 3 is neither flush: nothing is read.)
        let bad_mask = (ft == uvmf::TLB_FLUSH || ft == uvmf::INVLPG)
            && mask != uvmf::LOCAL
            && mask != uvmf::ALL
            && !canonical(mask);
        match ft {
            _ if bad_mask => {}
            uvmf::TLB_FLUSH => self.flush_all(l),
            uvmf::INVLPG => self.invlpg(va, l),
            _ => {}
        }
        self.check_frame(own, l);
        if bad_mask {
            return Err(errno::EFAULT);
        }
        Ok(())
    }
}
