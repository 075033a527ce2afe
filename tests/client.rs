//! A LUO client for the probes: the uAPI's ioctls on raw fds, as the
//! kernel's selftests call them.

#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub const CREATE: u64 = 0xBA00;
pub const RETRIEVE: u64 = 0xBA01;
pub const PRESERVE: u64 = 0xBA40;
pub const RETRIEVE_FD: u64 = 0xBA41;
pub const FINISH: u64 = 0xBA42;
pub const GET_NAME: u64 = 0xBA43;

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// ioctl on a raw pointer; Ok(()) or Err(errno).
pub fn ioctl_ptr(fd: RawFd, cmd: u64, arg: *mut u8) -> Result<(), i32> {
    // SAFETY: the probe passes deliberately bad pointers; the kernel (and the
    // daemon) must answer EFAULT rather than touch our memory unsafely.
    if unsafe { libc::ioctl(fd, cmd as _, arg) } < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

pub fn ioctl(fd: RawFd, cmd: u64, buf: &mut [u8]) -> Result<(), i32> {
    ioctl_ptr(fd, cmd, buf.as_mut_ptr())
}

pub fn session_args(size: u32, name: &str) -> Vec<u8> {
    let mut v = vec![0u8; 72];
    v[..4].copy_from_slice(&size.to_ne_bytes());
    v[8..8 + name.len()].copy_from_slice(name.as_bytes());
    v
}

pub fn fd_args(fd: i32, token: u64) -> Vec<u8> {
    let mut v = vec![0u8; 16];
    v[..4].copy_from_slice(&16u32.to_ne_bytes());
    v[4..8].copy_from_slice(&fd.to_ne_bytes());
    v[8..].copy_from_slice(&token.to_ne_bytes());
    v
}

pub fn create(dev: RawFd, name: &str) -> Result<OwnedFd, i32> {
    let mut a = session_args(72, name);
    ioctl(dev, CREATE, &mut a)?;
    let fd = i32::from_ne_bytes(a[4..8].try_into().unwrap());
    // SAFETY: the ioctl returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn get_name(s: RawFd) -> Result<String, i32> {
    let mut a = vec![0u8; 72];
    a[..4].copy_from_slice(&72u32.to_ne_bytes());
    ioctl(s, GET_NAME, &mut a)?;
    Ok(String::from_utf8(a[8..].split(|&b| b == 0).next().unwrap().to_vec()).unwrap())
}

pub fn open(path: &str) -> Result<OwnedFd, i32> {
    open_with(path, libc::O_RDWR)
}

/// `open(path, flags | O_CLOEXEC)`.
pub fn open_with(path: &str, flags: i32) -> Result<OwnedFd, i32> {
    let p = CString::new(path).unwrap();
    // SAFETY: p is a valid C string.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// RETRIEVE_SESSION by name.
pub fn retrieve(dev: RawFd, name: &str) -> Result<OwnedFd, i32> {
    let mut a = session_args(72, name);
    ioctl(dev, RETRIEVE, &mut a)?;
    let fd = i32::from_ne_bytes(a[4..8].try_into().unwrap());
    // SAFETY: the ioctl returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SESSION_PRESERVE_FD.
pub fn preserve(session: RawFd, fd: RawFd, token: u64) -> Result<(), i32> {
    ioctl(session, PRESERVE, &mut fd_args(fd, token))
}

/// SESSION_RETRIEVE_FD.
pub fn retrieve_fd(session: RawFd, token: u64) -> Result<OwnedFd, i32> {
    let mut a = fd_args(-1, token);
    ioctl(session, RETRIEVE_FD, &mut a)?;
    let fd = i32::from_ne_bytes(a[4..8].try_into().unwrap());
    // SAFETY: the ioctl returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Becomes `nobody` (uid and gid 65534, no supplementary groups) for good.
pub fn become_nobody() {
    become_uid(65534);
}

/// Becomes `uid` (and gid `uid`, no supplementary groups) for good.
pub fn become_uid(uid: u32) {
    // SAFETY: plain credential syscalls; glibc applies them to every thread.
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(uid), 0);
        assert_eq!(libc::setuid(uid), 0);
    }
}

/// Runs `f` as `uid` in a forked child and asserts it passed (a panic in
/// it is reported on stderr and fails the caller).
pub fn in_child_as(uid: u32, f: impl FnOnce()) {
    // SAFETY: the child runs `f` and _exits; it never returns into the test
    // harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let passed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            become_uid(uid);
            f();
        }))
        .is_ok();
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(if passed { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the part run as uid {uid} failed (status {status:#x})"
    );
}

pub fn memfd() -> OwnedFd {
    // SAFETY: the name is a valid C string.
    let fd = unsafe { libc::memfd_create(c"probe".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A struct whose first `readable` bytes end exactly at an unmapped page.
pub fn struct_at_page_end(readable: usize) -> *mut u8 {
    // SAFETY: anonymous mapping with no pointer inputs.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: unmapping the second page of our own mapping.
    unsafe { libc::munmap(p.cast::<u8>().add(4096).cast(), 4096) };
    // SAFETY: the result stays inside the first (still mapped) page.
    let s = unsafe { p.cast::<u8>().add(4096 - readable) };
    // SAFETY: the first 4 bytes are inside the mapped page.
    unsafe { std::ptr::write_unaligned(s.cast::<u32>(), 72) };
    s
}

pub fn probe_device() -> Option<String> {
    std::env::var("LUO_PROBE_DEVICE").ok()
}

/// Forks a child that keeps `fds` open until the update ends it, as the
/// kernel's two-stage selftests do, and returns in the parent.
pub fn hold_until_update(fds: Vec<OwnedFd>) {
    // SAFETY: the child only closes its stdio and sleeps.
    if unsafe { libc::fork() } == 0 {
        let _keep = fds;
        // Let whoever reads our output see its end, as a daemon would.
        // SAFETY: closing the standard fds, which this child does not use again.
        unsafe {
            libc::setsid();
            for fd in 0..3 {
                libc::close(fd);
            }
        }
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}
