//! `inspect` against QEMU, live, on a real Linux guest: Debian's unmodified
//! kernel (`linux-image-6.1.0-*-amd64`) boots under QEMU TCG with a busybox
//! initrd (built here: busybox as `/bin/busybox`, a two-line `/init` that
//! mounts proc, says so on the console and sleeps) to user space. The
//! machine is stopped, QEMU's monitor is asked for `info mem`, `info tlb`,
//! a `dump-guest-memory` ELF core and a `pmemsave` raw image, and `inspect`
//! must print exactly QEMU's lines for the live CR3 (the core's CPU note;
//! the raw image with `--cr3`), and `--translate` must agree with the
//! monitor's `gva2gpa` on a sample of mapped and unmapped addresses.
//!
//! Guests: 4-level with `pti=on` and with `pti=off` (`-cpu max,la57=off`),
//! and 5-level (`-cpu max`: Debian 6.1 turns LA57 on by itself). Under
//! LA57, QEMU 7.2's `info mem` is wrong (docs/PROTOCOL.md §13: it prints
//! nothing), so there `inspect --mem` is checked against the ranges derived
//! from QEMU's `info tlb` instead.
//!
//! The kernel and busybox come from `.ci/run` (`apt-get download`,
//! `dpkg-deb -x`) into `$PAGEPIN_LIVE_GUEST_DIR` (default
//! `target/live-guest`: `vmlinuz`, `busybox`). Without them or without QEMU
//! the test prints `SKIP: …` and passes; under `CI=true` it fails.

#[path = "support/qemu.rs"]
mod qemu;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qemu::{Machine, CR4_LA57};

const RAM_MIB: u32 = 256;
/// How long a boot to user space may take (TCG on a shared 2-core machine
/// takes 5-20 s).
const BOOT_LIMIT: Duration = Duration::from_secs(150);
const MARKER: &str = "PAGEPIN-USERSPACE-UP";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The kernel and busybox, or `None` after a loud `SKIP:` (a panic in CI).
fn guest_or_skip() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("PAGEPIN_LIVE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/live-guest"));
    let (kernel, busybox) = (dir.join("vmlinuz"), dir.join("busybox"));
    if kernel.is_file() && busybox.is_file() {
        return Some((kernel, busybox));
    }
    let why = format!(
        "no Debian kernel / busybox in {} (bash .ci/run fetches linux-image-6.1.0-*-amd64 and \
         busybox-static there, or set PAGEPIN_LIVE_GUEST_DIR)",
        dir.display()
    );
    assert!(!ci(), "inspect against live QEMU: {why}");
    println!("SKIP: inspect against live QEMU: {why}");
    None
}

// ---------------------------------------------------------------------------
// The initrd: a newc ("070701") cpio archive, written here (no cpio tool).

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("initrd member under 4 GiB"),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).expect("name"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// `/bin/busybox`, `/init`, `/proc`, `/dev/console`.
fn initrd(busybox: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040755;
    const EXE: u32 = 0o100755;
    const CHR: u32 = 0o020600;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo {MARKER} $(/bin/busybox cat /proc/cmdline)\n\
         exec /bin/busybox sleep 1000000\n"
    );
    let mut a = Vec::new();
    cpio_entry(&mut a, 1, "bin", DIR, (0, 0), &[]);
    cpio_entry(&mut a, 2, "bin/busybox", EXE, (0, 0), busybox);
    cpio_entry(&mut a, 3, "init", EXE, (0, 0), init.as_bytes());
    cpio_entry(&mut a, 4, "proc", DIR, (0, 0), &[]);
    cpio_entry(&mut a, 5, "dev", DIR, (0, 0), &[]);
    // The kernel opens /dev/console for init; initramfs has no devtmpfs.
    cpio_entry(&mut a, 6, "dev/console", CHR, (5, 1), &[]);
    cpio_entry(&mut a, 0, "TRAILER!!!", 0, (0, 0), &[]);
    a
}

