//! The report: JSON, the table and docs/benchmarks.md.

use super::*;

pub struct Report {
    pub machine: Machine,
    pub runs: usize,
    pub quick: bool,
    pub sizes: Sizes,
    pub fd_limit: u64,
    pub elapsed_s: f64,
    pub summary: BTreeMap<String, Stat>,
    pub per_run: Vec<Figures>,
    /// Benchmarks that could not run here, and why (e.g. no PostgreSQL).
    pub skipped: BTreeMap<String, String>,
}

pub(super) fn round3(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

pub(super) fn report_json(r: &Report) -> Value {
    let mut root = serde_json::Map::new();
    let set = |root: &mut serde_json::Map<String, Value>, key: &str, v: Value| {
        let (group, name) = key.split_once('.').unwrap_or(("other", key));
        let obj = root.entry(group.to_owned()).or_insert_with(|| json!({}));
        if let Some(o) = obj.as_object_mut() {
            o.insert(name.to_owned(), v);
        }
    };
    for key in JSON_KEYS {
        set(&mut root, key, Value::Null);
    }
    for (key, stat) in &r.summary {
        set(&mut root, key, round3(stat.median));
    }
    root.insert("machine".into(), json!(r.machine));
    root.insert("runs".into(), json!(r.runs));
    root.insert("quick".into(), json!(r.quick));
    root.insert("sizes".into(), json!(r.sizes));
    root.insert("elapsed_s".into(), round3(r.elapsed_s));
    root.insert("skipped".into(), json!(r.skipped));
    root.insert(
        "per_run".into(),
        Value::Array(
            r.per_run
                .iter()
                .map(|f| Value::Object(f.iter().map(|(k, v)| (k.clone(), round3(*v))).collect()))
                .collect(),
        ),
    );
    Value::Object(root)
}

/// 12345.6 → "12,346".
pub(super) fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

pub(super) struct Row {
    pub(super) key: &'static str,
    pub(super) bench: String,
    pub(super) result: String,
    pub(super) limit: String,
    pub(super) ratio: String,
    pub(super) goal: String,
    pub(super) met: Option<bool>,
}

pub(super) fn rows(r: &Report) -> Vec<Row> {
    let s = &r.sizes;
    let get = |k: &str| r.summary.get(k).copied();
    let med = |k: &str| get(k).map(|x| x.median);
    let spread = |k: &str, f: &dyn Fn(f64) -> String| match get(k) {
        Some(x) if x.n > 1 => format!("{} ({}–{})", f(x.median), f(x.min), f(x.max)),
        Some(x) => f(x.median),
        None => "not run".into(),
    };
    let per_s = |v: f64| format!("{}/s", thousands(v));
    let msf = |v: f64| format!("{v:.0} ms");
    let msf1 = |v: f64| format!("{v:.1} ms");
    let mib = |v: f64| format!("{v:.1} MiB");
    // Tenths below 100 ms, thousands separators above.
    let ms_any = |v: f64| {
        if v < 100.0 {
            msf1(v)
        } else {
            format!("{} ms", thousands(v))
        }
    };
    let ratio = |k: &str| med(k).map_or("—".into(), |v| format!("{v:.2}"));
    let at_least = |k: &str, goal: f64| med(k).map(|v| v >= goal);
    let at_most = |k: &str, goal: f64| med(k).map(|v| v <= goal);
    let mut out = vec![
        Row {
            key: "drain.records_per_s",
            bench: format!(
                "1. redundant-channel drain: {} nodes × {} release-1 records (~{:.0} B) → release-2 controller, {} per request",
                s.drain_nodes,
                thousands(s.drain_records_per_node as f64),
                med("drain.record_bytes").unwrap_or(0.0),
                s.drain_batch_records
            ),
            result: spread("drain.records_per_s", &per_s),
            limit: format!(
                "raw insert of the upcast rows, {} per transaction: {}",
                thousands(s.raw_rows_per_transaction as f64),
                spread("drain.limit_records_per_s", &per_s)
            ),
            ratio: ratio("drain.ratio"),
            goal: format!("≥ {GOAL_DRAIN_RATIO} × raw"),
            met: at_least("drain.ratio", GOAL_DRAIN_RATIO),
        },
        Row {
            key: "outbox.tick_per_s",
            bench: format!(
                "2a. node outbox, producer tick ({:.0} records + 3 kv rows per commit)",
                med("outbox.tick_records_per_commit").unwrap_or(0.0)
            ),
            result: spread("outbox.tick_per_s", &per_s),
            limit: format!(
                "raw insert, same file settings and records per transaction: {}",
                spread("outbox.tick_limit_per_s", &per_s)
            ),
            ratio: ratio("outbox.tick_ratio"),
            goal: "≥ 0.5 × raw".into(),
            met: at_least("outbox.tick_ratio", GOAL_RATIO),
        },
        Row {
            key: "outbox.single_per_s",
            bench: "2b. node outbox, 1 record per commit".into(),
            result: spread("outbox.single_per_s", &per_s),
            limit: format!(
                "raw insert, 1 per transaction: {}",
                spread("outbox.single_limit_per_s", &per_s)
            ),
            ratio: ratio("outbox.single_ratio"),
            goal: "≥ 0.5 × raw".into(),
            met: at_least("outbox.single_ratio", GOAL_RATIO),
        },
    ];
    for (label, n, goal) in [
        ("nodes_1000", s.fence_small, GOAL_FENCE_1000_MS),
        ("nodes_10000", s.fence_large, GOAL_FENCE_10000_MS),
    ] {
        let p = |q: &str| {
            med(&format!("fence.{label}_{q}_ms")).map_or("—".into(), |v| format!("{v:.0}"))
        };
        out.push(Row {
            key: if label == "nodes_1000" {
                "fence.nodes_1000_ms"
            } else {
                "fence.nodes_10000_ms"
            },
            bench: format!(
                "3. fence: {} watching nodes, fence request → every watcher fenced",
                thousands(n as f64)
            ),
            result: format!(
                "{} (per node p50 {} / p99 {} ms)",
                spread(&format!("fence.{label}_ms"), &msf),
                p("p50"),
                p("p99")
            ),
            limit: "goal".into(),
            ratio: "—".into(),
            goal: format!("≤ {goal:.0} ms"),
            met: at_most(&format!("fence.{label}_ms"), goal),
        });
    }
    out.push(Row {
        key: "storm.nodes_10000_ms",
        bench: format!(
            "4. reconnect storm: {} registered nodes say hello at once after a controller restart",
            thousands(s.fence_large as f64)
        ),
        result: format!(
            "{} ({} retries)",
            spread("storm.nodes_10000_ms", &msf),
            med("storm.retries").map_or("—".into(), thousands)
        ),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_STORM_MS:.0} ms"),
        met: at_most("storm.nodes_10000_ms", GOAL_STORM_MS),
    });
    out.push(Row {
        key: "viewers.segments_per_s",
        bench: format!(
            "5a. HLS served by one node process, {} concurrent client loops",
            s.hls_loops
        ),
        result: format!(
            "segments {}; playlists {}",
            spread("viewers.segments_per_s", &per_s),
            spread("viewers.playlists_per_s", &per_s)
        ),
        limit: "—".into(),
        ratio: "—".into(),
        goal: "—".into(),
        met: None,
    });
    out.push(Row {
        key: "viewers.switch_p99_ms",
        bench: format!(
            "5b. viewer latency p99 ({} viewers), during a release 1 → 2 switch of that node",
            s.paced_viewers
        ),
        result: format!(
            "{} ({} failed requests; switch {})",
            spread("viewers.switch_p99_ms", &msf1),
            med("viewers.failed_requests").map_or("—".into(), thousands),
            med("viewers.switch_ms").map_or("—".into(), msf)
        ),
        limit: format!("steady p99: {}", spread("viewers.steady_p99_ms", &msf1)),
        ratio: match (med("viewers.switch_p99_ms"), med("viewers.steady_p99_ms")) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}", a / b),
            _ => "—".into(),
        },
        goal: "no failed request".into(),
        met: med("viewers.failed_requests").map(|v| v == 0.0),
    });
    out.push(Row {
        key: "memory.controller_10000_nodes_mib",
        bench: format!(
            "6a. controller resident memory with {} connected nodes",
            thousands(s.fence_large as f64)
        ),
        result: spread("memory.controller_10000_nodes_mib", &mib),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_CONTROLLER_MIB:.0} MiB"),
        met: at_most("memory.controller_10000_nodes_mib", GOAL_CONTROLLER_MIB),
    });
    out.push(Row {
        key: "memory.node_idle_mib",
        bench: "6b. idle node (worker) resident memory, one live event, no viewers".into(),
        result: spread("memory.node_idle_mib", &mib),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_NODE_MIB:.0} MiB"),
        met: at_most("memory.node_idle_mib", GOAL_NODE_MIB),
    });
    out.push(Row {
        key: "upgrade.overhead_ms",
        bench: if r.quick {
            "7. upgrade overhead (quick: one group, 3 s event)".into()
        } else {
            "7. upgrade overhead of the demo cluster (`demo --skip-naive`)".into()
        },
        result: format!(
            "{} (total {}, waiting {})",
            spread("upgrade.overhead_ms", &msf),
            med("upgrade.total_ms").map_or("—".into(), msf),
            med("upgrade.waiting_ms").map_or("—".into(), msf)
        ),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_UPGRADE_OVERHEAD_MS:.0} ms"),
        met: at_most("upgrade.overhead_ms", GOAL_UPGRADE_OVERHEAD_MS),
    });
    let nodes = s.stage_nodes;
    let stage_key = "stage.nodes_100_ms";
    out.push(Row {
        key: "stage.nodes_100_ms",
        bench: format!(
            "8a. stage: {nodes} supervised nodes sharing this host's artifact cache, upgrade start → every node staged ({} MiB binary)",
            med("stage.artifact_mib").map_or("—".into(), |v| format!("{v:.1}"))
        ),
        result: spread(stage_key, &msf),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_STAGE_100_MS:.0} ms"),
        met: at_most(stage_key, GOAL_STAGE_100_MS),
    });
    out.push(Row {
        key: "stage.controller_bytes_per_artifact_bytes",
        bench: format!(
            "8b. stage: bytes the controller wrote while {nodes} nodes staged, per byte of the artifact"
        ),
        result: spread("stage.controller_bytes_per_artifact_bytes", &|v| {
            format!("{v:.1} copies")
        }),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_STAGE_COPIES:.0} copies"),
        met: at_most("stage.controller_bytes_per_artifact_bytes", GOAL_STAGE_COPIES),
    });
    let own = "stage.own_copy_nodes_100_ms";
    out.push(Row {
        key: own,
        bench: "8c. stage as 8a, each node writing its own copy (no host cache, as on hosts of their own; here one disk)".into(),
        result: spread(own, &msf),
        limit: "—".into(),
        ratio: "—".into(),
        goal: "—".into(),
        met: None,
    });
    let own_copies = "stage.own_copy_controller_bytes_per_artifact_bytes";
    out.push(Row {
        key: own_copies,
        bench: "8d. stage as 8c: bytes the controller wrote, per byte of the artifact".into(),
        result: spread(own_copies, &|v| format!("{v:.1} copies")),
        limit: "—".into(),
        ratio: "—".into(),
        goal: "—".into(),
        met: None,
    });
    out.push(Row {
        key: "drain_postgres.records_per_s",
        bench: format!(
            "9. redundant-channel drain as in 1, the controller's store on PostgreSQL: {} nodes × {} records",
            s.drain_nodes,
            thousands(s.drain_records_per_node as f64),
        ),
        result: spread("drain_postgres.records_per_s", &per_s),
        limit: format!(
            "raw `COPY` of the upcast rows into the same table, {} per `COPY`: {}",
            thousands(s.raw_rows_per_transaction as f64),
            spread("drain_postgres.limit_records_per_s", &per_s)
        ),
        ratio: ratio("drain_postgres.ratio"),
        goal: format!("≥ {GOAL_DRAIN_POSTGRES_RATIO} × raw"),
        met: at_least("drain_postgres.ratio", GOAL_DRAIN_POSTGRES_RATIO),
    });
    let offered = s.heartbeat_nodes as f64 / HEARTBEAT_PERIOD.as_secs_f64();
    out.push(Row {
        key: "heartbeats.nodes_10000_per_s",
        bench: format!(
            "10a. heartbeats: {} simulated nodes, one each per {} ms, to one controller (SQLite); answered per second over {} s",
            thousands(s.heartbeat_nodes as f64),
            thousands(HEARTBEAT_PERIOD.as_secs_f64() * 1000.0),
            s.heartbeat_window_ms / 1000
        ),
        result: format!(
            "{} (CPU: controller {} cores, simulated nodes {})",
            spread("heartbeats.nodes_10000_per_s", &per_s),
            med("heartbeats.controller_cores").map_or("—".into(), |v| format!("{v:.2}")),
            med("heartbeats.client_cores").map_or("—".into(), |v| format!("{v:.2}"))
        ),
        limit: format!("offered: {}/s", thousands(offered)),
        ratio: ratio("heartbeats.answered_share"),
        goal: format!(
            "≥ {}/s ({GOAL_HEARTBEATS_ANSWERED_SHARE} × offered)",
            thousands(offered * GOAL_HEARTBEATS_ANSWERED_SHARE)
        ),
        met: at_least("heartbeats.answered_share", GOAL_HEARTBEATS_ANSWERED_SHARE),
    });
    out.push(Row {
        key: "heartbeats.p99_ms",
        bench: "10b. heartbeat latency p99, from when each was due to its answer".into(),
        result: format!(
            "{} (p50 {}, max {})",
            spread("heartbeats.p99_ms", &ms_any),
            med("heartbeats.p50_ms").map_or("—".into(), ms_any),
            med("heartbeats.max_ms").map_or("—".into(), ms_any)
        ),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {} ms (the period)", thousands(GOAL_HEARTBEATS_P99_MS)),
        met: at_most("heartbeats.p99_ms", GOAL_HEARTBEATS_P99_MS),
    });
    out.push(Row {
        key: "ha.takeover_ms",
        bench: "11. three controller replicas on PostgreSQL, upgrade paused: leader SIGKILLed → a survivor's orchestrator steps the upgrade under a new term (resume retried every 20 ms)".into(),
        result: spread("ha.takeover_ms", &msf),
        limit: "goal".into(),
        ratio: "—".into(),
        goal: format!("≤ {GOAL_HA_TAKEOVER_MS:.0} ms"),
        met: at_most("ha.takeover_ms", GOAL_HA_TAKEOVER_MS),
    });
    out.retain(|row| {
        let bench = row.key.split('.').next().unwrap_or("");
        r.summary
            .keys()
            .any(|k| k.starts_with(&format!("{bench}.")))
    });
    for (bench, why) in &r.skipped {
        out.push(Row {
            key: "skipped",
            bench: format!("{bench}: skipped"),
            result: why.clone(),
            limit: "—".into(),
            ratio: "—".into(),
            goal: "—".into(),
            met: None,
        });
    }
    out
}

