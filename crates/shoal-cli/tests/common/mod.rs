//! What the tests of the `shoal` binary share: `shoal serve` as a child
//! process on a free loopback port.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// A `shoal serve` child process, killed when dropped.
pub struct Served {
    pub child: Child,
    pub url: String,
    /// Where its HTTP functions are served (`http://host:port`), if it said.
    #[allow(dead_code)]
    pub functions: Option<String>,
    /// Its metrics listener's `/metrics` URL, if it has one.
    pub metrics: Option<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shoal serve` in `dir` on a free port; returns once it is serving.
pub fn serve(dir: &Path) -> Served {
    serve_with(dir, &[])
}

pub fn serve_with(dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        // The Python runtime compiled once for every node of every test.
        .env("SHOAL_RUNTIME_CACHE", concat!(env!("CARGO_TARGET_TMPDIR"), "/runtime-cache"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .current_dir(dir)
        .env_remove("SHOAL_ADMIN_TOKEN")
        .env_remove("SHOAL_DATA_DIR")
        .env("SHOAL_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shoal serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut url, mut functions, mut metrics) = (None, None, None);
    for line in lines.by_ref() {
        let line = line.expect("read serve's stderr");
        if let Some(rest) = line.strip_prefix("shoal: HTTP functions at ") {
            functions = rest.strip_suffix("/TENANT/NAME/").map(str::to_string);
        }
        if let Some(rest) = line.strip_prefix("shoal: metrics at ") {
            metrics = Some(rest.trim().to_string());
        }
        if let Some(rest) = line.strip_prefix("shoal: serving ") {
            url = Some(rest.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    // Keep draining, so the node never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Served { child, url: url.expect("shoal serve printed its address"), functions, metrics }
}

/// A plain GET of `url` (`http://host:port/path`) over a socket: the body.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_string()
}

/// The value of the metric line starting with `name ` in `metrics`.
pub fn metric(metrics: &str, name: &str) -> f64 {
    let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Run the `shoal` client in `dir` against the node at `url`.
pub fn shoal(dir: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .current_dir(dir)
        .env("SHOAL_URL", url)
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_ADMIN_TOKEN")
        .env_remove("SHOAL_DATA_DIR")
        .output()
        .expect("run shoal")
}

/// A successful run's stdout (panics with its stderr otherwise).
pub fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}
