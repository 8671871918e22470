//! `inspect`: read real page tables from a memory dump (QEMU ELF core or
//! raw image). `cargo install --path dump`, then `inspect --help`.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use pagepin_dump::cli::{self, Args};

fn main() -> ExitCode {
    // clap prints usage errors with the usage line and exits 2, `--help`
    // and `--version` on stdout with 0.
    let args = Args::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = cli::run_args(&args, &mut out);
    let flushed = out.flush();
    drop(out);
    match r {
        Ok(()) if flushed.is_ok() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(1),
        Err(e) => {
            eprintln!("inspect: error: {}", cli::error_message(&args, &e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
