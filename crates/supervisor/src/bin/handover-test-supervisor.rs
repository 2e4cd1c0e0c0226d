//! TEST FIXTURE, not a product binary: runs `handover_supervisor::run` as a
//! process of its own, so the process tests can SIGKILL it.
//!
//! `handover-test-supervisor --name N --listen ADDR --state-dir DIR
//!  --initial-release N --initial-binary PATH [--ready-timeout-ms MS]
//!  [--stop-grace-ms MS] [-- WORKER_ARGS...]`
//!
//! Stops gracefully on SIGTERM or SIGINT.
//!
//! Like `handover`, the same binary is also the worker: with
//! `HANDOVER_WORKER=1` it runs the worker fixture (`fixture/worker.rs`), so a
//! copy of it can be a release the supervisor re-executes into.
//!
//! `handover-test-supervisor --pdeathsig-probe same-thread|other-thread`:
//! the experiment behind the spawner's design. A thread forks `sleep` with
//! `PR_SET_PDEATHSIG=SIGKILL` and prints its pid; then that same thread, or
//! another one while the forking thread lives on, execs `sleep`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::mpsc;

use anyhow::{bail, Context};
use handover_supervisor::{Release, SupervisorConfig};
use tokio::signal::unix::{signal, SignalKind};

#[path = "fixture/worker.rs"]
mod worker;

/// What the probe's child and the probe itself run: long enough for a test
/// to look, short enough to end by itself if a test forgets it.
const PROBE_SLEEP_S: &str = "60";

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
        Release::new(
            release.context("--initial-release is required")?,
            binary.context("--initial-binary is required")?,
        ),
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

/// Forks `sleep` with PDEATHSIG on this thread; its pid.
fn fork_with_pdeathsig() -> anyhow::Result<u32> {
    let mut command = Command::new("sleep");
    command.arg(PROBE_SLEEP_S);
    // SAFETY: prctl is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Not waited for: the test reads its fate from /proc.
    let child = command.spawn().context("spawn sleep")?;
    let pid = child.id();
    std::mem::forget(child);
    println!("{pid}");
    std::io::stdout().flush().context("stdout")?;
    Ok(pid)
}

fn pdeathsig_probe(mode: &str) -> anyhow::Result<()> {
    let same_thread = match mode {
        "same-thread" => true,
        "other-thread" => false,
        other => bail!("--pdeathsig-probe same-thread|other-thread, not {other:?}"),
    };
    let (forked, pid) = mpsc::channel();
    let (_keep_alive, park) = mpsc::channel::<()>();
    let forker = std::thread::spawn(move || -> anyhow::Result<()> {
        let pid = fork_with_pdeathsig()?;
        if same_thread {
            let e = Command::new("sleep").arg(PROBE_SLEEP_S).exec();
            bail!("exec from the forking thread: {e}");
        }
        let _ = forked.send(pid);
        // Lives until the exec ends it with every other thread.
        let _ = park.recv();
        Ok(())
    });
    if same_thread {
        return forker
            .join()
            .map_err(|_| anyhow::anyhow!("forking thread panicked"))?;
    }
    pid.recv().context("the forking thread ended")?;
    let e = Command::new("sleep").arg(PROBE_SLEEP_S).exec();
    bail!("exec from the main thread: {e}")
}

fn main() -> ExitCode {
    if std::env::var(handover_supervisor::ENV_WORKER).is_ok_and(|v| v == "1") {
        return worker::main();
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--pdeathsig-probe") {
        let mode = args.get(2).map(String::as_str).unwrap_or_default();
        return match pdeathsig_probe(mode) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("handover-test-supervisor: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
