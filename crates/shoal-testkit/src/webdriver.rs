//! A real browser for end-to-end tests: Debian's `chromedriver` on a free
//! loopback port driving headless `chromium`, spoken to in the W3C
//! WebDriver protocol (JSON over HTTP/1.1) with blocking calls, enough for
//! a test to open pages, find, click and type, read text, run a script,
//! upload a file, read the browser's console and take screenshots.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key WebDriver names an element's reference with.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` process with one headless browser session, both ended
/// when dropped.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

/// A reference to an element of the page shown.
#[derive(Clone, Debug)]
pub struct Element(String);

/// A message the page wrote to the browser's console (or the browser wrote
/// about the page: failed loads, blocked scripts).
#[derive(Clone, Debug)]
pub struct ConsoleEntry {
    pub level: String,
    pub message: String,
}

impl Browser {
    /// Start `chromedriver` and a headless Chromium of `width`×`height`.
    ///
    /// # Panics
    /// When `chromedriver` or `chromium` is not installed or does not come
    /// up: a browser test fails loudly, never skips.
    pub fn start(width: u32, height: u32) -> Self {
        let port = crate::free_port();
        let driver = Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".to_string()))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (Debian: apt-get install chromium chromium-driver)");
        let mut browser = Self { driver, port, session: String::new() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = browser.request("GET", "/status", None)
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let session = browser.request("POST", "/session", Some(capabilities)).expect("start a browser session");
        browser.session = session["value"]["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// One WebDriver request; the answer's JSON, or the error it names.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .map_err(|e| e.to_string())?;
        let body = read_answer(&mut stream)?;
        let body = String::from_utf8_lossy(&body);
        let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if let Some(error) = value["value"]["error"].as_str() {
            return Err(format!("{error}: {}", value["value"]["message"].as_str().unwrap_or("")));
        }
        Ok(value)
    }

    fn session_request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.request(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Call `path` of the session; panics with what went wrong.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.session_request(method, path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))["value"]
            .take()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// The first element matching the CSS `selector`, if any is there now.
    pub fn find(&self, selector: &str) -> Option<Element> {
        let found =
            self.session_request("POST", "/element", Some(json!({ "using": "css selector", "value": selector })));
        found.ok().and_then(|v| v["value"][ELEMENT_KEY].as_str().map(|id| Element(id.to_string())))
    }

    /// Every element matching `selector` now.
    pub fn find_all(&self, selector: &str) -> Vec<Element> {
        let found = self.call("POST", "/elements", Some(json!({ "using": "css selector", "value": selector })));
        found
            .as_array()
            .map(|all| all.iter().filter_map(|v| v[ELEMENT_KEY].as_str().map(|id| Element(id.to_string()))).collect())
            .unwrap_or_default()
    }

    /// Poll `probe` until it gives a value or `wait` runs out; then fail
    /// with `what` (given the last probe's note), the page's text and its
    /// console.
    fn poll<T>(
        &self,
        wait: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
        what: impl Fn(&str) -> String,
    ) -> T {
        let deadline = Instant::now() + wait;
        loop {
            let last = match probe() {
                Ok(found) => return found,
                Err(last) => last,
            };
            assert!(
                Instant::now() < deadline,
                "{}; the page:\n{}\nits console: {:#?}",
                what(&last),
                self.body_text(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(120));
        }
    }

    /// The element matching `selector`, waiting up to `wait` for it.
    pub fn wait_for(&self, selector: &str, wait: Duration) -> Element {
        self.poll(
            wait,
            || self.find(selector).ok_or_else(String::new),
            |_| format!("no `{selector}` on the page after {wait:?}"),
        )
    }

    /// Wait up to `wait` until the text of `selector` satisfies `test`;
    /// returns that text.
    pub fn wait_for_text(&self, selector: &str, wait: Duration, test: impl Fn(&str) -> bool) -> String {
        let probe = || {
            let text = self.find(selector).and_then(|element| self.try_text(&element)).unwrap_or_default();
            if test(&text) { Ok(text) } else { Err(text) }
        };
        self.poll(wait, probe, |last| format!("`{selector}` never showed the text awaited (last: {last:?})"))
    }

    pub fn click(&self, element: &Element) {
        self.call("POST", &format!("/element/{}/click", element.0), Some(json!({})));
    }

    /// Type `text` into an input (for a file input: the file's path).
    pub fn type_into(&self, element: &Element, text: &str) {
        self.call("POST", &format!("/element/{}/value", element.0), Some(json!({ "text": text })));
    }

    pub fn clear(&self, element: &Element) {
        self.call("POST", &format!("/element/{}/clear", element.0), Some(json!({})));
    }

    fn try_text(&self, element: &Element) -> Option<String> {
        let text = self.session_request("GET", &format!("/element/{}/text", element.0), None).ok()?;
        text["value"].as_str().map(str::to_string)
    }

    /// What the element shows, as text.
    pub fn text(&self, element: &Element) -> String {
        self.try_text(element).unwrap_or_default()
    }

    /// What the whole page shows, as text.
    pub fn body_text(&self) -> String {
        self.find("body").and_then(|body| self.try_text(&body)).unwrap_or_default()
    }

    /// Run `script` (a function body; `arguments` holds `args`) in the page.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": script, "args": args })))
    }

    /// The console messages since the last read (chromedriver's log of the
    /// browser: the page's `console` calls, uncaught errors, CSP
    /// violations and failed loads).
    pub fn console(&self) -> Vec<ConsoleEntry> {
        let entries = self.call("POST", "/se/log", Some(json!({ "type": "browser" })));
        entries
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|e| ConsoleEntry {
                        level: e["level"].as_str().unwrap_or_default().to_string(),
                        message: e["message"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The window as a PNG.
    pub fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let encoded = self.call("GET", "/screenshot", None);
        base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap_or_default()).expect("a base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An HTTP/1.1 answer's body (chromedriver keeps the connection open,
/// so the body ends where its length or last chunk says).
fn read_answer(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut read = |answer: &mut Vec<u8>| -> Result<bool, String> {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        answer.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    };
    let split = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if !read(&mut answer)? {
            return Err("chromedriver closed the connection before its answer's head".into());
        }
    };
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let length =
        head.lines().find_map(|line| line.strip_prefix("content-length:")).and_then(|n| n.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked") || head.contains("transfer-encoding:chunked");
    loop {
        let body = &answer[split + 4..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        if !read(&mut answer)? {
            break;
        }
    }
    let body = &answer[split + 4..];
    Ok(match length {
        Some(n) => body[..n.min(body.len())].to_vec(),
        None if chunked => unchunk(body),
        None => body.to_vec(),
    })
}

/// A chunked HTTP/1.1 body, joined.
fn unchunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..end]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let rest = &body[end + 2..];
        match size {
            Some(size) if size > 0 && rest.len() >= size => {
                out.extend_from_slice(&rest[..size]);
                body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
            }
            _ => break,
        }
    }
    out
}
