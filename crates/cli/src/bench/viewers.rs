//! 5, 6: HLS served by one node, viewer latency steady and while it switches, node memory.

use super::*;

/// The URI of the newest segment in a media playlist.
pub(super) fn newest_segment(playlist: &str) -> Option<&str> {
    playlist
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
}

pub(super) async fn get_text(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.get(url).send().await?;
    ensure!(r.status().is_success(), "GET {url}: {}", r.status());
    Ok(r.text().await?)
}

/// Requests per second of `loops` tight loops GETting `url` for `phase`.
pub(super) async fn hls_rate(
    http: &reqwest::Client,
    url: &str,
    loops: usize,
    phase: Duration,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + phase;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..loops {
        let (http, url, count) = (http.clone(), url.to_owned(), count.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let r = http.get(&url).send().await?;
                ensure!(r.status().is_success(), "GET {url}: {}", r.status());
                r.bytes().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

#[derive(Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: Instant,
    pub(super) ms: f64,
    pub(super) ok: bool,
}

/// Paced viewers start spread over this window, not all at once.
const VIEWERS_RAMP_MS: u64 = 100;
/// A paced viewer's pause between two playlist-and-segment rounds.
const VIEWER_PAUSE_MS: u64 = 100;

/// Viewers that fetch the playlist and its newest segment every 100 ms
/// until `stop`, recording every request.
pub(super) fn paced_viewers(
    http: &reqwest::Client,
    base: &str,
    viewers: usize,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for i in 0..viewers {
        let (http, stop, samples) = (http.clone(), stop.clone(), samples.clone());
        let playlist = format!("{base}/hls/ch1/index.m3u8");
        let base = base.to_owned();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(
                VIEWERS_RAMP_MS * i as u64 / viewers as u64,
            ))
            .await;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let text = get_text(&http, &playlist).await;
                let mut got = vec![Sample {
                    at: t,
                    ms: ms(t.elapsed()),
                    ok: text.is_ok(),
                }];
                if let Some(seg) = text.as_deref().ok().and_then(newest_segment) {
                    let t = Instant::now();
                    let ok = match http.get(format!("{base}/hls/ch1/{seg}")).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    got.push(Sample {
                        at: t,
                        ms: ms(t.elapsed()),
                        ok,
                    });
                }
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(got);
                tokio::time::sleep(Duration::from_millis(VIEWER_PAUSE_MS)).await;
            }
        });
    }
    tasks
}

/// How often [`wait_until`] checks again.
const WAIT_POLL_MS: u64 = 100;

pub(super) async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        ensure!(Instant::now() < deadline, "{what} not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(WAIT_POLL_MS)).await;
    }
    Ok(())
}

/// A started node serves its first playlist, or a new grant, within this.
const NODE_WAIT: Duration = Duration::from_secs(15);
/// Pause before asking a just-started supervisor for its worker, so it has
/// one.
const SUPERVISOR_SETTLE_MS: u64 = 1_000;
/// After a switch, the old worker finishes its requests and exits within
/// this; the figure's window ends after it.
const OLD_WORKER_DRAIN_MS: u64 = 1_500;

