//! One fresh store per test on either backend: a SQLite file in a temporary
//! directory, or a PostgreSQL schema of its own (created by the store,
//! dropped when the [`Db`] is, a failing test included), so tests run in
//! parallel on one server. [`on_both!`] runs a test body on each.

#![allow(dead_code)] // each test target uses a part

use handover_core::{Release, ReleaseInfo};
use handover_store::postgres::{PostgresStore, Target};
use handover_store::sqlite::SqliteStore;
use handover_store::{Store, StoreError};
use std::sync::atomic::{AtomicU32, Ordering};

/// The server the PostgreSQL tests use (a database on it), unless
/// `HANDOVER_TEST_POSTGRES` names another.
pub const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where one test's store lives.
pub struct Db {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    /// The URL with this test's own `schema` (PostgreSQL only).
    url: String,
    base_url: String,
    schema: String,
}

/// Runs `body` (an async block over `$db: Db`) once on SQLite and once on
/// PostgreSQL, as the tests `$name::sqlite` and `$name::postgres`.
#[macro_export]
macro_rules! on_both {
    ($(#[$meta:meta])* async fn $name:ident($db:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let $db = $crate::support::Db::fresh($crate::support::Backend::Sqlite).await;
                $body
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let $db = $crate::support::Db::fresh($crate::support::Backend::Postgres).await;
                $body
            }
        }
    };
}

impl Db {
    pub async fn fresh(backend: Backend) -> Db {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base_url = std::env::var("HANDOVER_TEST_POSTGRES")
            .unwrap_or_else(|_| POSTGRES_URL_DEFAULT.to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!(
            "t_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let sep = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{sep}schema={schema}");
        let db = Db {
            backend,
            dir: tempfile::tempdir().unwrap(),
            url,
            base_url,
            schema,
        };
        if backend == Backend::Postgres {
            if let Err(e) = db.pg_pool().await {
                panic!(
                    "PostgreSQL is not reachable at {}: {e}. Start it (`pg_ctlcluster 15 main \
                     start`; .ci/run does) or set HANDOVER_TEST_POSTGRES to a server's URL",
                    Target::parse(&db.base_url)
                        .map(|t| t.redacted().to_owned())
                        .unwrap_or_default()
                );
            }
        }
        db
    }

    /// The `--database` URL of this store (PostgreSQL).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn open(&self, release: u32) -> Box<dyn Store> {
        self.try_open(release).await.unwrap()
    }

