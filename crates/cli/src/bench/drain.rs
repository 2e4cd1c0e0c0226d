//! Benchmarks 1 and 9, the redundant-channel drain: `drain` with the
//! controller's store on SQLite, against a raw batched insert;
//! `drain_postgres` with the store on PostgreSQL, against a raw `COPY` of
//! the same rows.

use super::*;
use sqlx::Connection as _;

/// Where the drain's controller keeps its store, and so which limit it is
/// held against.
#[derive(Clone, Copy, Debug)]
pub(super) enum DrainStore<'a> {
    /// SQLite in the controller's data dir (the default store).
    Sqlite,
    /// A schema of the run's own on the PostgreSQL server of `server_url`
    /// (a `postgres://` URL without `schema`), dropped after the run.
    Postgres { server_url: &'a str },
}

impl DrainStore<'_> {
    /// The benchmark's name: the prefix of its figures and its data dir.
    pub(super) fn name(self) -> &'static str {
        match self {
            DrainStore::Sqlite => "drain",
            DrainStore::Postgres { .. } => "drain_postgres",
        }
    }
}

pub(super) fn drain_observation(k: usize, base_ms: i64) -> Observation {
    let kind = match k % 50 {
        0 => Kind::ViewerStats,
        25 => Kind::Alert,
        _ => Kind::SegmentPublished,
    };
    let seg = kind == Kind::SegmentPublished;
    Observation {
        kind,
        channel: "ch1".into(),
        channel_id: Some(1),
        at_ms: base_ms + (k as i64) * 20,
        media_seq: seg.then_some(k as u64),
        duration_ms: seg.then_some(1000),
        viewers: (kind == Kind::ViewerStats).then_some((k % 997) as u32),
        event_id: None,
        // Brings a release-1 record to about 200 bytes of JSON.
        message: Some(format!(
            "segment {k:08} of ch1 ready at 1080p/6000 kbps, 720p/3000 kbps, 480p/1200 kbps; origin ok; cdn purge queued"
        )),
        severity: (kind == Kind::Alert).then_some(Severity::Warning),
    }
}

/// Serialised batches, each with its first sequence number.
pub(super) type Batches = Vec<(u64, Vec<u8>)>;

/// Batches of release-1 records of one node, serialised as the shipper sends them.
pub(super) fn drain_batches(
    node_id: &str,
    epoch: u64,
    records: usize,
    per_batch: usize,
    base_ms: i64,
) -> anyhow::Result<(Batches, usize)> {
    let mut out = Vec::new();
    let mut record_bytes = 0usize;
    let mut first = 0usize;
    while first < records {
        let n = per_batch.min(records - first);
        let mut values = Vec::with_capacity(n);
        for k in first..first + n {
            let v = record::encode(Schema(1), node_id, &drain_observation(k, base_ms))?;
            record_bytes += v.to_string().len();
            values.push(v);
        }
        let batch = Batch {
            v: handover_core::wire::MESSAGE_VERSION,
            node_id: node_id.to_owned(),
            epoch,
            schema: Schema(1),
            first_seq: first as u64 + 1,
            records: values,
        };
        out.push(((first + n) as u64, serde_json::to_vec(&batch)?));
        first += n;
    }
    Ok((out, record_bytes))
}

/// Pause between spawning the shippers and starting the clock, so every one
/// waits at the start line (`go`) when it opens.
const START_LINE_MS: u64 = 50;

