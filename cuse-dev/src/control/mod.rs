//! The control socket: `luo status`, `luo run` registration and updates talk
//! to the daemon here, never through the exclusive device.
//!
//! One request per connection: a JSON line (with an fd attached for
//! `register`), answered by one JSON line.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sys;

pub mod server;

/// xattr on the device naming the control socket, so `luo run --device PATH`
/// finds its daemon.
pub const SOCKET_XATTR: &str = "user.luo.control";

/// Where a daemon serving a CUSE device `/dev/NAME` links `NAME.control` to
/// its control socket (a CUSE device has no xattrs).
pub const CUSE_LINKS: &str = "/run/luo";

/// The control socket of the daemon whose state dir is `state_dir`.
pub fn socket_in(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("control.sock")
}

/// A request to the daemon.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Sessions and state.
    Status,
    /// Take the attached seccomp listener of a `luo run` tree.
    Register,
    /// Freeze every outgoing session and flip the epoch (simulated reboot).
    Update,
    /// Unmount the device, release every preserved file, end the keeper.
    Shutdown,
    /// Freeze every outgoing session and stash them through kmod-shim for a
    /// real kexec (the caller has loaded the kernel and reboots next).
    KexecPrepare,
    /// The kexec did not happen: withdraw the stash, unfreeze, thaw.
    KexecAbort,
    /// Where the daemon's time went, per ioctl, since the last `Profile`
    /// (means; see `profile`), and a fresh start.
    Profile,
}

/// A file in a status report.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FileStatus {
    /// Its token.
    pub token: u64,
    /// Its handler.
    pub handler: String,
    /// Incoming: retrieved already.
    pub retrieved: bool,
    /// Incoming after a kexec: still in its kmod-shim stash, waiting for
    /// free huge pages to be rebuilt (why, as a sentence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// What the preserved object is, where its handler says (a VFIO
    /// device's PCI address and device node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// An FLB in a status report: global state shared by the files of one or
/// more handlers (`luo_flb.c`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FlbStatus {
    /// Its compatible string.
    pub compatible: String,
    /// Outgoing files depending on it.
    pub outgoing: u64,
    /// Incoming files depending on it.
    pub incoming: u64,
    /// Whether its incoming state was retrieved.
    pub retrieved: bool,
    /// What it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A session in a status report.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SessionStatus {
    /// Its name (escaped if not printable).
    pub name: String,
    /// "outgoing" or "incoming".
    pub direction: String,
    /// Incoming: a session fd was handed out.
    pub retrieved: bool,
    /// Its files.
    pub files: Vec<FileStatus>,
}

/// The daemon's answer.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not, as a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a successful request did, as a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Status: the device path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Status: the current epoch.
    #[serde(default)]
    pub epoch: u64,
    /// Status: every session.
    #[serde(default)]
    pub sessions: Vec<SessionStatus>,
    /// Status: `luo run` trees being served.
    #[serde(default)]
    pub luo_run_trees: usize,
    /// Status: every registered FLB.
    #[serde(default)]
    pub flbs: Vec<FlbStatus>,
    /// Status: how FUSE requests reach the daemon, `io_uring` or
    /// `/dev/fuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_transport: Option<String>,
    /// A progress report sent before the answer of a long request; the
    /// answer is the first line without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Profile: each ioctl's mean time per phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<crate::profile::ProfileRow>,
}

impl Response {
    /// A failure with a sentence.
    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Response::default()
        }
    }
}

/// Sends one JSON line, with an optional fd attached.
///
/// # Errors
/// Write failures.
pub fn send_line<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    // One send for the whole line (and the fd with its first byte): the
    // peer wakes once. A line larger than the socket's buffer goes out in
    // parts.
    let sent = sys::send_with_fd(stream.as_fd(), &line, fd)?;
    (&*stream).write_all(&line[sent..])
}

/// Receives one JSON line and the fd that came with it, if any.
///
/// # Errors
/// Timeouts, a peer that closes early, malformed JSON.
pub fn recv_line<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<(T, Option<OwnedFd>)> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut fd = None;
    while buf.last() != Some(&b'\n') {
        let (n, got) = sys::recv_with_fd(stream.as_fd(), &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        fd = fd.or(got);
        buf.extend_from_slice(&chunk[..n]);
    }
    let msg =
        serde_json::from_slice(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((msg, fd))
}

/// Connects, sends one request (with an optional fd) and waits for the
/// answer (and the fd that came with it).
///
/// # Errors
/// Connection or protocol failures.
pub fn exchange<Q: Serialize, R: DeserializeOwned>(
    socket: &Path,
    req: &Q,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<(R, Option<OwnedFd>)> {
    exchange_on(&UnixStream::connect(socket)?, req, fd)
}

/// Sends one request on an open connection and waits for the answer.
///
/// # Errors
/// Connection or protocol failures.
pub fn exchange_on<Q: Serialize, R: DeserializeOwned>(
    stream: &UnixStream,
    req: &Q,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<(R, Option<OwnedFd>)> {
    send_line(stream, req, fd)?;
    recv_line(stream)
}

/// Sends a request to the daemon and waits for its answer, passing every
/// progress report before it to `progress`; each may take up to `timeout`.
///
/// # Errors
/// Connection or protocol failures.
pub fn call_with_progress(
    socket: &Path,
    req: &Request,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> io::Result<Response> {
    use std::io::BufRead;
    let stream = UnixStream::connect(socket)?;
    send_line(&stream, req, None)?;
    stream.set_read_timeout(Some(timeout))?;
    // Several lines may arrive in one read: a buffered reader keeps the rest.
    let mut lines = io::BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        let r: Response = serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match &r.progress {
            Some(p) => progress(p),
            None => return Ok(r),
        }
    }
}

/// Sends a request to the daemon and waits for its answer.
///
/// # Errors
/// Connection or protocol failures.
pub fn call(socket: &Path, req: &Request, fd: Option<BorrowedFd<'_>>) -> io::Result<Response> {
    exchange(socket, req, fd).map(|(r, _)| r)
}