// ---------------------------------------------------------------------------
// The inspect binary (pagepin-dump's), built for this test's profile.

fn inspect_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test>
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("profile dir");
        let target_dir = profile_dir.parent().expect("target dir");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", "pagepin-dump", "--bin", "inspect"])
            .arg("--target-dir")
            .arg(target_dir);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build -p pagepin-dump");
        assert!(
            out.status.success(),
            "cargo build -p pagepin-dump --bin inspect failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("inspect");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// `inspect args`: its standard output (it must exit 0).
fn inspect(args: &[&str]) -> String {
    let out = Command::new(inspect_bin())
        .args(args)
        .output()
        .expect("run inspect");
    assert!(
        out.status.success(),
        "inspect {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("inspect prints UTF-8")
}

/// Monitor output as lines (HMP ends its lines with "\r\n").
fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| l.trim_end().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Compare `ours` with QEMU's lines: the number compared, or a panic
/// naming the first difference.
fn compare(what: &str, ours: &[String], qemu: &[String]) -> usize {
    let first = ours.iter().zip(qemu).position(|(a, b)| a != b);
    if first.is_some() || ours.len() != qemu.len() {
        let i = first.unwrap_or(ours.len().min(qemu.len()));
        let mismatches = ours.iter().zip(qemu).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {} lines from inspect, {} from QEMU, {mismatches} differ; first at line \
             {i}:\n  inspect: {:?}\n  QEMU:    {:?}",
            ours.len(),
            qemu.len(),
            ours.get(i),
            qemu.get(i)
        );
    }
    qemu.len()
}

/// QEMU's `addr_canonical` under LA57: bits 57..=63 set when bit 56 is.
fn canonical57(a: u64) -> u64 {
    if a & (1 << 56) != 0 {
        a | !((1u64 << 57) - 1)
    } else {
        a
    }
}

/// The `info mem` ranges QEMU's `info tlb` implies under 5-level paging
/// (QEMU's merge rule: consecutive mapped pages merge while their U/W
/// agree), as `(start, end, "urw")` printed the way `info mem` prints
/// them. `info tlb` prints the leaf's own U/W bits; Linux's upper levels
/// grant both to user tables and W to kernel ones and never U, so the leaf
/// bits are the effective ones here. A large leaf's size is not printed:
/// a `P` line is 1 GiB if it is 1 GiB-aligned, no line follows within
/// 2 MiB, and `gva2gpa` (`probe`) maps the next 2 MiB into the same leaf;
/// otherwise 2 MiB.
fn ranges_from_tlb(
    tlb: &[String],
    probe: &mut dyn FnMut(u64) -> Option<u64>,
) -> Vec<(u64, u64, String)> {
    let parsed: Vec<(u64, u64, String)> = tlb
        .iter()
        .map(|l| {
            let (va, rest) = l.split_once(": ").expect("tlb line");
            let (pa, flags) = rest.split_once(' ').expect("tlb line");
            (
                u64::from_str_radix(va, 16).expect("tlb va"),
                u64::from_str_radix(pa, 16).expect("tlb pa"),
                flags.to_string(),
            )
        })
        .collect();
    // (uncanonical start, uncanonical end, prot) as QEMU's scan sees them.
    let mask57 = (1u64 << 57) - 1;
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for (i, (va, pa, flags)) in parsed.iter().enumerate() {
        let size = if flags.as_bytes()[2] != b'P' {
            1 << 12
        } else {
            let next = parsed.get(i + 1).map(|n| n.0);
            let two_m = va.wrapping_add(1 << 21);
            if va & ((1 << 30) - 1) == 0
                && next != Some(two_m)
                && probe(two_m) == Some(pa + (1 << 21))
            {
                1 << 30
            } else {
                1 << 21
            }
        };
        let prot = format!(
            "{}r{}",
            if flags.contains('U') { 'u' } else { '-' },
            if flags.ends_with('W') { 'w' } else { '-' }
        );
        let start = va & mask57;
        match out.last_mut() {
            Some(last) if last.1 == start && last.2 == prot => last.1 = start + size,
            _ => out.push((start, start + size, prot)),
        }
    }
    out.into_iter()
        .map(|(a, b, p)| (canonical57(a), canonical57(b), p))
        .collect()
}

/// `--mem` lines parsed back into ranges.
fn parse_mem(mem: &[String]) -> Vec<(u64, u64, String)> {
    mem.iter()
        .map(|l| {
            let mut it = l.split_whitespace();
            let (range, _size, prot) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            let (a, b) = range.split_once('-').unwrap();
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
                prot.to_string(),
            )
        })
        .collect()
}

