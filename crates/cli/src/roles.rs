//! How `handover controller` and `handover node` run: as a supervisor that
//! owns the listening socket and runs a worker child of the chosen release
//! (the default), as that worker (started by a supervisor, socket passed as
//! `LISTEN_FDS`), or bare (`--no-supervisor`: binds the socket itself).

use anyhow::Context;
use handover_supervisor::{Release, SupervisorConfig};
use std::net::SocketAddr;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Supervisor,
    Worker,
    Bare,
}

pub fn mode(no_supervisor: bool) -> Mode {
    if std::env::var(handover_supervisor::ENV_WORKER).is_ok_and(|v| v == "1") {
        Mode::Worker
    } else if no_supervisor {
        Mode::Bare
    } else {
        Mode::Supervisor
    }
}

/// The socket a worker serves on: inherited from its supervisor, or bound here.
pub async fn listener(mode: Mode, addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    if mode == Mode::Worker {
        let std = handover_supervisor::inherited_listener()
            .context("cannot take the socket passed by the supervisor")?
            .context(
                "started as a worker (HANDOVER_WORKER=1) but no socket was passed (LISTEN_FDS)",
            )?;
        std.set_nonblocking(true)
            .context("cannot make the inherited socket non-blocking")?;
        return tokio::net::TcpListener::from_std(std).context("cannot use the inherited socket");
    }
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().with_context(|| format!("cannot listen on {addr}"))
}

/// Connections the kernel queues until the process accepts them, as the
/// supervisor's socket does (tokio's default is 1024): 10,000 nodes
/// reconnecting at once otherwise wait seconds in SYN retransmission.
const LISTEN_BACKLOG: u32 = 4096;

/// The controller's `--database` (a `postgres://` URL) from the
/// environment: a controller's workers inherit it, so every release it
/// switches to opens the same store.
pub const DATABASE_ENV: &str = "HANDOVER_DATABASE";

/// Runs the supervisor for one role until a signal; `tls`: its socket
/// serves TLS (the health probe speaks it).
pub async fn supervise(
    name: &str,
    listen: SocketAddr,
    data_dir: &Path,
    release: u32,
    worker_args: Vec<String>,
    tls: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find this binary to start the worker")?;
    handover_private::dir(data_dir).context("the data dir")?;
    let mut config = SupervisorConfig::new(
        name,
        listen,
        data_dir.join(handover_supervisor::STATE_DIR_NAME),
        Release::new(release, binary),
        worker_args,
    );
    config.health_tls = tls;
    handover_supervisor::run(config, shutdown).await
}
