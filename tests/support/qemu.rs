//! A paused QEMU (TCG) machine as a page-walk oracle: physical memory
//! loaded from an image, control registers set through QEMU's gdbstub, and
//! the human monitor (through QMP) asked `info tlb`, `info mem` and
//! `gva2gpa`. The CPU never runs an instruction: QEMU walks the tables the
//! way its MMU does when asked.
//!
//! Why a gdbstub: neither QMP nor the human monitor can write CR0, CR3, CR4
//! or EFER; the gdbstub can (QEMU's x86-64 register numbers, once the
//! client has read the target description: cr0 27, cr3 29, cr4 30, efer
//! 32). Both sockets are Unix sockets in a private temporary directory, so
//! concurrent tests never collide on a port.
//!
//! [`Machine::boot`] starts a machine that runs: a kernel and initrd given
//! to QEMU's `-kernel`, its serial console in a file, QMP only (no
//! gdbstub); [`Machine::wait_serial`], [`Machine::stop`] and
//! [`Machine::hmp`] drive it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Control-register bits the oracle sets.
pub const CR0_PE: u64 = 1;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_NXE: u64 = 1 << 11;

/// `Some(path)` of qemu-system-x86_64, or `None` after printing `SKIP:`
/// (panicking instead under `CI=true`, where `.ci/run` installs it).
pub fn qemu_or_skip(what: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{what}: qemu-system-x86_64 missing in CI (.ci/run installs qemu-system-x86)");
        }
        println!("SKIP: {what}: qemu-system-x86_64 not found");
    }
    found
}

/// A paused machine.
pub struct Machine {
    child: Child,
    qmp: BufReader<UnixStream>,
    /// The gdbstub of a machine from [`Machine::start`]; `None` for one
    /// from [`Machine::boot`].
    gdb: Option<UnixStream>,
    dir: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory for one machine's sockets and files.
fn private_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pagepin-qemu-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn connect(path: &Path, deadline: Instant) -> UnixStream {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("qemu socket {}: {e}", path.display()),
        }
    }
}

