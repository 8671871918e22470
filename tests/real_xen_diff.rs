//! The simulator held to real Xen with random programs: the test guest
//! (`xen-guest/`, `diff=1`) runs seeded PV MMU programs
//! (`xen-guest/src/program.rs`) on Xen 4.17 as dom0 under QEMU, this test
//! runs the same programs on `XenSim`, and every program's hash (each
//! operation's result, every pool entry and direct-map entry read back
//! after each operation, the final pin probe) must agree. On a mismatch
//! the program is shrunk (delta debugging, candidates batched into one
//! boot as a module of program words) and printed with both sides'
//! per-operation lines.
//!
//! Default: 32 programs × 200 operations (seed 1), in one boot (plus one
//! more per program whose frames real Xen would not let the guest reset:
//! the guest stops there, the test goes on after it). A long campaign:
//! `PAGEPIN_DIFF_PROGRAMS=500 PAGEPIN_DIFF_OPS=200 PAGEPIN_DIFF_SEED=7
//! cargo test --release --test real_xen_diff -- --nocapture` (programs
//! are run in boots of at most `PAGEPIN_DIFF_PER_BOOT`, 100).
//! `PAGEPIN_DIFF_FIRST=k` starts at program k; `PAGEPIN_DIFF_DETAIL=1`
//! prints the first divergent operation from the campaign's own boot;
//! `PAGEPIN_DIFF_NO_SHRINK=1` skips the shrink;
//! `PAGEPIN_DIFF_EXPLAIN=file` runs the hand-written programs in `file`
//! (`program::encode_all` words, little-endian; e.g. a candidate
//! regression test) in one boot and prints both sides' lines, `!` where
//! they differ.
//! Without QEMU or Xen it prints `SKIP:` and passes, unless `CI=true`.

extern crate alloc;

#[path = "support/diff.rs"]
mod diff_support;
#[path = "support/real_xen.rs"]
mod real_xen;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use diff_support::program::{self, Op, Program};
use diff_support::run_sim;
use real_xen::{available_or_skip, boot, build_guest, guest_dir, xen_elf, BootOptions};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Boots a shrink may spend.
const SHRINK_BOOTS: usize = 40;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rig {
    xen: PathBuf,
    guest: PathBuf,
    boots: usize,
    boot_time: Duration,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.xen);
    }
}

/// One guest's answer for one program.
#[derive(Clone, Debug, Default)]
struct XenAnswer {
    hash: u64,
    ops: usize,
    reset_ok: bool,
    probe: String,
    /// Its `-OP` / `-PROBE` lines (with `detail=1`).
    lines: Vec<String>,
}

