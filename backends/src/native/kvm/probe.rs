//! Probes: one guest access through a mapping, what pagepin predicts for
//! it, and the hand-assembled guest code that performs it and reports
//! back through I/O ports.

use pagepin_engine::Translation;
use pagepin_engine::FRAME_SIZE;

/// How a probe touches its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `mov rax, [va]`.
    Read,
    /// `mov [va], rsi`.
    Write,
    /// `jmp va` (the target holds `out 0xe3, al; hlt`).
    Execute,
}

/// One guest access to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    /// The virtual address (8-byte aligned for reads and writes).
    pub va: u64,
    /// The access.
    pub access: Access,
}

/// What a probe did inside the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The load completed and read this value (the checker's sentinel).
    Loaded(u64),
    /// The store completed and the value landed at the translated address.
    Stored,
    /// The store completed but the value is not at the translated address.
    StoredElsewhere,
    /// The jump reached the code the checker placed at the target.
    Executed,
    /// A page fault with its CR2 and error code.
    PageFault {
        /// The faulting linear address.
        cr2: u64,
        /// The error code (P=1, W=2, U=4, RSVD=8, I/D=16).
        error_code: u64,
    },
    /// Another exception vector.
    Exception(u8),
    /// The vCPU stopped some other way (triple fault, emulation failure).
    Stopped,
}

/// Page-fault error-code bits.
pub mod pf {
    /// The page was present (protection violation).
    pub const PRESENT: u64 = 1;
    /// The access was a write.
    pub const WRITE: u64 = 2;
    /// The access was from user mode.
    pub const USER: u64 = 4;
    /// A reserved bit was set in an entry.
    pub const RSVD: u64 = 8;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 16;
}

/// One probe with what pagepin predicts and what the CPU did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe.
    pub probe: Probe,
    /// The outcome pagepin's translation implies.
    pub expected: ProbeOutcome,
    /// The outcome the CPU produced.
    pub seen: ProbeOutcome,
}

/// The value a read probe finds at its target (set by the checker).
pub fn sentinel(va: u64) -> u64 {
    va.rotate_left(17) ^ 0x5eed_cafe_f00d_d00d
}

/// The value a write probe stores.
pub fn written_value(va: u64) -> u64 {
    !sentinel(va)
}

/// The outcome pagepin predicts for `probe`, from the translation of its
/// address and the rights of the path (`writable` on every level, `nx` on
/// some level). Supervisor accesses with CR0.WP and EFER.NXE.
pub fn expected_outcome(
    probe: Probe,
    translation: Option<Translation>,
    writable: bool,
    nx: bool,
) -> ProbeOutcome {
    let fault = |error_code| ProbeOutcome::PageFault {
        cr2: probe.va,
        error_code,
    };
    let access_bits = match probe.access {
        Access::Read => 0,
        Access::Write => pf::WRITE,
        Access::Execute => pf::FETCH,
    };
    match translation {
        None => fault(access_bits),
        Some(_) => match probe.access {
            Access::Read => ProbeOutcome::Loaded(sentinel(probe.va)),
            Access::Write if writable => ProbeOutcome::Stored,
            Access::Execute if !nx => ProbeOutcome::Executed,
            _ => fault(pf::PRESENT | access_bits),
        },
    }
}

// Offsets of the routines in the code page.
const CODE_LOAD: u64 = 0x000;
const CODE_STORE: u64 = 0x010;
const CODE_EXEC: u64 = 0x020;
const CODE_PF: u64 = 0x100;
const CODE_VEC: u64 = 0x200;

// I/O ports the guest reports through.
const PORT_DONE: u16 = 0xe0;
const PORT_EXECUTED: u16 = 0xe3;
const PORT_PF: u16 = 0xee;
const PORT_VECTOR: u16 = 0xef;

/// The #PF vector, whose handler reports CR2 and the error code.
const VECTOR_PF: u8 = 14;

/// Exception vectors the IDT routes to the code page.
pub(super) const VECTORS: u8 = 32;

