//! Running the `inspect` binary from the dump tests: under a wall
//! clock limit and an address-space limit (`ulimit -v`), with its exit
//! status or signal, output, time and peak RSS.

#![allow(dead_code)] // each test crate uses part of it

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `inspect` binary of this crate: cargo builds it for every
/// integration test and names it in `CARGO_BIN_EXE_inspect`.
pub fn inspect_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_inspect"))
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

/// Reap `child` if it has ended (or, with `block`, when it ends): its exit
/// code, signal and peak RSS. `wait4` gives this child's own rusage.
#[cfg(target_os = "linux")]
fn reap(
    child: &mut std::process::Child,
    block: bool,
) -> Option<(Option<i32>, Option<i32>, Option<u64>)> {
    let mut status = 0i32;
    // SAFETY: rusage is plain integers; all-zero is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: `status` and `u` are valid, writable; `pid` is our child,
    // not yet reaped (std never waits for it: we reap it here).
    let r = unsafe {
        libc::wait4(
            pid,
            &mut status,
            if block { 0 } else { libc::WNOHANG },
            &mut u,
        )
    };
    if r != pid {
        assert!(r == 0 && !block, "wait4({pid}) = {r}");
        return None;
    }
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else {
        (None, Some(libc::WTERMSIG(status)))
    };
    // ru_maxrss is in KiB on Linux.
    Some((code, signal, Some(u.ru_maxrss.max(0) as u64)))
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
