//! Test support shared by Shoal's crates: [`RedisServer`] runs a real
//! `redis-server` on a free loopback port for as long as it lives, so tests
//! of the Redis tier talk to Redis itself, not a stand-in.

pub mod fuzz;
mod otlp;
pub mod webdriver;

pub use otlp::{OtlpReceiver, ReceivedSpan};

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on 127.0.0.1, killed when dropped.
/// Nothing is persisted (but with [`RedisServer::start_durable`]); the
/// server's files live in a temporary directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// Every write in the append-only file, synced before it is answered.
    durable: bool,
}

impl RedisServer {
    /// Start a server on a free port.
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not come up: tests that
    /// need Redis must fail loudly, never skip.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Start a server that keeps every write in its append-only file
    /// (`appendonly yes`, `appendfsync always`), so a [`RedisServer::restart`]
    /// (after a `SIGKILL`) finds every write it answered.
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        // A port picked free can be taken before the server binds it; try
        // a few times.
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(port, dir.path(), durable);
            if wait_for_ping(port, &mut child) {
                return Self { child, port, dir, durable };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not start on a free loopback port (see its log above)");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Send one command; returns the reply's first line as Redis wrote it
    /// (`+OK`, `:1`, `$5` …), for checks that need no client library.
    pub fn command(&self, args: &[&str]) -> String {
        let mut stream = TcpStream::connect(self.addr()).expect("connect to redis-server");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).expect("send to redis-server");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            stream.read_exact(&mut byte).expect("read redis-server's reply");
            reply.push(byte[0]);
        }
        String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned()
    }

    /// `GET key` as text; None for a missing key.
    pub fn get(&self, key: &str) -> Option<String> {
        let mut stream = TcpStream::connect(self.addr()).expect("connect to redis-server");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
        let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        stream.write_all(request.as_bytes()).expect("send to redis-server");
        let mut reader = std::io::BufReader::new(stream);
        let mut head = String::new();
        std::io::BufRead::read_line(&mut reader, &mut head).expect("read redis-server's reply");
        let len: i64 = head.trim_end().strip_prefix('$').and_then(|n| n.parse().ok()).expect("a bulk reply");
        let len = usize::try_from(len).ok()?;
        let mut value = vec![0u8; len + 2];
        reader.read_exact(&mut value).expect("read the value");
        value.truncate(len);
        Some(String::from_utf8_lossy(&value).into_owned())
    }

    /// Kill the server (`SIGKILL`): clients see the connection drop.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kill the server and start it again on the same port: empty, or
    /// (durable) with every write it answered.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut child = spawn(self.port, self.dir.path(), self.durable);
            if wait_for_ping(self.port, &mut child) {
                self.child = child;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freeze the server (`SIGSTOP`): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends even a stopped process; thaw it first all the same,
        // so its socket closes promptly.
        let _ = Command::new("kill").arg("-CONT").arg(self.child.id().to_string()).status();
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    listener.local_addr().expect("bound address").port()
}

fn spawn(port: u16, dir: &std::path::Path, durable: bool) -> Child {
    let persistence: &[&str] =
        if durable { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] };
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(persistence)
        .args(["--protected-mode", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-server ({e}); install it first: apt-get install -y redis-server"))
}

fn wait_for_ping(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if ping(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Check a `/metrics` answer with Prometheus's own parser and linter
/// (`promtool check metrics`: the text format, and the naming and help
/// rules a scraper's users rely on). Returns what promtool said.
///
/// # Panics
/// When promtool is not installed (Debian: `apt-get install prometheus`)
/// or finds a problem.
pub fn promtool_check(metrics: &str) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool is needed to check /metrics (Debian: apt-get install prometheus): {e}"));
    child.stdin.take().expect("promtool's stdin").write_all(metrics.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("run promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics failed: {said}\n---\n{metrics}");
    said
}

/// The CPU time (user + system) process `pid` has used so far, from
/// /proc (in 10 ms ticks: Linux's `USER_HZ` of 100).
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("a stat line").1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_answers_pauses_and_comes_back() {
        let mut server = RedisServer::start();
        assert!(ping(server.port()));
        assert_eq!(server.command(&["SET", "k", "v w"]), "+OK");
        assert_eq!(server.command(&["EXISTS", "k"]), ":1");
        assert_eq!(server.get("k").as_deref(), Some("v w"));
        assert_eq!(server.get("missing"), None);
        server.pause();
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        stream.write_all(b"PING\r\n").unwrap();
        assert!(stream.read(&mut [0u8; 7]).is_err(), "a paused server does not answer");
        server.resume();
        server.restart();
        assert!(ping(server.port()));
        server.stop();
        assert!(!ping(server.port()));
    }

    #[test]
    fn a_durable_server_keeps_its_writes_across_a_kill_and_an_ordinary_one_does_not() {
        let mut durable = RedisServer::start_durable();
        let mut plain = RedisServer::start();
        for server in [&durable, &plain] {
            assert_eq!(server.command(&["SET", "k", "kept"]), "+OK");
        }
        durable.restart();
        plain.restart();
        assert_eq!(durable.get("k").as_deref(), Some("kept"));
        assert_eq!(plain.get("k"), None);
    }
}
