//! `roomhub load`: a load generator for a running hub.
//!
//! It connects `--clients` WebSocket clients spread over `--rooms` rooms
//! (client `i` joins room `i % rooms`, with `"history":0`), and the first
//! `--publishers` members of each room publish, either at `--rate` per second
//! or as fast as `--window` unanswered publishes allow, for `--duration`
//! seconds. Paced publishers all publish at the same instants (the worst
//! case for a hub: every room's message at once), or with `--spread` at
//! instants spread evenly over one period, as independent publishers would.
//! Every member, publishers included, receives every message of its
//! room. Each publish carries its send time (unix µs) in `data.t`; receivers
//! record `now − t`. At the end, after a short drain, every member must have
//! seen every acked offset of its room; what is missing is reported as lost.
//!
//! On loopback the clients bind 127.0.0.1, 127.0.0.2, … in turn before they
//! connect, so one source address's ephemeral ports never limit the count,
//! and the tool raises its open-file limit to the hard limit.
//!
//! - [`client`]: one connection (connect, join, read, publish).
//! - [`stats`]: shared counters and latency histograms.

pub mod client;
pub mod stats;

use client::{ClientSpec, Control, PublishPlan, Report, Target};
use stats::{human_rate, human_us, LatencySummary, Shared};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;

/// The most clients one run may open.
pub const MAX_CLIENTS: usize = 100_000;
/// The longest a run may publish, in seconds.
pub const MAX_DURATION_SECS: u64 = 3600;

/// `roomhub load`: connect clients to a hub, publish, measure deliveries and latency.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// The hub's WebSocket address (`/ws` is added when no path is given).
    /// Several, comma-separated (cluster nodes): clients take them in turn.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// Publishers connect here instead (e.g. another cluster node than the
    /// subscribers', to measure cross-node latency).
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Connections in all, spread evenly over the rooms (at most 100 000).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Rooms (`<room-prefix>-0`, `<room-prefix>-1`, …).
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Members of each room that also publish (0: connect and stay idle).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Publishes per second per publisher; 0 = as fast as --window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Spread paced publishers' instants evenly over one period (without it,
    /// all publish at the same instants).
    #[arg(long)]
    pub spread: bool,
    /// Publishes in flight (sent, not yet acked) per publisher, at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Seconds of publishing (at most 3600).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Serialized size of each publish's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1 …).
    #[arg(long, default_value_t = 16)]
    pub sources: u8,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seconds allowed for every client to connect and join.
    #[arg(long, default_value_t = 120)]
    pub connect_timeout: u64,
    /// Seconds after the last publish allowed for acks and deliveries to arrive.
    #[arg(long, default_value_t = 5)]
    pub drain: u64,
    /// Seconds to hold the connections after the drain (e.g. to measure memory).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Room name prefix.
    #[arg(long, default_value = "load")]
    pub room_prefix: String,
    /// Runtime worker threads (default: the CPUs this process may use).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the summary as one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Offer permessage-deflate; compressed frames from the hub are inflated.
    #[arg(long)]
    pub compress: bool,
}

impl LoadArgs {
    /// Refuses runs that are unbounded or make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return Err(format!("--clients must be 1..={MAX_CLIENTS}"));
        }
        if self.duration == 0 || self.duration > MAX_DURATION_SECS {
            return Err(format!(
                "--duration must be 1..={MAX_DURATION_SECS} seconds"
            ));
        }
        if self.rooms == 0 || self.rooms > self.clients {
            return Err("--rooms must be 1..=--clients".into());
        }
        if self.publishers > self.clients / self.rooms {
            return Err("--publishers must not exceed the members of a room".into());
        }
        if !(self.rate.is_finite() && self.rate >= 0.0 && self.rate <= 1e6) {
            return Err("--rate must be 0 (max) or a positive number up to 1e6".into());
        }
        if self.window == 0 || self.window > 100_000 {
            return Err("--window must be 1..=100000".into());
        }
        if self.payload > 1 << 20 || self.sources == 0 || self.connect_concurrency == 0 {
            return Err(
                "--payload must be at most 1 MiB; --sources and --connect-concurrency at least 1"
                    .into(),
            );
        }
        if self.drain > 600 || self.hold > MAX_DURATION_SECS || self.connect_timeout > 3600 {
            return Err("--drain ≤ 600, --hold ≤ 3600, --connect-timeout ≤ 3600 seconds".into());
        }
        crate::protocol::RoomName::parse(&format!("{}-0", self.room_prefix))
            .map_err(|_| "--room-prefix must make valid room names".to_string())?;
        Ok(())
    }
}

