//! Compiles the change-block tracker's BPF program (bpf/blocktrack.bpf.c) with clang
//! (`make setup` installs it). The object is embedded in the agent binary and loaded at run
//! time with aya (see src/cbt.rs for why aya).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/blocktrack.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("blocktrack.bpf.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args([
            "-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-c", src, "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {clang} to build {src} (install clang: make setup): {e}")
        });
    assert!(status.success(), "{clang} failed to compile {src}");
}
