//! Access to the calling process: its memory (the ioctl struct) and its fds.
//!
//! Callers reach the daemon two ways. Through FUSE, the request carries the
//! caller's thread id; the thread stays blocked in the ioctl, unkillable, until
//! the daemon replies, so that id cannot be reused while the request is served.
//! Through a seccomp notification, the thread may be killed at any time; every
//! access is followed by `SECCOMP_IOCTL_NOTIF_ID_VALID` (see `seccomp.rs`).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use luo_store::{Errno, Result};

/// Reads and writes a caller's memory. Any failure is `EFAULT`, as a kernel
/// `copy_{from,to}_user` would report.
pub trait CallerMem {
    /// Reads `buf.len()` bytes at `addr`.
    ///
    /// # Errors
    /// `EFAULT` unless every byte was read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `addr`.
    ///
    /// # Errors
    /// `EFAULT` unless every byte was written.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<()>;
}

/// A process's memory through `process_vm_readv`/`process_vm_writev`; these
/// honour page protections as `copy_to_user` does.
#[derive(Clone, Copy, Debug)]
pub struct ProcessVm {
    /// Thread id (in the daemon's pid namespace).
    pub tid: i32,
}

type VmCall = unsafe extern "C" fn(
    libc::pid_t,
    *const libc::iovec,
    libc::c_ulong,
    *const libc::iovec,
    libc::c_ulong,
    libc::c_ulong,
) -> isize;

impl ProcessVm {
    /// Moves `len` bytes between `local` and the caller's `addr` with
    /// `process_vm_readv` or `process_vm_writev`; short transfers are EFAULT.
    fn transfer(&self, call: VmCall, local: *mut u8, addr: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: local.cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as usize as *mut _,
            iov_len: len,
        };
        // SAFETY: the local iovec covers a buffer of `len` bytes borrowed by
        // the caller of `transfer` (mutably for reads); the remote one is only
        // interpreted in the other process.
        let n = unsafe { call(self.tid, &local, 1, &remote, 1, 0) };
        if n == len as isize {
            Ok(())
        } else {
            Err(Errno::EFAULT)
        }
    }
}

impl CallerMem for ProcessVm {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.transfer(libc::process_vm_readv, buf.as_mut_ptr(), addr, buf.len())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        // process_vm_writev only reads the local buffer.
        self.transfer(
            libc::process_vm_writev,
            buf.as_ptr() as *mut u8,
            addr,
            buf.len(),
        )
    }
}

const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// A pidfd for a thread (`pidfd_open(tid, PIDFD_THREAD)`).
///
/// # Errors
/// `ESRCH` if the thread is gone.
pub fn pidfd_open(tid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of another process's fd (`pidfd_getfd`), close-on-exec.
///
/// # Errors
/// `EBADF` if the target has no such fd; `ESRCH` if it is gone.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: pidfd_getfd takes no pointers.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// The command name of a thread, for log lines.
pub fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn reads_and_writes_own_memory_and_faults_on_bad_addresses() {
        let me = ProcessVm {
            tid: std::process::id() as i32,
        };
        let mut src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        me.read(src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(dst, [1, 2, 3, 4]);
        me.write(src.as_mut_ptr() as u64, &[9, 9]).unwrap();
        assert_eq!(std::hint::black_box(src)[..2], [9, 9]);
        assert_eq!(me.read(8, &mut dst), Err(Errno::EFAULT));
        assert_eq!(me.write(8, &dst), Err(Errno::EFAULT));
    }

    #[test]
    fn getfd_copies_an_fd_and_rejects_bad_ones() {
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(pidfd_getfd(pidfd.as_fd(), f.as_raw_fd()).is_ok());
        assert_eq!(
            pidfd_getfd(pidfd.as_fd(), 100_000).unwrap_err(),
            Errno::EBADF
        );
        assert_eq!(pidfd_getfd(pidfd.as_fd(), -1).unwrap_err(), Errno::EBADF);
    }
}
