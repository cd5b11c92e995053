//! Function projects: what `shoal deploy` sends for a path, and the
//! templates `shoal new` writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use shoal_runtime::{Language, MAX_SOURCE_FILES};

/// The body of a deploy of `path`, and the language if it is source: a
/// Python or JavaScript file, or a folder with an `app.py` or `app.js` (its
/// `.py` or `.js` files, as a tar archive); anything else is sent as it is
/// (wasm).
pub(crate) fn deploy_body(path: &Path) -> anyhow::Result<(Vec<u8>, Option<Language>)> {
    if path.is_dir() {
        for (language, extension) in [(Language::Python, "py"), (Language::JavaScript, "js")] {
            if path.join(language.entry_file()).is_file() {
                return Ok((tar_sources(path, extension)?, Some(language)));
            }
        }
        if path.join("Cargo.toml").is_file() {
            bail!(
                "{} is a Rust project: build it (cargo build --release --target wasm32-wasip2) and deploy the .wasm",
                path.display()
            );
        }
        if path.join("app.c").is_file() {
            bail!("{} is a C project: build it (make) and deploy its app.wasm", path.display());
        }
        bail!("{} has no app.py or app.js and is not a file: nothing to deploy", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let language = match path.extension().and_then(|ext| ext.to_str()) {
        Some("py") => Some(Language::Python),
        Some("js") => Some(Language::JavaScript),
        _ => None,
    };
    Ok((bytes, language))
}

/// A tar archive of the files under `dir` ending in `.{extension}`, with
/// paths relative to `dir`, in a stable order; hidden entries and
/// `__pycache__` are left out.
fn tar_sources(dir: &Path, extension: &str) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, dir, extension, &mut files)?;
    files.sort();
    if files.len() > MAX_SOURCE_FILES {
        bail!(
            "{} has {} .{extension} files; a function may have at most {MAX_SOURCE_FILES}",
            dir.display(),
            files.len()
        );
    }
    let mut archive = tar::Builder::new(Vec::new());
    for relative in &files {
        let contents = std::fs::read(dir.join(relative)).with_context(|| format!("reading {}", relative.display()))?;
        let mut header = tar::Header::new_ustar();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, relative, contents.as_slice())?;
    }
    Ok(archive.into_inner()?)
}

fn collect(root: &Path, dir: &Path, extension: &str, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "__pycache__" || name == "node_modules" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(root, &path, extension, out)?;
        } else if path.extension().is_some_and(|ext| ext == extension) {
            out.push(path.strip_prefix(root).expect("under the root").to_path_buf());
        }
    }
    Ok(())
}

/// The languages `shoal new` has a template for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Template {
    Rust,
    Python,
    Js,
    C,
    /// HTTP functions: a `wasi:http` component (with the `wstd` crate),
    /// Python's `on_fetch`, JavaScript's Workers-style `fetch`.
    RustHttp,
    PythonHttp,
    JsHttp,
}

/// The WIT contract, for projects that generate their own bindings.
const SHOAL_WIT: &str = include_str!("../../../wit/shoal.wit");
/// The wit-bindgen the Rust template uses (the SDK's).
const WIT_BINDGEN: &str = "0.57";

/// Write a new function project `name` of `template` into `dir/name`.
pub(crate) fn new_project(template: Template, name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        bail!("{name:?} is not a function name: lowercase letters, digits, `-` and `_`, at most 63");
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} exists already", root.display());
    }
    let files: Vec<(&str, String)> = match template {
        Template::Python => vec![("app.py", PYTHON_APP.to_string()), ("README.md", source_readme(name, "py"))],
        Template::Js => vec![("app.js", JS_APP.to_string()), ("README.md", source_readme(name, "js"))],
        Template::PythonHttp => {
            vec![("app.py", PYTHON_HTTP_APP.to_string()), ("README.md", http_readme(name, "nothing to build", "."))]
        }
        Template::JsHttp => {
            vec![("app.js", JS_HTTP_APP.to_string()), ("README.md", http_readme(name, "nothing to build", "."))]
        }
        Template::RustHttp => vec![
            ("Cargo.toml", rust_http_manifest(name)),
            ("src/main.rs", RUST_HTTP_MAIN.to_string()),
            (
                "README.md",
                http_readme(
                    name,
                    "`cargo build --release --target wasm32-wasip2`",
                    &format!("target/wasm32-wasip2/release/{name}.wasm"),
                ),
            ),
        ],
        Template::C => vec![
            ("app.c", C_APP.to_string()),
            ("Makefile", C_MAKEFILE.to_string()),
            (
                "README.md",
                format!(
                    "# {name}\n\n\
                     - build: `make` (clang, lld and wasi-libc; Debian/Ubuntu: `apt-get install clang lld wasi-libc libclang-rt-dev-wasm32`)\n\
                     - deploy: `shoal deploy TENANT/{name} app.wasm`\n\
                     - invoke: `shoal invoke TENANT/{name} -d world`\n"
                ),
            ),
        ],
        Template::Rust => vec![
            ("Cargo.toml", rust_manifest(name)),
            ("src/lib.rs", RUST_LIB.to_string()),
            ("wit/shoal.wit", SHOAL_WIT.to_string()),
            (
                "README.md",
                format!(
                    "# {name}\n\n\
                     - build: `cargo build --release --target wasm32-wasip2`\n\
                     - deploy: `shoal deploy TENANT/{name} target/wasm32-wasip2/release/{}.wasm`\n\
                     - invoke: `shoal invoke TENANT/{name} -d world`\n",
                    name.replace('-', "_")
                ),
            ),
        ],
    };
    for (relative, contents) in files {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().expect("inside the project"))
            .with_context(|| format!("creating {}", root.display()))?;
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(root)
}

