//! Stores that misbehave the way real ones do, under load over real HTTP: for each fault, 50
//! streams at 20 events/s each (1 000 events/s) run through the fault and after it, and the test
//! checks that every event reached its client, that every stream's latest id is in the store
//! once the fault clears, that the store was called at a bounded rate while it failed, and that
//! the shutdown report matches what the store holds. It prints one line per fault:
//!
//! `fault <name>: delivered <a>/<b>, persisted after recovery <c>/<d>, store calls/s <e>, frame delay p99 <f> ms, heap growth <g> KiB, report exact <yes|no>`
//!
//! followed by the bound on store calls/s it checks. A last fault lasts through the shutdown,
//! so that the report is checked while it lists streams.
//!
//! Then the same under eviction (`evicting …` lines): a registry of 20 streams read by 10
//! clients that each open short streams one after another, each on a session of its own, so
//! that hundreds of closed streams are evicted with their ids unwritten while the store fails,
//! hangs or panics, then recovers (or not, through the shutdown). Every stream's latest id must
//! reach the store once it works, and the report must name exactly the streams it lacks.
//!
//! Run: `cargo test --test store_faults -- --nocapture`. `STORE_FAULT_SECS` (default 1.5) sets
//! how long each fault lasts.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::build_recorded;
use common::load::{client, percentile, serve_load};
use common::names::{STORE_ERRORS_TOTAL, WORKER_FAILURES_TOTAL};
use common::stores::{Calls, Fault, FaultStore};
use tokio::time::{Instant, sleep};
use tower_sse_tracker::{RetryPolicy, SseTracker, StreamKey};

const STREAMS: usize = 50;
const RATE: u64 = 20;
const FLUSH: Duration = Duration::from_millis(100);
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY: RetryPolicy =
    RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1), 5);

fn key(session: &str) -> StreamKey {
    StreamKey::try_new(session, "GET /load").unwrap()
}

/// How the load reads the tracker.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// 50 streams at 20 events/s each, one connection each, for the whole run.
    Steady,
    /// 10 clients, each opening streams of 5 events at 50 events/s one after another, each on
    /// a new session, through a registry of 20 streams: closed streams are evicted all along.
    Evicting,
}

/// Streams open at once, and events per second of each.
const EVICTING_CLIENTS: usize = 10;
const EVICTING_MAX_STREAMS: usize = 20;
const EVICTING_EVENTS: u64 = 5;
const EVICTING_RATE: u64 = 50;

/// The most store calls per second the worker may make while a store fails, whatever the
/// fault: per call kind, one per flush tick plus one per retry wake-up, and a retry wake-up
/// comes at the earliest half the policy's base delay after a failure (the jitter's lower
/// bound). Two kinds, save and touch.
fn calls_per_second_bound() -> f64 {
    let flush_rate = 1.0 / FLUSH.as_secs_f64();
    let retry_rate = 1.0 / (RETRY.base().as_secs_f64() / 2.0);
    2.0 * (flush_rate + retry_rate)
}

struct Outcome {
    line: String,
    delivered: (u64, u64),
    persisted: (usize, usize),
    calls_per_second: f64,
    heap_growth_kib: i64,
    exact: bool,
    /// Streams the shutdown report lists (pending or given up).
    listed: usize,
    /// The registry held fewer streams than were read at the end (some were evicted).
    evicted: bool,
    activity_complete: bool,
    worker_failures: f64,
    store_errors: f64,
}