pub(super) fn before_of(key: &str) -> String {
    BEFORE
        .iter()
        .find(|(k, _, _)| *k == key)
        .map_or("—".into(), |(_, figure, _)| (*figure).to_owned())
}

pub(super) fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| benchmark | result (median{}) | limit measured in the same run | ratio | goal | met | before fix |",
        if r.runs > 1 { " (min–max)" } else { "" }
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in rows(r) {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.bench,
            row.result,
            row.limit,
            row.ratio,
            row.goal,
            met,
            before_of(row.key)
        );
    }
    out
}

pub(super) fn render_markdown(r: &Report) -> String {
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `handover bench{}` ({} build) on {}: {} cores ({}), {} MiB of memory, {}; \
         load average {} at the start; {} run{} per figure, {:.0} s in all. Open-file limit {}.\n",
        if r.quick { " --quick" } else { "" },
        m.build,
        m.date,
        m.cores,
        m.cpu_model,
        thousands(m.memory_mib as f64),
        m.kernel,
        m.load_average,
        r.runs,
        if r.runs == 1 { "" } else { "s" },
        r.elapsed_s,
        r.fd_limit
    );
    if r.quick {
        let _ = writeln!(
            out,
            "**`--quick`: tiny sizes, one run. These figures check that every benchmark runs; they measure nothing worth keeping.**\n"
        );
    }
    out.push_str(&render_table(r));
    out.push_str(METHOD);
    if !BEFORE.is_empty() {
        let _ = writeln!(out, "\n## Before and after\n");
        for (key, figure, note) in BEFORE {
            let _ = writeln!(out, "- `{key}`: before {figure}. {note}");
        }
    }
    out.push_str(PROFILES);
    out
}