/// What the jump target of an execute probe holds: `out 0xe3, al; hlt`.
pub(super) const EXEC_TARGET: [u8; 3] = [0xe6, PORT_EXECUTED as u8, 0xf4];

/// The code page: the three probe routines (address in RDI, value to
/// store in RSI) and the exception handlers, each ending in an `out` that
/// reports and a `hlt`.
pub(super) fn code_page() -> [u8; FRAME_SIZE] {
    let mut c = [0xf4u8; FRAME_SIZE]; // hlt everywhere else
    let put = |c: &mut [u8; FRAME_SIZE], at: u64, bytes: &[u8]| {
        c[at as usize..at as usize + bytes.len()].copy_from_slice(bytes)
    };
    // mov rax, [rdi]; out 0xe0, al; hlt
    put(
        &mut c,
        CODE_LOAD,
        &[0x48, 0x8b, 0x07, 0xe6, PORT_DONE as u8, 0xf4],
    );
    // mov [rdi], rsi; out 0xe0, al; hlt
    put(
        &mut c,
        CODE_STORE,
        &[0x48, 0x89, 0x37, 0xe6, PORT_DONE as u8, 0xf4],
    );
    // jmp rdi
    put(&mut c, CODE_EXEC, &[0xff, 0xe7]);
    // #PF: mov rbx, cr2; mov rax, [rsp] (error code); out 0xee, al; hlt
    put(
        &mut c,
        CODE_PF,
        &[
            0x0f,
            0x20,
            0xd3,
            0x48,
            0x8b,
            0x04,
            0x24,
            0xe6,
            PORT_PF as u8,
            0xf4,
        ],
    );
    // Other vectors v: mov al, v; out 0xef, al; hlt
    for v in 0..VECTORS {
        put(
            &mut c,
            CODE_VEC + 8 * v as u64,
            &[0xb0, v, 0xe6, PORT_VECTOR as u8, 0xf4],
        );
    }
    c
}

/// Offset in the code page of the handler of exception `vector`.
pub(super) fn handler_offset(vector: u8) -> u64 {
    if vector == VECTOR_PF {
        CODE_PF
    } else {
        CODE_VEC + 8 * vector as u64
    }
}

/// Offset in the code page of the routine that performs `access`.
pub(super) fn routine_offset(access: Access) -> u64 {
    match access {
        Access::Read => CODE_LOAD,
        Access::Write => CODE_STORE,
        Access::Execute => CODE_EXEC,
    }
}

/// What the guest reported when it stopped: the port it wrote (with AL),
/// and the registers the #PF handler leaves CR2 (RBX) and the error code
/// (RAX) in; RAX is also what a load read.
#[derive(Clone, Copy, Debug)]
pub(super) struct GuestReport {
    /// The port and AL of the `out` that stopped the vCPU; `None` if it
    /// stopped another way.
    pub(super) port: Option<(u16, u8)>,
    pub(super) rax: u64,
    pub(super) rbx: u64,
}

/// Decode what the guest reported for `probe`; `at_target` is the value
/// now at the address pagepin translates it to (`None`: unmapped).
pub(super) fn outcome(probe: Probe, report: GuestReport, at_target: Option<u64>) -> ProbeOutcome {
    match report.port {
        Some((PORT_DONE, _)) => match probe.access {
            Access::Read => ProbeOutcome::Loaded(report.rax),
            _ => match at_target {
                Some(v) if v == written_value(probe.va) => ProbeOutcome::Stored,
                _ => ProbeOutcome::StoredElsewhere,
            },
        },
        Some((PORT_EXECUTED, _)) => ProbeOutcome::Executed,
        Some((PORT_PF, _)) => ProbeOutcome::PageFault {
            cr2: report.rbx,
            error_code: report.rax,
        },
        Some((PORT_VECTOR, v)) => ProbeOutcome::Exception(v),
        _ => ProbeOutcome::Stopped,
    }
}
