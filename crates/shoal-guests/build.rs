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
    ("primes", false),
    ("misbehave", false),
    ("state-ops", false),
    ("chain", false),
    ("http-probe", false),
    ("notes", false),
    ("compat-wstd", false),
    ("compat-spin", false),
    ("queue-consumer", false),
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
    writeln!(out, "/// A function's source files: (path, contents).").unwrap();
    writeln!(out, "pub type SourceFiles = &'static [(&'static str, &'static [u8])];").unwrap();
    interpreters(&root, &target_dir, &mut out);

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

/// The pinned componentize-py and componentize-js (scripts/setup.sh installs them).
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";
const COMPONENTIZE_JS_VERSION: &str = "0.23.0";

/// A shared language runtime and its examples.
struct Interpreter {
    /// Directory under guests/ and prefix of the generated constants.
    name: &'static str,
    constant: &'static str,
    extension: &'static str,
    /// The tool: env var overriding it, default path under the root, the
    /// version it must print.
    tool_env: &'static str,
    tool_path: &'static str,
    version: String,
}

/// Build the shared Python and JavaScript runtimes and list the examples
/// (deployed as source: their files are embedded as they are).
fn interpreters(root: &Path, target_dir: &Path, out: &mut String) {
    let python = Interpreter {
        name: "python",
        constant: "PYTHON",
        extension: "py",
        tool_env: "SHOAL_COMPONENTIZE_PY",
        tool_path: "target/tools/python/bin/componentize-py",
        version: format!("componentize-py {COMPONENTIZE_PY_VERSION}"),
    };
    let js = Interpreter {
        name: "js",
        constant: "JS",
        extension: "js",
        tool_env: "SHOAL_COMPONENTIZE_JS",
        tool_path: "target/tools/js/node_modules/.bin/componentize-js",
        version: COMPONENTIZE_JS_VERSION.to_string(),
    };
    for interpreter in [python, js] {
        interpreter.build(root, target_dir, out);
    }
}

impl Interpreter {
    fn build(&self, root: &Path, target_dir: &Path, out: &mut String) {
        let runtime_dir = root.join("guests").join(self.name).join("runtime");
        let examples_dir = root.join("guests").join(self.name).join("examples");
        println!("cargo:rerun-if-changed={}", runtime_dir.display());
        println!("cargo:rerun-if-changed={}", examples_dir.display());
        println!("cargo:rerun-if-env-changed={}", self.tool_env);
        let tool = env::var_os(self.tool_env).map(PathBuf::from).unwrap_or_else(|| root.join(self.tool_path));
        let version = Command::new(&tool).arg("--version").output();
        let found = version.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        assert!(
            found == self.version,
            "the {} runtime is built with {}, looked for at {} and found {}: run scripts/setup.sh (or point {} at it)",
            self.name,
            self.version,
            tool.display(),
            if found.is_empty() { "nothing".to_string() } else { found.clone() },
            self.tool_env
        );
        let work = target_dir.join(self.name);
        let output = work.join("runtime.wasm");
        std::fs::create_dir_all(&work).expect("create the runtime's build directory");
        let mut command = Command::new(&tool);
        command.current_dir(&work).env("PYTHONDONTWRITEBYTECODE", "1");
        match self.name {
            "python" => command
                .arg("-d")
                .arg(root.join("wit"))
                .args(["-w", "interpreter", "componentize", "-p"])
                .arg(&runtime_dir)
                .arg("shoal_runtime")
                .arg("-o")
                .arg(&output),
            _ => command
                .arg(runtime_dir.join("shoal_runtime.js"))
                .arg("-w")
                .arg(root.join("wit"))
                // Every feature on: `fetch` (wasi:http outbound) and the
                // fetch event (an HTTP function's incoming requests).
                .args(["-n", "interpreter", "-o"])
                .arg(&output),
        };
        let status = command.status().expect("run the runtime's build tool");
        assert!(status.success(), "{} failed to build the {} runtime", self.version, self.name);
        let constant = self.constant;
        // Embedded from a copy of this build script's own: the work
        // directory is shared by every profile's build (and the tool's
        // output differs from run to run), so the file there may change
        // without this script running again, and the digest below must be
        // of exactly the bytes embedded.
        let built = std::fs::read(&output).expect("read the runtime just built");
        let embedded =
            PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join(format!("{}-runtime.wasm", self.name));
        std::fs::write(&embedded, &built).expect("copy the runtime into OUT_DIR");
        writeln!(out, "/// The shared {} runtime ({}, world `interpreter`).", self.name, self.version).unwrap();
        writeln!(out, "pub const {constant}_RUNTIME: &[u8] = include_bytes!({:?});", embedded.display().to_string())
            .unwrap();
        // Its digest, so a node finds the runtime's compiled code in its
        // cache without reading the bytes.
        let digest: [u8; 32] =
            sha2::Digest::finalize(sha2::Digest::chain_update(sha2::Sha256::default(), &built)).into();
        writeln!(out, "/// SHA-256 of [`{constant}_RUNTIME`].").unwrap();
        writeln!(out, "pub const {constant}_RUNTIME_SHA256: [u8; 32] = {digest:?};").unwrap();

        let mut examples: Vec<PathBuf> = std::fs::read_dir(&examples_dir)
            .expect("the examples directory exists")
            .map(|entry| entry.expect("read the examples directory").path())
            .filter(|path| path.is_dir())
            .collect();
        examples.sort();
        writeln!(out, "/// {} examples as source: (name, files).", self.name).unwrap();
        writeln!(out, "pub const {constant}_EXAMPLES: &[(&str, SourceFiles)] = &[").unwrap();
        for example in examples {
            let name = example.file_name().expect("named").to_string_lossy().to_string();
            let mut files: Vec<PathBuf> = std::fs::read_dir(&example)
                .expect("read an example")
                .map(|entry| entry.expect("read an example").path())
                .filter(|path| path.extension().is_some_and(|ext| ext == self.extension))
                .collect();
            files.sort();
            writeln!(out, "    ({name:?}, &[").unwrap();
            for file in files {
                let path = file.file_name().expect("named").to_string_lossy().to_string();
                writeln!(out, "        ({path:?}, include_bytes!({:?})),", file.display().to_string()).unwrap();
            }
            writeln!(out, "    ]),").unwrap();
        }
        writeln!(out, "];").unwrap();
    }
}