/// What one boot compared.
#[derive(Debug, Default)]
struct Figures {
    boot: Duration,
    cr3: u64,
    la57: bool,
    tlb_lines: usize,
    mem_lines: usize,
    translations: usize,
    mapped_samples: usize,
}

fn check_guest(qemu: &Path, kernel: &Path, initrd: &Path, cpu: &str, append: &str) -> Figures {
    let started = Instant::now();
    let mut m = Machine::boot(qemu, cpu, RAM_MIB, kernel, initrd, append);
    let boot = match m.wait_serial(MARKER, BOOT_LIMIT) {
        Ok(_) => started.elapsed(),
        Err(console) => {
            panic!("{cpu} {append:?}: no {MARKER} on the console within {BOOT_LIMIT:?}:\n{console}")
        }
    };
    // Let init reach its sleep, then freeze the machine: nothing changes
    // the tables while QEMU and inspect look at them.
    std::thread::sleep(Duration::from_millis(300));
    m.stop();
    let cr3 = m.register("CR3");
    let cr4 = m.register("CR4");
    let la57 = cr4 & CR4_LA57 != 0;
    let tlb_q = lines(&m.hmp("info tlb"));
    // QEMU 7.2's `info mem` under LA57 descends into non-present entries
    // (its inverted present tests): slow, and it prints nothing. Asked only
    // with PAGEPIN_LIVE_LA57_INFO_MEM=1 (to watch the bug), with time.
    let ask_mem = !la57 || std::env::var_os("PAGEPIN_LIVE_LA57_INFO_MEM").is_some();
    let mem_q = if ask_mem {
        m.set_reply_timeout(Duration::from_secs(600));
        let t = Instant::now();
        let out = lines(&m.hmp("info mem"));
        m.set_reply_timeout(Duration::from_secs(20));
        if la57 {
            println!(
                "live QEMU: 5-level info mem took {:.1} s and printed {} lines",
                t.elapsed().as_secs_f64(),
                out.len()
            );
        }
        out
    } else {
        Vec::new()
    };
    let core = m.dir().join("guest.elf");
    let raw = m.dir().join("guest.raw");
    // QMP rather than HMP: HMP would parse a path as an expression.
    m.qmp(
        "dump-guest-memory",
        serde_json::json!({ "paging": false, "protocol": format!("file:{}", core.display()) }),
    );
    m.qmp(
        "pmemsave",
        serde_json::json!({ "val": 0, "size": u64::from(RAM_MIB) << 20, "filename": raw }),
    );
    // PAGEPIN_LIVE_KEEP=DIR keeps the dumps (and QEMU's outputs) there.
    if let Some(keep) = std::env::var_os("PAGEPIN_LIVE_KEEP") {
        let keep = PathBuf::from(keep).join(format!("{}-{cr3:x}", if la57 { 5 } else { 4 }));
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&core, keep.join("guest.elf")).unwrap();
        std::fs::write(keep.join("info-tlb.txt"), tlb_q.join("\n")).unwrap();
        std::fs::write(keep.join("info-mem.txt"), mem_q.join("\n")).unwrap();
    }
    let (core_s, raw_s) = (core.to_str().unwrap(), raw.to_str().unwrap());
    let cr3_s = format!("{cr3:#x}");
    let what = format!("{cpu} {append:?} (CR3 {cr3:#x}, CR4 {cr4:#x})");
    assert!(
        tlb_q.len() > 100,
        "{what}: info tlb printed {} lines",
        tlb_q.len()
    );

    // PTI as asked: the kernel root's next page is the user root.
    let stats = inspect(&["--core", core_s, "--stats"]);
    assert_eq!(
        stats.contains("PTI user root at"),
        append.contains("pti=on"),
        "{what}: {stats}"
    );
    assert!(
        stats.contains(&format!("{}-level paging", if la57 { 5 } else { 4 })),
        "{what}: {stats}"
    );
    // The pin report runs on the live tables; 5-level ones Xen cannot run.
    // The engine's count of its own pin matches its formula either way.
    let report = inspect(&["--core", core_s, "--pin-report"]);
    assert_eq!(report.contains("xen: CANNOT RUN"), la57, "{what}: {report}");
    let counts: Vec<(&str, &str)> = report
        .lines()
        .filter_map(|l| l.trim().strip_prefix("engine, "))
        .filter_map(|l| {
            let n = l.split(':').nth(1)?.split_whitespace().next()?;
            let f = l.split("[formula: ").nth(1)?.split_whitespace().next()?;
            Some((n, f))
        })
        .collect();
    assert_eq!(counts.len(), 2, "{what}: {report}");
    assert!(counts.iter().all(|(n, f)| n == f), "{what}: {report}");
    let mut raw_args = vec!["--raw", raw_s, "--cr3", &cr3_s];
    if la57 {
        raw_args.push("--la57");
    }

    // info tlb: the core (CR3 and CR4 from its CPU note) and the raw image.
    let tlb_core = lines(&inspect(&["--core", core_s, "--tlb"]));
    let n_tlb = compare(&format!("{what}: --core --tlb"), &tlb_core, &tlb_q);
    let tlb_raw = lines(&inspect(&[&raw_args[..], &["--tlb"]].concat()));
    compare(&format!("{what}: --raw --tlb"), &tlb_raw, &tlb_q);
    // info mem: QEMU's own lines in 4-level mode; in 5-level mode QEMU 7.2
    // prints none (its bug), so inspect's ranges must be those `info tlb`
    // implies.
    let mem_core = lines(&inspect(&["--core", core_s, "--mem"]));
    let mem_raw = lines(&inspect(&[&raw_args[..], &["--mem"]].concat()));
    compare(
        &format!("{what}: --raw --mem vs --core --mem"),
        &mem_raw,
        &mem_core,
    );
    let n_mem = if la57 {
        assert!(
            mem_q.is_empty(),
            "{what}: QEMU 7.2's info mem under LA57 printed lines; the documented bug is gone?\n{mem_q:?}"
        );
        let derived = ranges_from_tlb(&tlb_q, &mut |va| m.gva2gpa(va));
        let ours = parse_mem(&mem_core);
        assert_eq!(
            ours, derived,
            "{what}: --mem ranges differ from those info tlb implies"
        );
        ours.len()
    } else {
        compare(&format!("{what}: --core --mem"), &mem_core, &mem_q)
    };

    // --translate against gva2gpa: a page of every 1/32 of the tlb lines
    // (at a random offset), and addresses in the gaps between mem ranges.
    let mut rng = Rng::new(cr3);
    let mut sample: Vec<u64> = Vec::new();
    let step = (tlb_q.len() / 32).max(1);
    for l in tlb_q.iter().step_by(step) {
        let va = u64::from_str_radix(l.split_once(':').unwrap().0, 16).unwrap();
        sample.push(va + (rng.next() & 0xfff));
    }
    let ranges = parse_mem(&mem_core);
    // Gaps on one side of the canonical hole (the hole itself is not an
    // address inspect translates), spread over the whole list.
    let gaps: Vec<(u64, u64)> = ranges
        .windows(2)
        .map(|w| (w[0].1, w[1].0))
        .filter(|&(a, b)| a < b && (a ^ b) >> 63 == 0)
        .collect();
    for &(a, b) in gaps.iter().step_by((gaps.len() / 16).max(1)) {
        sample.push(a + (rng.next() % (b - a)) / 8 * 8);
    }
    let mut args = vec!["--core".to_string(), core_s.to_string()];
    for va in &sample {
        args.push("--translate".into());
        args.push(format!("{va:#x}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = inspect(&args);
    let ours: Vec<Option<u64>> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("=> "))
        .map(|r| {
            r.strip_prefix("phys 0x")
                .map(|h| u64::from_str_radix(h.split_whitespace().next().unwrap(), 16).unwrap())
        })
        .collect();
    assert_eq!(
        ours.len(),
        sample.len(),
        "{what}: --translate output:\n{out}"
    );
    let mut mapped = 0;
    for (va, got) in sample.iter().zip(&ours) {
        let want = m.gva2gpa(*va);
        assert_eq!(*got, want, "{what}: --translate {va:#x} vs gva2gpa");
        mapped += usize::from(want.is_some());
    }
    assert!(
        mapped > 0 && mapped < sample.len(),
        "{what}: sample {mapped}/{}",
        sample.len()
    );
    Figures {
        boot,
        cr3,
        la57,
        tlb_lines: n_tlb,
        mem_lines: n_mem,
        translations: sample.len(),
        mapped_samples: mapped,
    }
}

#[test]
fn inspect_matches_qemu_on_a_live_debian_guest() {
    let Some(qemu) = qemu::qemu_or_skip("inspect against live QEMU") else {
        return;
    };
    let Some((kernel, busybox)) = guest_or_skip() else {
        return;
    };
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("pagepin-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initrd_bytes(&busybox)).unwrap();
    // Build the binary before the guests boot (not while they race it).
    inspect_bin();
    let base = "console=ttyS0 panic=-1 quiet";
    let guests = [
        ("max,la57=off", format!("{base} pti=on")),
        ("max,la57=off", format!("{base} pti=off")),
        ("max", format!("{base} pti=on")),
    ];
    // Two at a time: the machine has two cores.
    let mut figures = Vec::new();
    for pair in guests.chunks(2) {
        let got: Vec<Figures> = std::thread::scope(|s| {
            let hs: Vec<_> = pair
                .iter()
                .map(|(cpu, append)| {
                    let (qemu, kernel, initrd) = (&qemu, &kernel, &initrd);
                    s.spawn(move || check_guest(qemu, kernel, initrd, cpu, append))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        figures.extend(pair.iter().zip(got));
    }
    let _ = std::fs::remove_dir_all(&dir);
    for ((cpu, append), f) in &figures {
        println!(
            "live QEMU: -cpu {cpu} {append:?}: {}-level, CR3 {:#x}, user space after {:.1} s; \
             info tlb {} lines and info mem {} {} identical; {} translations ({} mapped) agree \
             with gva2gpa",
            if f.la57 { 5 } else { 4 },
            f.cr3,
            f.boot.as_secs_f64(),
            f.tlb_lines,
            f.mem_lines,
            if f.la57 {
                "ranges (from info tlb)"
            } else {
                "lines"
            },
            f.translations,
            f.mapped_samples
        );
    }
    assert!(
        !figures[0].1.la57 && !figures[1].1.la57,
        "la57=off guests in 4-level mode"
    );
    assert!(
        figures[2].1.la57,
        "-cpu max: Debian 6.1 enables LA57 by itself"
    );
    println!("live QEMU: {:.1} s in all", started.elapsed().as_secs_f64());
}

fn initrd_bytes(busybox: &Path) -> Vec<u8> {
    initrd(&std::fs::read(busybox).expect("read busybox"))
}
