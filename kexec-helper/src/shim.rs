//! The daemon's side of kmod-shim (`/dev/luo-shim`, `kmod-shim/`): stash the
//! folios of memfds and a state blob in the old kernel, get them back in the
//! new one. Every struct and ioctl number here is checked at compile time
//! against the values `kmod-shim/luo_shim.c` checks on its side.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use luo_store::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Where the shim's device appears.
pub const DEVICE: &str = "/dev/luo-shim";
/// The interface version this side speaks.
pub const VERSION: u32 = 1;
/// A stashed shmem file.
pub const SHMEM: u32 = 1;
/// A stashed hugetlbfs file.
pub const HUGETLB: u32 = 2;
/// The shim takes stashes.
pub const STATE_OPEN: u32 = 0;
/// A blob is published for the next kernel.
pub const STATE_PUBLISHED: u32 = 1;
/// The shim came up with what the previous kernel left.
pub const STATE_RESTORED: u32 = 2;

/// `struct luo_shim_stash`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Stash {
    /// In: the memfd.
    pub fd: i32,
    /// Out: [`SHMEM`] or [`HUGETLB`].
    pub kind: u32,
    /// In: the daemon's name for it.
    pub token: u64,
    /// Out: its size.
    pub size: u64,
    /// Out: folios preserved.
    pub folios: u64,
}

/// `struct luo_shim_blob`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Blob {
    /// User buffer.
    pub addr: u64,
    /// Its length.
    pub len: u64,
}

/// `struct luo_shim_info`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Info {
    /// Interface version.
    pub version: u32,
    /// `STATE_*`.
    pub state: u32,
    /// Length of the blob.
    pub blob_len: u64,
    /// Files stashed or restored.
    pub files: u64,
    /// Bytes of folios they hold.
    pub bytes: u64,
}