/// Runs the load and prints the summary. Exit code 2 for bad arguments, 1 if
/// the run could not be made.
pub fn run(args: LoadArgs) -> ExitCode {
    if let Err(e) = args.validate() {
        eprintln!("roomhub load: {e}");
        return ExitCode::from(2);
    }
    let parsed: anyhow::Result<Vec<Target>> = args
        .url
        .split(',')
        .map(|url| {
            parse_url(url).map(|t| Target {
                compress: args.compress,
                ..t
            })
        })
        .collect();
    let targets = match parsed {
        Ok(targets) => Targets {
            all: targets,
            publish: None,
        },
        Err(e) => {
            eprintln!("roomhub load: --url: {e}");
            return ExitCode::from(2);
        }
    };
    let targets = match args.publish_url.as_deref().map(parse_url) {
        None => targets,
        Some(Ok(publish)) => Targets {
            publish: Some(Arc::new(publish)),
            ..targets
        },
        Some(Err(e)) => {
            eprintln!("roomhub load: --publish-url: {e}");
            return ExitCode::from(2);
        }
    };
    let limit = raise_nofile_limit();
    if (args.clients as u64) + 64 > limit {
        eprintln!(
            "roomhub load: warning: {} clients but only {limit} open files allowed",
            args.clients
        );
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("roomhub load: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run_load(args.clone(), targets));
    // Clients still closing are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(summary) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&summary).expect("summary serializes")
                );
            } else {
                print!("{}", summary.human());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roomhub load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ws://host:port[/path]` → the address to connect to and the request target.
fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow::anyhow!("only ws:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = match path.trim_end_matches('/') {
        "" => "/ws",
        p => p,
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{authority} does not resolve"))?;
    Ok(Target {
        addr,
        authority: authority.to_string(),
        path: path.to_string(),
        compress: false,
    })
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now in force.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// The source address of client `index`: on loopback, 127.0.0.1 + (index mod sources).
fn source_for(target: &SocketAddr, index: usize, sources: u8) -> Option<IpAddr> {
    if !target.ip().is_loopback() || !target.is_ipv4() {
        return None;
    }
    let n = (index % sources as usize) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n)))
}

/// The run's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub clients: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub rate: f64,
    pub window: usize,
    pub payload_bytes: usize,
    pub duration_secs: u64,
    pub connected: usize,
    pub connect_failed: usize,
    pub connect_secs: f64,
    pub sent: u64,
    pub acked: u64,
    pub acked_per_sec: f64,
    pub errors: u64,
    /// Messages received by all members (their own included), all run long.
    pub deliveries: u64,
    /// Deliveries during the `duration` window, per second.
    pub deliveries_per_sec: f64,
    /// What the acked publishes owe the members: Σ rooms acked × members.
    pub expected_deliveries: u64,
    /// Acked offsets some member of the room never received (one per member).
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub stale: u64,
    /// Members whose connection ended before the run did.
    pub disconnected: usize,
    pub latency: LatencySummary,
    /// The first error frame or connection failure seen, if any.
    pub first_error: Option<String>,
}

impl Summary {
    fn human(&self) -> String {
        let l = &self.latency;
        let mut out = format!(
            "roomhub load: {} clients in {} rooms, {} publishers per room, {}, {}-byte data, {} s\n",
            self.clients,
            self.rooms,
            self.publishers,
            if self.rate > 0.0 {
                format!("{} publishes/s each", self.rate)
            } else {
                format!("max rate (window {})", self.window)
            },
            self.payload_bytes,
            self.duration_secs
        );
        out += &format!(
            "connected {}/{} in {:.1} s; sent {}, acked {} ({}/s), errors {}\n",
            self.connected,
            self.clients,
            self.connect_secs,
            self.sent,
            self.acked,
            human_rate(self.acked_per_sec),
            self.errors
        );
        out += &format!(
            "deliveries {} ({}/s); expected {}; lost {}; duplicates {}; out of order {}; disconnected {}\n",
            self.deliveries,
            human_rate(self.deliveries_per_sec),
            self.expected_deliveries,
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.disconnected
        );
        out += &format!(
            "latency p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)\n",
            human_us(l.p50_us),
            human_us(l.p90_us),
            human_us(l.p99_us),
            human_us(l.p999_us),
            human_us(l.max_us),
            l.count
        );
        if let Some(e) = &self.first_error {
            out += &format!("first error: {e}\n");
        }
        out
    }
}

