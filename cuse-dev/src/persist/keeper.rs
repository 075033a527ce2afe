//! The keeper: a small process that holds every fd the LUO state depends on
//! while no daemon runs, so that stopping, upgrading or killing the daemon
//! loses nothing.
//!
//! It holds the FUSE connection (so the mounted device and every session fd
//! in every client stay valid), the seccomp listeners of `luo run` trees, and
//! every preserved or carried file. It knows nothing of LUO: fds by key, put,
//! get, drop, list. It is started by the first daemon, detached into its own
//! session, and ends only when told to (`luo shutdown`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{control, sys};

/// A request to the keeper.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum KeeperRequest {
    /// Keep the attached fd under `key` (replacing any other).
    Put {
        /// Key.
        key: String,
    },
    /// Hand back a copy of the fd under `key`.
    Get {
        /// Key.
        key: String,
    },
    /// Close the fds under these keys.
    Drop {
        /// Keys.
        keys: Vec<String>,
    },
    /// Every key held.
    List,
    /// Close everything and exit.
    Exit,
}

/// The keeper's answer.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct KeeperResponse {
    /// Success.
    pub ok: bool,
    /// Keys (for `List`).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Its pid.
    #[serde(default)]
    pub pid: u32,
}

/// Serves the keeper protocol on `socket` until told to exit. A connection
/// may carry any number of requests, one at a time (the daemon keeps one
/// open); connections are served as their requests arrive.
///
/// # Errors
/// If the socket cannot be bound.
pub fn serve(socket: &Path) -> std::io::Result<()> {
    crate::sys::raise_fd_limit();
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let mut fds: HashMap<String, OwnedFd> = HashMap::new();
    let mut conns: Vec<UnixStream> = Vec::new();
    let me = sys::geteuid();
    loop {
        let watched: Vec<BorrowedFd<'_>> = std::iter::once(listener.as_fd())
            .chain(conns.iter().map(|c| c.as_fd()))
            .collect();
        let Some(ready) = sys::poll_readable(&watched, -1) else {
            continue;
        };
        let mut closed = Vec::new();
        for (i, ready) in ready.iter().enumerate().skip(1) {
            if !ready {
                continue;
            }
            let stream = &conns[i - 1];
            match control::recv_line::<KeeperRequest>(stream) {
                Ok((req, fd)) => {
                    let exit = matches!(req, KeeperRequest::Exit);
                    answer(stream, req, fd, &mut fds);
                    if exit {
                        let _ = std::fs::remove_file(socket);
                        return Ok(());
                    }
                }
                Err(_) => closed.push(i - 1),
            }
        }
        for i in closed.into_iter().rev() {
            conns.swap_remove(i);
        }
        if ready[0] {
            if let Ok((stream, _)) = listener.accept() {
                // Only our own user may take fds (the socket is also in a 0700 dir).
                if crate::sys::peer_uid(stream.as_fd()).ok() == Some(me) {
                    conns.push(stream);
                }
            }
        }
    }
}

fn answer(
    stream: &UnixStream,
    req: KeeperRequest,
    fd: Option<OwnedFd>,
    fds: &mut HashMap<String, OwnedFd>,
) {
    let mut resp = KeeperResponse {
        ok: true,
        pid: std::process::id(),
        ..Default::default()
    };
    let mut out = None;
    match req {
        KeeperRequest::Put { key } => match fd {
            Some(fd) => {
                fds.insert(key, fd);
            }
            None => resp.ok = false,
        },
        KeeperRequest::Get { key } => match fds.get(&key) {
            Some(fd) => out = Some(fd.as_fd()),
            None => resp.ok = false,
        },
        KeeperRequest::Drop { keys } => {
            for k in keys {
                fds.remove(&k);
            }
        }
        KeeperRequest::List => resp.keys = fds.keys().cloned().collect(),
        KeeperRequest::Exit => fds.clear(),
    }
    let _ = control::send_line(stream, &resp, out);
}

/// The daemon's handle on its keeper: one connection, opened again if it
/// breaks.
#[derive(Debug)]
pub struct Keeper {
    socket: PathBuf,
    stream: RefCell<Option<UnixStream>>,
}

