//! A TCP proxy on loopback whose open connections can be made to go silent: the proxy stops
//! forwarding (and reading) in both directions but keeps both sockets open, so that neither
//! end sees an error or a reset. A client sees much the same when its server's host is powered
//! off or a middlebox (NAT, load balancer, firewall) drops the flow without a reset: requests
//! are written and no answer comes (there, the kernel errors the socket after its
//! retransmission timeout, about 15 minutes with Linux's defaults). Connections opened after
//! [`SilentProxy::silence`] are forwarded normally.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct SilentProxy {
    pub addr: SocketAddr,
    /// The generation of connections to silence: those accepted before it was raised.
    silenced: Arc<watch::Sender<u64>>,
    /// The accept task, which owns the connection tasks: dropping the proxy aborts them all.
    _tasks: JoinSet<()>,
}

impl SilentProxy {
    /// A proxy from a free `127.0.0.1` port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = upstream.to_owned();
        let silenced = Arc::new(watch::Sender::new(0u64));
        let mut tasks = JoinSet::new();
        let accept_silenced = silenced.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                // Reap the connections that ended.
                while connections.try_join_next().is_some() {}
                let Ok((mut client, _)) = listener.accept().await else {
                    // Out of file descriptors, say: wait rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let generation = *accept_silenced.borrow();
                let mut silenced = accept_silenced.subscribe();
                let upstream = upstream.clone();
                connections.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = async { drop(silenced.wait_for(|g| *g > generation).await) } => {
                            // Hold both sockets open, forwarding nothing, until the proxy
                            // is dropped.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            silenced,
            _tasks: tasks,
        }
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Makes every connection open now go silent for good.
    pub fn silence(&self) {
        self.silenced.send_modify(|g| *g += 1);
    }
}
