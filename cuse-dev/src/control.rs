//! The control socket: `luo status`, `luo run` registration and updates talk
//! to the daemon here, never through the exclusive device.
//!
//! One request per connection: a JSON line (with an fd attached for
//! `register`), answered by one JSON line.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::sys;

/// xattr on the device naming the control socket, so `luo run --device PATH`
/// finds its daemon.
pub const SOCKET_XATTR: &str = "user.luo.control";

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

/// Sends a request (with an optional fd) and waits for the answer.
///
/// # Errors
/// Connection or protocol failures.
pub fn call(socket: &Path, req: &Request, fd: Option<BorrowedFd<'_>>) -> io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    sys::send_with_fd(stream.as_fd(), &line, fd)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads one request on the daemon side.
///
/// # Errors
/// Timeouts, disconnects and malformed JSON.
pub fn read_request(stream: &UnixStream) -> io::Result<(Request, Option<OwnedFd>)> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 4096];
    let (mut n, fd) = sys::recv_with_fd(stream.as_fd(), &mut buf)?;
    while n > 0 && buf[n - 1] != b'\n' && n < buf.len() {
        let (more, _) = sys::recv_with_fd(stream.as_fd(), &mut buf[n..])?;
        if more == 0 {
            break;
        }
        n += more;
    }
    let req = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((req, fd))
}

/// Writes the answer on the daemon side.
///
/// # Errors
/// Write failures.
pub fn write_response(mut stream: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp)?;
    line.push(b'\n');
    stream.write_all(&line)
}
