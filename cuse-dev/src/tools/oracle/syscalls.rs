//! The raw system calls the oracle makes, each as a program makes it: the
//! oracle observes what a device does with a malformed struct, a bad fd or
//! a null pointer, so its calls pass exactly what a test names.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::hex;

pub(super) fn raw_ioctl(fd: RawFd, cmd: u64, arg: *mut u8) -> (i64, i32) {
    // SAFETY: arg is null (the EFAULT probes) or points at a live buffer at
    // least as large as the size it declares.
    let r = unsafe { libc::ioctl(fd, cmd as _, arg) };
    let errno = if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    (i64::from(r), errno)
}

pub(super) fn memfd(name: &str, contents: &[u8]) -> OwnedFd {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: c is a valid C string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd we own.
    let m = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: writes from a live buffer.
    let n = unsafe { libc::write(fd, contents.as_ptr().cast(), contents.len()) };
    assert_eq!(n, contents.len() as isize);
    m
}

/// What a retrieved memfd shows: size, position, seals, fd and file flags,
/// contents (hex of the first 64 bytes).
pub(super) fn describe(fd: RawFd) -> String {
    // SAFETY: plain syscalls on an fd number; failures show as -1.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st);
        let pos = libc::lseek(fd, 0, libc::SEEK_CUR);
        let seals = libc::fcntl(fd, libc::F_GET_SEALS);
        let fdflags = libc::fcntl(fd, libc::F_GETFD);
        let flflags = libc::fcntl(fd, libc::F_GETFL) & libc::O_ACCMODE;
        let mut buf = [0u8; 64];
        let n = libc::pread(fd, buf.as_mut_ptr().cast(), 64, 0);
        format!(
            "size={} pos={pos} seals={seals:#x} cloexec={} accmode={flflags} data={}",
            st.st_size,
            fdflags & libc::FD_CLOEXEC,
            hex(&buf[..n.max(0) as usize])
        )
    }
}

pub(super) fn same_file(a: RawFd, b: RawFd) -> bool {
    // SAFETY: fstat into zeroed structs.
    unsafe {
        let mut x: libc::stat = std::mem::zeroed();
        let mut y: libc::stat = std::mem::zeroed();
        libc::fstat(a, &mut x) == 0
            && libc::fstat(b, &mut y) == 0
            && x.st_ino == y.st_ino
            && x.st_dev == y.st_dev
    }
}

/// Takes an fd an ioctl returned.
pub(super) fn returned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the ioctl succeeded and wrote this new fd, which nothing else
    // owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `open(path, O_RDWR | O_CLOEXEC)`: the fd, or the errno.
pub(super) fn open_rdwr(path: &Path) -> Result<OwnedFd, i32> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: c is a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `dup(fd)`.
pub(super) fn dup(fd: BorrowedFd<'_>) -> OwnedFd {
    fd.try_clone_to_owned().expect("dup of a live fd")
}

/// `ftruncate(fd, len)`'s return value (errno left for the caller).
pub(super) fn ftruncate(fd: BorrowedFd<'_>, len: i64) -> i64 {
    // SAFETY: plain syscall on a live fd.
    i64::from(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

/// `pwrite(fd, bytes, offset)`'s return value (errno left for the caller).
pub(super) fn pwrite(fd: BorrowedFd<'_>, bytes: &[u8], offset: i64) -> i64 {
    // SAFETY: writes from a live buffer of bytes.len() bytes.
    unsafe { libc::pwrite(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), offset) as i64 }
}

/// `lseek(fd, pos, SEEK_SET)`.
pub(super) fn seek(fd: BorrowedFd<'_>, pos: i64) {
    // SAFETY: plain syscall on a live fd.
    unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_SET) };
}

/// `fcntl(fd, F_ADD_SEALS, seals)`.
pub(super) fn add_seals(fd: BorrowedFd<'_>, seals: i32) {
    // SAFETY: plain syscall on a live fd.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
}

/// Splices the first page of `page` into the pipe `w` (`vmsplice`): the
/// pipe then holds a reference to that folio.
///
/// # Errors
/// The kernel's, as a sentence.
pub(super) fn splice_page(w: BorrowedFd<'_>, page: &mut [u8]) -> Result<(), String> {
    let iov = libc::iovec {
        iov_base: page.as_mut_ptr().cast(),
        iov_len: 4096.min(page.len()),
    };
    // SAFETY: iov names memory of `page`, borrowed for the call.
    if unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) } != 4096 {
        return Err(format!("vmsplice: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
