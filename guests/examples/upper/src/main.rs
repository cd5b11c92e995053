//! `upper`: a WASI preview-1 command module. Reads its input on stdin and
//! writes it upper-cased on stdout; input that is not UTF-8 is a failure
//! (exit code 1, the reason on stderr).

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("reading stdin: {e}");
        return ExitCode::from(1);
    }
    let Ok(text) = String::from_utf8(input) else {
        eprintln!("input is not UTF-8");
        return ExitCode::from(1);
    };
    if std::io::stdout().write_all(text.to_uppercase().as_bytes()).is_err() {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
