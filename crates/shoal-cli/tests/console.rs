//! The web console in a real browser: `shoal serve` as a child process,
//! Debian's headless Chromium driven through `chromedriver` (WebDriver).
//! A user signs in, deploys by upload, invokes, watches logs and the call
//! rate, sets state, lists asynchronous calls and usage; output and log
//! lines that carry markup stay text; another tenant sees none of it; no
//! page writes an error to the browser's console.
//!
//! With `SHOAL_SCREENSHOTS=DIR` the main pages are saved there as PNGs
//! (how the pictures in `docs/console/` were made).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{serve_with, shoal, stdout};
use serde_json::Value;
use shoal_testkit::webdriver::Browser;

const SHORT: Duration = Duration::from_secs(15);
/// A first Python deploy may compile the shared runtime (once per machine).
const DEPLOY: Duration = Duration::from_secs(300);

/// What a function under test writes: markup in its output, its logs and
/// its state, each of which would set `window.pwned` if it ever ran.
const MARKUP_PY: &str = r#"
def handle(input: bytes) -> bytes:
    print('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">')
    print("seen:", input.decode())
    return b'<script>window.pwned = 3</script><img src=x onerror="window.pwned = 4">' + input
"#;

fn save_screenshot(browser: &Browser, name: &str) {
    if let Ok(dir) = std::env::var("SHOAL_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(format!("{name}.png")), browser.screenshot()).unwrap();
    }
}

/// Nothing the page did since the last look wrote an error (or a
/// warning) to the console.
fn assert_quiet_console(browser: &Browser, page: &str) {
    let noisy: Vec<_> = browser.console().into_iter().filter(|e| e.level == "SEVERE" || e.level == "WARNING").collect();
    assert!(noisy.is_empty(), "the {page} page wrote to the console: {noisy:#?}");
}

/// Nothing a function or tenant wrote ran as script or became markup.
fn assert_nothing_ran(browser: &Browser) {
    let pwned = browser.execute("return window.pwned === undefined ? null : window.pwned;", vec![]);
    assert_eq!(pwned, Value::Null, "markup from a function ran in the console");
    let injected = browser.execute("return document.querySelectorAll('#main script, #main img').length;", vec![]);
    assert_eq!(injected, 0, "markup from a function became elements");
}

fn sign_in(browser: &Browser, base: &str, token: &str) {
    browser.goto(&format!("{base}/console"));
    let field = browser.wait_for("#token", SHORT);
    browser.type_into(&field, token);
    browser.click(&browser.wait_for("#sign-in", SHORT));
    browser.wait_for("#sign-out", SHORT);
}

fn sign_out(browser: &Browser) {
    browser.click(&browser.wait_for("#sign-out", SHORT));
    browser.wait_for("#token", SHORT);
    let kept = browser.execute("return sessionStorage.length;", vec![]);
    assert_eq!(kept, 0, "signing out forgets the token");
}