/// Runs one fault for `fault_for` under load; the store recovers then, unless `recovers` is
/// false (the fault lasts through the shutdown, whose report then lists streams).
async fn run(
    shape: Shape,
    name: &str,
    calls: Calls,
    fault: Fault,
    fault_for: Duration,
    recovers: bool,
) -> Outcome {
    let store = Arc::new(FaultStore::default());
    let mut builder = SseTracker::builder()
        .store(store.clone())
        .flush_interval(FLUSH)
        .store_timeout(STORE_TIMEOUT)
        .retry(RETRY);
    if shape == Shape::Evicting {
        builder = builder.max_streams(common::nz(EVICTING_MAX_STREAMS));
    }
    let (tracker, recorded) = build_recorded(builder);
    let addr = serve_load(&tracker).await;
    let lead = Duration::from_millis(500);
    let tail = Duration::from_secs(1);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (clients, sent) = match shape {
        Shape::Steady => {
            let events_each = (RATE as f64 * (lead + fault_for + tail).as_secs_f64()).ceil() as u64;
            let url = format!("http://{addr}/load?events={events_each}&per_second={RATE}");
            let clients: Vec<_> = (0..STREAMS)
                .map(|c| {
                    let (http, url) = (http.clone(), url.clone());
                    let session = format!("{name}-{c:02}");
                    tokio::spawn(async move { vec![client(http, url, session).await] })
                })
                .collect();
            (clients, STREAMS as u64 * events_each)
        }
        Shape::Evicting => {
            let url =
                format!("http://{addr}/load?events={EVICTING_EVENTS}&per_second={EVICTING_RATE}");
            let until = Instant::now() + lead + fault_for + tail;
            let clients: Vec<_> = (0..EVICTING_CLIENTS)
                .map(|c| {
                    let (http, url, name) = (http.clone(), url.clone(), name.to_owned());
                    tokio::spawn(async move {
                        let mut results = Vec::new();
                        while Instant::now() < until {
                            let session = format!("{name}-{c:02}-{:03}", results.len());
                            results.push(client(http.clone(), url.clone(), session).await);
                        }
                        results
                    })
                })
                .collect();
            // Known once the clients are done.
            (clients, 0)
        }
    };

    sleep(lead).await;
    let heap_before = counting_alloc::live_process();
    let calls_before = store.calls();
    let started = Instant::now();
    store.set(calls, fault);
    sleep(fault_for).await;
    let calls_after = store.calls();
    let faulty = started.elapsed();
    if recovers {
        store.set(Calls::Both, Fault::Ok);
    }
    let heap_after = counting_alloc::live_process();

    let mut results = Vec::new();
    for c in clients {
        results.extend(c.await.unwrap());
    }
    let streams = results.len();
    let sent = match shape {
        Shape::Steady => sent,
        Shape::Evicting => streams as u64 * EVICTING_EVENTS,
    };
    let received: u64 = results.iter().map(|r| r.received as u64).sum();
    let mut latencies: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();

    // Once the fault has cleared, every stream's latest id reaches the store.
    let persisted = |results: &[common::load::ClientResult]| {
        results
            .iter()
            .filter(|r| store.get(&key(&r.session)).map(|s| s.id.to_string()) == r.last_id)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(if recovers { 15 } else { 0 });
    while persisted(&results) < streams && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    let persisted_n = persisted(&results);
    // The activity of sessions evicted while their write failed is dropped (counted): only
    // the steady load, which evicts nothing, must have every session's.
    let activity_complete = shape == Shape::Evicting || {
        while store.inner.sessions() < streams && Instant::now() < deadline {
            sleep(Duration::from_millis(20)).await;
        }
        results
            .iter()
            .all(|r| store.inner.last_active(&r.session).is_some())
    };
    let evicted = tracker.tracked_streams() < streams;

    // The report names exactly the streams whose latest id the store lacks.
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    let listed: BTreeSet<StreamKey> = report
        .pending
        .iter()
        .chain(&report.given_up)
        .cloned()
        .collect();
    // The truth is what each client read last: every event reached it (checked below).
    let lacking: BTreeSet<StreamKey> = results
        .iter()
        .filter(|r| store.get(&key(&r.session)).map(|s| s.id.to_string()) != r.last_id)
        .map(|r| key(&r.session))
        .collect();
    let exact = listed == lacking && report.is_complete() == lacking.is_empty();
    let listed = listed.len();

    let calls = (calls_after.0 - calls_before.0) + (calls_after.1 - calls_before.1);
    let calls_per_second = calls as f64 / faulty.as_secs_f64();
    let heap_growth_kib = (heap_after as i64 - heap_before as i64) / 1024;
    let prefix = match shape {
        Shape::Steady => "fault",
        Shape::Evicting => "evicting fault",
    };
    let line = format!(
        "{prefix} {name}: delivered {received}/{sent}, persisted after recovery {persisted_n}/{streams}, \
         store calls/s {calls_per_second:.1}, frame delay p99 {:.1} ms, heap growth {heap_growth_kib} KiB, \
         report exact {}; expected store calls/s at most {:.0}",
        percentile(&latencies, 0.99) as f64 / 1000.0,
        if exact { "yes" } else { "no" },
        calls_per_second_bound(),
    );
    Outcome {
        line,
        delivered: (received, sent),
        persisted: (persisted_n, streams),
        calls_per_second,
        heap_growth_kib,
        exact,
        listed,
        evicted,
        activity_complete,
        worker_failures: recorded.sum(WORKER_FAILURES_TOTAL),
        store_errors: recorded.sum(STORE_ERRORS_TOTAL),
    }
}

#[test]
fn no_store_fault_stalls_a_stream_loses_an_id_spins_or_misreports() {
    let fault_for = Duration::from_secs_f64(
        std::env::var("STORE_FAULT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1.5),
    );
    let scenarios: &[(&str, Calls, Fault)] = &[
        ("none", Calls::Both, Fault::Ok),
        ("save-fails-at-once", Calls::Save, Fault::FailAtOnce),
        (
            "save-fails-after-200ms",
            Calls::Save,
            Fault::FailAfter(Duration::from_millis(200)),
        ),
        ("save-hangs", Calls::Save, Fault::Hang),
        ("save-hangs-once", Calls::Save, Fault::HangOnce),
        ("save-panics-once", Calls::Save, Fault::PanicOnce),
        ("save-panics-always", Calls::Save, Fault::PanicAlways),
        (
            "save-flaps-every-300ms",
            Calls::Save,
            Fault::Flapping(Duration::from_millis(300)),
        ),
        ("touch-fails-at-once", Calls::Touch, Fault::FailAtOnce),
        (
            "touch-fails-after-200ms",
            Calls::Touch,
            Fault::FailAfter(Duration::from_millis(200)),
        ),
        ("touch-hangs", Calls::Touch, Fault::Hang),
        ("touch-hangs-once", Calls::Touch, Fault::HangOnce),
        ("touch-panics-once", Calls::Touch, Fault::PanicOnce),
        ("touch-panics-always", Calls::Touch, Fault::PanicAlways),
        (
            "touch-flaps-every-300ms",
            Calls::Touch,
            Fault::Flapping(Duration::from_millis(300)),
        ),
        ("both-fail-at-once", Calls::Both, Fault::FailAtOnce),
        ("both-hang", Calls::Both, Fault::Hang),
        ("both-panic-always", Calls::Both, Fault::PanicAlways),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Injected panics are expected: keep their messages out of the output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|m| m.starts_with("injected store panic"));
        if !injected {
            hook(info);
        }
    }));
    let bound = calls_per_second_bound();
    println!(
        "each fault lasts {fault_for:?}; store calls/s bound while failing: {bound:.0} \
         (2 kinds x (flush {:.0}/s + retries {:.0}/s))",
        1.0 / FLUSH.as_secs_f64(),
        2.0 / RETRY.base().as_secs_f64()
    );
    let mut failures = Vec::new();
    let mut check = |shape: Shape, name: &str, fault: Fault, o: &Outcome| {
        let mut fail = |what: String| failures.push(format!("{} {name}: {what}", o.line));
        if o.delivered.0 != o.delivered.1 {
            fail(format!("delivered {}/{}", o.delivered.0, o.delivered.1));
        }
        if o.persisted.0 != o.persisted.1 {
            fail(format!("persisted {}/{}", o.persisted.0, o.persisted.1));
        }
        if o.calls_per_second > bound {
            fail(format!(
                "{:.1} store calls/s > {bound:.0}",
                o.calls_per_second
            ));
        }
        if o.heap_growth_kib > 4 * 1024 {
            fail(format!("heap grew {} KiB", o.heap_growth_kib));
        }
        if !o.exact {
            fail("the report does not match the store".into());
        }
        if !o.activity_complete {
            fail("a session's activity never reached the store".into());
        }
        if o.worker_failures != 0.0 {
            fail(format!("{} worker failures", o.worker_failures));
        }
        if fault != Fault::Ok && o.store_errors == 0.0 {
            fail("the fault was never counted".into());
        }
        if shape == Shape::Evicting && !o.evicted {
            fail("no stream was evicted".into());
        }
    };
    for &(name, calls, fault) in scenarios {
        let o = rt.block_on(run(Shape::Steady, name, calls, fault, fault_for, true));
        println!("{}", o.line);
        check(Shape::Steady, name, fault, &o);
    }
    // The same under eviction: closed streams leave the registry with their ids unwritten
    // while the store misbehaves.
    for &(name, calls, fault) in scenarios {
        if calls == Calls::Touch {
            // Activity writes carry no latest id: nothing eviction could lose.
            continue;
        }
        let o = rt.block_on(run(Shape::Evicting, name, calls, fault, fault_for, true));
        println!("{}", o.line);
        check(Shape::Evicting, name, fault, &o);
    }
    // A fault that lasts through the shutdown: the report lists streams, exactly those whose
    // latest id the store lacks; evicted ones among them in the second run.
    for shape in [Shape::Steady, Shape::Evicting] {
        let name = "save-fails-through-shutdown";
        let o = rt.block_on(run(
            shape,
            name,
            Calls::Save,
            Fault::FailAtOnce,
            fault_for,
            false,
        ));
        println!("{} ({} streams listed)", o.line, o.listed);
        if o.delivered.0 != o.delivered.1 {
            failures.push(format!(
                "{name}: delivered {}/{}",
                o.delivered.0, o.delivered.1
            ));
        }
        if o.calls_per_second > bound {
            failures.push(format!(
                "{name}: {:.1} store calls/s > {bound:.0}",
                o.calls_per_second
            ));
        }
        if o.listed == 0 || !o.exact {
            failures.push(format!(
                "{name}: the report lists {} streams and does not match the store",
                o.listed
            ));
        }
    }
    let _ = std::panic::take_hook();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A store that fails at once or hangs never starves the runtime the worker shares: on a