fn refused(what: &str) -> std::io::Error {
    std::io::Error::other(format!("the keeper refused to {what}"))
}

/// A process of another user answers on the keeper's socket.
#[derive(Debug, thiserror::Error)]
#[error(
    "{socket} is answered by a process of uid {uid}, not by root: it is no keeper of ours; \
     end that process and remove the socket"
)]
pub struct ForeignKeeper {
    /// The socket.
    pub socket: PathBuf,
    /// The uid the peer listened as.
    pub uid: u32,
}

/// Connects to `socket` and makes sure our own user (root) listens on it
/// (`SO_PEERCRED`: the credentials of the process that called listen(2)).
fn connect_own(socket: &Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    let uid = crate::sys::peer_uid(stream.as_fd())?;
    if uid != sys::geteuid() {
        let socket = socket.to_owned();
        return Err(std::io::Error::other(ForeignKeeper { socket, uid }));
    }
    Ok(stream)
}

/// Whether `e` is a [`ForeignKeeper`].
fn is_foreign(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<ForeignKeeper>())
}

impl Keeper {
    /// The keeper listening on `socket`, if one answers.
    ///
    /// # Errors
    /// [`ForeignKeeper`] (inside an `io::Error`) if a process of another
    /// user answers: nothing was sent to it.
    pub fn connect(socket: &Path) -> std::io::Result<Option<Keeper>> {
        let k = Keeper {
            socket: socket.to_owned(),
            stream: RefCell::new(None),
        };
        match k.list() {
            Ok(_) => Ok(Some(k)),
            Err(e) if is_foreign(&e) => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// Starts a keeper (detached, in its own session) and waits for it.
    ///
    /// # Errors
    /// If it cannot be started or does not answer within 5 s.
    pub fn spawn(socket: &Path) -> std::io::Result<Keeper> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("keeper").arg("--socket").arg(socket);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::new_session_on_spawn(&mut cmd);
        cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(k) = Keeper::connect(socket)? {
                return Ok(k);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the keeper did not start within 5 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn call(
        &self,
        req: &KeeperRequest,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> std::io::Result<(KeeperResponse, Option<OwnedFd>)> {
        // Every request may be sent twice (put, get and drop are idempotent).
        if let Some(stream) = self.stream.borrow().as_ref() {
            if let Ok(answer) = control::exchange_on(stream, req, fd) {
                return Ok(answer);
            }
        }
        let stream = connect_own(&self.socket)?;
        let answer = control::exchange_on(&stream, req, fd);
        *self.stream.borrow_mut() = answer.is_ok().then_some(stream);
        answer
    }

    /// Keeps `fd` under `key`.
    ///
    /// # Errors
    /// Connection failures or a refusal.
    pub fn put(&self, key: &str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        let (r, _) = self.call(
            &KeeperRequest::Put {
                key: key.to_owned(),
            },
            Some(fd),
        )?;
        r.ok.then_some(()).ok_or_else(|| refused("keep an fd"))
    }

    /// A copy of the fd under `key`.
    ///
    /// # Errors
    /// Connection failures, or no such key.
    pub fn get(&self, key: &str) -> std::io::Result<OwnedFd> {
        let (r, fd) = self.call(
            &KeeperRequest::Get {
                key: key.to_owned(),
            },
            None,
        )?;
        fd.filter(|_| r.ok)
            .ok_or_else(|| refused(&format!("hand back {key}")))
    }

    /// Closes the fds under `keys`.
    ///
    /// # Errors
    /// Connection failures.
    pub fn drop_keys(&self, keys: Vec<String>) -> std::io::Result<()> {
        self.call(&KeeperRequest::Drop { keys }, None).map(|_| ())
    }

    /// Every key held, and the keeper's pid.
    ///
    /// # Errors
    /// Connection failures.
    pub fn list(&self) -> std::io::Result<(Vec<String>, u32)> {
        self.call(&KeeperRequest::List, None)
            .map(|(r, _)| (r.keys, r.pid))
    }

    /// Tells the keeper to close everything and exit.
    ///
    /// # Errors
    /// Connection failures.
    pub fn exit(&self) -> std::io::Result<()> {
        self.call(&KeeperRequest::Exit, None).map(|_| ())
    }
}