#[test]
fn a_user_works_in_the_console_and_another_tenant_sees_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    // Spans go nowhere (nothing listens on the discard port), but calls
    // are sampled: their trace ids link to where `--trace-link` says.
    let served = serve_with(
        dir.path(),
        &[
            "--max-state-value",
            "64KiB",
            "--otlp-endpoint",
            "http://127.0.0.1:9",
            "--trace-link",
            "http://127.0.0.1:16686/trace/{trace_id}",
        ],
    );
    let base = served.url.trim_end_matches('/').to_string();
    let run = |args: &[&str]| shoal(dir.path(), &served.url, args);
    let acme = stdout(&run(&["tenant", "create", "acme"])).trim().to_string();
    let rival = stdout(&run(&["tenant", "create", "rival"])).trim().to_string();
    let admin = std::fs::read_to_string(dir.path().join(".shoal/admin.token")).unwrap().trim().to_string();
    std::fs::write(dir.path().join("markup.py"), MARKUP_PY).unwrap();
    std::fs::write(dir.path().join("echo.wasm"), shoal_guests::ECHO).unwrap();
    std::fs::write(dir.path().join("bytes.bin"), [0u8, 1, 2, 0xff, 0xfe]).unwrap();
    // A folder of Python source, as a tar archive.
    std::fs::create_dir(dir.path().join("folder")).unwrap();
    std::fs::write(dir.path().join("folder/helper.py"), "WORDS = 'from a folder'\n").unwrap();
    std::fs::write(
        dir.path().join("folder/app.py"),
        "from helper import WORDS\n\ndef handle(input: bytes) -> bytes:\n    return WORDS.encode()\n",
    )
    .unwrap();
    let tarred = std::process::Command::new("tar")
        .args(["-cf", "folder.tar", "-C", "folder", "app.py", "helper.py"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(tarred.success());

    let browser = Browser::start(1280, 1500);

    // A wrong token: said so, and nothing is kept.
    browser.goto(&format!("{base}/console"));
    browser.type_into(&browser.wait_for("#token", SHORT), "acme.not-the-token");
    browser.click(&browser.wait_for("#sign-in", SHORT));
    let refused = browser.wait_for_text("#signin-error", SHORT, |t| !t.is_empty());
    assert!(refused.contains("unauthorized"), "{refused}");
    assert_eq!(browser.execute("return sessionStorage.length;", vec![]), 0);
    browser.console(); // the refused request's 401, expected

    // Signed in: no functions yet; the token is in session storage only.
    sign_in(&browser, &base, &acme);
    browser.wait_for("#no-functions", SHORT);
    assert_eq!(browser.text(&browser.wait_for("#who", SHORT)), "tenant acme");
    let stored = browser
        .execute("return [sessionStorage.getItem('shoal.token'), localStorage.length, document.cookie];", vec![]);
    assert_eq!(stored, serde_json::json!([acme, 0, ""]));
    assert_quiet_console(&browser, "functions");

    // Deploy by upload: a Python file, then a wasm component with limits and env.
    let upload = |file: &str, memory: Option<&str>, env: Option<&str>| {
        let path = dir.path().join(file);
        browser.type_into(&browser.wait_for("#deploy-file", SHORT), path.to_str().unwrap());
        if file.ends_with(".tar") {
            browser.click(&browser.wait_for("#deploy-language option[value='python']", SHORT));
        }
        if let Some(memory) = memory {
            browser.type_into(&browser.wait_for("#deploy-memory", SHORT), memory);
        }
        if let Some(env) = env {
            browser.type_into(&browser.wait_for("#deploy-env", SHORT), env);
        }
        browser.click(&browser.wait_for("#deploy-go", SHORT));
        browser.wait_for_text("#deploy-result", DEPLOY, |t| !t.is_empty())
    };
    let deployed = upload("markup.py", None, None);
    assert!(deployed.starts_with("Deployed markup"), "{deployed}");
    let deployed = upload("echo.wasm", Some("16"), Some("GREETING=hi"));
    assert!(deployed.starts_with("Deployed echo"), "{deployed}");
    let deployed = upload("folder.tar", None, None);
    assert!(deployed.starts_with("Deployed folder"), "{deployed}");
    let listed = browser.wait_for_text("#functions-table", SHORT, |t| {
        t.contains("markup") && t.contains("echo") && t.contains("folder")
    });
    assert!(listed.contains("python") && listed.contains("16 MiB"), "{listed}");
    assert_quiet_console(&browser, "functions");
    // A bad upload is refused with its kind, and deploys nothing.
    std::fs::write(dir.path().join("broken.wasm"), b"\0asm not really").unwrap();
    let refused = upload("broken.wasm", None, None);
    assert!(refused.contains("invalid_wasm"), "{refused}");
    browser.console(); // the refused request's 422, expected

    // Invoke echo with JSON: shown pretty-printed; its settings as deployed.
    browser.goto(&format!("{base}/console#/function/echo"));
    let settings = browser.wait_for_text("#main dl", SHORT, |t| t.contains("GREETING"));
    assert!(settings.contains("16 MiB"), "{settings}");
    browser.type_into(&browser.wait_for("#invoke-input", SHORT), r#"{"a":[1,2]}"#);
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    let output = browser.wait_for_text("#invoke-output", SHORT, |t| !t.is_empty());
    assert_eq!(output, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    // A file as input; bytes that are not UTF-8 come back as hex.
    let bytes = dir.path().join("bytes.bin");
    browser.type_into(&browser.wait_for("#invoke-file", SHORT), bytes.to_str().unwrap());
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    let output = browser.wait_for_text("#invoke-output", SHORT, |t| t.starts_with("00000000"));
    assert_eq!(output, "00000000  00 01 02 ff fe");
    // The folder's function: its two files were deployed together.
    browser.goto(&format!("{base}/console#/function/folder"));
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    assert_eq!(browser.wait_for_text("#invoke-output", SHORT, |t| !t.is_empty()), "from a folder");

    // The markup function: its output and its log lines are text.
    browser.goto(&format!("{base}/console#/function/markup"));
    browser.type_into(&browser.wait_for("#invoke-input", SHORT), "<b>bold</b>");
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    let output = browser.wait_for_text("#invoke-output", SHORT, |t| !t.is_empty());
    assert_eq!(output, r#"<script>window.pwned = 3</script><img src=x onerror="window.pwned = 4"><b>bold</b>"#);
    let call_id = browser.text(&browser.wait_for("#invoke-call-id", SHORT));
    assert!(call_id.len() >= 16 && call_id.bytes().all(|b| b.is_ascii_hexdigit()), "{call_id}");
    let logs = browser.wait_for_text("#logs", SHORT, |t| t.contains("seen: <b>bold</b>"));
    assert!(logs.contains(r#"<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">"#), "{logs}");
    // The call is listed, and the call rate moved off zero.
    let recent = browser.wait_for_text("#recent-table", SHORT, |t| t.contains(&call_id));
    assert!(recent.contains("ok"), "{recent}");
    let rate = browser.wait_for_text("#rate", SHORT, |t| t.parse::<f64>().is_ok_and(|r| r > 0.0));
    assert!(rate.parse::<f64>().unwrap() > 0.0);
    // Its trace id links to the trace viewer.
    browser.wait_for("#recent-table a.trace-link", SHORT);
    let href = browser.execute("return document.querySelector('#recent-table a.trace-link').href;", vec![]);
    let href = href.as_str().unwrap();
    let trace_id = href.strip_prefix("http://127.0.0.1:16686/trace/").unwrap_or_else(|| panic!("{href}"));
    assert!(trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()), "{href}");
    // Input it cannot decode: the function fails, and the kind is shown.
    browser.type_into(&browser.wait_for("#invoke-file", SHORT), bytes.to_str().unwrap());
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    let failed = browser.wait_for_text("#invoke-result .error", SHORT, |t| !t.is_empty());
    assert!(failed.starts_with("function_error: ") || failed.starts_with("trap: "), "{failed}");
    assert!(failed.contains("UnicodeDecodeError"), "{failed}");
    browser.console(); // the failed call's 500, expected
    browser.goto(&format!("{base}/console#/functions"));
    browser.goto(&format!("{base}/console#/function/markup"));
    // Another call while the page follows: its lines arrive without a reload.
    let follow_from = browser.find_all("#logs > div").len();
    browser.clear(&browser.wait_for("#invoke-input", SHORT));
    browser.type_into(&browser.wait_for("#invoke-input", SHORT), "second");
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    browser.wait_for_text("#logs", SHORT, |t| t.contains("seen: second"));
    assert!(browser.find_all("#logs > div").len() >= follow_from + 2);
    assert_nothing_ran(&browser);
    save_screenshot(&browser, "function");
    assert_quiet_console(&browser, "function");

    // An asynchronous call: accepted, then listed as succeeded with its output.
    browser.click(&browser.wait_for("#invoke-async", SHORT));
    browser.click(&browser.wait_for("#invoke-go", SHORT));
    let accepted = browser.wait_for_text("#invoke-result", SHORT, |t| t.starts_with("Accepted"));
    let async_id = accepted.trim_start_matches("Accepted: ").trim().to_string();
    browser.goto(&format!("{base}/console#/calls"));
    browser.wait_for_text("#calls-table", SHORT, |t| t.contains(&async_id) && t.contains("succeeded"));
    browser.click(&browser.wait_for(&format!("tr[data-call='{async_id}']"), SHORT));
    let output = browser.wait_for_text("#call-output", SHORT, |t| !t.is_empty());
    assert!(output.starts_with("<script>window.pwned = 3</script>"), "{output}");
    assert_nothing_ran(&browser);
    save_screenshot(&browser, "calls");
    assert_quiet_console(&browser, "async calls");

    // State: set a value and read it back, after a reload too.
    browser.click(&browser.wait_for("#nav-state", SHORT));
    browser.type_into(&browser.wait_for("#state-key", SHORT), "greeting");
    browser.type_into(&browser.wait_for("#state-value", SHORT), "hello <i>state</i>");
    browser.click(&browser.wait_for("#state-set", SHORT));
    assert_eq!(browser.wait_for_text("#state-shown", SHORT, |t| !t.is_empty()), "hello <i>state</i>");
    browser.goto(&format!("{base}/console#/functions"));
    browser.goto(&format!("{base}/console#/state"));
    let keys = browser.wait_for_text("#state-table", SHORT, |t| t.contains("greeting"));
    assert!(keys.contains("18 B"), "{keys}");
    browser.click(&browser.wait_for("tr[data-key='greeting'] a", SHORT));
    assert_eq!(browser.wait_for_text("#state-shown", SHORT, |t| !t.is_empty()), "hello <i>state</i>");
    assert_eq!(
        stdout(&run(&["state", "get", "acme/greeting"])),
        "hello <i>state</i>",
        "the console wrote through the API"
    );
    assert_quiet_console(&browser, "state");
    // A key that holds `..` segments is one key: acting on it never walks
    // the request to another route (here it would be the admin deleting a
    // tenant, below).
    browser.goto(&format!("{base}/console#/functions"));
    browser.goto(&format!("{base}/console#/state"));
    browser.clear(&browser.wait_for("#state-key", SHORT));
    browser.type_into(&browser.wait_for("#state-key", SHORT), "../../tenants/rival");
    browser.type_into(&browser.wait_for("#state-value", SHORT), "a trap");
    browser.click(&browser.wait_for("#state-set", SHORT));
    assert_eq!(browser.wait_for_text("#state-shown", SHORT, |t| !t.is_empty()), "a trap");
    assert_eq!(stdout(&run(&["state", "get", "acme/../../tenants/rival"])), "a trap");
    // Over the node's limit of a value: the API's error, shown.
    let big = "x".repeat(70_000);
    browser.execute("document.getElementById('state-value').value = arguments[0];", vec![big.into()]);
    browser.click(&browser.wait_for("#state-set", SHORT));
    let refused = browser.wait_for_text("#state-result", SHORT, |t| !t.is_empty());
    assert!(refused.contains("too_large") || refused.contains("limit"), "{refused}");
    browser.console(); // the refused request's 413, expected
    save_screenshot(&browser, "state");
    // Deleted: gone from the list and from the API.
    browser.click(&browser.wait_for("[data-delete='greeting']", SHORT));
    browser.wait_for_text("#state-keys", SHORT, |t| !t.contains("greeting"));
    assert!(!run(&["state", "get", "acme/greeting"]).status.success());

    // Usage: the calls made are counted.
    browser.click(&browser.wait_for("#nav-usage", SHORT));
    let calls = browser.wait_for_text("#usage-calls", SHORT, |t| t.parse::<u64>().is_ok_and(|n| n >= 4));
    assert!(calls.parse::<u64>().unwrap() >= 4, "{calls}");
    browser.wait_for_text("#usage-table", SHORT, |t| t.contains("markup") && t.contains("echo"));
    save_screenshot(&browser, "usage");
    assert_quiet_console(&browser, "usage");
    assert!(browser.find("#nav-admin").is_none(), "a tenant has no admin page");
    sign_out(&browser);

    // Another tenant sees none of acme's functions, calls or state.
    sign_in(&browser, &base, &rival);
    browser.wait_for("#no-functions", SHORT);
    let shown = browser.body_text();
    assert!(!shown.contains("markup") && !shown.contains("echo"), "{shown}");
    browser.goto(&format!("{base}/console#/function/markup"));
    let missing = browser.wait_for_text("#main .error", SHORT, |t| !t.is_empty());
    assert!(missing.contains("not_found"), "{missing}");
    browser.console(); // the 404, expected
    browser.goto(&format!("{base}/console#/calls/{async_id}"));
    let missing = browser.wait_for_text("#main .error", SHORT, |t| !t.is_empty());
    assert!(missing.contains("not_found"), "{missing}");
    browser.console();
    browser.goto(&format!("{base}/console#/state"));
    browser.wait_for_text("#state-keys", SHORT, |t| t.contains("No keys"));
    browser.goto(&format!("{base}/console#/calls"));
    browser.wait_for_text("#calls-list", SHORT, |t| t.contains("No asynchronous calls"));
    assert_quiet_console(&browser, "another tenant's");
    sign_out(&browser);

    // The admin: every tenant with its limits, the node and its load, and
    // any tenant's functions through the tenant picker.
    sign_in(&browser, &base, &admin);
    browser.click(&browser.wait_for("#nav-admin", SHORT));
    let tenants = browser.wait_for_text("#tenants-table", SHORT, |t| t.contains("rival"));
    for tenant in ["acme", "demo", "rival"] {
        assert!(tenants.contains(tenant), "{tenants}");
    }
    let members = browser.wait_for_text("#members-table", SHORT, |t| t.contains("running"));
    assert!(members.contains("this node"), "{members}");
    save_screenshot(&browser, "admin");
    // The admin deletes acme's key named like a route: the key goes, rival stays.
    browser.execute(
        "const s = document.getElementById('tenant-select'); s.value = 'acme'; s.dispatchEvent(new Event('change'));",
        vec![],
    );
    browser.click(&browser.wait_for("#nav-state", SHORT));
    browser.click(&browser.wait_for("[data-delete='../../tenants/rival']", SHORT));
    browser.wait_for_text("#state-keys", SHORT, |t| t.contains("No keys"));
    browser.click(&browser.wait_for("#nav-admin", SHORT));
    let tenants = browser.wait_for_text("#tenants-table", SHORT, |t| t.contains("rival"));
    assert!(!tenants.contains("deleting"), "{tenants}");
    browser.execute(
        "const s = document.getElementById('tenant-select'); s.value = 'acme'; s.dispatchEvent(new Event('change'));",
        vec![],
    );
    browser.click(&browser.wait_for("#nav-functions", SHORT));
    browser.wait_for_text("#functions-table", SHORT, |t| t.contains("markup"));
    browser.wait_for_text("tr[data-function='markup'] .rate", SHORT, |t| t != "0.00" && t != "–");
    save_screenshot(&browser, "functions");
    // Remove asks once more, then removes.
    browser.click(&browser.wait_for("[data-remove='echo']", SHORT));
    browser.click(&browser.wait_for("[data-remove='echo'].armed", SHORT));
    browser.wait_for_text("#functions-table", SHORT, |t| !t.contains("echo"));
    assert!(!run(&["invoke", "acme/echo", "-d", "x"]).status.success());
    assert_quiet_console(&browser, "admin");
    drop(browser);
    drop(served);
}
