//! Files and mounts: `mount`, `umount2`, `open`, `fstat`, `fcntl` and xattrs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::{check, cstring};

/// What identifies an open file to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Its filesystem.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// A character device.
    pub chr: bool,
    /// The device number, for a device.
    pub rdev: u64,
}

/// `mount(2)`.
pub fn mount(
    src: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = CString::new(src)?;
    let target = cstring(target)?;
    let fstype = fstype.map(CString::new).transpose()?;
    let data = data.map(CString::new).transpose()?;
    // SAFETY: every pointer is a valid C string or null, alive for the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })?;
    Ok(())
}

/// Bind-mounts `src` onto the file at `target` itself, never through a
/// symbolic link: `target` is opened `O_PATH|O_NOFOLLOW` and the mount goes
/// onto that open file (through its `/proc/self/fd` link, which mount(2)
/// resolves to the opened file), so the entry cannot be swapped for a link
/// between a check and the mount. ELOOP if `target` is a symbolic link.
pub fn bind(src: &Path, target: &Path) -> io::Result<()> {
    let fd = open_flags(target, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
    if file_type(fd.as_fd())? == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    let at = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount(&src.to_string_lossy(), &at, None, libc::MS_BIND, None)
}

/// The `S_IFMT` bits of an open file (an `O_PATH` fd too).
fn file_type(fd: BorrowedFd<'_>) -> io::Result<libc::mode_t> {
    // SAFETY: stat is plain data; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer; fd is open.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// Lazily unmounts `target`, never through a symbolic link
/// (`UMOUNT_NOFOLLOW`: a link at `target` is not followed, and is no mount).
pub fn umount_detach(target: &Path) -> io::Result<()> {
    let t = cstring(target)?;
    // SAFETY: t is a valid C string.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) })?;
    Ok(())
}

/// `getxattr(2)` into a string.
pub fn getxattr(path: &Path, name: &str) -> io::Result<String> {
    let p = cstring(path)?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: p and n are C strings; buf is writable for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    String::from_utf8(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Opens a path read-write and close-on-exec, plus `extra` flags.
pub fn open_rdwr(path: &Path, extra: libc::c_int) -> io::Result<OwnedFd> {
    open_flags(path, libc::O_RDWR | libc::O_CLOEXEC | extra)
}

fn open_flags(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = cstring(path)?;
    // SAFETY: p is a valid C string.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags) })?;
    // SAFETY: open returned a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `st_dev` and `st_ino` of an fd from the cached inode
/// (`statx(AT_STATX_DONT_SYNC)`): on a FUSE file this sends no request, so
/// the daemon can inspect its own files without waiting on itself.
pub fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    file_identity(fd).map(|id| (id.dev, id.ino))
}

/// [`dev_ino`] of a path, opened `O_PATH` so that no filesystem `open` runs.
pub fn path_dev_ino(path: &Path) -> io::Result<(u64, u64)> {
    let fd = open_flags(path, libc::O_PATH | libc::O_CLOEXEC)?;
    dev_ino(std::os::fd::AsFd::as_fd(&fd))
}

/// The identity of an open file, without syncing anything.
pub fn file_identity(fd: BorrowedFd<'_>) -> io::Result<FileIdentity> {
    // SAFETY: all-zero is a valid statx to overwrite.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC;
    // SAFETY: the path is a valid empty C string; stx is a valid out pointer.
    check(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            libc::STATX_INO | libc::STATX_TYPE,
            &mut stx,
        )
    })?;
    Ok(FileIdentity {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        chr: u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFCHR,
        rdev: libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor),
    })
}

/// The device number of the character device at `path`.
pub fn path_rdev(path: &Path) -> io::Result<u64> {
    let fd = open_flags(path, libc::O_PATH | libc::O_CLOEXEC)?;
    let id = file_identity(std::os::fd::AsFd::as_fd(&fd))?;
    if !id.chr {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    Ok(id.rdev)
}

/// The file status flags of an open file description (`F_GETFL`): the
/// access mode, `O_PATH`, `O_NONBLOCK`, ….
pub fn status_flags(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GETFL takes no argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// Sets `O_NONBLOCK` on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take integer arguments.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// `openat(2)` of one entry of `dir` (no path walk: `name` is one component
/// or, with `AT_FDCWD`, a path).
///
/// # Errors
/// The kernel's.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid C string; dir is an open fd (or AT_FDCWD).
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) })?;
    // SAFETY: openat returned a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The working directory as a dirfd (`AT_FDCWD`), for [`openat`].
pub fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is always a valid dirfd for the *at calls.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// `mkdirat(2)`.
///
/// # Errors
/// The kernel's.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = CString::new(name.as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid C string; dir is an open fd.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// `fstat(2)`.
///
/// # Errors
/// The kernel's.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer; fd is open.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `fchmod(2)`.
///
/// # Errors
/// The kernel's.
pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: fchmod takes no pointers; fd is open.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `fallocate(2)` with `FALLOC_FL_KEEP_SIZE`: room for `len` bytes at
/// `offset` without changing the file's size.
///
/// # Errors
/// The kernel's (ENOSPC on a full filesystem).
pub fn reserve_space(file: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (offset as libc::off_t, len as libc::off_t);
    // SAFETY: plain syscall on an open file.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    check(r).map(drop)
}

/// A close-on-exec pipe: (read end, write end).
///
/// # Errors
/// The kernel's.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0i32; 2];
    // SAFETY: p has room for the two fds pipe2() writes.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// A copy of `fd` at the lowest free number ≥ `min`, `O_CLOEXEC`.
///
/// # Errors
/// The errno of `fcntl(F_DUPFD_CLOEXEC)`.
pub fn dup_above(fd: BorrowedFd<'_>, min: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int and returns a new fd.
    let new = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Makes fd number `target` a copy of `fd` that a program this process
/// executes inherits (no `O_CLOEXEC`); whatever was at `target` is closed.
/// The number is left open on purpose: it belongs to the program to come.
///
/// # Errors
/// The errno of `dup2`.
pub fn dup2_inheritable(fd: BorrowedFd<'_>, target: i32) -> io::Result<()> {
    // SAFETY: dup2 takes two ints; `target` is given up to the new file.
    check(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
    Ok(())
}