impl Machine {
    /// Start `qemu` paused with `mem_mib` MiB of RAM, `image` loaded at
    /// guest-physical `load_addr`, and `-cpu max` (5-level capable).
    pub fn start(qemu: &Path, mem_mib: u32, image: &[u8], load_addr: u64) -> Machine {
        let dir = private_dir();
        let img = dir.join("mem.bin");
        std::fs::write(&img, image).unwrap();
        let (qmp_path, gdb_path) = (dir.join("qmp.sock"), dir.join("gdb.sock"));
        let child = Command::new(qemu)
            .args(["-machine", "q35", "-cpu", "max", "-accel", "tcg"])
            .args(["-m", &format!("{mem_mib}M"), "-S", "-nodefaults"])
            .args(["-display", "none", "-serial", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=gdb0",
                gdb_path.display()
            ))
            .args(["-gdb", "chardev:gdb0"])
            .arg("-device")
            .arg(format!(
                "loader,file={},addr={load_addr:#x},force-raw=on",
                img.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu");
        let deadline = Instant::now() + Duration::from_secs(20);
        let qmp = BufReader::new(connect(&qmp_path, deadline));
        let gdb = connect(&gdb_path, deadline);
        let mut m = Machine {
            child,
            qmp,
            gdb: Some(gdb),
            dir,
        };
        m.qmp_read(); // greeting
        m.qmp_call(r#"{"execute":"qmp_capabilities"}"#);
        // The gdbstub answers register reads and writes only once the
        // client has read the target description.
        m.gdb_packet("qSupported");
        m.gdb_packet("qXfer:features:read:target.xml:0,ffb");
        m
    }

    /// Boot `kernel` with `initrd` and command line `append` under TCG:
    /// `mem_mib` MiB of RAM, one vCPU of model `cpu` (e.g. `max,la57=off`),
    /// the serial console written to a file ([`Machine::serial`]).
    pub fn boot(
        qemu: &Path,
        cpu: &str,
        mem_mib: u32,
        kernel: &Path,
        initrd: &Path,
        append: &str,
    ) -> Machine {
        let dir = private_dir();
        let qmp_path = dir.join("qmp.sock");
        let child = Command::new(qemu)
            .args(["-machine", "q35", "-cpu", cpu, "-accel", "tcg", "-smp", "1"])
            .args(["-m", &format!("{mem_mib}M"), "-nodefaults", "-no-reboot"])
            .args(["-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu");
        let qmp = BufReader::new(connect(&qmp_path, Instant::now() + Duration::from_secs(20)));
        let mut m = Machine {
            child,
            qmp,
            gdb: None,
            dir,
        };
        m.qmp_read(); // greeting
        m.qmp_call(r#"{"execute":"qmp_capabilities"}"#);
        m
    }

    /// The machine's private directory (sockets, serial log; removed on
    /// drop): a place for its dumps too.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long a QMP reply may take (20 s unless set).
    pub fn set_reply_timeout(&mut self, limit: Duration) {
        self.qmp.get_ref().set_read_timeout(Some(limit)).unwrap();
    }

    /// The serial console's output so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("serial.log")).unwrap_or_default())
            .into_owned()
    }

    /// Wait until the serial console shows `marker`: `Ok(elapsed)`, or
    /// `Err(console)` after `limit` or if QEMU exits.
    pub fn wait_serial(&mut self, marker: &str, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let out = self.serial();
            if out.contains(marker) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit || self.child.try_wait().ok().flatten().is_some() {
                return Err(out);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the vCPUs (QMP `stop`): the tables no longer change.
    pub fn stop(&mut self) {
        self.qmp_call(r#"{"execute":"stop"}"#);
    }

    /// A register of `info registers` (e.g. `CR3`, `CR4`), as printed:
    /// `NAME=hex`.
    pub fn register(&mut self, name: &str) -> u64 {
        let regs = self.hmp("info registers");
        let key = format!("{name}=");
        let at = regs
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in info registers: {regs}"));
        let hex: String = regs[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&hex, 16).unwrap_or_else(|e| panic!("{name}={hex}: {e}"))
    }

    fn qmp_read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.qmp.read_line(&mut line).expect("qmp read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("qmp line {line:?}: {e}"))
    }

    fn qmp_call(&mut self, json: &str) -> serde_json::Value {
        self.qmp
            .get_mut()
            .write_all(format!("{json}\n").as_bytes())
            .unwrap();
        loop {
            let v = self.qmp_read();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                panic!("qmp {json}: {e}");
            }
            return v["return"].clone();
        }
    }

    /// A QMP command with arguments: its `return` value (a QMP error
    /// panics, naming the command).
    pub fn qmp(&mut self, execute: &str, arguments: serde_json::Value) -> serde_json::Value {
        let req = serde_json::json!({ "execute": execute, "arguments": arguments });
        self.qmp_call(&req.to_string())
    }

    /// A human-monitor command's output.
    pub fn hmp(&mut self, cmd: &str) -> String {
        let req = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": cmd }
        });
        self.qmp_call(&req.to_string())
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// One gdb remote-protocol exchange; returns the reply's payload.
    fn gdb_packet(&mut self, payload: &str) -> String {
        let sum: u8 = payload.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        let gdb = self
            .gdb
            .as_mut()
            .expect("a machine from Machine::start has a gdbstub");
        gdb.write_all(format!("${payload}#{sum:02x}").as_bytes())
            .unwrap();
        // Skip acks up to '$', read to '#', then the two checksum digits.
        let mut byte = [0u8; 1];
        loop {
            gdb.read_exact(&mut byte).expect("gdb read");
            if byte[0] == b'$' {
                break;
            }
        }
        let mut reply = Vec::new();
        loop {
            gdb.read_exact(&mut byte).expect("gdb read");
            if byte[0] == b'#' {
                break;
            }
            reply.push(byte[0]);
        }
        let mut sum = [0u8; 2];
        gdb.read_exact(&mut sum).expect("gdb read");
        gdb.write_all(b"+").unwrap();
        String::from_utf8_lossy(&reply).into_owned()
    }

    fn set_reg(&mut self, num: u32, value: u64) {
        let hex: String = value
            .to_le_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let r = self.gdb_packet(&format!("P{num:x}={hex}"));
        assert_eq!(r, "OK", "gdb write of register {num}");
    }

    /// Enter long mode with paging on `cr3`: CR4 (PAE, and LA57 for
    /// 5-level) and EFER (LME | NXE) first, then CR3, then CR0.PG, which
    /// makes QEMU set EFER.LMA.
    pub fn enter_long_mode(&mut self, cr3: u64, la57: bool) {
        let cr4 = CR4_PAE | if la57 { CR4_LA57 } else { 0 };
        self.set_reg(30, cr4);
        self.set_reg(32, EFER_LME | EFER_NXE);
        self.set_reg(29, cr3);
        self.set_reg(27, CR0_PG | CR0_PE);
        let regs = self.hmp("info registers");
        let want_cr4 = format!("CR4={cr4:08x}");
        assert!(
            regs.contains(&want_cr4) && regs.contains("EFER=0000000000000d00"),
            "qemu did not take the control registers ({want_cr4}): {regs}"
        );
    }

    /// `gva2gpa va`: the guest-physical address, or `None` ("Unmapped").
    pub fn gva2gpa(&mut self, va: u64) -> Option<u64> {
        let out = self.hmp(&format!("gva2gpa {va:#x}"));
        let t = out.trim();
        if let Some(hex) = t.strip_prefix("gpa: 0x") {
            return Some(u64::from_str_radix(hex, 16).expect("gpa"));
        }
        if t == "gpa: 0" {
            return Some(0);
        }
        assert!(t.contains("Unmapped"), "gva2gpa {va:#x}: {t:?}");
        None
    }
}

/// One line of QEMU's `info tlb`: virtual address, physical address and
/// the nine flag letters (`X G P D A C T U W`, `-` when clear).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlbLine {
    pub va: u64,
    pub pa: u64,
    pub flags: String,
}

/// Parse `info tlb` (x86-64, 4- or 5-level: both print 16 hex digits).
pub fn parse_tlb(out: &str) -> Vec<TlbLine> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (va, rest) = l.split_once(": ").unwrap_or_else(|| panic!("tlb {l:?}"));
            let (pa, flags) = rest.split_once(' ').unwrap_or_else(|| panic!("tlb {l:?}"));
            TlbLine {
                va: u64::from_str_radix(va, 16).unwrap(),
                pa: u64::from_str_radix(pa, 16).unwrap(),
                flags: flags.trim().to_string(),
            }
        })
        .collect()
}
