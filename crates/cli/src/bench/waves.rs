//! 3, 4, 6: a fence reaching N watching nodes, a reconnect storm, controller memory.

use super::*;

pub(super) struct Registered {
    pub(super) node_id: String,
    pub(super) credential: String,
}

pub(super) struct FenceWave {
    pub(super) latencies_ms: Vec<f64>,
    pub(super) total_ms: f64,
    pub(super) answer_ms: f64,
    pub(super) controller_mib: f64,
    pub(super) setup_ms: f64,
    pub(super) registered: Vec<Registered>,
}

/// How often the setup checks how many simulated nodes said hello.
const SETUP_POLL_MS: u64 = 10;

/// `n` simulated nodes say hello (distinct ids, release 2, grant `full`),
/// then all long-poll the watch as a node does; once they wait, the operator
/// fences. Latency per node: from the fence request to its fenced answer.
pub(super) async fn fence_wave(
    fleet: &Fleet,
    n: usize,
    sources: &[Ipv4Addr],
    settle: Duration,
) -> anyhow::Result<FenceWave> {
    let addr = fleet.controller_addr();
    let setup_started = Instant::now();
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let ready = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = watch::channel(false);
    let ids: Vec<String> = (0..n).map(|k| format!("n{k:05}")).collect();
    let tokens = fleet.add_simulated_nodes(&ids).await?;
    let mut tasks = JoinSet::new();
    for (node_id, token) in ids.into_iter().zip(tokens) {
        let k = tasks.len();
        let hello = hello_body(&node_id, &token, 2, &node_id, true)?;
        let (sem, ready, mut go) = (sem.clone(), ready.clone(), go_rx.clone());
        let from = source_of(sources, k);
        tasks.spawn(async move {
            let permit = sem.acquire_owned().await?;
            let mut c = Http1::connect(from, addr)
                .await
                .with_context(|| format!("connect from {from}"))?;
            let (st, body) = c.call("POST", "/node/v1/hello", None, &hello).await?;
            let w: Welcome = parse(st, &body, "hello")?;
            drop(permit);
            ready.fetch_add(1, Ordering::SeqCst);
            go.wait_for(|g| *g).await?;
            let path = format!(
                "/node/v1/watch?node={node_id}&epoch={}&grant={}&wait_ms={WATCH_WAIT_MS}&desired_rev={}",
                w.epoch,
                w.grant.as_str(),
                w.desired_rev
            );
            let (st, body) = c.call("GET", &path, Some(&w.credential), &[]).await?;
            let at = Instant::now();
            let gs: GrantState = parse(st, &body, "watch")?;
            anyhow::Ok((at, gs.grant, Registered { node_id, credential: w.credential }))
        });
    }
    wait_ready(
        &mut tasks,
        &ready,
        n,
        SETUP_POLL_MS,
        "a simulated node answered before the fence",
    )
    .await?;
    go_tx.send_replace(true);
    tokio::time::sleep(settle).await;
    if let Some(r) = tasks.try_join_next() {
        r??;
        bail!("a watch answered before the fence (raise the settle time?)");
    }
    let setup_ms = ms(setup_started.elapsed());
    let pid = fleet
        .controller
        .as_ref()
        .and_then(|p| p.pid())
        .context("no controller")?;
    let controller_mib = vmrss_mib(pid.as_raw().unsigned_abs())?;

    let t0 = Instant::now();
    let _: Value = fleet.op.post("/api/v1/fence", &json!({})).await?;
    let answer_ms = ms(t0.elapsed());
    let mut latencies_ms = Vec::with_capacity(n);
    let mut registered = Vec::with_capacity(n);
    let joined = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            let (at, grant, reg) = r??;
            ensure!(grant == Grant::Fenced, "a watcher got {grant}, not fenced");
            latencies_ms.push(ms(at.saturating_duration_since(t0)));
            registered.push(reg);
        }
        anyhow::Ok(())
    })
    .await;
    joined.map_err(|_| anyhow!("not every watcher was fenced within {ANSWER_TIMEOUT:?}"))??;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(FenceWave {
        total_ms: latencies_ms.last().copied().unwrap_or(0.0),
        latencies_ms,
        answer_ms,
        controller_mib,
        setup_ms,
        registered,
    })
}

/// Waits (at most [`SETUP_TIMEOUT`], polling every `poll_ms`) until `n`
/// simulated nodes counted themselves `ready`; one of `tasks` ending
/// before is an error, its own or `early`.
pub(super) async fn wait_ready<T: 'static>(
    tasks: &mut JoinSet<anyhow::Result<T>>,
    ready: &AtomicUsize,
    n: usize,
    poll_ms: u64,
    early: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while ready.load(Ordering::SeqCst) < n {
        if let Some(r) = tasks.try_join_next() {
            r??;
            bail!("{early}");
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} simulated nodes said hello within {SETUP_TIMEOUT:?}",
            ready.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(poll_ms)).await;
    }
    Ok(())
}

/// A simulated node's first pause after a failed hello, doubled each time...
const STORM_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// ...up to this, as a node's own backoff (`BACKOFF_MS_MAX`) would.
const STORM_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Pause between spawning the simulated nodes and starting the clock, so
/// every one waits at the start line (`go`) when it opens.
const START_LINE_MS: u64 = 100;

