//! The sockets the supervisor binds once and never closes while it runs:
//! the listening socket (retried while a dying worker still holds it) and
//! the control socket.

use anyhow::{bail, Context};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::net::{TcpSocket, UnixListener, UnixStream};

/// Bound on connections waiting in the kernel while no worker accepts (the
/// kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG_CONNECTIONS: u32 = 4096;
/// Binds retries on EADDRINUSE: a worker of a supervisor that was just
/// SIGKILLed may hold the inherited socket for a moment before it dies too.
const BIND_RETRIES_MAX: u32 = 50;
const BIND_RETRY_MS: u64 = 100;

pub(super) async fn bind_listener_retrying(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let mut tries = 0;
    loop {
        match bind_listener(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < BIND_RETRIES_MAX => {
                tries += 1;
                if tries == 1 {
                    tracing::warn!(%addr, "address in use; retrying for a few seconds");
                }
                tokio::time::sleep(std::time::Duration::from_millis(BIND_RETRY_MS)).await;
            }
            other => return other,
        }
    }
}

/// The role's listening socket, bound once with SO_REUSEADDR. In blocking
/// mode as systemd passes sockets; a worker sets its own mode.
fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG_CONNECTIONS)?.into_std()?;
    listener.set_nonblocking(false)?;
    Ok(listener)
}

/// The control socket; a stale one from a killed supervisor is removed, a
/// live one means another supervisor owns this state dir.
pub(super) async fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another supervisor answers on {}; refusing to share its state dir",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("bind control socket {}", path.display()))?;
    // Only the owner (the supervisor's user, and so its workers) may steer it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restrict control socket {}", path.display()))?;
    Ok(listener)
}
