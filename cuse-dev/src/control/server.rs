//! The daemon's side of the control socket: connections served from the
//! daemon's event loop without ever waiting on one.
//!
//! A client can be slow, stop reading, or send without end; none of that may
//! hold the daemon up for other callers. So every connection is non-blocking:
//! its request is collected as bytes arrive (at most [`MAX_REQUEST`] of them,
//! within [`IDLE`] of each other), its answer goes out as the peer takes it,
//! and a connection that stalls for [`IDLE`] is dropped. At most
//! [`MAX_CONNECTIONS`] are open at once.
//!
//! Who may ask what is decided by the peer's credentials (`SO_PEERCRED`, at
//! connect time): root may ask anything; members of the status group (if
//! the daemon has one, `luo daemon --status-group`) may only ask `status`.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::control::{Request, Response};
use crate::sys;

/// The longest request line (a request is a few dozen bytes).
pub const MAX_REQUEST: usize = 64 << 10;
/// How long a connection may go without progress before it is dropped.
pub const IDLE: Duration = Duration::from_secs(5);
/// Connections open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;

/// What a peer may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anything (root).
    Full,
    /// `status` only (a member of the status group).
    Status,
}

/// Who may connect: root, and the members of an optional status group.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// The group whose members may ask for `status`.
    pub status_group: Option<u32>,
}

impl Policy {
    /// What the peer of `stream` may ask, if anything.
    pub fn access(&self, stream: &UnixStream) -> Option<Access> {
        let cred = sys::peer_cred(stream.as_fd()).ok()?;
        if cred.uid == 0 {
            return Some(Access::Full);
        }
        let group = self.status_group?;
        let member =
            cred.gid == group || sys::peer_groups(stream.as_fd()).is_ok_and(|g| g.contains(&group));
        member.then_some(Access::Status)
    }
}

/// A request that arrived whole.
pub struct Incoming {
    /// The request.
    pub request: Request,
    /// The fd that came with it (`register`).
    pub fd: Option<OwnedFd>,
    /// The peer's pid.
    pub pid: i32,
}

struct Conn {
    stream: UnixStream,
    /// None: the peer may ask nothing; its request is answered with why.
    access: Option<Access>,
    input: Vec<u8>,
    fd: Option<OwnedFd>,
    output: Vec<u8>,
    sent: usize,
    /// The request has been answered (the connection ends once sent).
    answered: bool,
    deadline: Instant,
}

/// The control socket and its connections.
pub struct ControlServer {
    listener: UnixListener,
    policy: Policy,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    /// An fd held back for a daemon out of fds (see [`ControlServer::shed`]).
    spare: Option<OwnedFd>,
}

/// What became of a connection after an event.
pub enum Event {
    /// Nothing to do yet.
    Pending,
    /// A request to answer with [`ControlServer::answer`].
    Request(Incoming),
}

impl ControlServer {
    /// Serves `listener` (made non-blocking here); connections get epoll
    /// tokens from `first_token` on.
    ///
    /// # Errors
    /// The listener cannot be made non-blocking.
    pub fn new(listener: UnixListener, policy: Policy, first_token: u64) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            policy,
            conns: HashMap::new(),
            next_token: first_token,
            spare: spare_fd(),
        })
    }

    /// The listening socket, for the event loop.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Whether `token` names one of our connections.
    pub fn owns(&self, token: u64) -> bool {
        self.conns.contains_key(&token)
    }

    /// Accepts every pending connection; refuses peers the policy does not
    /// know, and any beyond [`MAX_CONNECTIONS`].
    pub fn accept(&mut self, epoll: &sys::Epoll) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if !self.shed() {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            };
            if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let access = self.policy.access(&stream);
            let token = self.next_token;
            if epoll.add(stream.as_raw_fd(), token).is_err() {
                continue;
            }
            self.next_token += 1;
            let conn = Conn {
                stream,
                access,
                input: Vec::new(),
                fd: None,
                output: Vec::new(),
                sent: 0,
                answered: false,
                deadline: Instant::now() + IDLE,
            };
            self.conns.insert(token, conn);
        }
    }

    /// Out of fds with a connection pending, which would wake the event loop
    /// again at once, forever: takes it with the spare fd and closes it (the
    /// peer sees the connection end and may try again). False if there was
    /// no spare.
    fn shed(&mut self) -> bool {
        if self.spare.take().is_none() {
            return false;
        }
        let shed = self.listener.accept().is_ok();
        self.spare = spare_fd();
        if shed {
            crate::log::warn(format_args!(
                "out of fds: a control connection was closed unanswered"
            ));
        }
        shed
    }

    /// Serves an event on connection `token`: reads what arrived, or sends
    /// what the peer can take.
    pub fn on_event(&mut self, token: u64, epoll: &sys::Epoll) -> Event {
        let Some(conn) = self.conns.get_mut(&token) else {
            return Event::Pending;
        };
        if conn.answered {
            self.flush(token, epoll);
            return Event::Pending;
        }
        match conn.read() {
            Ok(None) => Event::Pending,
            Ok(Some(Ok(incoming))) => Event::Request(incoming),
            Ok(Some(Err(why))) => {
                self.answer(token, &Response::error(why), epoll);
                Event::Pending
            }
            Err(()) => {
                self.close(token, epoll);
                Event::Pending
            }
        }
    }

    /// Queues a progress line for the peer of `token` and sends what it can
    /// take now.
    pub fn progress(&mut self, token: u64, line: &Response) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.queue(line);
            let _ = conn.send();
        }
    }

    /// Queues the answer for `token`; the connection ends once it is sent.
    pub fn answer(&mut self, token: u64, response: &Response, epoll: &sys::Epoll) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.queue(response);
        conn.answered = true;
        let _ = epoll.watch_output(conn.stream.as_raw_fd(), token);
        self.flush(token, epoll);
    }

    /// Drops every connection that made no progress for [`IDLE`]; returns
    /// how long until the next one would be, for the event loop's timeout.
    pub fn expire(&mut self, epoll: &sys::Epoll) -> Option<Duration> {
        let now = Instant::now();
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.close(token, epoll);
        }
        self.conns.values().map(|c| c.deadline - now).min()
    }

    fn flush(&mut self, token: u64, epoll: &sys::Epoll) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        match conn.send() {
            Ok(true) if conn.answered => self.close(token, epoll),
            Ok(_) => {}
            Err(()) => self.close(token, epoll),
        }
    }

    fn close(&mut self, token: u64, epoll: &sys::Epoll) {
        if let Some(conn) = self.conns.remove(&token) {
            epoll.delete(conn.stream.as_raw_fd());
        }
    }
}