pub(super) async fn drain(
    exe: &Path,
    dir: &Path,
    s: &Sizes,
    store: DrainStore<'_>,
) -> anyhow::Result<Figures> {
    let name = store.name();
    let mut fleet = Fleet::new(exe, &dir.join(name), SUBNET_DRAIN)?;
    // The drain's clients speak plain HTTP on loopback (TLS not measured here).
    fleet.plain_http()?;
    fleet.supervised = false;
    if let DrainStore::Postgres { server_url } = store {
        fleet.use_postgres(server_url).await?;
    }
    fleet.start_controller(2).await?;
    create_channel(&fleet).await?;
    let base_ms = crate::client::now_ms();
    let url = fleet.controller_url();
    let total = s.drain_nodes * s.drain_records_per_node;

    // Every node says hello as release 1 and gets `deliver`; its batches are
    // built before the clock starts (a node reads them from its outbox).
    let mut clients = Vec::new();
    let mut record_bytes = 0usize;
    let ids: Vec<String> = (0..s.drain_nodes).map(|i| format!("drain-{i}")).collect();
    let tokens = fleet.add_simulated_nodes(&ids).await?;
    for (node_id, token) in ids.into_iter().zip(tokens) {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(ANSWER_TIMEOUT)
            .build()?;
        let hello = hello_body(&node_id, &token, 1, &node_id, true)?;
        let r = http
            .post(format!("{url}/node/v1/hello"))
            .header("content-type", "application/json")
            .body(hello)
            .send()
            .await?;
        let status = r.status().as_u16();
        let w: Welcome = parse(status, &r.bytes().await?, "hello")?;
        ensure!(
            w.grant == Grant::Deliver,
            "a release-1 node got grant {} from a release-2 controller, not deliver",
            w.grant
        );
        let (batches, bytes) = drain_batches(
            &node_id,
            w.epoch,
            s.drain_records_per_node,
            s.drain_batch_records,
            base_ms,
        )?;
        record_bytes += bytes;
        clients.push((http, w.credential, batches));
    }

    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for (http, credential, batches) in clients {
        let mut go = go_rx.clone();
        let endpoint = format!("{url}/node/v1/deliver");
        tasks.spawn(async move {
            go.wait_for(|g| *g).await?;
            // One batch at a time, like the shipper: the next goes after the ack.
            for (last, body) in batches {
                let r = http
                    .post(&endpoint)
                    .bearer_auth(&credential)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let ack: BatchAck = parse(status, &r.bytes().await?, "deliver")?;
                ensure!(
                    ack.acked_through == last,
                    "acked through {} instead of {last}",
                    ack.acked_through
                );
            }
            anyhow::Ok(Instant::now())
        });
    }
    tokio::time::sleep(Duration::from_millis(START_LINE_MS)).await;
    let t0 = Instant::now();
    go_tx.send_replace(true);
    let mut last_ack = t0;
    while let Some(r) = tasks.join_next().await {
        last_ack = last_ack.max(r??);
    }
    let elapsed = last_ack - t0;
    let summary: Vec<RecordSummary> = fleet.op.get("/api/v1/records/summary").await?;
    let stored: u64 = summary.iter().map(|r| r.records).sum();
    let translated: u64 = summary.iter().map(|r| r.translated).sum();
    ensure!(
        stored == total as u64 && translated == total as u64,
        "the database holds {stored} records ({translated} translated), expected {total}"
    );
    fleet.stop_all().await?;
    // Its PostgreSQL schema, if any, goes now: the limit runs on a quiet server.
    drop(fleet);

    let limit = match store {
        DrainStore::Sqlite => drain_limit(dir, s, base_ms).await?,
        DrainStore::Postgres { server_url } => copy_limit(server_url, s, base_ms).await?,
    };
    let rate = total as f64 / elapsed.as_secs_f64();
    let mut f = Figures::new();
    let key = |k: &str| format!("{name}.{k}");
    put(&mut f, &key("records_per_s"), rate);
    put(&mut f, &key("limit_records_per_s"), limit);
    put(&mut f, &key("ratio"), rate / limit);
    put(&mut f, &key("records"), total as f64);
    put(
        &mut f,
        &key("record_bytes"),
        record_bytes as f64 / total as f64,
    );
    put(&mut f, &key("elapsed_ms"), ms(elapsed));
    Ok(f)
}

/// The records node `node_id` queues in the drain, upcast to schema 2 as the
/// controller stores them.
fn upcast_records(
    node_id: &str,
    s: &Sizes,
    base_ms: i64,
    directory: &record::ChannelDirectory,
) -> anyhow::Result<Vec<AnyRecord>> {
    Ok((0..s.drain_records_per_node)
        .map(|k| {
            let raw = record::encode(Schema(1), node_id, &drain_observation(k, base_ms))?;
            record::upcast(Schema(1), Schema(2), &raw, node_id, directory)
        })
        .collect::<Result<_, _>>()?)
}

