//! Making the memfds a handler takes: shmem or hugetlb (2 MiB pages),
//! sealable, at a size; and carrying a file's position and seals over to
//! a rebuilt copy, as `memfd_luo` does on retrieve.

use std::os::fd::{AsFd, OwnedFd};

pub use crate::mapping::{Mapping, PAGE};
use crate::memfd::Backing;
use crate::sys;
pub use crate::sys::memfd;

/// A sealable memfd of `size` bytes with `backing`.
///
/// # Errors
/// What failed, as a sentence.
pub fn create(name: &str, backing: Backing, size: u64) -> Result<OwnedFd, String> {
    let flags = libc::MFD_ALLOW_SEALING
        | match backing {
            Backing::Hugetlb => libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            Backing::Shmem => 0,
        };
    memfd(name, flags, size)
        .map(OwnedFd::from)
        .map_err(|e| format!("a {} MiB memfd: {e}", size >> 20))
}

/// Position and seals of an open memfd (0 for either that cannot be read).
pub fn position_and_seals(fd: &OwnedFd) -> (u64, i32) {
    let pos = sys::position(fd.as_fd()).unwrap_or(0);
    let seals = sys::get_seals(fd.as_fd()).map_or(0, |s| s as i32);
    (pos, seals)
}

/// Gives a rebuilt memfd the position and seals its original had.
///
/// # Errors
/// Adding the seals failed, as a sentence.
pub fn set_position_and_seals(fd: &OwnedFd, pos: u64, seals: i32) -> Result<(), String> {
    // As before a kexec: a position past what lseek takes is left at 0.
    let _ = sys::seek_to(fd.as_fd(), pos);
    if seals != 0 {
        sys::add_seals(fd.as_fd(), seals)
            .map_err(|e| format!("seal: {}", std::io::Error::from(e)))?;
    }
    Ok(())
}
