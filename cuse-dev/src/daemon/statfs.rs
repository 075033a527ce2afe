//! Trapped `fstatfs` and `statfs`. The kernel's session fds are anon inodes,
//! and programs tell a session fd from other files by its filesystem
//! (systemd's `fd_is_luo_session`); ours are files on the daemon's FUSE
//! mount. A session fd, or a `/proc/self/fd/N`-style path naming one, is
//! answered with what the kernel reports for any anon inode; every other
//! file runs untouched (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).
//!
//! These calls change nothing, so they are never saved as in flight: one
//! a killed daemon left unanswered is simply answered again.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::rc::Rc;

use luo_store::Result;

use super::caller::Caller;
use super::trap::reply;
use super::Daemon;
use crate::caller::seccomp::Listener;
use crate::persist::{self, Outcome};
use crate::sys;
use crate::uapi::CallerMem;

/// The longest path the statfs trap looks at: "/proc/4194304/fd/2147483647".
const PATH_MAX_LOOKED_AT: usize = 40;

impl Daemon {
    /// Answers a trapped `fstatfs(fd, buf)` or `statfs(path, buf)` (`nr`).
    pub(super) fn answer_statfs(
        &mut self,
        listener: &Rc<Listener>,
        nr: i64,
        call: persist::Inflight,
    ) {
        let outcome = match self.statfs_of_session(listener, nr, &call) {
            None => Outcome::Continue,
            Some(Ok(())) => Outcome::Return(0),
            Some(Err(e)) => Outcome::Return(e.0),
        };
        reply(listener, call.id, outcome);
    }

    /// The answer for a session fd, or None for any other file (or a caller
    /// that cannot be reached: the kernel then answers it).
    fn statfs_of_session(
        &mut self,
        listener: &Rc<Listener>,
        nr: i64,
        call: &persist::Inflight,
    ) -> Option<Result<()>> {
        let [target, buf, _] = call.args;
        let tid = call.pid as i32;
        // Most calls are on other files: those are told apart by the path
        // the daemon sees for the fd, which reads nothing of the caller's
        // memory and touches no filesystem.
        let (fd, caller) = if nr == libc::SYS_fstatfs {
            let fd = i32::try_from(target).ok()?;
            if !self.may_be_session(tid, fd) {
                return None;
            }
            (fd, Caller::trapped(listener, call, &self.runs.runner).ok()?)
        } else {
            let caller = Caller::trapped(listener, call, &self.runs.runner).ok()?;
            let fd = fd_named_by(&read_path(&caller, target)?, tid)?;
            (self.may_be_session(tid, fd).then_some(fd)?, caller)
        };
        let file = caller.get_fd(fd).ok()?;
        if !self.is_session_file(file.as_fd()) {
            caller.dispose(file);
            return None;
        }
        // A session file (opened FOPEN_NOFLUSH): closing sends nothing.
        drop(file);
        Some(match anon_inode_statfs(self.ev.epoll.fd()) {
            Ok(st) => caller.write(buf, statfs_bytes(&st)),
            Err(e) => Err(e),
        })
    }

    /// Whether fd `fd` of thread `tid` may be a session file: the path the
    /// daemon sees for it (`/proc/TID/fd/FD`, made by the kernel from the
    /// open file, not from the caller) lies in the daemon's FUSE mount.
    fn may_be_session(&self, tid: i32, fd: i32) -> bool {
        std::fs::read_link(format!("/proc/{tid}/fd/{fd}"))
            .is_ok_and(|p| p.starts_with(self.cfg.fs_dir()))
    }

    /// Whether `file` is one of the daemon's session files.
    pub(super) fn is_session_file(&self, file: BorrowedFd<'_>) -> bool {
        sys::file_identity(file).is_ok_and(|id| {
            !id.chr
                && id.dev == self.files.fs_dev
                && matches!(self.files.slots.get(&id.ino), Some(Some(_)))
        })
    }
}