/// The same rows, upcast beforehand, inserted by one in-process writer into a
/// fresh release-2 database, one transaction per `raw_rows_per_transaction`.
pub(super) async fn drain_limit(dir: &Path, s: &Sizes, base_ms: i64) -> anyhow::Result<f64> {
    let d = dir.join("drain-limit");
    std::fs::create_dir_all(&d)?;
    let store = handover_store::sqlite::SqliteStore::open(
        &d.join("controller.db"),
        Release(2),
        &d.join("snapshots"),
    )
    .await?;
    store.create_channel(&bench_channel()).await?;
    let (directory, _) = store.channel_directory().await?;
    let mut spent = Duration::ZERO;
    let mut rows = 0usize;
    for i in 0..s.drain_nodes {
        let node_id = format!("drain-{i}");
        let upcast = upcast_records(&node_id, s, base_ms, &directory)?;
        for (c, chunk) in upcast.chunks(s.raw_rows_per_transaction).enumerate() {
            let first_seq = (c * s.raw_rows_per_transaction) as u64 + 1;
            let t = Instant::now();
            let n = store
                .insert_records(&node_id, first_seq, chunk, Some(1))
                .await?;
            spent += t.elapsed();
            rows += usize::try_from(n).unwrap_or(0);
        }
    }
    ensure!(
        rows == s.drain_nodes * s.drain_records_per_node,
        "raw insert stored {rows}"
    );
    Ok(rows as f64 / spent.as_secs_f64())
}

/// The same rows, upcast beforehand, sent by one in-process writer with
/// `COPY … FROM STDIN` (text format) into the `records` table of a fresh
/// release-2 store in a schema of its own on the same server (dropped
/// after), one `COPY` (its own transaction, committed) per
/// `raw_rows_per_transaction` rows. The clock runs while the rows are sent
/// and committed (formatted before, as the SQLite limit's are upcast before).
pub(super) async fn copy_limit(server_url: &str, s: &Sizes, base_ms: i64) -> anyhow::Result<f64> {
    let db = crate::fleet::FleetDatabase::create(server_url, "bench_copy").await?;
    let store = handover_store::postgres::PostgresStore::open(db.url(), Release(2)).await?;
    store.create_channel(&bench_channel()).await?;
    let (directory, channel_names) = store.channel_directory().await?;
    store.close().await;
    let schema = db.target()?.schema().clone();
    let mut conn = sqlx::PgConnection::connect(server_url)
        .await
        .context("cannot connect for the raw COPY")?;
    let mut spent = Duration::ZERO;
    let mut rows = 0u64;
    for i in 0..s.drain_nodes {
        let node_id = format!("drain-{i}");
        let upcast = upcast_records(&node_id, s, base_ms, &directory)?;
        for (c, chunk) in upcast.chunks(s.raw_rows_per_transaction).enumerate() {
            let first_seq = c * s.raw_rows_per_transaction + 1;
            let numbered: Vec<(i64, &AnyRecord)> = (first_seq as i64..).zip(chunk).collect();
            // The text the store's own COPY sends.
            let (columns, text) =
                handover_store::postgres::copy_text(&node_id, &numbered, Some(1), &channel_names)?;
            let statement = format!(
                "COPY \"{}\".records ({columns}) FROM STDIN",
                schema.as_str()
            );
            let t = Instant::now();
            let mut copy = conn.copy_in_raw(&statement).await?;
            copy.send(text.as_bytes()).await?;
            rows += copy.finish().await?;
            spent += t.elapsed();
        }
    }
    conn.close().await?;
    ensure!(
        rows == (s.drain_nodes * s.drain_records_per_node) as u64,
        "raw COPY stored {rows}"
    );
    Ok(rows as f64 / spent.as_secs_f64())
}
