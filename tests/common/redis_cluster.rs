//! A Redis Cluster for the tests: six `redis-server` processes in cluster mode on free ports
//! of 127.0.0.1 (three primaries, three replicas), made a cluster with `redis-cli --cluster
//! create`, stopped when dropped. Each node keeps an append-only file and its `nodes.conf`, so
//! it can be killed and restarted with its data and its place in the cluster. Nodes are started
//! by `redis_server::spawn`: include that file too, as a module `redis_server` of the crate.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NODES: usize = 6;

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
}

fn require(binary: &str) {
    assert!(
        crate::redis_server::installed(binary),
        "the Redis Cluster tests need `{binary}` on PATH: `apt-get install -y redis-server` \
         (Debian/Ubuntu) installs it with redis-cli"
    );
}

/// A free port in 20000..22768 whose cluster bus port (port + 10000) is free too. Both lie
/// below Linux's ephemeral range (32768..), so the test's own client connections cannot take
/// them between this check and the server's bind; other processes still can, which
/// [`RedisCluster::new`] survives by picking again.
fn free_cluster_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut x = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        let port = 20_000 + (x % 2_768) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

fn query(port: u16, args: &[&str]) -> redis::RedisResult<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn)
}

/// [`query`], tried again for up to 10 s: a node busy with a failover, on a loaded machine,
/// may not answer the first time (`EAGAIN` was seen in CI-like runs).
fn query_patiently(port: u16, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match query(port, args) {
            Ok(answer) => return answer,
            Err(e) if Instant::now() >= deadline => panic!("{args:?} on port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster of three primaries with a replica each. A
    /// failed `redis-cli --cluster create` (a loaded machine, a port another process took
    /// meanwhile) starts over on new ports, three times at most.
    pub fn new() -> Self {
        require("redis-server");
        require("redis-cli");
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_new() {
                Ok(cluster) => return cluster,
                Err(output) => last = output,
            }
        }
        panic!("redis-cli --cluster create failed three times; the last said:\n{last}");
    }

    /// Six new nodes made a cluster, or what `redis-cli --cluster create` said when it failed
    /// (the nodes are stopped then).
    fn try_new() -> Result<Self, String> {
        let mut cluster = Self { nodes: Vec::new() };
        let mut attempts = 0;
        while cluster.nodes.len() < NODES {
            let port = free_cluster_port();
            if cluster.nodes.iter().any(|n| n.port == port) {
                continue;
            }
            let dir = std::env::temp_dir().join(format!("sse-tracker-cluster-{port}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            cluster.nodes.push(Node {
                port,
                dir,
                child: None,
            });
            let i = cluster.nodes.len() - 1;
            if !cluster.try_start(i) {
                // Another process took the port after the check: pick another.
                attempts += 1;
                assert!(attempts < 20, "no free ports for a Redis Cluster node");
                let node = cluster.nodes.pop().unwrap();
                let _ = std::fs::remove_dir_all(&node.dir);
            }
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster create");
        if !created.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        cluster.wait_ok(Duration::from_secs(30));
        Ok(cluster)
    }

    /// Starts node `i` on its port and data (again).
    fn start(&mut self, i: usize) {
        let port = self.nodes[i].port;
        assert!(self.try_start(i), "redis-server on {port} did not start");
    }

    /// Starts node `i` and waits until it answers; false if it exited first (its port taken).
    fn try_start(&mut self, i: usize) -> bool {
        let node = &mut self.nodes[i];
        node.child = crate::redis_server::spawn(
            node.port,
            &node.dir,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica takes over however long it was cut off from its primary.
                "--cluster-replica-validity-factor",
                "0",
            ],
        );
        node.child.is_some()
    }

    /// Waits until every live node says the cluster is ok with all slots served.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                query(n.port, &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's URL (any of them is enough for a client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The indexes of the nodes that are primaries now, as a live node sees it.
    pub fn primaries(&self) -> Vec<usize> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node");
        let nodes = query_patiently(live.port, &["CLUSTER", "NODES"]);
        let mut primaries = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 3 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port: Option<u16> = fields[1]
                .split(['@', ','])
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            if let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                primaries.push(i);
            }
        }
        primaries.sort();
        primaries
    }

    /// Waits until a replica has taken over from node `killed` (a primary that was killed):
    /// the live nodes see it failed and serve every slot with three primaries.
    pub fn wait_failover(&self, killed: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let primaries = self.primaries();
            if !primaries.contains(&killed) && primaries.len() == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "no replica took over");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(within);
    }

    /// Runs a command on every live primary.
    pub fn on_primaries(&self, args: &[&str]) {
        for i in self.primaries() {
            if self.nodes[i].child.is_some() {
                query_patiently(self.nodes[i].port, args);
            }
        }
    }

    /// Moves `slots` slots, with their keys, from primary `from` to primary `to` (node
    /// indexes), with `redis-cli --cluster reshard`.
    pub fn reshard(&self, from: usize, to: usize, slots: usize) {
        let id = |i: usize| query_patiently(self.nodes[i].port, &["CLUSTER", "MYID"]);
        let moved = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{}", self.nodes[from].port))
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("running redis-cli --cluster reshard");
        assert!(
            moved.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&moved.stdout),
            String::from_utf8_lossy(&moved.stderr)
        );
        self.wait_ok(Duration::from_secs(30));
    }

    /// Runs a command on node `i`; its reply as text.
    pub fn command_on(&self, i: usize, args: &[&str]) -> String {
        query_patiently(self.nodes[i].port, args)
    }

    /// Every key of every primary that matches `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut all = Vec::new();
        for i in self.primaries() {
            let client =
                redis::Client::open(format!("redis://127.0.0.1:{}", self.nodes[i].port)).unwrap();
            let mut conn = client.get_connection().unwrap();
            let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut conn).unwrap();
            all.extend(keys);
        }
        all
    }

    /// Kills node `i` (SIGKILL: no goodbye).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }

    /// Starts every node again and waits for the cluster to be ok.
    pub fn restart_all(&mut self) {
        for i in 0..NODES {
            if self.nodes[i].child.is_none() {
                self.start(i);
            }
        }
        self.wait_ok(Duration::from_secs(30));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.kill_all();
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.dir);
        }
    }
}
