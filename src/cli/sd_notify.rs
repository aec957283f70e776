//! systemd's readiness protocol (`sd_notify(3)`): one datagram per state
//! change to the Unix socket named by `NOTIFY_SOCKET` (a path, or `@name`
//! for the abstract namespace). A no-op when the variable is unset, so the
//! daemon behaves the same outside systemd.
//!
//! Must not: fail the daemon. A notification that cannot be sent is
//! logged; systemd then times the start out, which says more than we
//! could.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`, `STOPPING=1`, `STATUS=…`) to the
/// service manager, if there is one.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else { return };
    if let Err(e) = send(&target, state) {
        tracing::warn!(error = %e, socket = ?target, "cannot notify the service manager");
    }
}

fn send(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'@') => send_abstract(&socket, &bytes[1..], state),
        Some(b'/') => socket.send_to(state.as_bytes(), std::path::Path::new(target)).map(|_| ()),
        _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is neither a path nor @name")),
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract sockets need Linux"))
}
