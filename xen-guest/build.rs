//! Links the guest with its own script, without the C runtime, and refuses a
//! position-independent build (nothing would apply its relocations) or one
//! with a red zone (Xen's trap frames would overwrite it).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=.cargo/config.toml");
    for arg in ["-nostartfiles", "-nostdlib", "-static"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags
        .split('\x1f')
        .any(|f| f.contains("relocation-model=static"))
    {
        panic!(
            "xen-guest must be built with -C relocation-model=static: run cargo from \
             the xen-guest directory (its .cargo/config.toml sets it)"
        );
    }
    if !flags.split('\x1f').any(|f| f.contains("no-redzone=yes")) {
        panic!(
            "xen-guest must be built with -C no-redzone=yes (Xen's trap frames land \
             below the stack pointer): run cargo from the xen-guest directory"
        );
    }
}