/// current-thread runtime, while streams publish and the store misbehaves, a 10 ms timer keeps
/// ticking. (Before the worker backed off, a `touch_sessions` failing at once was retried in
/// the same turn of the worker, and such a timer ran 8 times in 2 s instead of 200.)
#[test]
fn a_misbehaving_store_never_starves_the_runtime_it_shares() {
    use std::sync::atomic::{AtomicU64, Ordering};

    use common::direct::{drive, frames_service, id_frames};

    const RUN: Duration = Duration::from_secs(1);
    const TICK: Duration = Duration::from_millis(10);
    for (name, fault) in [
        ("both-fail-at-once", Fault::FailAtOnce),
        ("both-hang", Fault::Hang),
    ] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (ticks, calls) = rt.block_on(async {
            let store = Arc::new(FaultStore::default());
            store.set(Calls::Both, fault);
            let tracker = SseTracker::builder()
                .store(store.clone())
                .heartbeat_interval(None)
                .flush_interval(TICK)
                .store_timeout(Duration::from_millis(50))
                .retry(RETRY)
                .build()
                .unwrap();
            let ticks = Arc::new(AtomicU64::new(0));
            let counter = ticks.clone();
            let timer = tokio::spawn(async move {
                // A tick the runtime could not run in time is skipped, not made up for.
                let mut interval = tokio::time::interval(TICK);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    interval.tick().await;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            let mut svc = frames_service(&tracker);
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < RUN {
                drive(&mut svc, &format!("starve-{:02}", n % 50), id_frames(10)).await;
                n += 1;
                sleep(Duration::from_millis(1)).await;
            }
            let ticks = ticks.load(Ordering::Relaxed);
            timer.abort();
            let (saves, touches) = store.calls();
            (ticks, saves + touches)
        });
        let expected = (RUN.as_millis() / TICK.as_millis()) as u64;
        println!(
            "{name}: a 10 ms timer ticked {ticks} times in {RUN:?} (expected {expected}); {calls} store calls"
        );
        assert!(calls > 0, "{name}: the store was never called");
        assert!(
            ticks >= expected / 2,
            "{name}: the timer ticked {ticks} times of {expected}"
        );
    }
}
