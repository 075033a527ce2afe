//! memfd handler: the userspace mirror of `mm/memfd_luo.c`.
//!
//! Accepts any shmem file with no links (a memfd, or an unlinked tmpfs file)
//! and, unlike Linux 7.2, hugetlb memfds (`MFD_HUGETLB`) through a second
//! handler with its own compatible string. Preserves contents, size, file
//! position and seals. The retrieved file is opened with the access mode of
//! the fd it was preserved through, never more: the kernel's retrieve makes a
//! new read-write file in the new kernel, but here the retrieved file is the
//! preserved inode itself, which other processes may still share, so a
//! read-only holder must not come back with a writable file.
//!
//! Holding the file keeps its pages: the daemon's reference is what the kernel's
//! pinned folios are. The kernel also freezes the size while a memfd is
//! preserved (`ftruncate`, writes past the end and `fallocate` fail with EPERM).
//! A daemon cannot block calls on a client's own fd by itself; given a
//! [`SizeLock`] (kmod-shim's `LUO_SHIM_FREEZE`, which sets the same inode flag
//! the kernel sets), a shmem file's size is fixed from preserve until it is
//! unpreserved, retrieved or finished, exactly as in the kernel. In every case
//! the handler also records the size at preserve and **refuses the freeze**
//! (EPERM) if it has changed (no lock, or hugetlb, which the kernel does not
//! preserve): the update fails instead of carrying a file of another size.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use luo_store::{Errno, FileHandler, FileId, FileState, Preserved, Result};

use crate::sys;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Seals memfd_luo preserves (`MEMFD_LUO_ALL_SEALS`).
pub const ALL_SEALS: u32 = (libc::F_SEAL_SEAL
    | libc::F_SEAL_SHRINK
    | libc::F_SEAL_GROW
    | libc::F_SEAL_WRITE
    | libc::F_SEAL_FUTURE_WRITE
    | libc::F_SEAL_EXEC) as u32;

/// Which memory a memfd handler serves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backing {
    /// shmem: `memfd_create` without `MFD_HUGETLB`, unlinked tmpfs files.
    Shmem,
    /// hugetlbfs: `memfd_create(…, MFD_HUGETLB)`.
    Hugetlb,
}

/// Serialized state of a preserved memfd (`struct memfd_luo_ser`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemfdState {
    /// File position at freeze.
    pub pos: u64,
    /// Size at preserve.
    pub size: u64,
    /// Seals at preserve.
    pub seals: u32,
    /// Access mode of the preserved fd (`O_RDONLY`, `O_WRONLY`, `O_RDWR`).
    pub access: i32,
}

const STATE_VERSION: u32 = 2;
const STATE_LEN: usize = 4 + 8 + 8 + 4 + 4;
/// Version 1 (no access mode) was written by earlier daemons; such files
/// were always retrieved read-write, and still are.
const STATE_V1_LEN: usize = 4 + 8 + 8 + 4;

impl MemfdState {
    /// Little-endian, versioned encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.seals.to_le_bytes());
        out.extend_from_slice(&self.access.to_le_bytes());
        out
    }

    /// Decodes [`MemfdState::encode`]'s output.
    ///
    /// # Errors
    /// `EINVAL` for a wrong length or version.
    pub fn decode(data: &[u8]) -> Result<MemfdState> {
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
        let access = match (data.len(), data.get(..4).map(|_| u32_at(0))) {
            (STATE_LEN, Some(STATE_VERSION)) => u32_at(24) as i32,
            (STATE_V1_LEN, Some(1)) => libc::O_RDWR,
            _ => return Err(Errno::EINVAL),
        };
        if ![libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR].contains(&access) {
            return Err(Errno::EINVAL);
        }
        Ok(MemfdState {
            pos: u64_at(4),
            size: u64_at(12),
            seals: u32_at(20),
            access,
        })
    }
}

/// Fixes the size of a shmem file while it is preserved, as the kernel's
/// `shmem_freeze` does.
pub trait SizeLock: Send + Sync + std::fmt::Debug {
    /// Fixes (`frozen`) or frees the size of `file`.
    ///
    /// # Errors
    /// Whatever stops it; the handler then relies on its freeze-time check.
    fn set(&self, file: BorrowedFd<'_>, frozen: bool) -> Result<()>;
}

/// The memfd file handler.
#[derive(Debug)]
pub struct MemfdHandler {
    backing: Backing,
    size_lock: Option<Arc<dyn SizeLock>>,
}

impl MemfdHandler {
    /// A handler for one backing.
    pub fn new(backing: Backing) -> MemfdHandler {
        MemfdHandler {
            backing,
            size_lock: None,
        }
    }

