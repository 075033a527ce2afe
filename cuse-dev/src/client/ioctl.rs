//! The LUO ioctls as a client makes them (the kernel selftests'
//! `libliveupdate.h`): typed calls on a device or session fd, each taking
//! ownership of the fd the kernel returns. The benchmark and the demo use
//! them against any device, the kernel's or ours.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::uapi::{self, FdArgs, FinishArgs, SessionArgs};

/// `ioctl(fd, cmd, arg)` with `arg` the command's struct.
///
/// # Errors
/// The kernel's.
pub fn call<T: IntoBytes + FromBytes + Immutable>(
    fd: BorrowedFd<'_>,
    cmd: u32,
    arg: &mut T,
) -> io::Result<()> {
    // SAFETY: arg is a live, writable struct of the size `cmd` encodes
    // (every LUO command's struct is its own `T`).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, (arg as *mut T).cast::<u8>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn name_field(name: &str) -> io::Result<[u8; 64]> {
    let mut field = [0u8; 64];
    if name.len() >= field.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(field)
}

/// Takes the fd the kernel wrote into a struct.
fn returned_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the call succeeded, so `fd` is a new fd installed for us
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn session(dev: BorrowedFd<'_>, cmd: u32, name: &str) -> io::Result<OwnedFd> {
    let mut a = SessionArgs {
        size: size_of::<SessionArgs>() as u32,
        fd: -1,
        name: name_field(name)?,
    };
    call(dev, cmd, &mut a)?;
    returned_fd(a.fd)
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION`.
///
/// # Errors
/// The device's errno.
pub fn create_session(dev: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    session(dev, uapi::CREATE_SESSION, name)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`.
///
/// # Errors
/// The device's errno.
pub fn retrieve_session(dev: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    session(dev, uapi::RETRIEVE_SESSION, name)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD`.
///
/// # Errors
/// The device's errno.
pub fn preserve_fd(session: BorrowedFd<'_>, file: BorrowedFd<'_>, token: u64) -> io::Result<()> {
    let mut a = FdArgs {
        size: size_of::<FdArgs>() as u32,
        fd: file.as_raw_fd(),
        token,
    };
    call(session, uapi::PRESERVE_FD, &mut a)
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD`.
///
/// # Errors
/// The device's errno.
pub fn retrieve_fd(session: BorrowedFd<'_>, token: u64) -> io::Result<OwnedFd> {
    let mut a = FdArgs {
        size: size_of::<FdArgs>() as u32,
        fd: -1,
        token,
    };
    call(session, uapi::RETRIEVE_FD, &mut a)?;
    returned_fd(a.fd)
}

/// `LIVEUPDATE_SESSION_FINISH`.
///
/// # Errors
/// The device's errno.
pub fn finish(session: BorrowedFd<'_>) -> io::Result<()> {
    let mut a = FinishArgs {
        size: size_of::<FinishArgs>() as u32,
        reserved: 0,
    };
    call(session, uapi::FINISH, &mut a)
}

/// `LIVEUPDATE_SESSION_GET_NAME`.
///
/// # Errors
/// The device's errno (ENOTTY for a file that is no session).
pub fn get_name(session: BorrowedFd<'_>) -> io::Result<String> {
    let mut a = uapi::GetNameArgs {
        size: size_of::<uapi::GetNameArgs>() as u32,
        reserved: 0,
        name: [0; 64],
    };
    call(session, uapi::GET_NAME, &mut a)?;
    let len = a.name.iter().position(|&b| b == 0).unwrap_or(a.name.len());
    Ok(String::from_utf8_lossy(&a.name[..len]).into_owned())
}
