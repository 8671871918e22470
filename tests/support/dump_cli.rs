//! Running the `inspect` example binary from the dump tests: under a wall
//! clock limit and an address-space limit (`ulimit -v`), with its exit
//! status or signal, output, time and peak RSS.

#![allow(dead_code)] // each test crate uses part of it

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `inspect` example next to this test binary (`target/<profile>/
/// examples/inspect`), built first: `cargo test --test NAME` builds only
/// the test, and a binary left from an older build would test old code.
pub fn inspect_bin() -> PathBuf {
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
            .args(["build", "--quiet", "--example", "inspect", "--target-dir"])
            .arg(target_dir);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build --example inspect");
        assert!(
            out.status.success(),
            "cargo build --example inspect failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = profile_dir.join("examples").join("inspect");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// One run of the binary.
#[derive(Debug)]
pub struct BinRun {
    /// The exit status, if it exited (not killed by a signal).
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Whether the time limit killed it.
    pub timed_out: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Its peak resident set (KiB), where measured (Linux).
    pub max_rss_kib: Option<u64>,
}

/// Run `inspect args` with at most `vmem_kib` KiB of address space and
/// `limit` of wall-clock time (killed after it).
pub fn run_inspect(args: &[&str], limit: Duration, vmem_kib: u64) -> BinRun {
    let bin = inspect_bin();
    let start = Instant::now();
    // `exec` keeps the limit and makes the binary the child we wait for.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {vmem_kib} && exec \"$0\" \"$@\""))
        .arg(&bin)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn inspect");
    // Drain both pipes while waiting: a full pipe would stall the child.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let mut timed_out = false;
    let (code, signal, max_rss_kib) = loop {
        if let Some(done) = reap(&mut child, false) {
            break done;
        }
        if start.elapsed() > limit {
            timed_out = true;
            // Not reaped yet, so the pid is still this child's.
            let _ = child.kill();
            break reap(&mut child, true).expect("reap killed inspect");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    BinRun {
        code,
        signal,
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        max_rss_kib,
    }
}

/// struct rusage on x86-64 / aarch64 Linux: two timevals, then 14 longs of
/// which ru_maxrss (KiB) is the first.
#[cfg(target_os = "linux")]
#[repr(C)]
struct Rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    maxrss: i64,
    rest: [i64; 13],
}

#[cfg(target_os = "linux")]
extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, usage: *mut Rusage) -> i32;
}

/// Reap `child` if it has ended (or, with `block`, when it ends): its exit
/// code, signal and peak RSS. `wait4` gives this child's own rusage.
#[cfg(target_os = "linux")]
fn reap(
    child: &mut std::process::Child,
    block: bool,
) -> Option<(Option<i32>, Option<i32>, Option<u64>)> {
    const WNOHANG: i32 = 1;
    let mut status = 0i32;
    let mut u = Rusage {
        utime: [0; 2],
        stime: [0; 2],
        maxrss: 0,
        rest: [0; 13],
    };
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: `status` and `u` are valid, writable; `pid` is our child,
    // not yet reaped (std never waits for it: we reap it here).
    let r = unsafe { wait4(pid, &mut status, if block { 0 } else { WNOHANG }, &mut u) };
    if r != pid {
        assert!(r == 0 && !block, "wait4({pid}) = {r}");
        return None;
    }
    let (code, signal) = if status & 0x7f == 0 {
        (Some((status >> 8) & 0xff), None)
    } else {
        (None, Some(status & 0x7f))
    };
    Some((code, signal, Some(u.maxrss.max(0) as u64)))
}

#[cfg(not(target_os = "linux"))]
fn reap(
    child: &mut std::process::Child,
    block: bool,
) -> Option<(Option<i32>, Option<i32>, Option<u64>)> {
    let s = if block {
        Some(child.wait().expect("wait"))
    } else {
        child.try_wait().expect("try_wait")
    }?;
    Some((s.code(), None, None))
}