/// The path at `addr` in the caller, if it is short enough to name an fd
/// (longer ones never do).
fn read_path(caller: &Caller, addr: u64) -> Option<String> {
    let mut buf = [0u8; PATH_MAX_LOOKED_AT];
    // Up to the end of its page first: the next one may not be mapped.
    let in_page = (4096 - (addr % 4096) as usize).min(buf.len());
    caller.mem().read(addr, &mut buf[..in_page]).ok()?;
    let mut len = buf[..in_page].iter().position(|&b| b == 0);
    if len.is_none() && in_page < buf.len() {
        caller
            .mem()
            .read(addr + in_page as u64, &mut buf[in_page..])
            .ok()?;
        len = buf.iter().position(|&b| b == 0);
    }
    String::from_utf8(buf[..len?].to_vec()).ok()
}

/// The fd a path names in process `tid`'s own fd table:
/// `/proc/self/fd/N`, `/proc/thread-self/fd/N`, `/dev/fd/N` or
/// `/proc/PID/fd/N` with the caller's own pid. Any other path is left to
/// the kernel.
fn fd_named_by(path: &str, tid: i32) -> Option<i32> {
    let tgid = sys::tgid(tid)?;
    let rest = path
        .strip_prefix("/dev/fd/")
        .or_else(|| path.strip_prefix("/proc/self/fd/"))
        .or_else(|| path.strip_prefix("/proc/thread-self/fd/"))
        .or_else(|| {
            let (pid, rest) = path.strip_prefix("/proc/")?.split_once("/fd/")?;
            (pid.parse::<i32>().ok()? == tgid).then_some(rest)
        })?;
    if rest.starts_with('+') || (rest.len() > 1 && rest.starts_with('0')) {
        return None;
    }
    rest.parse().ok()
}

/// What the kernel reports for an anon inode: `fstatfs` of one of the
/// daemon's own (its epoll fd), as every anon inode shares one filesystem.
fn anon_inode_statfs(anon: BorrowedFd<'_>) -> Result<libc::statfs> {
    // SAFETY: all-zero is a valid statfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer of the right type.
    if unsafe { libc::fstatfs(anon.as_raw_fd(), &mut st) } != 0 {
        return Err(luo_store::Errno::last());
    }
    debug_assert_eq!(st.f_type, ANON_INODE_FS_MAGIC);
    Ok(st)
}

/// `ANON_INODE_FS_MAGIC`.
pub const ANON_INODE_FS_MAGIC: libc::c_long = 0x0904_1934;

fn statfs_bytes(st: &libc::statfs) -> &[u8] {
    // SAFETY: statfs is plain old data (integers only, no padding on the
    // 64-bit ABIs), so its bytes are initialised; the slice borrows it.
    unsafe {
        std::slice::from_raw_parts(
            (st as *const libc::statfs).cast::<u8>(),
            std::mem::size_of::<libc::statfs>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_callers_own_fd_paths_name_an_fd() {
        let me = std::process::id() as i32;
        assert_eq!(fd_named_by("/proc/self/fd/5", me), Some(5));
        assert_eq!(fd_named_by("/dev/fd/0", me), Some(0));
        assert_eq!(fd_named_by("/proc/thread-self/fd/17", me), Some(17));
        assert_eq!(fd_named_by(&format!("/proc/{me}/fd/3"), me), Some(3));
        assert_eq!(fd_named_by("/proc/1/fd/3", me), None);
        assert_eq!(fd_named_by("/proc/self/fd/05", me), None);
        assert_eq!(fd_named_by("/proc/self/fd/+5", me), None);
        assert_eq!(fd_named_by("/proc/self/fd/5/x", me), None);
        assert_eq!(fd_named_by("/proc/self/fdinfo/5", me), None);
        assert_eq!(fd_named_by("/tmp/x", me), None);
    }

    #[test]
    fn an_epoll_fd_reports_the_anon_inode_filesystem() {
        let epoll = sys::Epoll::new().unwrap();
        let st = anon_inode_statfs(epoll.fd()).unwrap();
        assert_eq!(st.f_type, ANON_INODE_FS_MAGIC);
        assert_eq!(statfs_bytes(&st).len(), 120);
    }
}