/// Every registered node says hello at once with its own credential, as
/// nodes do after a controller restart; done when every one holds a grant.
pub(super) async fn storm_wave(
    fleet: &Fleet,
    nodes: &[Registered],
    sources: &[Ipv4Addr],
) -> anyhow::Result<(f64, u64)> {
    let addr = fleet.controller_addr();
    let (go_tx, go_rx) = watch::channel(false);
    let retries = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for (k, node) in nodes.iter().enumerate() {
        let hello = hello_body(&node.node_id, &node.credential, 2, &node.node_id, false)?;
        let mut go = go_rx.clone();
        let from = source_of(sources, k);
        let retries = retries.clone();
        tasks.spawn(async move {
            go.wait_for(|g| *g).await?;
            let mut backoff = STORM_BACKOFF_MIN;
            let mut last_error = None;
            for _ in 0..STORM_ATTEMPTS_MAX {
                let attempt = async {
                    let mut c = Http1::connect(from, addr).await?;
                    let (st, body) = c.call("POST", "/node/v1/hello", None, &hello).await?;
                    parse::<Welcome>(st, &body, "hello")
                };
                match attempt.await {
                    Ok(w) => return anyhow::Ok((Instant::now(), w.grant)),
                    Err(e) => last_error = Some(e),
                }
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(STORM_BACKOFF_MAX);
            }
            Err(last_error.unwrap_or_else(|| anyhow!("no attempt")))
        });
    }
    tokio::time::sleep(Duration::from_millis(START_LINE_MS)).await;
    let t0 = Instant::now();
    go_tx.send_replace(true);
    let mut last = t0;
    let joined = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(r) = tasks.join_next().await {
            let (at, grant) = r??;
            ensure!(grant == Grant::Full, "a node got {grant} after the restart");
            last = last.max(at);
        }
        anyhow::Ok(())
    })
    .await;
    joined.map_err(|_| anyhow!("not every node was welcomed within {ANSWER_TIMEOUT:?}"))??;
    Ok((ms(last - t0), retries.load(Ordering::Relaxed)))
}

/// A wave settles (connections closed, the controller idle) for this long
/// before the next one...
const SETTLE_BASE_MS: u64 = 300;
/// ...plus one more millisecond per this many nodes.
const SETTLE_NODES_PER_MS: u64 = 10;

pub(super) async fn fence_and_storm(
    exe: &Path,
    dir: &Path,
    s: &Sizes,
    sources: &mut Sources,
    fence_small: bool,
) -> anyhow::Result<Figures> {
    let mut f = Figures::new();
    let settle =
        |n: usize| Duration::from_millis(SETTLE_BASE_MS + (n as u64) / SETTLE_NODES_PER_MS);
    let record = |f: &mut Figures, label: &str, w: &FenceWave| {
        put(f, &format!("fence.{label}_ms"), w.total_ms);
        put(
            f,
            &format!("fence.{label}_p50_ms"),
            quantile(&w.latencies_ms, 0.5),
        );
        put(
            f,
            &format!("fence.{label}_p99_ms"),
            quantile(&w.latencies_ms, 0.99),
        );
        put(f, &format!("fence.{label}_max_ms"), w.total_ms);
        put(f, &format!("fence.{label}_fence_answer_ms"), w.answer_ms);
        put(f, &format!("fence.{label}_setup_ms"), w.setup_ms);
        put(
            f,
            &format!("fence.{label}_count"),
            w.latencies_ms.len() as f64,
        );
    };
    if fence_small {
        let mut fleet = Fleet::new(exe, &dir.join("fence-small"), SUBNET_FENCE)?;
        // The simulated nodes are raw HTTP/1 clients: plain HTTP on loopback.
        fleet.plain_http()?;
        fleet.supervised = false;
        fleet.start_controller(2).await?;
        let src = sources.next_wave(s.fence_small)?;
        let w = fence_wave(&fleet, s.fence_small, &src, settle(s.fence_small)).await?;
        record(&mut f, "nodes_1000", &w);
        fleet.stop_all().await?;
    }

    let mut fleet = Fleet::new(exe, &dir.join("fence-large"), SUBNET_FENCE)?;
    // The simulated nodes are raw HTTP/1 clients: plain HTTP on loopback.
    fleet.plain_http()?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let src = sources.next_wave(s.fence_large)?;
    let w = fence_wave(&fleet, s.fence_large, &src, settle(s.fence_large)).await?;
    record(&mut f, "nodes_10000", &w);
    put(
        &mut f,
        "memory.controller_10000_nodes_mib",
        w.controller_mib,
    );
    put(&mut f, "memory.controller_nodes", s.fence_large as f64);

    // Storm: lift the fence, restart the controller, every node at once.
    let _: Value = fleet.op.post("/api/v1/unfence", &json!({})).await?;
    let mut controller = fleet.controller.take().context("no controller")?;
    controller.terminate().await?;
    fleet.start_controller(2).await?;
    let src = sources.next_wave(s.fence_large)?;
    let (storm_ms, retries) = storm_wave(&fleet, &w.registered, &src).await?;
    put(&mut f, "storm.nodes_10000_ms", storm_ms);
    put(&mut f, "storm.nodes", w.registered.len() as f64);
    put(&mut f, "storm.retries", retries as f64);
    fleet.stop_all().await?;
    Ok(f)
}