    pub async fn try_open(&self, release: u32) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => Box::new(
                SqliteStore::open(&self.sqlite_path(), Release(release), &self.snapshots()).await?,
            ),
            Backend::Postgres => Box::new(PostgresStore::open(&self.url, Release(release)).await?),
        })
    }

    pub async fn open_as(&self, info: &'static ReleaseInfo) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => {
                Box::new(SqliteStore::open_as(&self.sqlite_path(), info, &self.snapshots()).await?)
            }
            Backend::Postgres => Box::new(PostgresStore::open_as(&self.url, info).await?),
        })
    }

    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self.dir.path().join("db.sqlite")
    }

    fn snapshots(&self) -> std::path::PathBuf {
        self.dir.path().join("snapshots")
    }

    /// Whether the copy taken before migrating from `schema` exists (a
    /// snapshot file, or a PostgreSQL schema).
    pub async fn has_pre_upgrade_copy(&self, schema: u32) -> bool {
        match self.backend {
            Backend::Sqlite => self
                .snapshots()
                .join(format!("schema-{schema}-0.db"))
                .exists(),
            Backend::Postgres => {
                let pool = self.pg_pool().await.unwrap();
                let name = format!("{}_pre_schema_{schema}", self.schema);
                let found: Option<String> = sqlx::query_scalar(
                    "SELECT schema_name::TEXT FROM information_schema.schemata WHERE schema_name = $1",
                )
                .bind(&name)
                .fetch_optional(&pool)
                .await
                .unwrap();
                pool.close().await;
                found.is_some()
            }
        }
    }

    /// A plain connection pool onto this store's tables (PostgreSQL).
    pub async fn pg_pool(&self) -> Result<sqlx::PgPool, sqlx::Error> {
        use std::str::FromStr;
        let options = sqlx::postgres::PgConnectOptions::from_str(&self.base_url)?
            .options([("search_path", self.schema.as_str())]);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_with(options)
            .await
    }

    async fn sqlite_pool(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}", self.sqlite_path().display()))
            .await
            .unwrap()
    }

    /// Every column of every record, in order: what "equal rows" means.
    pub async fn record_rows(&self) -> Vec<String> {
        const SQL: &str = "SELECT node_id, seq, kind, channel_id, produced_at_ms, media_seq, duration_ms, viewers,
            event_id, message, natural_key, translated_from, severity FROM records ORDER BY node_id, seq";
        macro_rules! render {
            ($rows:expr) => {{
                use sqlx::Row;
                $rows
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} {} {} {} {:?} {:?} {:?} {:?} {:?} {} {:?} {:?}",
                            r.get::<String, _>(0),
                            r.get::<i64, _>(1),
                            r.get::<String, _>(2),
                            r.get::<i64, _>(3),
                            r.get::<i64, _>(4),
                            r.get::<Option<i64>, _>(5),
                            r.get::<Option<i64>, _>(6),
                            r.get::<Option<i64>, _>(7),
                            r.get::<Option<i64>, _>(8),
                            r.get::<Option<String>, _>(9),
                            r.get::<String, _>(10),
                            r.get::<Option<i64>, _>(11),
                            r.get::<Option<String>, _>(12),
                        )
                    })
                    .collect::<Vec<String>>()
            }};
        }
        match self.backend {
            Backend::Sqlite => {
                let pool = self.sqlite_pool().await;
                let rows = sqlx::query(SQL).fetch_all(&pool).await.unwrap();
                pool.close().await;
                render!(rows)
            }
            Backend::Postgres => {
                let pool = self.pg_pool().await.unwrap();
                let rows = sqlx::query(SQL).fetch_all(&pool).await.unwrap();
                pool.close().await;
                render!(rows)
            }
        }
    }

    /// Whether the table takes this schema-3 `records` row (its CHECK).
    pub async fn insert_record_row(&self, seq: i64, kind: &str, severity: Option<&str>) -> bool {
        match self.backend {
            Backend::Sqlite => {
                let pool = self.sqlite_pool().await;
                let done = sqlx::query(
                    "INSERT INTO records (node_id, seq, kind, channel_id, produced_at_ms, natural_key, severity)
                     VALUES ('n1', ?, ?, 1, 0, ?, ?)",
                )
                .bind(seq)
                .bind(kind)
                .bind(format!("k{seq}"))
                .bind(severity)
                .execute(&pool)
                .await;
                pool.close().await;
                done.is_ok()
            }
            Backend::Postgres => {
                let pool = self.pg_pool().await.unwrap();
                let done = sqlx::query(
                    "INSERT INTO records (node_id, seq, kind, channel_id, produced_at_ms, natural_key, severity)
                     VALUES ('n1', $1, $2, 1, 0, $3, $4)",
                )
                .bind(seq)
                .bind(kind)
                .bind(format!("k{seq}"))
                .bind(severity)
                .execute(&pool)
                .await;
                pool.close().await;
                done.is_ok()
            }
        }
    }
}

impl Drop for Db {
    /// Drops this test's PostgreSQL schemas, also when the test failed: on a
    /// thread of its own, since the test's runtime may be gone or busy.
    fn drop(&mut self) {
        if self.backend != Backend::Postgres {
            return;
        }
        let url = self.url.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let target = Target::parse(&url).map_err(|e| e.to_string())?;
                target.drop_schemas().await.map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop the test's PostgreSQL schema: {e}");
        }
    }
}
