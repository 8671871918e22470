//! What the real-Xen tests share: whether QEMU and Xen are here (with the
//! loud `SKIP:` / CI failure convention), the PV test guest's build, Xen as
//! an ELF QEMU boots, and one boot of Xen with the guest as dom0 under
//! QEMU TCG, its serial lines collected until the guest is done, panics,
//! QEMU exits or the timeout passes, and the checks every boot's end gets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Debian's Xen 4.17 (package xen-hypervisor-4.17-amd64).
pub const XEN_GZ: &str = "/boot/xen-4.17-amd64.gz";

/// Why real Xen cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new(XEN_GZ).exists() {
        return Some(format!(
            "{XEN_GZ} missing (package xen-hypervisor-4.17-amd64)"
        ));
    }
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(qemu, Ok(s) if s.success()) {
        return Some(String::from(
            "qemu-system-x86_64 not runnable (package qemu-system-x86)",
        ));
    }
    None
}

/// `true` when real Xen can run; otherwise prints `SKIP: {what} ...` and
/// returns `false`, or panics under `CI=true` (where `.ci/run` installs
/// QEMU and Xen).
pub fn available_or_skip(what: &str) -> bool {
    let Some(reason) = unavailable() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "real Xen unavailable in CI ({reason}): .ci/run installs qemu-system-x86 and \
             xen-hypervisor-4.17-amd64"
        );
    }
    println!("SKIP: real Xen unavailable ({reason}); {what} did not run");
    false
}

/// The guest's own workspace.
pub fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("xen-guest")
}

/// Build the guest in its own workspace and target dir.
pub fn build_guest() -> PathBuf {
    let dir = guest_dir();
    let target = dir.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| String::from("cargo"));
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .output()
        .expect("run cargo for the guest");
    assert!(
        out.status.success(),
        "guest build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release").join("pagepin-xen-guest")
}

/// Xen as an ELF QEMU can boot, written per process (test binaries may run
/// at the same time).
pub fn xen_elf() -> PathBuf {
    let dir = guest_dir().join("target");
    std::fs::create_dir_all(&dir).expect("target dir");
    let path = dir.join(format!("xen-4.17-{}.elf", std::process::id()));
    let out = Command::new("zcat").arg(XEN_GZ).output().expect("zcat");
    assert!(out.status.success(), "zcat {XEN_GZ} failed");
    std::fs::write(&path, out.stdout).expect("write xen elf");
    path
}

/// One boot's options.
pub struct BootOptions<'a> {
    /// vCPUs of the machine and of dom0 (1: no `-smp`).
    pub vcpus: usize,
    /// The guest's command line after its path (`a=b c=d`).
    pub args: &'a str,
    /// Extra boot modules after the guest (files).
    pub modules: &'a [PathBuf],
    /// How long the whole boot may take before it counts as a hang.
    pub timeout: Duration,
    /// Print the guest's `PAGEPIN` lines as they come.
    pub echo: bool,
}

/// What one boot printed and how it ended.
pub struct Boot {
    /// Every serial line.
    pub lines: Vec<String>,
    /// QEMU's exit status (`value << 1 | 1` through isa-debug-exit).
    pub status: Option<i32>,
    /// Wall time of the boot.
    pub elapsed: Duration,
    /// The timeout passed (QEMU was killed).
    pub timed_out: bool,
}

impl Boot {
    /// Every serial line, one string (for failure messages).
    pub fn console(&self) -> String {
        self.lines.join("\n")
    }

    /// Fail on a hang (no result within `timeout`) or a Xen or guest panic.
    pub fn assert_alive(&self, timeout: Duration) {
        assert!(
            !self.timed_out,
            "hang: no result within {timeout:?}\n{}",
            self.console()
        );
        assert!(
            !self
                .lines
                .iter()
                .any(|l| l.contains("Panic on CPU") || l.contains("PAGEPIN-GUEST panic")),
            "panic:\n{}",
            self.console()
        );
    }

    /// Fail unless the guest said it is done with every scenario passed
    /// and QEMU exited through isa-debug-exit.
    pub fn assert_passed(&self) {
        assert!(
            self.lines
                .iter()
                .any(|l| l.contains("PAGEPIN-GUEST done verdict=pass")),
            "{}",
            self.console()
        );
        assert_eq!(
            self.status,
            Some((0x10 << 1) | 1),
            "QEMU exit status (isa-debug-exit)"
        );
    }
}

/// The real-Xen tests of one binary one at a time: a real-Xen boot runs its
/// vCPUs as host threads, and a simulator workload spinning on the same two
/// host cores beside it starves them (a lock holder's vCPU descheduled
/// while the others spin) until the boot times out.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boot Xen (`xen`) with `guest` as dom0 under QEMU TCG.
pub fn boot(xen: &Path, guest: &Path, o: &BootOptions<'_>) -> Boot {
    let start = Instant::now();
    let mut initrd = format!("{} {}", guest.display(), o.args)
        .trim_end()
        .to_string();
    for m in o.modules {
        initrd.push(',');
        initrd.push_str(&m.display().to_string());
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-no-reboot",
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-m",
        "512",
    ]);
    let mut append =
        String::from("loglvl=all guest_loglvl=all console=com1 com1=115200 noreboot dom0_mem=64M");
    if o.vcpus > 1 {
        cmd.args(["-accel", "tcg,thread=multi", "-smp"])
            .arg(o.vcpus.to_string());
        append.push_str(&format!(" dom0_max_vcpus={} dom0_vcpus_pin", o.vcpus));
    }
    let mut child = cmd
        .arg("-kernel")
        .arg(xen)
        .arg("-initrd")
        .arg(initrd)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    let stdout = child.stdout.take().expect("qemu stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = o.timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(l) => {
                if o.echo && l.starts_with("PAGEPIN") {
                    println!("  {l}");
                }
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().ok().and_then(|s| s.code());
    Boot {
        lines,
        status,
        elapsed: start.elapsed(),
        timed_out,
    }
}
