//! Benchmark 10, heartbeats: N simulated nodes each heartbeating once a
//! period to one controller (SQLite), answered per second and their latency.

use super::*;
use handover_core::wire::{if_protocol, Heartbeat, OutboxState, HLS_REQUESTS_PROTOCOL};

/// A node's heartbeat period with the default lease (`LEASE_MS_DEFAULT / 3`,
/// as `core::node` derives it): one heartbeat a second per node.
pub(super) const HEARTBEAT_PERIOD: Duration =
    Duration::from_millis(handover_controller::LEASE_MS_DEFAULT / 3);

/// What one simulated node measured: each heartbeat's slot (when it was
/// due) and when its answer was read.
type Beats = Vec<(Instant, Instant)>;

/// `n` simulated nodes say hello (distinct ids, release 2, grant `full`) on
/// connections of their own, then each sends the heartbeat a node sends
/// (`core::node::session`'s shape, the same body every time) once per
/// [`HEARTBEAT_PERIOD`], the nodes' slots spread evenly over the period, one
/// request at a time per node as a node's heartbeat lane does. A heartbeat
/// whose slot comes while the one before is unanswered goes as soon as that
/// one is answered, and its latency counts from its slot, so a slow
/// controller is not hidden by nodes waiting for it. After the warm-up,
/// the window: answers read in it per second, and the latency (slot to
/// answer) of every heartbeat due in it.
pub(super) async fn heartbeats(
    exe: &Path,
    dir: &Path,
    s: &Sizes,
    sources: &mut Sources,
) -> anyhow::Result<Figures> {
    let n = s.heartbeat_nodes;
    ensure!(n > 0, "no nodes to heartbeat");
    let mut fleet = Fleet::new(exe, &dir.join("heartbeats"), SUBNET_HEARTBEATS)?;
    // The simulated nodes are raw HTTP/1 clients: plain HTTP on loopback.
    fleet.plain_http()?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let src = sources.next_wave(n)?;
    let addr = fleet.controller_addr();
    let warmup = Duration::from_millis(s.heartbeat_warmup_ms);
    let window = Duration::from_millis(s.heartbeat_window_ms);
    let setup_started = Instant::now();
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let ready = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let ids: Vec<String> = (0..n).map(|k| format!("h{k:05}")).collect();
    let tokens = fleet.add_simulated_nodes(&ids).await?;
    let mut tasks = JoinSet::new();
    for (k, (node_id, token)) in ids.into_iter().zip(tokens).enumerate() {
        let hello = hello_body(&node_id, &token, 2, &node_id, true)?;
        let (sem, ready, mut go) = (sem.clone(), ready.clone(), go_rx.clone());
        let from = source_of(&src, k);
        // Node k's slots are k/n of a period after the start.
        let phase = HEARTBEAT_PERIOD.mul_f64(k as f64 / n as f64);
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await?;
            let mut c = Http1::connect(from, addr)
                .await
                .with_context(|| format!("connect from {from}"))?;
            let (st, body) = c.call("POST", "/node/v1/hello", None, &hello).await?;
            let w: Welcome = parse(st, &body, "hello")?;
            drop(permit);
            let beat = serde_json::to_vec(&Heartbeat {
                v: handover_core::wire::MESSAGE_VERSION,
                node_id: node_id.clone(),
                epoch: w.epoch,
                outbox: OutboxState {
                    next_seq: 1,
                    oldest_unacked_seq: None,
                    count: 0,
                },
                current_events: vec![],
                staged: vec![],
                hls_requests: if_protocol(Some(w.protocol), HLS_REQUESTS_PROTOCOL, 0),
            })?;
            ready.fetch_add(1, Ordering::SeqCst);
            let start = go
                .wait_for(Option::is_some)
                .await?
                .context("no start time")?;
            let end = start + warmup + window;
            let mut slot = start + phase;
            let mut beats = Beats::new();
            while slot < end {
                tokio::time::sleep_until(slot.into()).await;
                let (st, body) = c
                    .call("POST", "/node/v1/heartbeat", Some(&w.credential), &beat)
                    .await
                    .with_context(|| format!("{node_id}'s heartbeat"))?;
                let at = Instant::now();
                let gs: GrantState = parse(st, &body, "heartbeat")?;
                ensure!(
                    gs.grant == Grant::Full,
                    "{node_id}'s heartbeat was answered with {}",
                    gs.grant
                );
                beats.push((slot, at));
                slot += HEARTBEAT_PERIOD;
            }
            anyhow::Ok(beats)
        });
    }
    wait_ready(
        &mut tasks,
        &ready,
        n,
        HEARTBEAT_SETUP_POLL_MS,
        "a simulated node stopped before the heartbeats began",
    )
    .await?;
    let setup_ms = ms(setup_started.elapsed());
    let pid = fleet
        .controller
        .as_ref()
        .and_then(|p| p.pid())
        .context("no controller")?
        .as_raw()
        .unsigned_abs();

    let start = Instant::now();
    go_tx.send_replace(Some(start));
    let (from, to) = (start + warmup, start + warmup + window);
    tokio::time::sleep_until(from.into()).await;
    let own = std::process::id();
    let cpu_from = (cpu_ticks(pid)?, cpu_ticks(own)?);
    tokio::time::sleep_until(to.into()).await;
    let cpu_to = (cpu_ticks(pid)?, cpu_ticks(own)?);
    let mut all = Beats::new();
    let joined = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        anyhow::Ok(())
    })
    .await;
    joined.map_err(|_| anyhow!("not every heartbeat was answered within {ANSWER_TIMEOUT:?}"))??;
    fleet.stop_all().await?;

    let answered = all.iter().filter(|(_, at)| (from..to).contains(at)).count();
    let mut latencies_ms: Vec<f64> = all
        .iter()
        .filter(|(slot, _)| (from..to).contains(slot))
        .map(|(slot, at)| ms(at.saturating_duration_since(*slot)))
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    let window_s = window.as_secs_f64();
    let per_s = answered as f64 / window_s;
    let offered = n as f64 / HEARTBEAT_PERIOD.as_secs_f64();
    let mut f = Figures::new();
    put(&mut f, "heartbeats.nodes_10000_per_s", per_s);
    put(&mut f, "heartbeats.offered_per_s", offered);
    put(&mut f, "heartbeats.answered_share", per_s / offered);
    put(&mut f, "heartbeats.p50_ms", quantile(&latencies_ms, 0.5));
    put(&mut f, "heartbeats.p99_ms", quantile(&latencies_ms, 0.99));
    put(
        &mut f,
        "heartbeats.max_ms",
        latencies_ms.last().copied().unwrap_or(f64::NAN),
    );
    put(&mut f, "heartbeats.nodes", n as f64);
    put(&mut f, "heartbeats.window_ms", ms(window));
    put(&mut f, "heartbeats.setup_ms", setup_ms);
    let cores = |from: u64, to: u64| to.saturating_sub(from) as f64 / CLOCK_TICKS_PER_S / window_s;
    put(
        &mut f,
        "heartbeats.controller_cores",
        cores(cpu_from.0, cpu_to.0),
    );
    // The simulated nodes share the machine: what they used of it.
    put(
        &mut f,
        "heartbeats.client_cores",
        cores(cpu_from.1, cpu_to.1),
    );
    Ok(f)
}

/// How often the setup checks how many simulated nodes said hello.
const HEARTBEAT_SETUP_POLL_MS: u64 = 10;

/// `USER_HZ`, the unit of `/proc/PID/stat`'s CPU times: 100 on every Linux
/// architecture the binary is built for.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// CPU time (user and system, in clock ticks) process `pid` used so far.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: state is field 3,
    // utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no command in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {} in /proc/{pid}/stat", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}