/// A progress line; on stderr with `--json`, else on stdout.
fn progress(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

/// Where clients connect: in turn over `all`, publishers to `publish` if set.
struct Targets {
    all: Vec<Target>,
    publish: Option<Arc<Target>>,
}

async fn run_load(args: LoadArgs, targets: Targets) -> anyhow::Result<Summary> {
    let all: Vec<Arc<Target>> = targets.all.into_iter().map(Arc::new).collect();
    let shared = Arc::new(Shared::new(args.rooms));
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let names: Vec<Arc<str>> = (0..args.rooms)
        .map(|r| Arc::from(format!("{}-{r}", args.room_prefix)))
        .collect();
    let plan = PublishPlan {
        rate: args.rate,
        window: args.window,
        payload: args.payload,
        duration: Duration::from_secs(args.duration),
        phase: Duration::ZERO,
    };
    let publishers_total = (args.publishers * args.rooms).max(1);
    let mut handles = Vec::with_capacity(args.clients);
    let mut starts = Vec::new();
    let mut stops = Vec::with_capacity(args.clients);
    let connect_began = Instant::now();
    for index in 0..args.clients {
        let room = index % args.rooms;
        let publishes = index / args.rooms < args.publishers;
        let (stop_tx, stop) = oneshot::channel();
        stops.push(stop_tx);
        let start = publishes.then(|| {
            let (tx, rx) = oneshot::channel();
            starts.push(tx);
            rx
        });
        let target = match (&targets.publish, publishes) {
            (Some(publish), true) => publish.clone(),
            _ => all[index % all.len()].clone(),
        };
        let spec = ClientSpec {
            index,
            room,
            room_name: names[room].clone(),
            source: source_for(&target.addr, index, args.sources),
            publish: publishes.then(|| PublishPlan {
                phase: if args.spread {
                    spread_phase(index, publishers_total, args.rate)
                } else {
                    Duration::ZERO
                },
                ..plan
            }),
        };
        let permit = gate.clone().acquire_owned().await?;
        handles.push(tokio::spawn(client::run(
            spec,
            target,
            shared.clone(),
            Control { start, stop },
            permit,
        )));
    }

    // Connect phase: until every client has joined or failed.
    let connect_deadline = connect_began + Duration::from_secs(args.connect_timeout);
    let mut next_line = connect_began + Duration::from_secs(1);
    loop {
        let connected = shared.connected.load(Ordering::Relaxed);
        let failed = shared.connect_failed.load(Ordering::Relaxed);
        if connected + failed >= args.clients || Instant::now() >= connect_deadline {
            break;
        }
        if Instant::now() >= next_line {
            progress(
                args.json,
                &format!(
                    "[connecting {:>3.0}s] connected {connected}/{} failed {failed}",
                    connect_began.elapsed().as_secs_f64(),
                    args.clients
                ),
            );
            next_line += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_secs = connect_began.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::Relaxed);
    if connected == 0 {
        for stop in stops {
            let _ = stop.send(());
        }
        let first = collect(handles).await;
        let why = first
            .iter()
            .find_map(|r| r.ended.clone())
            .unwrap_or_default();
        anyhow::bail!("no client could connect to {}: {why}", args.url);
    }
    progress(
        args.json,
        &format!(
            "connected {connected}/{} in {connect_secs:.1} s; publishing for {} s",
            args.clients, args.duration
        ),
    );

    // Run phase: the publishers start together; a progress line every second.
    let start = Instant::now();
    let mut live_publishers = 0;
    for tx in starts {
        if tx.send(start).is_ok() {
            live_publishers += 1;
        }
    }
    let deadline = start + Duration::from_secs(args.duration);
    let delivered_at_start = shared.delivered.load(Ordering::Relaxed);
    let mut last = delivered_at_start;
    for second in 1..=args.duration {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let p99 = shared
            .take_interval_p99()
            .map_or_else(|| "-".to_string(), human_us);
        progress(
            args.json,
            &format!(
                "[{second:>4}s] connected {}/{}  sent {}  acked {}  delivered/s {}  p99 {p99}",
                shared.connected.load(Ordering::Relaxed),
                args.clients,
                shared.sent.load(Ordering::Relaxed),
                shared.acked.load(Ordering::Relaxed),
                human_rate((delivered - last) as f64),
            ),
        );
        last = delivered;
    }
    let delivered_in_run = last - delivered_at_start;

    // Drain: until every publish is answered and every acked message
    // delivered, or the drain time is up.
    let drain_deadline = deadline + Duration::from_secs(args.drain);
    while Instant::now() < drain_deadline {
        let done = shared.publishers_done.load(Ordering::Relaxed) >= live_publishers;
        if done && shared.delivered.load(Ordering::Relaxed) >= shared.expected_deliveries() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if args.hold > 0 {
        progress(
            args.json,
            &format!("holding the connections for {} s", args.hold),
        );
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    for stop in stops {
        let _ = stop.send(());
    }
    let reports = collect(handles).await;
    Ok(summarize(
        &args,
        &shared,
        &reports,
        connect_secs,
        delivered_in_run,
    ))
}

fn summarize(
    args: &LoadArgs,
    shared: &Shared,
    reports: &[Report],
    connect_secs: f64,
    delivered_in_run: u64,
) -> Summary {
    let mut acked_by_room: Vec<Vec<u64>> = vec![Vec::new(); args.rooms];
    for r in reports {
        acked_by_room[r.room].extend(&r.acked);
    }
    for acked in &mut acked_by_room {
        acked.sort_unstable();
        acked.dedup();
    }
    let (mut expected, mut lost) = (0, 0);
    for r in reports.iter().filter(|r| r.joined) {
        for &offset in acked_by_room[r.room].iter().filter(|&&o| o > r.base) {
            expected += 1;
            if !r.seen.contains(offset - r.base - 1) {
                lost += 1;
            }
        }
    }
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let acked = sum(|r| r.acked.len() as u64);
    let duration = args.duration as f64;
    Summary {
        clients: args.clients,
        rooms: args.rooms,
        publishers: args.publishers,
        rate: args.rate,
        window: args.window,
        payload_bytes: args.payload,
        duration_secs: args.duration,
        connected: reports.iter().filter(|r| r.joined).count(),
        connect_failed: reports.iter().filter(|r| !r.joined).count(),
        connect_secs,
        sent: sum(|r| r.sent),
        acked,
        acked_per_sec: acked as f64 / duration,
        errors: sum(|r| r.errors),
        deliveries: sum(|r| r.deliveries),
        deliveries_per_sec: delivered_in_run as f64 / duration,
        expected_deliveries: expected,
        lost,
        duplicates: sum(|r| r.duplicates),
        out_of_order: sum(|r| r.out_of_order),
        stale: sum(|r| r.stale),
        disconnected: reports
            .iter()
            .filter(|r| r.joined && r.ended.is_some())
            .count(),
        latency: shared.latency_summary(),
        first_error: reports
            .iter()
            .find_map(|r| r.first_error.clone())
            .or_else(|| reports.iter().find_map(|r| r.ended.clone())),
    }
}

/// When publisher `publisher` of `publishers`, each publishing `rate` times a
/// second, first publishes, after the common start: evenly over one period.
fn spread_phase(publisher: usize, publishers: usize, rate: f64) -> Duration {
    if rate <= 0.0 || publishers == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(publisher as f64 / publishers as f64 / rate)
}

/// Every client's report; a client that does not finish within 30 s is left out.
async fn collect(handles: Vec<tokio::task::JoinHandle<Report>>) -> Vec<Report> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reports = Vec::with_capacity(handles.len());
    for handle in handles {
        let abort = handle.abort_handle();
        match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(_)) => {}
            Err(_) => abort.abort(),
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_publishers_take_turns_over_one_period() {
        // 4 publishers at 100/s: one every 2.5 ms.
        let phases: Vec<_> = (0..4).map(|p| spread_phase(p, 4, 100.0)).collect();
        assert_eq!(phases[0], Duration::ZERO);
        assert_eq!(phases[2], Duration::from_micros(5_000));
        assert!(phases[3] < Duration::from_millis(10));
        // As fast as the window allows: nothing to spread.
        assert_eq!(spread_phase(3, 4, 0.0), Duration::ZERO);
    }
}
