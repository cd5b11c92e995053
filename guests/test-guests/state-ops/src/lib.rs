//! Runs the state operations its input names, one per line, so host tests
//! can drive the `state` interface from a real guest:
//! `get K`, `set K V`, `del K`, `range K OFF LEN`, `setrange K OFF DATA`,
//! `append K DATA`, `incr K DELTA`, `push K`, `pull K`, `fill K BYTE LEN`,
//! `lock K`, `unlock K`, `bump K` (add 1 to the decimal local value, a
//! read-modify-write that only a lock makes safe), `panic K` (trap),
//! `sleep K MS` (K is ignored), `qsend Q BODY` (send BODY to the
//! tenant's queue Q; the output is the message's id), and
//! for benchmarks `loopget K N`, `loopset K LEN N` and
//! `looprange K LEN N SPAN` (N reads of LEN bytes spread over SPAN).
//! The output is the last operation's result; an error stops the run and
//! is returned as `<line>: <error>`.

use shoal_sdk::state;

struct StateOps;

fn run(line: &str) -> Result<Vec<u8>, String> {
    let mut words = line.splitn(4, ' ');
    let op = words.next().unwrap_or_default();
    // Keys may hold any character but a space here; `\0` spells NUL.
    let key = words.next().ok_or("missing key")?.replace("\\0", "\0");
    fn arg<'a>(op: &str, w: Option<&'a str>) -> Result<&'a str, String> {
        w.ok_or_else(|| format!("{op}: missing argument"))
    }
    let num = |w: Option<&str>| arg(op, w)?.parse::<i64>().map_err(|e| e.to_string());
    let ok = |r: Result<(), shoal_sdk::Error>| r.map(|()| b"ok".to_vec()).map_err(|e| format!("{e:?}"));
    match op {
        "get" => state::get(&key).map(|v| v.unwrap_or_else(|| b"<none>".to_vec())).map_err(|e| format!("{e:?}")),
        "set" => ok(state::set(&key, arg(op, words.next())?.as_bytes())),
        "del" => ok(state::delete(&key)),
        "range" => {
            let offset = num(words.next())? as u64;
            let len = num(words.next())? as u64;
            state::get_range(&key, offset, len).map_err(|e| format!("{e:?}"))
        }
        "setrange" => {
            let offset = num(words.next())? as u64;
            ok(state::set_range(&key, offset, arg(op, words.next())?.as_bytes()))
        }
        "fill" => {
            let byte = num(words.next())? as u8;
            let len = num(words.next())? as usize;
            ok(state::set(&key, &vec![byte; len]))
        }
        "append" => ok(state::append(&key, arg(op, words.next())?.as_bytes())),
        "incr" => {
            state::incr(&key, num(words.next())?).map(|v| v.to_string().into_bytes()).map_err(|e| format!("{e:?}"))
        }
        "qsend" => shoal_sdk::queue::send(&key, arg(op, words.next())?.as_bytes())
            .map(String::into_bytes)
            .map_err(|e| format!("{e:?}")),
        "push" => ok(state::push(&key)),
        "pull" => ok(state::pull(&key)),
        "lock" => ok(state::lock(&key)),
        "unlock" => ok(state::unlock(&key)),
        "bump" => {
            let current = state::get(&key).map_err(|e| format!("{e:?}"))?.unwrap_or_else(|| b"0".to_vec());
            let n: u64 = String::from_utf8_lossy(&current).parse().map_err(|_| "not a number".to_string())?;
            let next = (n + 1).to_string();
            state::set(&key, next.as_bytes()).map_err(|e| format!("{e:?}"))?;
            Ok(next.into_bytes())
        }
        "loopget" => {
            for _ in 0..num(words.next())? {
                state::get(&key).map_err(|e| format!("{e:?}"))?;
            }
            Ok(b"ok".to_vec())
        }
        "loopset" => {
            let value = vec![1u8; num(words.next())? as usize];
            for _ in 0..num(words.next())? {
                state::set(&key, &value).map_err(|e| format!("{e:?}"))?;
            }
            Ok(b"ok".to_vec())
        }
        "looprange" => {
            let len = num(words.next())? as u64;
            let rest: Vec<u64> = arg(op, words.next())?.split(' ').filter_map(|w| w.parse().ok()).collect();
            let [n, span] = rest[..] else { return Err("looprange K LEN N SPAN".into()) };
            for i in 0..n {
                let offset = (i * 7919 * 4096) % (span - len);
                state::get_range(&key, offset, len).map_err(|e| format!("{e:?}"))?;
            }
            Ok(b"ok".to_vec())
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_millis(num(words.next())? as u64));
            Ok(b"ok".to_vec())
        }
        "panic" => panic!("asked to trap while working on {key}"),
        other => Err(format!("unknown op {other:?}")),
    }
}

impl shoal_sdk::Function for StateOps {
    fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|_| "input is not UTF-8".to_string())?;
        let mut last = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            last = run(line).map_err(|e| format!("{line}: {e}"))?;
        }
        Ok(last)
    }
}

shoal_sdk::export!(StateOps);
