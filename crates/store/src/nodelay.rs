//! TCP_NODELAY on PostgreSQL connections. sqlx 0.9.0 connects without it
//! (launchbadge/sqlx#4335; fixed upstream after 0.9.0), so a statement longer
//! than one TCP segment waits for the server's delayed ACK whenever it ends
//! in an odd segment: 40 ms on Linux. A batch of a thousand attempt ends or
//! new jobs is such a statement on any network, and an enqueue with a few
//! kilobytes of input is one on a real network.
//!
//! Until sqlx sets the option again, each new connection asks the server which
//! port it comes from (`inet_client_port()`) and sets the option on this
//! process's socket with those ports. Where that socket cannot be found (a
//! proxy in between, a Unix socket, no `/proc`), nothing changes.

use std::os::fd::{BorrowedFd, RawFd};

use sqlx::PgConnection;

pub(super) async fn disable_nagle(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (client, server): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()").fetch_one(connection).await?;
    let port = |port: Option<i32>| port.and_then(|port| u16::try_from(port).ok());
    let (Some(local), Some(peer)) = (port(client), port(server)) else { return Ok(()) };
    if !set_nodelay(local, peer) {
        tracing::debug!(
            local,
            peer,
            "no socket of this process matches the ports the database sees; TCP_NODELAY not set"
        );
    }
    Ok(())
}

/// Sets TCP_NODELAY on this process's TCP socket from port `local` to port
/// `peer`; `false` when there is none.
fn set_nodelay(local: u16, peer: u16) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return false };
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<RawFd>().ok()) else { continue };
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was listed as open a moment ago and is only borrowed
        // for two socket calls. Were another thread to close it meanwhile,
        // those calls fail (EBADF) or reach whatever took its number, and
        // only a TCP socket on this very port is changed.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let port_of =
            |addr: std::io::Result<socket2::SockAddr>| addr.ok().and_then(|addr| addr.as_socket()).map(|a| a.port());
        if port_of(socket.local_addr()) == Some(local) && port_of(socket.peer_addr()) == Some(peer) {
            return socket.set_tcp_nodelay(true).is_ok();
        }
    }
    false
}