/// Where the first request line of `input` ends (its newline), `None`
/// while more may come, or why it cannot be a request (over
/// [`MAX_REQUEST`] bytes without a newline).
pub fn line_end(input: &[u8]) -> Option<Result<usize, String>> {
    match input.iter().position(|&b| b == b'\n') {
        Some(end) => Some(Ok(end)),
        None if input.len() > MAX_REQUEST => Some(Err(format!(
            "the request is over {MAX_REQUEST} bytes without a newline"
        ))),
        None => None,
    }
}

/// One request line (without its newline).
///
/// # Errors
/// Why it is not a request, as a sentence.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("unreadable request: {e}"))
}

impl Conn {
    /// Reads what arrived. `Ok(Some(..))` once a whole line is in (a request,
    /// or why it cannot be one), `Ok(None)` while more is to come, `Err` when
    /// the peer went away.
    fn read(&mut self) -> Result<Option<Result<Incoming, String>>, ()> {
        let mut chunk = [0u8; 4096];
        loop {
            let got = sys::recv_with_fd_nonblocking(self.stream.as_fd(), &mut chunk);
            let (n, fd) = match got {
                Ok(Some(got)) => got,
                Ok(None) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(_) => return Err(()),
            };
            if n == 0 {
                return Err(());
            }
            self.deadline = Instant::now() + IDLE;
            self.fd = self.fd.take().or(fd);
            self.input.extend_from_slice(&chunk[..n]);
            match line_end(&self.input) {
                Some(Ok(end)) => return Ok(Some(self.parse(end))),
                Some(Err(e)) => return Ok(Some(Err(e))),
                None => {}
            }
        }
    }

    fn parse(&mut self, end: usize) -> Result<Incoming, String> {
        let request = parse_request(&self.input[..end])?;
        match self.access {
            Some(Access::Full) => {}
            Some(Access::Status) if matches!(request, Request::Status) => {}
            Some(Access::Status) => {
                return Err(
                    "only root may ask that; the status group may only ask for status".into(),
                )
            }
            None => {
                return Err("control requests need root (or the status group, for status)".into())
            }
        }
        let pid = sys::peer_cred(self.stream.as_fd()).map_or(0, |c| c.pid);
        Ok(Incoming {
            request,
            fd: self.fd.take(),
            pid,
        })
    }

    fn queue(&mut self, msg: &Response) {
        let line = serde_json::to_vec(msg).expect("a response serializes");
        self.output.extend_from_slice(&line);
        self.output.push(b'\n');
    }

    /// Sends what the peer takes now; `Ok(true)` once everything is sent.
    fn send(&mut self) -> Result<bool, ()> {
        while self.sent < self.output.len() {
            let n = match sys::send_nonblocking(self.stream.as_fd(), &self.output[self.sent..]) {
                Ok(n) => n,
                Err(e) => {
                    return match e.kind() {
                        std::io::ErrorKind::WouldBlock => Ok(false),
                        std::io::ErrorKind::Interrupted => continue,
                        _ => Err(()),
                    }
                }
            };
            self.sent += n;
            self.deadline = Instant::now() + IDLE;
        }
        Ok(true)
    }
}

/// An fd to give up when the daemon has no other (`/dev/null`).
fn spare_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}
