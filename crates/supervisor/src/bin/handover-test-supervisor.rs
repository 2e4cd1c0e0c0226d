//! TEST FIXTURE, not a product binary: runs `handover_supervisor::run` as a
//! process of its own, so the process tests can SIGKILL it.
//!
//! `handover-test-supervisor --name N --listen ADDR --state-dir DIR
//!  --initial-release N --initial-binary PATH [--ready-timeout-ms MS]
//!  [--stop-grace-ms MS] [-- WORKER_ARGS...]`
//!
//! Stops gracefully on SIGTERM or SIGINT.

use std::process::ExitCode;

use anyhow::{bail, Context};
use handover_supervisor::{Release, SupervisorConfig};
use tokio::signal::unix::{signal, SignalKind};

fn parse_args() -> anyhow::Result<SupervisorConfig> {
    let mut name = None;
    let mut listen = None;
    let mut state_dir = None;
    let mut release = None;
    let mut binary = None;
    let mut ready_timeout_ms = None;
    let mut stop_grace_ms = None;
    let mut worker_args = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--" {
            worker_args.extend(it.by_ref());
            break;
        }
        let value = it.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--name" => name = Some(value),
            "--listen" => listen = Some(value.parse().context("--listen")?),
            "--state-dir" => state_dir = Some(value),
            "--initial-release" => release = Some(value.parse().context("--initial-release")?),
            "--initial-binary" => binary = Some(value),
            "--ready-timeout-ms" => {
                ready_timeout_ms = Some(value.parse().context("--ready-timeout-ms")?)
            }
            "--stop-grace-ms" => stop_grace_ms = Some(value.parse().context("--stop-grace-ms")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let mut config = SupervisorConfig::new(
        name.context("--name is required")?,
        listen.context("--listen is required")?,
        state_dir.context("--state-dir is required")?,
        Release {
            release: release.context("--initial-release is required")?,
            binary: binary.context("--initial-binary is required")?.into(),
        },
        worker_args,
    );
    if let Some(ms) = ready_timeout_ms {
        config.ready_timeout_ms = ms;
    }
    if let Some(ms) = stop_grace_ms {
        config.stop_grace_ms = ms;
    }
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = parse_args().and_then(|config| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("runtime")?
            .block_on(async move {
                let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
                let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = sigterm.recv() => {}
                        _ = sigint.recv() => {}
                    }
                };
                handover_supervisor::run(config, shutdown).await
            })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handover-test-supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
