//! A caller of an ioctl, as the daemon reaches it: through FUSE (blocked in
//! the kernel until the reply) or through a seccomp notification (it may
//! vanish, and it can be given fds). Its memory is read and written through
//! the deadline runner; its fds are copied with `pidfd_getfd` and refused as
//! the kernel's `fdget` would refuse them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use luo_store::{Errno, Result};

use crate::caller::deadline::{Guarded, Runner};
use crate::caller::owners;
use crate::caller::seccomp::Listener;
use crate::caller::{self, PinnedVm, ProcessVm};
use crate::persist;
use crate::profile::{self, Phase};
use crate::uapi::CallerMem;
use crate::{log, sys};

/// A caller of an ioctl: through FUSE (blocked until we reply) or through a
/// seccomp notification (may vanish; can receive fds). Its memory is reached
/// through the deadline runner (see `deadline.rs`).
pub(super) struct Caller {
    pub(super) tid: i32,
    /// Its effective uid.
    pub(super) uid: u32,
    pub(super) mem: Guarded,
    pub(super) runner: Rc<Runner>,
    /// The notification, for a trapped call.
    pub(super) trap: Option<(Rc<Listener>, u64)>,
    /// The token of its `luo run` tree's listener, for a trapped call.
    pub(super) tree: Option<u64>,
}

impl Caller {
    /// A FUSE caller: the kernel keeps it blocked, unkillably, until we
    /// reply, so its tid is its own for the whole request.
    pub(super) fn fuse(tid: i32, uid: u32, runner: &Rc<Runner>) -> Caller {
        Caller {
            tid,
            uid,
            mem: Guarded::new(Arc::new(ProcessVm { tid }), uid, runner),
            runner: runner.clone(),
            trap: None,
            tree: None,
        }
    }

    /// A trapped call of the tree `call.listener`: the caller's memory
    /// pinned and its uid read first, then the call checked to be still
    /// waiting (so what was read is the caller's).
    pub(super) fn trapped(
        listener: &Rc<Listener>,
        call: &persist::Inflight,
        runner: &Rc<Runner>,
    ) -> Result<Caller> {
        let _t = profile::enter(Phase::Caller);
        let tid = call.pid as i32;
        let mem = PinnedVm::open(tid)?;
        let uid = owners::effective_uid(tid).ok_or(Errno::ESRCH)?;
        if !listener.id_valid(call.id) {
            return Err(Errno::ESRCH);
        }
        if runner.over_limit(uid) {
            return Err(Errno::EAGAIN);
        }
        Ok(Caller {
            tid,
            uid,
            mem: Guarded::new(Arc::new(mem), uid, runner),
            runner: runner.clone(),
            trap: Some((listener.clone(), call.id)),
            tree: Some(call.listener),
        })
    }

    pub(super) fn tid(&self) -> i32 {
        self.tid
    }

    /// The caller's memory, each access with a deadline.
    pub(super) fn mem(&self) -> &Guarded {
        &self.mem
    }

    /// Still waiting for us (always true for FUSE callers, see `caller.rs`).
    pub(super) fn valid(&self) -> bool {
        self.trap
            .as_ref()
            .is_none_or(|(listener, id)| listener.id_valid(*id))
    }

    pub(super) fn can_install(&self) -> bool {
        self.trap.is_some()
    }

    /// A copy of the caller's fd `fd`, refused as the kernel's `fdget` would
    /// refuse it: EBADF for a bad number and for an `O_PATH` fd (which was
    /// opened without any permission check and can reach no ioctl); EMFILE
    /// or ENFILE when the daemon has no fd to spare.
    pub(super) fn get_fd(&self, fd: i32) -> Result<OwnedFd> {
        let _t = profile::enter(Phase::Caller);
        let pidfd = caller::pidfd_open(self.tid()).map_err(|e| match e {
            Errno::EMFILE | Errno::ENFILE => e,
            _ => Errno::ESRCH,
        })?;
        if !self.valid() {
            return Err(Errno::ESRCH);
        }
        let file = caller::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| match e {
            Errno::ESRCH | Errno::EMFILE | Errno::ENFILE => e,
            _ => Errno::EBADF,
        })?;
        match sys::status_flags(file.as_fd()) {
            Ok(flags) if flags & libc::O_PATH == 0 => Ok(file),
            _ => Err(Errno::EBADF),
        }
    }

    pub(super) fn install(&self, file: BorrowedFd<'_>) -> Result<i32> {
        let _t = profile::enter(Phase::Install);
        match &self.trap {
            Some((listener, id)) => listener.add_fd(*id, file).map_err(|e| match e {
                Errno::ENOENT => Errno::ESRCH,
                other => other,
            }),
            None => Err(Errno::EOPNOTSUPP),
        }
    }

    pub(super) fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let _t = profile::enter(Phase::Caller);
        if !self.valid() {
            return Err(Errno::ESRCH);
        }
        self.mem().write(addr, bytes)
    }

    /// Closes a copy of one of the caller's fds that the daemon does not
    /// keep, off the daemon's thread: closing a file of a filesystem that
    /// does not answer (FUSE `FLUSH`) would wait for good.
    pub(super) fn dispose(&self, file: OwnedFd) {
        if self.runner.over_limit(self.uid) {
            // No thread may be spent on this uid; the copy stays open.
            std::mem::forget(file);
            return;
        }
        if self.runner.run(self.uid, move || drop(file)).is_err() {
            log::warn(format_args!(
                "closing a file pid {} passed did not finish; it is left to a helper thread",
                self.tid
            ));
        }
    }
}

/// The answer to an fd-returning ioctl from a caller we cannot give fds to.
pub(super) fn refuse(caller: &Caller, what: &str) -> Errno {
    let tid = caller.tid();
    log::warn(format_args!(
        "pid {tid} ({}) called {what}, which returns a new fd, outside `luo run`; \
         run the program as `luo run -- PROGRAM` to receive session fds",
        caller::comm(tid)
    ));
    Errno::EOPNOTSUPP
}