/// A release-1 node under its supervisor, serving one live channel, whose
/// controller was then restarted as release 2 (so the node runs on `deliver`
/// from its cache, as in an upgrade's deliver phase). Figures: the node's
/// idle memory, HLS throughput, viewer p99 steady and during its switch to
/// release 2 (through the supervisor's control socket).
pub(super) async fn viewers(
    exe: &Path,
    dir: &Path,
    s: &Sizes,
    load: bool,
) -> anyhow::Result<Figures> {
    let mut f = Figures::new();
    let mut fleet = Fleet::new(exe, &dir.join("viewers"), SUBNET_VIEWERS)?;
    fleet.supervised = false;
    fleet.start_controller(1).await?;
    create_live_event(&fleet, ("v-a", "v-b"), 500, 3_600_000).await?;
    fleet.supervised = true;
    let i = fleet.add_node("v-a", Role::Primary, "g1", 1);
    fleet.start_node(i).await?;
    let base = fleet.nodes[i].url();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(crate::viewers::REQUEST_TIMEOUT)
        .build()?;
    let playlist = format!("{base}/hls/ch1/index.m3u8");
    wait_until("the node's first playlist", NODE_WAIT, || {
        let (http, playlist) = (&http, &playlist);
        async move { get_text(http, playlist).await.is_ok() }
    })
    .await?;

    // The controller becomes release 2; the node keeps serving on `deliver`.
    let mut controller = fleet.controller.take().context("no controller")?;
    controller.terminate().await?;
    fleet.supervised = false;
    fleet.start_controller(2).await?;
    let status_url = format!("{base}/status");
    wait_until("grant deliver for the release-1 node", NODE_WAIT, || {
        let (http, status_url) = (&http, &status_url);
        async move {
            match get_text(http, status_url).await {
                Ok(t) => serde_json::from_str::<Value>(&t).is_ok_and(|v| v["grant"] == "deliver"),
                Err(_) => false,
            }
        }
    })
    .await?;
    let sock = fleet.nodes[i]
        .data_dir
        .join("supervisor")
        .join("control.sock");
    let supervisor = handover_supervisor::SupervisorClient::new(
        &sock,
        handover_supervisor::DEFAULT_READY_TIMEOUT_MS,
    );
    tokio::time::sleep(Duration::from_millis(SUPERVISOR_SETTLE_MS)).await;
    let worker = supervisor
        .status()
        .await?
        .active_pid
        .context("the node's supervisor runs no worker")?;
    put(&mut f, "memory.node_idle_mib", vmrss_mib(worker)?);

    if load {
        let phase = Duration::from_millis(s.hls_phase_ms);
        let playlists = hls_rate(&http, &playlist, s.hls_loops, phase).await?;
        let text = get_text(&http, &playlist).await?;
        let seg = newest_segment(&text).context("empty playlist")?;
        let seg_url = format!("{base}/hls/ch1/{seg}");
        let segments = hls_rate(&http, &seg_url, s.hls_loops, phase).await?;
        put(&mut f, "viewers.playlists_per_s", playlists);
        put(&mut f, "viewers.segments_per_s", segments);
        let seg_bytes = http.get(&seg_url).send().await?.bytes().await?.len();
        put(&mut f, "viewers.segment_bytes", seg_bytes as f64);

        // Steady, then the switch to release 2 under the same viewers.
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let steady_from = Instant::now();
        let mut tasks = paced_viewers(&http, &base, s.paced_viewers, stop.clone(), samples.clone());
        tokio::time::sleep(Duration::from_millis(s.steady_ms)).await;
        let switch_from = Instant::now();
        let outcome = supervisor
            .switch(&handover_supervisor::Release::new(2, exe))
            .await?;
        let switch_ms = ms(switch_from.elapsed());
        ensure!(
            matches!(outcome, handover_supervisor::SwitchOutcome::Switched { .. }),
            "the switch to release 2 did not happen: {outcome:?}"
        );
        // The old worker finishes its requests and exits after the switch.
        tokio::time::sleep(Duration::from_millis(OLD_WORKER_DRAIN_MS)).await;
        let switch_until = Instant::now();
        stop.store(true, Ordering::Relaxed);
        while tasks.join_next().await.is_some() {}
        let all = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let window = |from: Instant, to: Instant| {
            let mut v: Vec<f64> = all
                .iter()
                .filter(|x| x.at >= from && x.at < to && x.ok)
                .map(|x| x.ms)
                .collect();
            v.sort_by(f64::total_cmp);
            let failed = all
                .iter()
                .filter(|x| x.at >= from && x.at < to && !x.ok)
                .count();
            (v, failed)
        };
        let (steady, steady_failed) = window(steady_from, switch_from);
        let (during, during_failed) = window(switch_from, switch_until);
        put(&mut f, "viewers.steady_p99_ms", quantile(&steady, 0.99));
        put(&mut f, "viewers.switch_p99_ms", quantile(&during, 0.99));
        put(
            &mut f,
            "viewers.switch_max_ms",
            during.last().copied().unwrap_or(0.0),
        );
        put(&mut f, "viewers.switch_ms", switch_ms);
        put(
            &mut f,
            "viewers.switch_requests",
            (during.len() + during_failed) as f64,
        );
        put(
            &mut f,
            "viewers.failed_requests",
            (steady_failed + during_failed) as f64,
        );
        let active = supervisor.status().await?.active.release;
        ensure!(
            active == 2,
            "after the switch the node runs release {active}"
        );
    }
    fleet.stop_all().await?;
    Ok(f)
}
