//! Builds the guest workspace (`guests/`) for wasm32 and writes a module of
//! `include_bytes!` constants for the artifacts, so the host crates get real
//! compiled guests without a separate build step.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Components (wasm32-wasip2): (package, is an example deployed by `shoal serve`).
const COMPONENTS: &[(&str, bool)] = &[
    ("hello", true),
    ("echo", true),
    ("fib", true),
    ("counter", true),
    ("matvec", true),
    ("wordcount", true),
    ("fanout", true),
    ("misbehave", false),
    ("state-ops", false),
    ("chain", false),
];
/// WASI preview-1 command modules (wasm32-wasip1).
const COMMANDS: &[(&str, bool)] = &[("upper", true), ("noop-cmd", false)];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.join("../..").canonicalize().expect("workspace root exists");
    let guests = root.join("guests");
    let target_dir = root.join("target").join("guests");
    for watched in ["Cargo.toml", "Cargo.lock", "shoal-sdk", "examples", "test-guests"] {
        println!("cargo:rerun-if-changed={}", guests.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    build(&guests, &target_dir, "wasm32-wasip2", COMPONENTS);
    build(&guests, &target_dir, "wasm32-wasip1", COMMANDS);

    let mut out = String::new();
    let mut examples = String::new();
    let mut all = String::new();
    for (target, list) in [("wasm32-wasip2", COMPONENTS), ("wasm32-wasip1", COMMANDS)] {
        for (package, is_example) in list {
            let file = target_dir.join(target).join("release").join(format!("{}.wasm", package.replace('-', "_")));
            let file = if file.exists() {
                file
            } else {
                target_dir.join(target).join("release").join(format!("{package}.wasm"))
            };
            assert!(file.exists(), "guest build did not produce {}", file.display());
            let ident = package.to_uppercase().replace('-', "_");
            writeln!(out, "/// `{package}`, built for {target}.").unwrap();
            writeln!(out, "pub const {ident}: &[u8] = include_bytes!({:?});", file.display().to_string()).unwrap();
            writeln!(all, "    ({package:?}, {ident}),").unwrap();
            if *is_example {
                writeln!(examples, "    ({package:?}, {ident}),").unwrap();
            }
        }
    }
    writeln!(out, "/// The example functions `shoal serve` deploys under tenant `demo`.").unwrap();
    writeln!(out, "pub const EXAMPLES: &[(&str, &[u8])] = &[\n{examples}];").unwrap();
    writeln!(out, "/// Every guest artifact, examples and test guests.").unwrap();
    writeln!(out, "pub const ALL: &[(&str, &[u8])] = &[\n{all}];").unwrap();
    let out_file = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("guests.rs");
    std::fs::write(out_file, out).expect("write guests.rs");
}

fn build(guests: &Path, target_dir: &Path, target: &str, packages: &[(&str, bool)]) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guests).args(["build", "--release", "--target", target]).arg("--target-dir").arg(target_dir);
    for (package, _) in packages {
        cmd.args(["-p", package]);
    }
    // The outer build's settings (flags, profile, target dir) are not the
    // guests' business.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME") || key.starts_with("RUSTFLAGS") || key == "RUSTC_WRAPPER"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("run cargo for the guest workspace");
    assert!(
        status.success(),
        "building guests for {target} failed; is the target installed? (rustup target add {target})"
    );
}
