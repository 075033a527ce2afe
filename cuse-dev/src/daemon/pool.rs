//! Session files: a child process (the opener) opens them on the daemon's
//! own mount and passes them over a socket into a small pool; a new session
//! takes one, and a call waits for the opener (replacing it if it hangs)
//! when the pool is empty.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use luo_store::{Errno, Result, SessionId};

use super::event_loop::TOKEN_POOL;
use super::{setup, Daemon, DaemonError};
use crate::persist::Header;
use crate::profile::{self, Phase};
use crate::{log, sys};

pub(super) const SLOT_BASE: u64 = 1 << 32;
pub(super) const POOL_SIZE: usize = 16;
/// How long a call waits for a session file before the opener is taken
/// for hung and replaced.
const OPENER_PATIENCE_MS: i32 = 5000;

/// Session files, open and to come.
pub(super) struct SessionFiles {
    /// Socket to the session-file opener process.
    pub(super) opener: OwnedFd,
    /// Its pid (the `pid` of its FUSE requests).
    pub(super) opener_tid: i32,
    /// Session files received from the opener, not yet used.
    pub(super) pool: VecDeque<(u64, OwnedFd)>,
    /// Session files taken for a call that then failed: used first.
    pub(super) spare: Vec<(u64, OwnedFd)>,
    /// Next session-file number the opener will use.
    pub(super) next_slot: u64,
    /// Every session-file inode, and the session it names, if any.
    pub(super) slots: HashMap<u64, Option<SessionId>>,
    /// The session file of each session that has one open.
    pub(super) session_slot: HashMap<SessionId, u64>,
    /// `st_dev` of our FUSE mount: identifies our device and session files.
    pub(super) fs_dev: u64,
    /// Session files the opener sent that the daemon had no fd for.
    pub(super) lost_slots: usize,
    /// When session-file openers exited (the last minute's).
    pub(super) opener_deaths: Vec<std::time::Instant>,
}

impl SessionFiles {
    /// None yet; `opener` (pid `opener_tid`) starts at `next_slot`.
    pub(super) fn new(opener: OwnedFd, opener_tid: i32, fs_dev: u64, next_slot: u64) -> Self {
        SessionFiles {
            opener,
            opener_tid,
            pool: VecDeque::new(),
            spare: Vec::new(),
            next_slot,
            slots: HashMap::new(),
            session_slot: HashMap::new(),
            fs_dev,
            lost_slots: 0,
            opener_deaths: Vec::new(),
        }
    }

    /// Writes its part of the journal header.
    pub(super) fn save_into(&self, header: &mut Header) {
        header.next_slot = self.next_slot;
    }
}

