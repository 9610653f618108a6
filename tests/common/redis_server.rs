//! A `redis-server` for the tests: the one at `REDIS_URL` when that is set, else one started
//! here on a free port on 127.0.0.1 (with an append-only file, so it can be killed and
//! restarted with its data), stopped when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `redis-server` on `port` of 127.0.0.1 with an append-only file in `dir` and the
/// `extra` arguments, and waits until it answers. The file is flushed to disk at every write
/// (`appendfsync always`), or as `REDIS_TEST_APPENDFSYNC` says (`everysec`, `no`). `None` when it exited first (another process
/// holds the port) or did not answer within 20 s; it is killed then.
pub fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Option<Child> {
    let appendfsync =
        std::env::var("REDIS_TEST_APPENDFSYNC").unwrap_or_else(|_| "always".to_owned());
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(extra)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            &appendfsync,
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting redis-server");
    // The server answering is this child, not another process that holds the port.
    let ours = format!("process_id:{}\r\n", child.id());
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
        if info.is_ok_and(|info| info.contains(&ours)) {
            return Some(child);
        }
        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct RedisServer {
    pub url: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Whether `binary` runs (`{binary} --version`): redis-server, redis-cli.
pub fn installed(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn require_binary() {
    assert!(
        installed("redis-server"),
        "the Redis tests need a Redis server: `redis-server` is not on PATH and REDIS_URL is \
         not set. Install it with `apt-get install -y redis-server` (Debian/Ubuntu), or set \
         REDIS_URL=redis://host:port to use a running one."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The URL of the shared server from `REDIS_URL`, if set.
pub fn shared_url() -> Option<String> {
    std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty())
}

/// A unique key prefix, so that tests sharing one server never see each other's keys.
pub fn unique_prefix(test: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "sse-test-{}-{}-{test}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl RedisServer {
    /// `REDIS_URL`'s server if set (never stopped here), else a new one.
    pub fn shared_or_new() -> Self {
        match shared_url() {
            Some(url) => Self {
                url,
                port: 0,
                dir: PathBuf::new(),
                child: None,
            },
            None => Self::new(),
        }
    }

    /// A server of the test's own, whatever `REDIS_URL` says (for tests that kill it).
    pub fn new() -> Self {
        for _ in 0..20 {
            let mut server = Self::not_started();
            if server.try_start() {
                return server;
            }
            // Another process took the port after it was picked: pick another.
        }
        panic!("no free port for a redis-server");
    }

    /// A server of the test's own on a free port, not started yet: its URL refuses
    /// connections until [`restart`](Self::restart).
    pub fn not_started() -> Self {
        require_binary();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sse-tracker-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
        }
    }

    fn start(&mut self) {
        assert!(
            self.try_start(),
            "redis-server on port {} did not start",
            self.port
        );
    }

    /// Starts the server and waits until it answers; false if it exited first (its port taken).
    fn try_start(&mut self) -> bool {
        self.child = spawn(self.port, &self.dir, &[]);
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one command on the server (a connection of its own).
    pub async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await
    }

    /// Starts the server (again) on the same port and data.
    pub fn restart(&mut self) {
        assert!(self.port != 0, "cannot restart the REDIS_URL server");
        self.start();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if self.port != 0 {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
