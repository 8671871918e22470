//! Guest stores into table frames (rule 10 of docs/PROTOCOL.md §6): plain
//! through a writable mapping, emulated into a read-only L1, else a fault.

use pagepin_engine::Level;
use pagepin_engine::PageTableEntry;
use pagepin_engine::{errno, StoreFault};
use pagepin_engine::{Mfn, ENTRIES_PER_FRAME};

use crate::sync::Ordering;
use core::sync::atomic::AtomicU64 as EntryWord;

use super::stats::Local;
use super::types::{hold, FrameType};
use super::XenSim;

impl XenSim {
    /// The guest store logic (rule 10).
    pub(super) fn store(
        &self,
        slot: &EntryWord,
        mfn: Mfn,
        index: usize,
        value: u64,
        l: &mut Local,
    ) -> Result<(), StoreFault> {
        let fault = StoreFault {
            mfn,
            index,
            errno: errno::EFAULT,
        };
        let m = mfn.0;
        let (Ok(f), Some(pfn)) = (self.frame(m), self.pfn_of(mfn)) else {
            return Err(fault);
        };
        let Ok(frame) = self.table_memory(m) else {
            return Err(fault);
        };
        if index >= ENTRIES_PER_FRAME || !std::ptr::eq(slot, frame.entry(index)) {
            return Err(fault);
        }
        let dm = &self.dm[pfn.0 as usize];
        for _ in 0..4 {
            {
                let _g = hold(&dm.lock);
                let pte = PageTableEntry::from_bits(dm.pte.load(Ordering::Acquire));
                // Through a writable mapping, or (exact TLB) a stale
                // writable TLB entry of one: a plain write Xen never sees.
                if (pte.is_present() && pte.is_writable())
                    || (self.cfg.exact_tlb && self.stale_live(f))
                {
                    slot.store(value, Ordering::Release);
                    l.plain_stores += 1;
                    return Ok(());
                }
            }
            // Read-only: Xen emulates the write if the frame is a typed L1.
            match self.get_existing(m, FrameType::L1) {
                Ok(true) => {
                    let r = {
                        let _g = hold(f.lock);
                        self.update_entry(m, Level::L1, index, value, slot, false, false, l)
                    };
                    self.put_type(m, l);
                    l.emulated_stores += 1;
                    return r.map_err(|e| StoreFault {
                        mfn,
                        index,
                        errno: e,
                    });
                }
                Ok(false) => {
                    // Remapped writable meanwhile? Then retry as a plain store.
                    let pte = PageTableEntry::from_bits(dm.pte.load(Ordering::Acquire));
                    if !(pte.is_present() && pte.is_writable()) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        l.faults += 1;
        Err(fault)
    }
}