    /// A handler that fixes preserved shmem files' sizes with `lock`.
    pub fn with_size_lock(backing: Backing, lock: Arc<dyn SizeLock>) -> MemfdHandler {
        MemfdHandler {
            backing,
            size_lock: Some(lock),
        }
    }

    /// Fixes or frees the size, where a lock is given and the kernel would.
    fn lock_size(&self, file: Option<BorrowedFd<'_>>, frozen: bool) {
        if let (Some(lock), Some(file), Backing::Shmem) = (&self.size_lock, file, self.backing) {
            // A lock that fails leaves the freeze-time check in charge.
            let _ = lock.set(file, frozen);
        }
    }

    fn magic(&self) -> i64 {
        match self.backing {
            Backing::Shmem => TMPFS_MAGIC,
            Backing::Hugetlb => HUGETLBFS_MAGIC,
        }
    }

    fn snapshot(file: BorrowedFd<'_>) -> Result<MemfdState> {
        let seals = sys::get_seals(file)?;
        if seals & !ALL_SEALS != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let size = sys::fstat(file)?.st_size as u64;
        if size.div_ceil(4096) > u64::from(u32::MAX) {
            return Err(Errno::EFBIG);
        }
        Ok(MemfdState {
            pos: sys::position(file)?,
            size,
            seals,
            access: sys::access_mode(file)?,
        })
    }
}

impl FileHandler for MemfdHandler {
    fn compatible(&self) -> &'static str {
        match self.backing {
            Backing::Shmem => "memfd-v1",
            Backing::Hugetlb => "memfd-hugetlb-v1",
        }
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        // F_GET_SEALS answers for shmem and hugetlbfs files alone, from the
        // inode, and fails for every other file without asking its
        // filesystem: the fstat below never reaches a FUSE or network
        // filesystem that could leave the daemon waiting.
        if sys::get_seals(file).is_err() {
            return false;
        }
        let Ok(st) = sys::fstat(file) else {
            return false;
        };
        st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_nlink == 0
            && sys::fs_magic(file).is_ok_and(|m| m == self.magic())
    }

    fn get_id(&self, file: BorrowedFd<'_>) -> Result<FileId> {
        let st = sys::fstat(file)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    fn preserve(&self, file: BorrowedFd<'_>) -> Result<Preserved> {
        // Fixed first, so that the size recorded is the one that stays.
        self.lock_size(Some(file), true);
        match Self::snapshot(file) {
            Ok(state) => Ok(Preserved {
                data: state.encode(),
            }),
            Err(e) => {
                self.lock_size(Some(file), false);
                Err(e)
            }
        }
    }

    fn unpreserve(&self, state: &FileState<'_>) {
        self.lock_size(state.file, false);
    }

    fn freeze(&self, state: &FileState<'_>, data: &mut Vec<u8>) -> Result<()> {
        let file = state.file.ok_or(Errno::EINVAL)?;
        let mut saved = MemfdState::decode(state.data)?;
        if sys::fstat(file)?.st_size as u64 != saved.size {
            return Err(Errno::EPERM);
        }
        saved.pos = sys::position(file)?;
        *data = saved.encode();
        Ok(())
    }

    fn retrieve(&self, state: &FileState<'_>) -> Result<OwnedFd> {
        let saved = MemfdState::decode(state.data)?;
        let carried = state.carried.ok_or(Errno::EINVAL)?;
        if sys::fstat(carried)?.st_size as u64 != saved.size
            || sys::get_seals(carried)? != saved.seals
        {
            return Err(Errno::EIO);
        }
        let file = sys::reopen(carried, saved.access)?;
        sys::seek_to(file.as_fd(), saved.pos)?;
        // The kernel's retrieve makes a new file, whose size is free.
        self.lock_size(Some(carried), false);
        Ok(file)
    }

    fn finish(&self, state: &FileState<'_>) {
        // Retrieved files were freed at retrieve; one never retrieved is
        // dropped, and may still be open elsewhere.
        self.lock_size(state.carried, false);
    }
}
