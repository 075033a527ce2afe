//! The session commands: PRESERVE_FD, RETRIEVE_FD, FINISH and GET_NAME,
//! and the fd budget that keeps preserved files from taking the daemon's own
//! fds.

use std::os::fd::{AsFd, OwnedFd};

use luo_handlers::vfio::dma::Anchor;
use luo_store::{Errno, Lookup, Result, SessionId};

use super::caller::{refuse, Caller};
use super::dma;
use super::ioctl::Ucmd;
use super::Daemon;
use crate::caller::owners::{self, FdBudget};
use crate::{log, sys, uapi};

impl Daemon {
    pub(super) fn preserve_fd(&mut self, u: &Ucmd<'_>) -> Result<()> {
        let a: uapi::FdArgs = u.args();
        self.preserve(u.session()?, (a.fd, a.token), u.caller)?;
        u.respond_unchanged()
    }

    pub(super) fn retrieve_fd(&mut self, u: &Ucmd<'_>) -> Result<()> {
        let sid = u.session()?;
        let mut a: uapi::FdArgs = u.args();
        u.respond_unchanged()?;
        self.rebuild_waiting(sid, a.token)?;
        let file = self.store.retrieve_fd(sid, a.token)?;
        if !u.caller.can_install() {
            return Err(refuse(u.caller, "SESSION_RETRIEVE_FD"));
        }
        a.fd = u.caller.install(file)?;
        u.respond(&a)
    }

    pub(super) fn finish(&mut self, u: &Ucmd<'_>) -> Result<()> {
        let a: uapi::FinishArgs = u.args();
        if a.reserved != 0 {
            return Err(Errno::EINVAL);
        }
        self.store.finish(u.session()?)?;
        u.respond_unchanged()
    }

    pub(super) fn get_name(&mut self, u: &Ucmd<'_>) -> Result<()> {
        let mut a: uapi::GetNameArgs = u.args();
        if a.reserved != 0 {
            return Err(Errno::EINVAL);
        }
        let sid = u.session()?;
        a.name = self.store.session(sid).ok_or(Errno::EBADF)?.name.to_field();
        u.respond(&a)
    }

    /// SESSION_PRESERVE_FD of the caller's `fd` under `token`; the fd is
    /// taken only once the session's owner may hold one more file.
    pub(super) fn preserve(
        &mut self,
        sid: SessionId,
        (fd, token): (i32, u64),
        caller: &Caller,
    ) -> Result<()> {
        let result = match self.try_preserve(sid, (fd, token), caller) {
            // A queued RELEASE may give back files that hold the owner at
            // its limit.
            Err(Errno::ENOSPC) if self.store.refusal().is_some() || self.fds_short => {
                self.settle_releases();
                self.try_preserve(sid, (fd, token), caller)
            }
            other => other,
        };
        self.log_refusal();
        result
    }

    fn try_preserve(
        &mut self,
        sid: SessionId,
        (fd, token): (i32, u64),
        caller: &Caller,
    ) -> Result<()> {
        let counted = self.store.held_fds()
            + self.runs.listeners.len()
            + self.files.pool.len()
            + self.files.spare.len();
        // The limit may have been changed since the start (prlimit).
        self.fds = FdBudget::current();
        self.daemon_fd_room(counted)?;
        self.store.set_fd_room(Some(self.fds.room(counted)));
        let fs_dev = self.files.fs_dev;
        self.prune_dma();
        let dma = &self.dma.table;
        let mut iommufd = false;
        self.store
            .preserve_fd_with(sid, token, |lookup| match caller.get_fd(fd) {
                // No fd to spare (root may use them all): no room, not a bad fd.
                Err(Errno::EMFILE | Errno::ENFILE) => Err(Errno::ENOSPC),
                got => {
                    let file = got.and_then(|f| Daemon::foreign(fs_dev, f, lookup, caller))?;
                    dma::check_device(dma, file.as_fd(), lookup, caller)?;
                    iommufd = luo_handlers::vfio::is_iommufd(file.as_fd());
                    Ok(file)
                }
            })?;
        if iommufd {
            if let (Some(pid), Some(s)) = (sys::tgid(caller.tid()), self.store.session(sid)) {
                let session = s.name.to_string();
                self.hold_iommufd(Anchor { pid, fd }, session, token);
                self.saved.dirty = true;
            }
        }
        Ok(())
    }

    /// Refuses a file (ENOSPC) once the files preserved, each of which may
    /// come to hold two fds (carried across an update, then retrieved),
    /// could take the fds the daemon keeps for its own work: root is not
    /// limited by owners' budgets, but the daemon never lets itself run out
    /// of fds. Logs once when that begins and once when it ends.
    fn daemon_fd_room(&mut self, counted: usize) -> Result<()> {
        let room = self.fds.room_for_all(counted);
        let need = self.store.fds_to_come() + 2;
        let short = need > room;
        if short != self.fds_short {
            self.fds_short = short;
            if short {
                log::warn(format_args!(
                    "the preserved files may come to need {need} more fds and only {room} are \
                     left of the daemon's RLIMIT_NOFILE of {} ({} kept for its own work): \
                     SESSION_PRESERVE_FD fails with ENOSPC until files are released or the \
                     limit is raised",
                    self.fds.limit,
                    owners::DAEMON_RESERVE
                ));
            } else {
                log::info(format_args!("the daemon has fds to spare again"));
            }
        }
        if short {
            Err(Errno::ENOSPC)
        } else {
            Ok(())
        }
    }

    /// Refuses our own device and session files as files to preserve (no
    /// handler takes them, as in the kernel); handlers must never `fstat` them,
    /// since that would wait on this very thread. A file no handler takes
    /// (`takes`) is closed off this thread: the close of a FUSE file waits
    /// for its server's answer to `FLUSH`.
    fn foreign(
        fs_dev: u64,
        file: OwnedFd,
        lookup: &Lookup<'_>,
        caller: &Caller,
    ) -> Result<OwnedFd> {
        let (dev, _) = sys::dev_ino(file.as_fd())?;
        if dev == fs_dev {
            return Err(Errno::ENOENT);
        }
        if !lookup.takes(file.as_fd()) {
            caller.dispose(file);
            return Err(Errno::ENOENT);
        }
        Ok(file)
    }
}
