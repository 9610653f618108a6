//! A load generator for SSE endpoints; by default the demo server (`cargo run --release
//! --example axum_server`).
//!
//! ```text
//! cargo run --release --example loadgen -- [--url URL] [--clients N] [--rate EVENTS_PER_S] [--seconds S]
//! ```
//!
//! Each client has its own session (`mcp-session-id: loadgen-<i>`), reads its stream, and on a
//! disconnect reconnects with `Last-Event-ID` (counted). For the demo, `--rate` is turned into
//! the per-stream `interval_ms`; event data carrying `"ts"` (server time in µs) gives the
//! delivery latency. Ids are checked to be consecutive per stream: a gap is a lost event. A
//! progress bar shows while it runs; a summary table follows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone)]
struct Options {
    url: String,
    clients: u64,
    rate: u64,
    seconds: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        url: "http://127.0.0.1:3000/events".to_owned(),
        clients: 100,
        rate: 1_000,
        seconds: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => o.url = value()?,
            "--clients" => o.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--rate" => o.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "-h" | "--help" => {
                return Err(
                    "usage: loadgen [--url URL] [--clients N] [--rate EVENTS_PER_S] [--seconds S]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    if o.clients == 0 || o.rate == 0 || o.seconds == 0 {
        return Err("--clients, --rate and --seconds must be at least 1".into());
    }
    Ok(o)
}

#[derive(Default)]
struct Totals {
    events: AtomicU64,
    heartbeats: AtomicU64,
    reconnects: AtomicU64,
    lost: AtomicU64,
    errors: AtomicU64,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The `"ts":N` field of an event's data, if any.
fn timestamp(data: &str) -> Option<u64> {
    let rest = &data[data.find("\"ts\":")? + 5..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

async fn run_client(
    http: reqwest::Client,
    url: String,
    session: String,
    until: Instant,
    totals: Arc<Totals>,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    let mut last_id: Option<u64> = None;
    let mut first = true;
    while Instant::now() < until {
        if !first {
            totals.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut request = http.get(&url).header("mcp-session-id", &session);
        if let Some(id) = last_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = match request.send().await {
            Ok(r) if r.status().is_success() => r,
            _ => {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut body = response.bytes_stream();
        let mut buf = String::new();
        loop {
            let next =
                tokio::time::timeout(until.saturating_duration_since(Instant::now()), body.next());
            let chunk = match next.await {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => return latencies,
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut id = None;
                for line in block.lines() {
                    if line.starts_with(':') {
                        totals.heartbeats.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse::<u64>().ok();
                    } else if let Some(ts) = line.strip_prefix("data:").and_then(timestamp) {
                        latencies.push(now_micros().saturating_sub(ts));
                    }
                }
                if let Some(id) = id {
                    if let Some(previous) = last_id
                        && id > previous + 1
                    {
                        totals.lost.fetch_add(id - previous - 1, Ordering::Relaxed);
                    }
                    last_id = Some(id);
                    totals.events.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    latencies
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // Per-stream pace for the demo server.
    let interval_ms = (1_000 * o.clients / o.rate).max(1);
    let url = if o.url.contains('?') {
        o.url.clone()
    } else {
        format!("{}?interval_ms={interval_ms}", o.url)
    };
    println!(
        "loadgen: {} clients, {} events/s in total ({interval_ms} ms per stream), {} s, {url}",
        o.clients, o.rate, o.seconds
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client");
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let until = started + Duration::from_secs(o.seconds);
    let tasks: Vec<_> = (0..o.clients)
        .map(|i| {
            tokio::spawn(run_client(
                http.clone(),
                url.clone(),
                format!("loadgen-{i}"),
                until,
                totals.clone(),
            ))
        })
        .collect();

    let bar = ProgressBar::new(o.seconds);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} s  {msg}").expect("valid template"),
    );
    let mut previous = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let events = totals.events.load(Ordering::Relaxed);
        bar.set_position(started.elapsed().as_secs().min(o.seconds));
        bar.set_message(format!(
            "{} events/s, {} lost, {} reconnects",
            events - previous,
            totals.lost.load(Ordering::Relaxed),
            totals.reconnects.load(Ordering::Relaxed)
        ));
        previous = events;
    }
    bar.finish();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    latencies.sort_unstable();
    let elapsed = started.elapsed().as_secs_f64();
    let events = totals.events.load(Ordering::Relaxed);
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| clients | {} |", o.clients);
    println!("| duration | {elapsed:.1} s |");
    println!("| events received | {events} |");
    println!("| events/s | {:.0} |", events as f64 / elapsed);
    println!(
        "| lost (id gaps) | {} |",
        totals.lost.load(Ordering::Relaxed)
    );
    println!(
        "| latency p50 / p90 / p99 / max | {} / {} / {} / {} µs |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0)
    );
    println!(
        "| reconnects | {} |",
        totals.reconnects.load(Ordering::Relaxed)
    );
    println!(
        "| heartbeats seen | {} |",
        totals.heartbeats.load(Ordering::Relaxed)
    );
    println!(
        "| request errors | {} |",
        totals.errors.load(Ordering::Relaxed)
    );
}
