//! Read real page tables from a memory dump.
//!
//! ```sh
//! cargo run --release --example inspect -- --core guest.elf --mem
//! cargo run --release --example inspect -- --raw mem.bin --cr3 0x1234000 --tlb --pin-report
//! ```
//!
//! See `pagepin::dump::cli` for the flags (`--help`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = pagepin::dump::cli::run(&args, &mut out);
    let flushed = std::io::Write::flush(&mut out);
    match r {
        Ok(()) => {
            if flushed.is_err() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            drop(out);
            eprintln!(
                "inspect: error: {}",
                pagepin::dump::cli::error_message(&args, &e)
            );
            std::process::exit(pagepin::dump::cli::exit_code(&e));
        }
    }
}