impl Daemon {
    /// Takes what the opener sent: the bind report, session files.
    pub(super) fn on_pool_event(&mut self) -> std::result::Result<(), DaemonError> {
        let mut msg = [0u8; 12];
        loop {
            let (n, fd) = match sys::recv_with_fd_nonblocking(self.files.opener.as_fd(), &mut msg) {
                Ok(Some(got)) => got,
                Ok(None) => return Ok(()),
                // Killed: end of file, or a reset if a credit was unread.
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    return self.respawn_opener()
                }
                Err(e) => {
                    let what = "hear from the session-file opener".to_owned();
                    return Err(DaemonError::Setup { what, source: e });
                }
            };
            if n == 0 {
                return self.respawn_opener();
            }
            let slot = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes"));
            match (slot, fd) {
                // A replacement opener binds nothing and reports success.
                (crate::persist::opener::BOUND, _) if self.ev.control.is_some() => {}
                (crate::persist::opener::BOUND, _) => {
                    let errno = i32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
                    if errno != 0 {
                        let what = format!("bind the device onto {}", self.cfg.device.display());
                        return Err(DaemonError::Setup {
                            what,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                    self.open_control()?;
                }
                (n, Some(fd)) => self.files.pool.push_back((SLOT_BASE + n, fd)),
                // The daemon had no fd for it (the kernel closed it): its
                // credit is granted again when a session file is needed.
                (_, None) => self.files.lost_slots += 1,
            }
        }
    }

    /// The session-file opener exited (killed?): a new one takes over from
    /// the next slot, and gets the credits the pool lacks. One that keeps
    /// dying (5 times within a minute) stops the daemon, which keeps
    /// everything with the keeper for the next one.
    fn respawn_opener(&mut self) -> std::result::Result<(), DaemonError> {
        sys::try_reap(self.files.opener_tid);
        let now = std::time::Instant::now();
        self.files
            .opener_deaths
            .retain(|t| now.duration_since(*t).as_secs() < 60);
        self.files.opener_deaths.push(now);
        if self.files.opener_deaths.len() >= 5 {
            return Err(DaemonError::Setup {
                what: "keep the session-file opener running".into(),
                source: std::io::Error::other("it exited 5 times within a minute"),
            });
        }
        log::warn(format_args!(
            "the session-file opener (pid {}) exited; starting a new one",
            self.files.opener_tid
        ));
        let (opener, tid) = setup(
            || "start a new session-file opener".into(),
            crate::persist::opener::respawn(&self.cfg.fs_dir(), self.files.next_slot),
        )?;
        self.ev.epoll.delete(self.files.opener.as_raw_fd());
        setup(
            || "watch the new session-file opener".into(),
            self.ev.epoll.add(opener.as_raw_fd(), TOKEN_POOL),
        )?;
        self.files.opener = opener;
        self.files.opener_tid = tid;
        self.files.lost_slots = 0;
        for _ in self.files.pool.len()..POOL_SIZE {
            grant_credit(self.files.opener.as_fd());
        }
        Ok(())
    }

    /// A pre-opened session file; serves FUSE while the opener catches up.
    pub(super) fn take_slot(&mut self) -> Result<(u64, OwnedFd)> {
        let _t = profile::enter(Phase::Install);
        if let Some(s) = self.files.spare.pop() {
            return Ok(s);
        }
        let mut asked_again = false;
        loop {
            if let Some(slot) = self.files.pool.pop_front() {
                grant_credit(self.files.opener.as_fd());
                return Ok(slot);
            }
            if self.files.lost_slots > 0 {
                // Once per call: a daemon still out of fds fails the call
                // rather than spin with the opener.
                if asked_again {
                    return Err(Errno::EMFILE);
                }
                self.files.lost_slots -= 1;
                grant_credit(self.files.opener.as_fd());
                asked_again = true;
            }
            self.wait_for_opener()?;
        }
    }

    fn wait_for_opener(&mut self) -> Result<()> {
        let mut files = vec![self.files.opener.as_fd()];
        files.extend(self.chan.request_fds());
        let Some(ready) = sys::poll_readable(&files, OPENER_PATIENCE_MS) else {
            return self.replace_hung_opener();
        };
        if ready[1..].iter().any(|r| *r) {
            self.drain_fuse();
        }
        if ready[0] && self.on_pool_event().is_err() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The opener sent no session file for [`OPENER_PATIENCE_MS`] (stopped,
    /// or stuck): it is killed and a new one takes over; the call that
    /// waited goes on waiting for the new one's files.
    fn replace_hung_opener(&mut self) -> Result<()> {
        log::warn(format_args!(
            "the session-file opener (pid {}) sent no session file within {} s; replacing it",
            self.files.opener_tid,
            OPENER_PATIENCE_MS / 1000
        ));
        sys::kill(self.files.opener_tid, libc::SIGKILL);
        // Reaped once it is gone (a killed waiter on a FUSE request goes at
        // once; never wait long here).
        for _ in 0..100 {
            if sys::try_reap(self.files.opener_tid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.respawn_opener().map_err(|e| {
            log::error(format_args!("{e}"));
            Errno::EAGAIN
        })
    }
}

/// Lets the opener open one more session file.
pub(super) fn grant_credit(opener: BorrowedFd<'_>) {
    let _ = sys::send_with_fd(opener, &[1], None);
}