/// `struct luo_shim_file`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FileInfo {
    /// In: which.
    pub index: u64,
    /// Out: its token.
    pub token: u64,
    /// Out: its size.
    pub size: u64,
    /// Out: its kind.
    pub kind: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct luo_shim_read`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Read {
    /// The file.
    pub token: u64,
    /// Byte offset.
    pub offset: u64,
    /// User buffer.
    pub addr: u64,
    /// Its length.
    pub len: u64,
}

/// `struct luo_shim_freeze`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Freeze {
    /// A shmem file.
    pub fd: i32,
    /// 1 fixes its size, 0 frees it.
    pub frozen: u32,
}

/// `struct luo_shim_adopt`.
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Adopt {
    /// In: a restored file.
    pub token: u64,
    /// In: a writable shmem file of its size.
    pub fd: i32,
    /// Padding.
    pub pad: u32,
    /// In: the first of its folios (in file order) to place.
    pub first: u64,
    /// In: how many (0: all from `first`).
    pub count: u64,
    /// Out: folios put into the file's page cache as they are.
    pub moved: u64,
    /// Out: folios copied.
    pub copied: u64,
}

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (0xB7 << 8) | nr
}
const W: u32 = 1;
const R: u32 = 2;

/// `LUO_SHIM_STASH`.
pub const STASH: u32 = ioc(R | W, 1, size_of::<Stash>());
/// `LUO_SHIM_UNSTASH`.
pub const UNSTASH: u32 = ioc(W, 2, size_of::<u64>());
/// `LUO_SHIM_PUBLISH`.
pub const PUBLISH: u32 = ioc(W, 3, size_of::<Blob>());
/// `LUO_SHIM_UNPUBLISH`.
pub const UNPUBLISH: u32 = ioc(0, 4, 0);
/// `LUO_SHIM_INFO`.
pub const INFO: u32 = ioc(R, 5, size_of::<Info>());
/// `LUO_SHIM_FETCH`.
pub const FETCH: u32 = ioc(W, 6, size_of::<Blob>());
/// `LUO_SHIM_FILE`.
pub const FILE: u32 = ioc(R | W, 7, size_of::<FileInfo>());
/// `LUO_SHIM_READ`.
pub const READ: u32 = ioc(W, 8, size_of::<Read>());
/// `LUO_SHIM_RELEASE`.
pub const RELEASE: u32 = ioc(W, 9, size_of::<u64>());
/// `LUO_SHIM_FREEZE`.
pub const FREEZE: u32 = ioc(W, 10, size_of::<Freeze>());
/// `LUO_SHIM_ADOPT`.
pub const ADOPT: u32 = ioc(R | W, 11, size_of::<Adopt>());
/// `LUO_SHIM_MAP`.
pub const MAP: u32 = ioc(W, 12, size_of::<u64>());

// The same values kmod-shim/luo_shim.c asserts.
const _: () = assert!(size_of::<Stash>() == 32);
const _: () = assert!(size_of::<Blob>() == 16);
const _: () = assert!(size_of::<Info>() == 32);
const _: () = assert!(size_of::<FileInfo>() == 32);
const _: () = assert!(size_of::<Read>() == 32);
const _: () = assert!(STASH == 0xc020_b701);
const _: () = assert!(UNSTASH == 0x4008_b702);
const _: () = assert!(PUBLISH == 0x4010_b703);
const _: () = assert!(UNPUBLISH == 0x0000_b704);
const _: () = assert!(INFO == 0x8020_b705);
const _: () = assert!(FETCH == 0x4010_b706);
const _: () = assert!(FILE == 0xc020_b707);
const _: () = assert!(READ == 0x4020_b708);
const _: () = assert!(RELEASE == 0x4008_b709);
const _: () = assert!(size_of::<Freeze>() == 8);
const _: () = assert!(size_of::<Adopt>() == 48);
const _: () = assert!(FREEZE == 0x4008_b70a);
const _: () = assert!(ADOPT == 0xc030_b70b);
const _: () = assert!(MAP == 0x4008_b70c);

/// An open `/dev/luo-shim`.
#[derive(Debug)]
pub struct Shim {
    dev: File,
}

impl Shim {
    /// Opens the shim's device.
    ///
    /// # Errors
    /// ENOENT if the module is not loaded.
    pub fn open(path: &Path) -> std::io::Result<Shim> {
        Ok(Shim {
            dev: File::options().read(true).write(true).open(path)?,
        })
    }

    fn ioctl<T: IntoBytes + FromBytes>(&self, cmd: u32, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: arg is a live struct of the size the command encodes.
        let r =
            unsafe { libc::ioctl(self.dev.as_raw_fd(), cmd as _, (arg as *mut T).cast::<u8>()) };
        if r < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Stashes every folio of `file` under `token`.
    ///
    /// # Errors
    /// The shim's errno (EBADF, EINVAL not a memfd, EEXIST token, EBUSY file
    /// already stashed or blob published, ENOMEM).
    pub fn stash(&self, file: BorrowedFd<'_>, token: u64) -> Result<Stash, Errno> {
        self.stash_number(file.as_raw_fd(), token)
    }

    /// [`Shim::stash`] by fd number (bad numbers are the shim's to refuse).
    ///
    /// # Errors
    /// As [`Shim::stash`].
    pub fn stash_number(&self, fd: i32, token: u64) -> Result<Stash, Errno> {
        let mut a = Stash {
            fd,
            token,
            ..Stash::default()
        };
        self.ioctl(STASH, &mut a)?;
        Ok(a)
    }

    /// Drops a stash.
    ///
    /// # Errors
    /// ENOENT unknown token, EBUSY while published.
    pub fn unstash(&self, token: u64) -> Result<(), Errno> {
        let mut t = token;
        self.ioctl(UNSTASH, &mut t)
    }

    /// Publishes `blob` and every stash for the next kernel.
    ///
    /// # Errors
    /// EBUSY already published, E2BIG too large, ENOMEM, or KHO's errno.
    pub fn publish(&self, blob: &[u8]) -> Result<(), Errno> {
        let mut b = Blob {
            addr: blob.as_ptr() as u64,
            len: blob.len() as u64,
        };
        self.ioctl(PUBLISH, &mut b)
    }

    /// Withdraws a publication (the kexec did not happen).
    ///
    /// # Errors
    /// EINVAL if nothing is published.
    pub fn unpublish(&self) -> Result<(), Errno> {
        let mut none = 0u64;
        // SAFETY: _IO commands take no argument; the pointer is ignored.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), UNPUBLISH as _, &mut none) };
        if r < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// The shim's state.
    ///
    /// # Errors
    /// Never in practice (EFAULT).
    pub fn info(&self) -> Result<Info, Errno> {
        let mut i = Info::default();
        self.ioctl(INFO, &mut i)?;
        Ok(i)
    }

    /// The blob the previous kernel's daemon published.
    ///
    /// # Errors
    /// ENOENT if this boot did not come with one.
    pub fn fetch(&self) -> Result<Vec<u8>, Errno> {
        let info = self.info()?;
        let mut buf = vec![0u8; info.blob_len as usize];
        let mut b = Blob {
            addr: buf.as_mut_ptr() as u64,
            len: buf.len() as u64,
        };
        self.ioctl(FETCH, &mut b)?;
        Ok(buf)
    }

    /// The restored files.
    ///
    /// # Errors
    /// As [`Shim::info`].
    pub fn files(&self) -> Result<Vec<FileInfo>, Errno> {
        let n = self.info()?.files;
        (0..n)
            .map(|index| {
                let mut f = FileInfo {
                    index,
                    ..FileInfo::default()
                };
                self.ioctl(FILE, &mut f).map(|()| f)
            })
            .collect()
    }

    /// Copies `buf.len()` bytes at `offset` of a restored file into `buf`.
    ///
    /// # Errors
    /// ENOENT unknown token, EINVAL past the end, EFAULT.
    pub fn read(&self, token: u64, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let mut r = Read {
            token,
            offset,
            addr: buf.as_mut_ptr() as u64,
            len: buf.len() as u64,
        };
        self.ioctl(READ, &mut r)
    }

    /// Fills `file` (a writable shmem file of the restored size) with a
    /// restored file's folios: in its page cache as they are where the folio
    /// sizes match, copied where they do not. The folios stay readable with
    /// [`Shim::read`] until [`Shim::release`], so a failure loses nothing.
    ///
    /// # Errors
    /// ENOTTY from a module without it, EINVAL not shmem or not the size,
    /// EBUSY another file was being filled, EIO folios missing, ENOMEM.
    pub fn adopt(&self, token: u64, file: BorrowedFd<'_>) -> Result<Adopt, Errno> {
        self.adopt_range(token, file, 0, 0)
    }

    /// [`Shim::adopt`] for `count` of the file's folios from `first` (in
    /// file order; 0 for all the rest). Disjoint ranges of one file may be
    /// adopted from several threads at once.
    ///
    /// # Errors
    /// As [`Shim::adopt`].
    pub fn adopt_range(
        &self,
        token: u64,
        file: BorrowedFd<'_>,
        first: u64,
        count: u64,
    ) -> Result<Adopt, Errno> {
        let mut a = Adopt {
            token,
            fd: file.as_raw_fd(),
            first,
            count,
            ..Adopt::default()
        };
        self.ioctl(ADOPT, &mut a)?;
        Ok(a)
    }

    /// Hands a restored file's folios to a new fd of the module's own whose
    /// `mmap` maps them as they are (no copy; not a memfd: no seals, not
    /// hugetlbfs, cannot be stashed again). The file leaves the shim's list.
    ///
    /// # Errors
    /// ENOENT unknown token, EBUSY being adopted, EIO folios missing.
    pub fn map(&self, token: u64) -> Result<std::os::fd::OwnedFd, Errno> {
        use std::os::fd::FromRawFd;
        let mut t = token;
        // SAFETY: MAP reads one u64 from the pointer.
        let fd = unsafe { libc::ioctl(self.dev.as_raw_fd(), MAP as _, &mut t) };
        if fd < 0 {
            return Err(Errno::last());
        }
        // SAFETY: the ioctl returned a new fd that we now own.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// Fixes (or frees) the size of a shmem file as the kernel does while a
    /// memfd is preserved: `ftruncate`, growing writes and `fallocate` fail
    /// with EPERM.
    ///
    /// # Errors
    /// ENOTTY from a module without it, EINVAL not a shmem file, EBADF.
    pub fn freeze(&self, file: BorrowedFd<'_>, frozen: bool) -> Result<(), Errno> {
        let mut f = Freeze {
            fd: file.as_raw_fd(),
            frozen: u32::from(frozen),
        };
        self.ioctl(FREEZE, &mut f)
    }

    /// Lets a restored file's folios go.
    ///
    /// # Errors
    /// ENOENT unknown token.
    pub fn release(&self, token: u64) -> Result<(), Errno> {
        let mut t = token;
        self.ioctl(RELEASE, &mut t)
    }
}

/// A sealable memfd of `size` bytes for a stash of `kind`: hugetlb-backed
/// (2 MiB pages) for [`HUGETLB`], shmem otherwise.
///
/// # Errors
/// What failed, as a sentence.
pub fn memfd_of_kind(name: &str, kind: u32, size: u64) -> Result<std::os::fd::OwnedFd, String> {
    let backing = if kind == HUGETLB {
        luo_handlers::Backing::Hugetlb
    } else {
        luo_handlers::Backing::Shmem
    };
    luo_handlers::mem::create(name, backing, size)
}

/// Fixes preserved shmem files' sizes through kmod-shim (`LUO_SHIM_FREEZE`)
/// while the module is loaded; without it, the memfd handler's freeze-time
/// check stands alone. The device is looked for at most once a second.
#[derive(Debug)]
pub struct ShimSizeLock {
    path: std::path::PathBuf,
    dev: std::sync::Mutex<(Option<Shim>, Option<std::time::Instant>)>,
}

impl ShimSizeLock {
    /// A lock through the shim's device at `path`.
    pub fn new(path: &Path) -> ShimSizeLock {
        ShimSizeLock {
            path: path.to_path_buf(),
            dev: std::sync::Mutex::new((None, None)),
        }
    }
}

impl luo_handlers::SizeLock for ShimSizeLock {
    fn set(&self, file: BorrowedFd<'_>, frozen: bool) -> Result<(), Errno> {
        let mut dev = self
            .dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (shim, tried) = &mut *dev;
        if shim.is_none() && tried.is_none_or(|t| t.elapsed().as_secs() >= 1) {
            *tried = Some(std::time::Instant::now());
            *shim = Shim::open(&self.path).ok();
        }
        let Some(s) = shim else {
            return Err(Errno::ENODEV);
        };
        let r = s.freeze(file, frozen);
        if r == Err(Errno::ENOTTY) {
            // A module without FREEZE: look again later (it may be reloaded).
            *shim = None;
        }
        r
    }
}