/// Where the time and memory of the figures short of their goals go, from profiles
/// (kept with the report, so a new run does not lose them; profiled again
/// when the figures move).
pub(super) const PROFILES: &str = r#"
## Where the time and memory go (profiles)

Profiled on 2026-12-01 on this 2-core machine, on the controller of the
10,000-node fence (the bench's `fence-large` controller process).

**Memory** (heaptrack, the controller run under `heaptrack`, peak heap
consumers; VmRSS 190 MiB at the time in an unprofiled run):

- hyper's buffers, about 16 KiB per connection: the 8 KiB buffer for
  response heads that `serve_connection` allocates for every connection
  (82 MB over 19,850 allocations), and the read buffer, which starts at
  8 KiB (`Buffered::poll_read_from_io`; 82 MB over about 40,000
  allocations). Most of these pages are touched only in part, which is why
  VmRSS is below the 235 MB heaptrack counts at the peak.
- The connection's task (`handover_net::serve::connection` and its tokio
  task): about 1.3 KB per connection (25.6 MB).
- axum's route future of a held watch: about 0.7 KB (4.6 MB).
- Everything the controller keeps per node (sessions, memberships, desired
  states, credential digests): under 1 MB in all.

So the 128 MiB goal needs smaller per-connection buffers than hyper 1.x's
server gives (its builder sets neither the first read buffer size, whose
floor is 8 KiB, nor the head buffer's), or fewer connections per node.
Tried and rejected: mimalloc as the global allocator (the fence 354–427 ms,
but VmRSS 278–280 MiB).

**Drain into PostgreSQL** (the server's own statement log,
`log_min_duration_statement = 0` on the bench's database, one run of
`bench --only drain_postgres`; logging every statement slows the run, 8.3 s
for 800,000 records and a ratio of 0.49): the server spent 4.0 s in the
store's `COPY`s (397, one a group commit of 3.8 batches, about 2,000 rows
each; the limit's 800 `COPY`s of 1,000 rows took 3.8 s), 0.5 s in 418
commits, and 0.3 s in the rest of each group's statements (the epochs'
check, the nodes' row locks, their highest seqs, 1,600 acknowledgements).
The rest of the run is the controller's own pipeline, on the same two cores
as the server and the eight simulated nodes: reading and decoding each
request's JSON, upcasting every record and formatting the `COPY` text. So
a stored row now costs the server what the limit's row does, and what
remains between the two figures is the controller's CPU beside the
server's. Before the group's batches shared statements each batch paid its
own five (1,600 `COPY`s of 500 rows took 3.2 s of a 6.4 s run, 0.47); before
`COPY`, each batch was one multi-row `INSERT … ON CONFLICT DO NOTHING` of
6,000 parameters, and the server spent 7.3 s executing them (speculative
insertion costs about 1.7 times a plain insert a row, measured with `psql`).

**Stage time with the host cache** (the controller's phase records and
the 100 nodes' logs, the full run of 2026-12-02 05:37): the first node had
the binary from the controller 0.39 s after the stage began; the second,
linking it from the cache, 1.1 s after; the 25th 2.8 s, the 50th 3.1 s,
the 75th 3.4 s, the 100th 3.5 s; the controller saw the last one staged
1.3 s later. 1 node downloaded, 99 linked; each reads and hashes the
28.6 MiB it linked (from the page cache) before it stages it. Where the
3.1 s between the second node and the last, and the 1.3 s after it, go
is not profiled yet. The figure over three runs of this build on this
machine: 4,440 ms (`--only stage`), 4,822 and 5,399 ms (full runs, the
machine slower than on earlier days: the drain's limit 30,000/s where it
was 43,000). Before the entry was let go before the check, the checks
ran one at a time under the entry's lock, about 45 ms each: 7,080 ms in
a run of `--only stage`.

**Stage time, each node its own copy** (one run of `bench --only stage`,
8.9 s, before the host cache): the first node had the binary
0.5 s after the stage began, the 25th after 3.1 s, the 50th 4.5 s, the 75th
5.8 s, the 100th 7.7 s, and the controller saw the last one staged 1.0 s
later (its report, a heartbeat, committed behind the disk writes). 4 nodes
took the binary from the controller, 96 from peers. The floor is the disk:
each node writes its own 28.4 MiB copy, 2.98 GB for 100 nodes on this
machine's one disk, and `dd if=/dev/zero bs=1M count=2800` into a new file
on it takes 4.2 to 8.0 s (365 to 702 MB/s, nearly all of it kernel time on
one core; 1.7 s into tmpfs), more than the 5 s goal before any byte is
sent, hashed or reported. A fleet whose nodes each have a disk of their own
does not share that floor; a smaller binary lowers it (without symbols the
release binary is 23.3 MB instead of 29.8, and the backtraces of a shipped
binary would lose their function names).

**Fence time** (`perf record -g -p <controller>` at 1,999 Hz, the 0.6 s
after the fence request): the controller used about 1.1 of the 2 cores;
the bench's 10,000 simulated nodes, on the same machine, used the rest, so
the figure is bounded by both sharing two cores. Of the controller's time:
glibc malloc and free about 18% (`_int_malloc` 6.3%, `unlink_chunk`
3.9%, `_int_free` 3.3%, `free` 2.3%, `malloc_consolidate` 1.8%); waking
threads and switching tasks about 15% (`try_to_wake_up` 9.7%,
`finish_task_switch` 5.4%); socket writes and epoll about 10%; the
controller's own code (the watch handler, `desired_of`, the auth layer)
under 5%.
"#;

pub(super) const METHOD: &str = r#"
Each figure is the median of the runs (min–max in brackets); a ratio is the
median of the per-run ratios, each taken against the limit measured in the
same run. `handover bench --json` prints the same figures (and every run's).

## What each benchmark measures

1. **Redundant-channel drain.** A release-2 controller process
   (`controller --no-supervisor --release 2`, embedded SQLite, WAL,
   `synchronous=FULL`) with one channel. Eight in-process clients speak the
   node protocol: `hello` with its bootstrap token as release 1 (grant `deliver`),
   then `POST /node/v1/deliver` batches of 500 release-1 records
   (`record::encode(Schema(1), …)`, about 200 bytes each), one batch at a time
   per client, each sent after the previous one was acknowledged, as the
   shipper does. The clock runs from the first batch sent to the last
   acknowledgement; each acknowledgement comes after the upcast, the
   idempotent insert and the commit. The database must then hold every record,
   translated. **Limit:** the same rows, upcast beforehand, inserted into a
   fresh release-2 database by one in-process writer with the statement
   `store_batch` uses (`SqliteStore::insert_records`: multi-row INSERTs of
   100 records), one transaction per 1,000 rows.
2. **Node outbox.** `handover_node::store::Store::commit` on a fresh node.db:
   (a) the commit a producer tick makes on a node running two channels at a
   second boundary (a segment and viewer stats per channel, two progress rows
   and the stats second), (b) one record per commit. Every commit is durable
   (`synchronous=FULL`) before the next. **Limit:** `RawOutbox`, a file opened
   the same way with one outbox-shaped table and one INSERT per record, the
   same records per transaction.
3. **Fence.** A fresh release-2 controller; N simulated nodes in this process,
   each on its own TCP connection (source addresses 127.52.x.y), say `hello`
   as distinct node ids and then long-poll
   `GET /node/v1/watch?node=…&epoch=…&grant=full&wait_ms=25000&desired_rev=…`
   as `handover_node::session` does. Once all wait, `POST /api/v1/fence`.
   Latency per node: from sending the fence request until that node has read
   its `fenced` answer; the figure is the last one (every watcher fenced).
4. **Reconnect storm.** After the 10,000-node fence: unfence, stop the
   controller (SIGTERM), start it again on the same database, then every node
   says `hello` with its own credential at the same instant, each on a new
   connection, retrying as a node does (100 ms doubling) on any error. The
   figure runs from the go signal to the last `welcome` (grant `full`).
5. **Viewers.** A release-1 node under its supervisor serves one live channel
   (1 s segments); its controller is then restarted as release 2, so the node
   serves from its cache on `deliver`, as in an upgrade's deliver phase.
   (a) Playlists, then the newest segment, requested in tight loops by
   concurrent in-process clients (keep-alive), per second. (b) Viewers
   fetching the playlist and its newest segment every 100 ms: p99 over a
   steady period, then over the node's switch to release 2 (the supervisor's
   control socket: new worker on the same socket, ready after its
   parameters, old worker retired) plus 1.5 s after it. The bench triggers
   the switch directly, so the old worker is not quiesced first as the
   upgrade agent would do.
6. **Memory.** VmRSS from `/proc/PID/status`: the controller while the
   10,000 simulated nodes of benchmark 3 wait on the watch; the node worker
   of benchmark 5 (release 1, one live event, no viewers) one second after
   it got `deliver`.
7. **Upgrade overhead.** `handover demo --json --skip-naive` as a child
   process (3 groups of supervised primary and backup nodes, 6 channels,
   events of 20–40 s, viewers): `upgrade.total_ms −
   upgrade.waiting_for_operations_ms`.
8. **Stage.** A release-1 controller and 100 release-1 nodes under their
   supervisors (50 groups, each with a live event), the release-2 artifact
   of this binary uploaded (stored, and its zstd copy made), then an
   upgrade that pauses before the fence; twice: (a, b) the nodes sharing
   this host's artifact cache (`--artifact-cache`, one directory for all,
   as nodes run on one host would be; the run fails unless every node's
   staged binary is then one file, one inode), and (c, d) each node
   writing its own copy (as on hosts of their own, but all on this
   machine's one disk). (a, c) From the upgrade's start to the end of its
   stage phase, by the controller's own phase records: every node has
   its binary (downloaded, decompressed and digest-checked, or linked from
   the cache and digest-checked) placed. (b, d) The bytes the controller
   process wrote meanwhile (`wchar` of `/proc/PID/io`: sockets and files,
   so the little else it writes counts too), divided by the size of the
   artifact's binary: how many copies of the artifact the controller
   served.
9. **Drain on PostgreSQL.** Benchmark 1 with the controller's store on
   PostgreSQL (`--postgres`, default the tests' database `test` on
   127.0.0.1:5432; the controller gets `--database` with a schema of the
   run's own, dropped after). **Limit:** the same rows, upcast beforehand,
   sent by one in-process connection with `COPY records (…) FROM STDIN` in
   text format into the `records` table of a fresh release-2 store (another
   schema of the run's own), one `COPY` (its own committed transaction) per
   1,000 rows; the clock runs while the rows are sent and committed. When
   the server does not answer, the benchmark is skipped (its figures null,
   `skipped` says why) and the others run.
10. **Heartbeats.** A fresh release-2 controller (SQLite); N simulated nodes
   in this process, each on its own keep-alive connection (source addresses
   127.52.x.y), say `hello`, then each sends `POST /node/v1/heartbeat` with
   its credential and the body a node sends (`core::node::session`) once a
   second (the period of the default lease), the nodes' slots spread
   evenly over the second, one request in flight per node. A heartbeat due
   while its node's previous one is unanswered goes when that one is
   answered, and its latency counts from when it was due, so a slow
   controller shows in the latency instead of slowing the load. After a
   warm-up of 3 s, a window of 10 s: the heartbeats answered in it per
   second (against the N per second offered), and p50 / p99 of the latency
   of those due in it. The CPU the controller and this process (the
   simulated nodes) used over the window, in cores, from `/proc/PID/stat`.
11. **Takeover.** Three controller replicas (`controller` under their
   supervisors, 127.55.1.x) on one PostgreSQL store, a release-1 controller
   fleet with the release-2 artifact uploaded, and an upgrade paused at its
   fence phase. The replica leading the orchestrator is SIGKILLed; the
   operator's resume is sent every 20 ms, moving past the dead replica and
   past followers (503 `not_leader`) as the CLI does. The figure runs from
   the kill until a surviving replica's orchestrator stepped the upgrade
   under a new term: its first step in the store's step log
   (`upgrade_steps`, with the term and the replica's clock). The lease is
   2 s, so most of the figure is the lease running out.
"#;