impl Rig {
    /// Boot the guest with `args` (and the programs as a module); the
    /// answer per program, and the console.
    fn boot(&mut self, args: &str, module: Option<&[Program]>) -> (Vec<XenAnswer>, String) {
        let start = Instant::now();
        let module_path = module.map(|ps| {
            let p = guest_dir()
                .join("target")
                .join(format!("diff-module-{}.bin", std::process::id()));
            let words = program::encode_all(ps);
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            std::fs::write(&p, bytes).expect("write module");
            p
        });
        let b = boot(
            &self.xen,
            &self.guest,
            &BootOptions {
                vcpus: 1,
                args: &format!("diff=1 {args}"),
                modules: module_path.as_slice(),
                timeout: BOOT_TIMEOUT,
                echo: false,
            },
        );
        let mut console = String::new();
        let mut answers = Vec::new();
        let mut pending = Vec::new();
        for l in &b.lines {
            if let Some(rest) = l.strip_prefix("PAGEPIN-DIFF p=") {
                let f: BTreeMap<&str, &str> = rest
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|w| w.split_once('='))
                    .collect();
                answers.push(XenAnswer {
                    hash: u64::from_str_radix(f.get("hash").unwrap_or(&"0"), 16).unwrap_or(0),
                    ops: f.get("ops").and_then(|v| v.parse().ok()).unwrap_or(0),
                    reset_ok: f.get("reset") == Some(&"ok"),
                    probe: f.get("probe").unwrap_or(&"").to_string(),
                    lines: std::mem::take(&mut pending),
                });
            } else if l.starts_with("PAGEPIN-DIFF-OP") || l.starts_with("PAGEPIN-DIFF-PROBE") {
                pending.push(l.clone());
            }
            console.push_str(l);
            console.push('\n');
        }
        if b.timed_out {
            console.push_str("TIMEOUT\n");
        }
        if let Some(p) = module_path {
            let _ = std::fs::remove_file(p);
        }
        self.boots += 1;
        self.boot_time += start.elapsed();
        (answers, console)
    }

    /// Real Xen's answers to `ps` (one boot): `None` for a program that
    /// did not finish or whose reset failed.
    fn answers(&mut self, ps: &[Program], detail: bool) -> Vec<Option<XenAnswer>> {
        let args = if detail { "detail=1" } else { "" };
        let (a, console) = self.boot(args, Some(ps));
        if a.len() < ps.len() && a.iter().all(|x| x.reset_ok) {
            eprintln!("guest stopped early:\n{}", tail(&console, 30));
        }
        (0..ps.len())
            .map(|k| a.get(k).filter(|x| x.reset_ok).cloned())
            .collect()
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Whether real Xen and the simulator disagree on `p` (given Xen's answer).
fn differs(p: &Program, x: &XenAnswer) -> bool {
    let s = run_sim(p, false);
    s.out.hash != x.hash || s.breaks != 0
}

/// Smaller variants of `p` to try: ddmin chunks of the operations (each
/// chunk removed), then single setup stores, then single requests,
/// operations and entries inside list operations.
fn candidates(p: &Program, n: usize) -> Vec<Program> {
    let mut out = Vec::new();
    let len = p.ops.len();
    if len > 1 {
        let chunk = len.div_ceil(n.min(len));
        for start in (0..len).step_by(chunk) {
            let mut q = p.clone();
            q.ops.drain(start..(start + chunk).min(len));
            out.push(q);
        }
    }
    if n >= len {
        for i in 0..p.setup.len() {
            let mut q = p.clone();
            q.setup.remove(i);
            out.push(q);
        }
        for (i, o) in p.ops.iter().enumerate() {
            let inner = match o {
                Op::Mmu(v) => v.len(),
                Op::Ext(v) => v.len(),
                Op::Multi(v) => v.len(),
                _ => 0,
            };
            for j in 0..inner {
                let mut q = p.clone();
                match &mut q.ops[i] {
                    Op::Mmu(v) => drop(v.remove(j)),
                    Op::Ext(v) => drop(v.remove(j)),
                    Op::Multi(v) => drop(v.remove(j)),
                    _ => {}
                }
                out.push(q);
            }
        }
    }
    out
}

fn size(p: &Program) -> usize {
    p.setup.len()
        + program::op_count(p)
        + p.ops
            .iter()
            .map(|o| match o {
                Op::Mmu(v) => v.len(),
                Op::Ext(v) => v.len(),
                _ => 0,
            })
            .sum::<usize>()
}

/// Shrink a failing program: every round boots once with all candidates
/// of the current granularity and keeps the smallest that still differs.
fn shrink(rig: &mut Rig, p: &Program) -> Program {
    let mut cur = p.clone();
    cur.seed = 0;
    let mut n = 2;
    let start = rig.boots;
    while rig.boots - start < SHRINK_BOOTS {
        let cands = candidates(&cur, n);
        if cands.is_empty() {
            break;
        }
        // At most 64 per boot (the module and the run stay small).
        let mut best: Option<Program> = None;
        for batch in cands.chunks(64) {
            let ans = rig.answers(batch, false);
            for (q, a) in batch.iter().zip(ans) {
                if let Some(a) = a {
                    if differs(q, &a) && best.as_ref().is_none_or(|b| size(q) < size(b)) {
                        best = Some(q.clone());
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        match best {
            Some(b) => {
                cur = b;
                n = (n - 1).max(2);
            }
            None if n >= cur.ops.len() => break,
            None => n = (n * 2).min(cur.ops.len()),
        }
    }
    cur
}

/// Both sides' per-operation lines of `p`, and where they first differ.
fn explain(rig: &mut Rig, p: &Program) -> String {
    let x = rig.answers(std::slice::from_ref(p), true);
    explain_answer(p, x.first().and_then(Option::as_ref))
}

/// [`explain`] with real Xen's answer at hand.
fn explain_answer(p: &Program, x: Option<&XenAnswer>) -> String {
    let s = run_sim(p, true);
    let mut out = format!("program: {p:?}\n");
    let Some(x) = x else {
        return out + "(real Xen gave no answer)";
    };
    for (k, (a, b)) in x.lines.iter().zip(&s.lines).enumerate() {
        let mark = if a == b { " " } else { "!" };
        out += &format!("{mark} xen: {a}\n");
        if a != b {
            out += &format!("{mark} sim: {b}\n");
        }
        let _ = k;
    }
    if s.breaks != 0 {
        out += &format!("simulator invariant breaks/refcount errors: {}\n", s.breaks);
    }
    out
}

#[test]
fn simulator_matches_real_xen_on_random_programs() {
    if !available_or_skip("the differential programs") {
        return;
    }
    // Hand-written programs (a file of `program::encode_all` words, e.g.
    // a regression test's): both sides' lines, one boot.
    if let Ok(path) = std::env::var("PAGEPIN_DIFF_EXPLAIN") {
        let bytes = std::fs::read(&path).expect("PAGEPIN_DIFF_EXPLAIN file");
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ps = program::decode_all(&words).expect("encoded programs");
        let mut rig = Rig {
            guest: build_guest(),
            xen: xen_elf(),
            boots: 0,
            boot_time: Duration::ZERO,
        };
        let xs = rig.answers(&ps, true);
        for (p, x) in ps.iter().zip(&xs) {
            println!("{}", explain_answer(p, x.as_ref()));
        }
        return;
    }
    let seed = env_u64("PAGEPIN_DIFF_SEED", 1);
    let programs = env_u64("PAGEPIN_DIFF_PROGRAMS", 32);
    let ops = env_u64("PAGEPIN_DIFF_OPS", 200) as usize;
    let per_boot = env_u64("PAGEPIN_DIFF_PER_BOOT", 100).max(1);
    // Per-operation lines from the campaign's own boots (the programs in
    // their order there), for divergences a later boot does not repeat.
    let detail = std::env::var("PAGEPIN_DIFF_DETAIL").is_ok();
    let t0 = Instant::now();
    let mut rig = Rig {
        guest: build_guest(),
        xen: xen_elf(),
        boots: 0,
        boot_time: Duration::ZERO,
    };
    let mut failing: Vec<Program> = Vec::new();
    let mut incomplete: Vec<String> = Vec::new();
    // Programs after which real Xen kept a frame the guest could not
    // reset (the guest stops there; the next boot goes on after it).
    let mut unresettable: Vec<String> = Vec::new();
    let mut total_ops = 0;
    // The first program (to rerun one of a campaign alone).
    let mut first = env_u64("PAGEPIN_DIFF_FIRST", 0);
    let end = first + programs;
    while first < end {
        let n = per_boot.min(end - first);
        let (ans, console) = rig.boot(
            &format!(
                "seed={seed} programs={n} ops={ops} first={first}{}",
                if detail { " detail=1" } else { "" }
            ),
            None,
        );
        let stuck = ans.iter().position(|a| !a.reset_ok);
        if let Some(k) = stuck {
            let why = console
                .lines()
                .find(|l| l.contains("-RESET stuck"))
                .unwrap_or("(no reset line)");
            unresettable.push(format!(
                "program {} (seed {:#x}): {why}",
                first + k as u64,
                program::program_seed(seed, first + k as u64)
            ));
        }
        if ans.is_empty() || (ans.len() as u64 != n && stuck.is_none()) {
            incomplete.push(format!(
                "boot of programs {first}..{}: {} answers\n{}",
                first + n,
                ans.len(),
                tail(&console, 20)
            ));
        }
        for (k, a) in ans.iter().enumerate() {
            let p = program::generate(program::program_seed(seed, first + k as u64), ops);
            let s = run_sim(&p, false);
            assert_eq!(
                s.out.ops,
                a.ops,
                "program {} ran differently",
                first + k as u64
            );
            total_ops += a.ops;
            if s.out.hash != a.hash || s.breaks != 0 {
                println!(
                    "MISMATCH program {} (seed {:#x}): xen probe {} sim probe {} breaks {}",
                    first + k as u64,
                    p.seed,
                    a.probe,
                    s.out.probe,
                    s.breaks
                );
                if detail {
                    let s = run_sim(&p, true);
                    if let Some((x, y)) = a.lines.iter().zip(&s.lines).find(|(x, y)| x != y) {
                        println!(
                            "DIVERGE-IN-BOOT seed {:#x}:\n  xen: {x}\n  sim: {y}",
                            p.seed
                        );
                    }
                }
                failing.push(p);
            }
        }
        // After a failed reset the guest stopped: go on after that program.
        first += match stuck {
            Some(k) => k as u64 + 1,
            None if ans.is_empty() => n,
            None => ans.len() as u64,
        };
    }
    println!(
        "real_xen_diff: {programs} programs, {total_ops} operations, {} mismatching, {} boots, {:.1} s",
        failing.len(),
        rig.boots,
        t0.elapsed().as_secs_f64()
    );
    for i in &incomplete {
        println!("INCOMPLETE {i}");
    }
    for u in &unresettable {
        println!("UNRESETTABLE (open, BENCHMARKS.md) {u}");
    }
    if !failing.is_empty() {
        // Where each failing program first diverges (one boot, details).
        let some: Vec<Program> = failing.iter().take(24).cloned().collect();
        let xs = rig.answers(&some, true);
        for (p, x) in some.iter().zip(xs) {
            let Some(x) = x else { continue };
            let s = run_sim(p, true);
            if let Some((a, b)) = x.lines.iter().zip(&s.lines).find(|(a, b)| a != b) {
                let op = a
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("k="))
                    .and_then(|k| k.parse::<usize>().ok())
                    .and_then(|k| p.ops.get(k));
                println!(
                    "DIVERGE seed {:#x}:\n  op:  {op:?}\n  xen: {a}\n  sim: {b}",
                    p.seed
                );
            }
        }
    }
    if std::env::var("PAGEPIN_DIFF_NO_SHRINK").is_ok() {
        assert!(failing.is_empty(), "{} mismatching programs", failing.len());
    }
    if let Some(p) = failing.first() {
        let small = shrink(&mut rig, p);
        let why = explain(&mut rig, &small);
        panic!(
            "the simulator differs from real Xen on {} of {programs} programs; the first, shrunk ({} boots so far):\n{why}",
            failing.len(),
            rig.boots
        );
    }
    assert!(
        incomplete.is_empty(),
        "real Xen did not run every program: {incomplete:?}"
    );
}

/// The encoding the guest decodes round-trips every generated program.
#[test]
fn programs_round_trip_through_words() {
    for k in 0..64 {
        let p = program::generate(program::program_seed(3, k), 100);
        assert_eq!(program::decode(&program::encode(&p)), Some(p.clone()));
        let all = program::decode_all(&program::encode_all(&[p.clone(), p.clone()]));
        assert_eq!(all.map(|v| v.len()), Some(2));
    }
    assert_eq!(program::decode(&[1, 2]), None);
}
