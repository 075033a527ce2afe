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
    if seals & libc::F_SEAL_EXEC != 0 && seals & libc::F_SEAL_FUTURE_WRITE == 0 {
        // Sealing exec on a file with exec bits seals writes too
        // (`memfd_add_seals`), so the original had none, as a memfd made
        // with MFD_NOEXEC_SEAL (systemd's, for one) has none.
        sys::chmod(fd.as_fd(), 0o666).map_err(|e| format!("chmod: {}", std::io::Error::from(e)))?;
    }
    if seals != 0 {
        sys::add_seals(fd.as_fd(), seals)
            .map_err(|e| format!("seal: {}", std::io::Error::from(e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seals as systemd's `memfd_new_and_seal` leaves them (MFD_NOEXEC_SEAL,
    /// then every write seal) come back exactly on a rebuilt memfd, and so
    /// do exec-sealed files that kept their exec bits.
    #[test]
    fn a_rebuilt_memfd_gets_exactly_the_seals_of_its_original() {
        let sealed =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        let cases = [
            (libc::MFD_NOEXEC_SEAL, sealed),
            (libc::MFD_NOEXEC_SEAL, 0),
            (libc::MFD_ALLOW_SEALING | libc::MFD_EXEC, libc::F_SEAL_EXEC),
            (libc::MFD_ALLOW_SEALING | libc::MFD_EXEC, sealed),
            (libc::MFD_ALLOW_SEALING, libc::F_SEAL_FUTURE_WRITE),
        ];
        for (flags, add) in cases {
            let original = OwnedFd::from(memfd("original", flags, 22).unwrap());
            if add != 0 {
                sys::add_seals(original.as_fd(), add).unwrap();
            }
            let (pos, seals) = position_and_seals(&original);
            let rebuilt = create("rebuilt", Backing::Shmem, 22).unwrap();
            set_position_and_seals(&rebuilt, pos, seals).unwrap();
            assert_eq!(
                sys::get_seals(rebuilt.as_fd()).unwrap() as i32,
                seals,
                "memfd_create flags {flags:#x}, seals added {add:#x}"
            );
        }
    }
}