/// The README of a project deployed as source (`app.{extension}`).
fn source_readme(name: &str, extension: &str) -> String {
    format!(
        "# {name}\n\n\
         - build: nothing to build; `app.{extension}` (and any `.{extension}` next to it) is the function\n\
         - deploy: `shoal deploy TENANT/{name} .`\n\
         - invoke: `shoal invoke TENANT/{name} -d world`\n"
    )
}

/// The README of an HTTP function project.
fn http_readme(name: &str, build: &str, deploy: &str) -> String {
    format!(
        "# {name}\n\n\
         - build: {build}\n\
         - deploy: `shoal deploy TENANT/{name} {deploy} --http --public` (without `--public`, callers need the tenant's token)\n\
         - call: `curl 'http://127.0.0.1:8081/TENANT/{name}/?name=you'` (`shoal ls TENANT` shows the URL)\n"
    )
}

const PYTHON_HTTP_APP: &str = r#""""A Shoal HTTP function: `on_fetch` gets each request and returns its answer.

`request` has `method`, `path` (after the function's prefix), `query`,
`args` (the query parsed), `headers` and `body`. Return a `shoal.Response`
(or bytes, a str, None). `shoal.fetch(url)` calls out, to the hosts named
at deploy with `--allow-host`; `shoal.state` is shared state.
"""

import shoal


def on_fetch(request: shoal.Request) -> shoal.Response:
    if request.path != "/":
        return shoal.Response("not found\n", status=404)
    name = request.args.get("name", "world")
    return shoal.Response.json({"hello": name, "method": request.method})
"#;

const JS_HTTP_APP: &str = r#"// A Shoal HTTP function, Workers style: `fetch` gets each request (a
// standard Request) and returns a Response. `fetch(url)` inside it calls out,
// to the hosts named at deploy with `--allow-host`; `require("shoal")`
// reaches shared state.

export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname !== "/") return new Response("not found\n", { status: 404 });
    const name = url.searchParams.get("name") ?? "world";
    return new Response(JSON.stringify({ hello: name, method: request.method }), {
      headers: { "content-type": "application/json" },
    });
  },
};
"#;

/// The `wstd` the Rust HTTP template uses.
const WSTD: &str = "0.6";

fn rust_http_manifest(name: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
         [dependencies]\nwstd = \"{WSTD}\"\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\n\n\
         # A project of its own, not a member of an enclosing workspace.\n[workspace]\n"
    )
}

const RUST_HTTP_MAIN: &str = r#"//! A Shoal HTTP function: a standard `wasi:http` handler (the same component
//! runs under `wasmtime serve` or Spin). Each request gets a fresh instance.

use wstd::http::{Body, Request, Response, StatusCode};

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, wstd::http::Error> {
    if request.uri().path() != "/" {
        return Ok(Response::builder().status(StatusCode::NOT_FOUND).body("not found\n".into())?);
    }
    let name = request
        .uri()
        .query()
        .and_then(|query| query.split('&').find_map(|pair| pair.strip_prefix("name=")))
        .unwrap_or("world")
        .to_string();
    Ok(Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(format!("hello {name} ({})\n", request.method()).into())?)
}
"#;

const PYTHON_APP: &str = r#""""A Shoal function: `handle` gets the call's input and returns its output.

`import shoal` reaches shared state (`shoal.state.get/set/incr/...`) and
other functions of the tenant (`shoal.call`, `shoal.spawn`, `shoal.wait`).
Top-level code runs once, when the function is deployed.
"""


def handle(input: bytes) -> bytes:
    name = input.decode() or "world"
    return f"hello {name}".encode()
"#;

const JS_APP: &str = r#"// A Shoal function: `handle` gets the call's input (a Uint8Array) and
// returns its output (a string, a Uint8Array or nothing).
//
// `require("shoal")` reaches shared state (`shoal.state.get/set/incr/...`)
// and other functions of the tenant (`shoal.call`, `shoal.spawn`,
// `shoal.wait`). Top-level code runs once, when the function is deployed.

exports.handle = (input) => {
  const name = new TextDecoder().decode(input) || "world";
  return `hello ${name}`;
};
"#;

const C_APP: &str = r#"/* A Shoal function in C: a WASI command module. The call's input is its
 * stdin and what it writes to stdout is the output; a non-zero exit status
 * fails the call (with what it wrote to stderr in the logs). The deploy's
 * env vars are its environment. */
#include <stdio.h>
#include <stdlib.h>

int main(void) {
    char name[1024];
    size_t n = fread(name, 1, sizeof name - 1, stdin);
    name[n] = '\0';
    printf("hello %s", n > 0 ? name : "world");
    return 0;
}
"#;

/// Builds `app.wasm` with Debian's clang and wasi-libc (a WASI preview 1
/// command module; newer clangs also call the target `wasm32-wasip1`).
const C_MAKEFILE: &str = "CLANG ?= clang\n\n\
app.wasm: app.c\n\
\t$(CLANG) --target=wasm32-wasi -O2 -o $@ $<\n\n\
clean:\n\
\trm -f app.wasm\n\n\
.PHONY: clean\n";

fn rust_manifest(name: &str) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\nwit-bindgen = {{ version = \"{WIT_BINDGEN}\", default-features = false, features = [\"macros\", \"realloc\"] }}\n\n\
         [profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\n\n\
         # A project of its own, not a member of an enclosing workspace.\n[workspace]\n"
    )
}

const RUST_LIB: &str = r#"//! A Shoal function: `handle` gets the call's input and returns its output.
//! The host interfaces are `shoal::function::state` and `::invoke`.

wit_bindgen::generate!({ path: "wit", world: "function" });

struct Function;

impl exports::shoal::function::handler::Guest for Function {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let name = if input.is_empty() { b"world".to_vec() } else { input };
        Ok([b"hello ".as_slice(), &name].concat())
    }
}

export!(Function);
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_folder_is_sent_as_a_tar_of_its_sources() {
        let dir = tempfile::tempdir().unwrap();
        let project = new_project(Template::Python, "greet", dir.path()).unwrap();
        std::fs::create_dir_all(project.join("lib/__pycache__")).unwrap();
        std::fs::write(project.join("lib/util.py"), "X = 1\n").unwrap();
        std::fs::write(project.join("lib/__pycache__/util.cpython.pyc"), "junk").unwrap();
        std::fs::write(project.join(".hidden.py"), "junk").unwrap();
        let (body, language) = deploy_body(&project).unwrap();
        assert_eq!(language, Some(Language::Python));
        let bundle = shoal_runtime::SourceBundle::from_upload(Language::Python, &body).unwrap();
        let paths: Vec<&str> = bundle.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["app.py", "lib/util.py"]);
        let (body, language) = deploy_body(&project.join("app.py")).unwrap();
        assert_eq!((body.as_slice(), language), (PYTHON_APP.as_bytes(), Some(Language::Python)));
        let readme = std::fs::read_to_string(project.join("README.md")).unwrap();
        assert_eq!(readme.lines().filter(|l| l.starts_with("- ")).count(), 3, "build, deploy, invoke");
    }

    #[test]
    fn a_js_folder_is_sent_as_a_tar_of_its_sources() {
        let dir = tempfile::tempdir().unwrap();
        let project = new_project(Template::Js, "greet", dir.path()).unwrap();
        std::fs::create_dir_all(project.join("node_modules/x")).unwrap();
        std::fs::write(project.join("node_modules/x/index.js"), "junk").unwrap();
        std::fs::write(project.join("util.js"), "exports.x = 1;").unwrap();
        let (body, language) = deploy_body(&project).unwrap();
        assert_eq!(language, Some(Language::JavaScript));
        let bundle = shoal_runtime::SourceBundle::from_upload(Language::JavaScript, &body).unwrap();
        let paths: Vec<&str> = bundle.files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["app.js", "util.js"]);
    }

    #[test]
    fn projects_are_refused_where_they_cannot_be_made_or_sent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(new_project(Template::Rust, "Bad Name", dir.path()).is_err());
        let rust = new_project(Template::Rust, "adder", dir.path()).unwrap();
        assert!(new_project(Template::Rust, "adder", dir.path()).unwrap_err().to_string().contains("exists"));
        let error = deploy_body(&rust).unwrap_err().to_string();
        assert!(error.contains("Rust project") && error.contains("wasm32-wasip2"), "{error}");
        let c = new_project(Template::C, "cgreet", dir.path()).unwrap();
        let error = deploy_body(&c).unwrap_err().to_string();
        assert!(error.contains("C project") && error.contains("make"), "{error}");
        assert!(deploy_body(dir.path()).is_err(), "a folder that is no project");
    }
}
