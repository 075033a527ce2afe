//! Safe wrappers around the few file syscalls the handlers need.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use luo_store::{Errno, Result};

fn check(ret: libc::c_long) -> Result<libc::c_long> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// `fstat(2)`.
pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat> {
    // SAFETY: all-zero is a valid `stat` to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the borrow's lifetime; st is a valid out pointer.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }.into())?;
    Ok(st)
}

/// `fstatfs(2)`'s filesystem magic.
pub fn fs_magic(fd: BorrowedFd<'_>) -> Result<i64> {
    // SAFETY: all-zero is a valid `statfs` to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the borrow's lifetime; st is a valid out pointer.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) }.into())?;
    Ok(st.f_type)
}

/// `fcntl(F_GET_SEALS)`.
pub fn get_seals(fd: BorrowedFd<'_>) -> Result<u32> {
    // SAFETY: F_GET_SEALS takes no pointer argument.
    let seals = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) }.into())?;
    Ok(seals as u32)
}

/// The file offset (`lseek(fd, 0, SEEK_CUR)`).
pub fn position(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: lseek takes no pointers.
    let pos = check(unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR) })?;
    Ok(pos as u64)
}

/// Sets the file offset.
pub fn seek_to(fd: BorrowedFd<'_>, pos: u64) -> Result<()> {
    let pos = i64::try_from(pos).map_err(|_| Errno::EINVAL)?;
    // SAFETY: lseek takes no pointers.
    check(unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_SET) })?;
    Ok(())
}

/// The access mode of an open file description (`O_RDONLY`, `O_WRONLY` or
/// `O_RDWR`).
pub fn access_mode(fd: BorrowedFd<'_>) -> Result<i32> {
    // SAFETY: F_GETFL takes no argument.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }.into())?;
    Ok(flags as i32 & libc::O_ACCMODE)
}

/// Opens a new open file description of the same inode with access mode
/// `access`, close-on-exec, through `/proc/self/fd`.
pub fn reopen(fd: BorrowedFd<'_>, access: i32) -> Result<OwnedFd> {
    let path =
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| Errno::EINVAL)?;
    let flags = (access & libc::O_ACCMODE) | libc::O_CLOEXEC;
    // SAFETY: path is a valid NUL-terminated string.
    let raw = unsafe { libc::open(path.as_ptr(), flags) };
    let raw = check(raw.into())? as i32;
    // SAFETY: open returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn io_errno(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// `memfd_create(2)` of `len` bytes (`MFD_CLOEXEC` is always added to
/// `flags`).
///
/// # Errors
/// `memfd_create` or `ftruncate` failures.
pub fn memfd(name: &str, flags: libc::c_uint, len: u64) -> std::io::Result<std::fs::File> {
    let c = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid C string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_errno("memfd_create"));
    }
    // SAFETY: fresh fd we own.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len)?;
    Ok(f)
}

/// `fcntl(F_ADD_SEALS)`.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> Result<()> {
    // SAFETY: F_ADD_SEALS takes an integer argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }.into())?;
    Ok(())
}

/// `fchmod(fd, mode)`.
pub fn chmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> Result<()> {
    // SAFETY: fchmod takes an fd and a mode; no memory is passed.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }.into())?;
    Ok(())
}

/// What `statx` knows of an open file without asking its filesystem
/// (`AT_STATX_DONT_SYNC`: cached attributes, so a FUSE or network file whose
/// server never answers cannot make the caller wait).
#[derive(Clone, Copy, Debug)]
pub struct CachedStat {
    /// `st_mode`'s file type bits.
    pub kind: u32,
    /// The device a character or block special file names.
    pub rdev: u64,
    /// The inode number.
    pub ino: u64,
}

/// [`CachedStat`] of `fd`.
pub fn stat_cached(fd: BorrowedFd<'_>) -> Result<CachedStat> {
    // SAFETY: all-zero is a valid `statx` to be overwritten.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC;
    let mask = libc::STATX_TYPE | libc::STATX_INO;
    // SAFETY: c"" is a valid empty path (with AT_EMPTY_PATH, fd itself is
    // asked about); st is a valid out pointer.
    let r = unsafe { libc::statx(fd.as_raw_fd(), c"".as_ptr(), flags, mask, &mut st) };
    check(r.into())?;
    Ok(CachedStat {
        kind: u32::from(st.stx_mode) & libc::S_IFMT,
        rdev: libc::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        ino: st.stx_ino,
    })
}
