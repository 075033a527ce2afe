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

/// `luo shim-check`: exercises the shim across a real kexec with a shmem and
/// a hugetlb memfd written with a known pattern (the rig's `shim` scenario).
pub mod check {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::path::Path;
    use std::time::Instant;

    use luo_store::Errno;
    use serde::{Deserialize, Serialize};

    use super::{Shim, HUGETLB, SHMEM, STATE_RESTORED};
    use crate::kexec::{restore_memfd_with, Filled, StashedFile};
    use crate::memfd::{memfd_of_kind, Mapping};

    /// What stage 1 leaves in the blob about each file.
    #[derive(Serialize, Deserialize, Debug)]
    struct Meta {
        token: u64,
        kind: u32,
        size: u64,
        pos: u64,
        seals: i32,
        /// [`page_sum`] of every page, recorded before the stash.
        pages: Vec<u64>,
    }

    const PAGE: usize = 4096;
    /// The token of a hugetlb file that comes back mapped through the
    /// module (`LUO_SHIM_MAP`) instead of copied.
    const MAPPED: u64 = 3;

    fn word(token: u64, i: u64) -> u64 {
        (i ^ token.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn expect(what: &str, got: Result<(), Errno>, want: Errno) -> Result<(), String> {
        match got {
            Err(e) if e == want => Ok(()),
            other => Err(format!("{what}: expected {want}, got {other:?}")),
        }
    }

    fn stage1(shim: &Shim, shmem_mib: u64, hugetlb_mib: u64) -> Result<(), String> {
        // Bad input first: nothing may change.
        expect(
            "stash of fd -1",
            shim.stash_number(-1, 1).map(|_| ()),
            Errno::EBADF,
        )?;
        expect(
            "stash of a closed fd",
            shim.stash_number(999, 1).map(|_| ()),
            Errno::EBADF,
        )?;
        let mut p = [0i32; 2];
        // SAFETY: p has room for the two fds pipe() writes.
        if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fds we own.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        expect(
            "stash of a pipe",
            shim.stash(r.as_fd(), 1).map(|_| ()),
            Errno::EINVAL,
        )?;
        expect(
            "read before a kexec",
            shim.read(1, 0, &mut [0; 8]),
            Errno::ENOENT,
        )?;
        expect(
            "unpublish with nothing published",
            shim.unpublish(),
            Errno::EINVAL,
        )?;
        expect(
            "unstash of an unknown token",
            shim.unstash(99),
            Errno::ENOENT,
        )?;

        let mut metas = Vec::new();
        let mut keep = Vec::new();
        let mapped_mib = if hugetlb_mib > 0 { 4 } else { 0 };
        for (token, kind, mib) in [
            (1u64, SHMEM, shmem_mib),
            (2, HUGETLB, hugetlb_mib),
            (MAPPED, HUGETLB, mapped_mib),
        ] {
            if mib == 0 {
                continue;
            }
            let size = mib << 20;
            let fd = memfd_of_kind("luo-shim-check", kind, size)?;
            let map = Mapping::new(fd.as_raw_fd(), size as usize).map_err(|e| e.to_string())?;
            // SAFETY: the mapping is ours alone while it lives.
            let bytes = unsafe { map.bytes() };
            for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&word(token, i as u64).to_ne_bytes());
            }
            let pages = page_sums(bytes);
            drop(map);
            let pos = if kind == SHMEM { 12345 } else { 0 };
            let seals = if kind == SHMEM {
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
            } else {
                0
            };
            let mut file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
            file.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
            // SAFETY: plain fcntl on our fd.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            let t = Instant::now();
            let s = shim
                .stash(fd.as_fd(), token)
                .map_err(|e| format!("stash {token}: {e}"))?;
            println!(
                "SHIM stashed token {token}: {mib} MiB in {} folios in {:.1} ms",
                s.folios,
                t.elapsed().as_secs_f64() * 1e3
            );
            if s.size != size || s.kind != kind {
                return Err(format!("stash {token} reported {s:?}"));
            }
            expect(
                "stash of a used token",
                shim.stash(fd.as_fd(), token).map(|_| ()),
                Errno::EEXIST,
            )?;
            expect(
                "stash of a stashed file",
                shim.stash(fd.as_fd(), 77).map(|_| ()),
                Errno::EBUSY,
            )?;
            metas.push(Meta {
                token,
                kind,
                size,
                pos,
                seals,
                pages,
            });
            keep.push(fd);
        }
        let blob = serde_json::to_vec(&metas).map_err(|e| e.to_string())?;
        shim.publish(&blob).map_err(|e| format!("publish: {e}"))?;
        expect("publish twice", shim.publish(&blob), Errno::EBUSY)?;
        expect(
            "stash after publish",
            shim.stash(keep[0].as_fd(), 9).map(|_| ()),
            Errno::EBUSY,
        )?;
        // A kexec that does not happen: withdraw, then publish again.
        shim.unpublish().map_err(|e| format!("unpublish: {e}"))?;
        shim.publish(&blob)
            .map_err(|e| format!("publish again: {e}"))?;
        let info = shim.info().map_err(|e| e.to_string())?;
        println!("SHIM published {} files, {} bytes", info.files, info.bytes);
        Ok(())
    }

    fn stage2(shim: &Shim) -> Result<(), String> {
        let info = shim.info().map_err(|e| e.to_string())?;
        if info.state != STATE_RESTORED {
            return Err(format!("the shim did not come back with files: {info:?}"));
        }
        let metas: Vec<Meta> = serde_json::from_slice(&shim.fetch().map_err(|e| e.to_string())?)
            .map_err(|e| format!("the blob: {e}"))?;
        let files = shim.files().map_err(|e| e.to_string())?;
        if files.len() != metas.len() {
            return Err(format!(
                "{} files came back, {} were stashed",
                files.len(),
                metas.len()
            ));
        }
        for m in &metas {
            let f = files
                .iter()
                .find(|f| f.token == m.token)
                .ok_or(format!("token {} did not come back", m.token))?;
            if f.size != m.size || f.kind != m.kind {
                return Err(format!(
                    "token {}: came back as {f:?}, stashed {m:?}",
                    m.token
                ));
            }
            expect(
                "read past the end",
                shim.read(m.token, m.size, &mut [0; 1]),
                Errno::EINVAL,
            )?;
            if m.token == MAPPED {
                let fd = shim
                    .map(m.token)
                    .map_err(|e| format!("map {}: {e}", m.token))?;
                let map =
                    Mapping::new(fd.as_raw_fd(), m.size as usize).map_err(|e| e.to_string())?;
                // SAFETY: the mapping is ours alone while it lives.
                verify_contents(unsafe { map.bytes() }, m)?;
                expect("map twice", shim.map(m.token).map(|_| ()), Errno::ENOENT)?;
                println!(
                    "SHIM token {} (hugetlb, mapped through the module): {} MiB identical ({} pages checked)",
                    m.token,
                    m.size >> 20,
                    m.pages.len()
                );
                continue;
            }
            let stashed = StashedFile {
                session: 0,
                token: m.token,
                shim_token: m.token,
                kind: m.kind,
                size: m.size,
                pos: m.pos,
                seals: m.seals,
            };
            let t = Instant::now();
            let (fd, filled) = restore_memfd_with(shim, &stashed, true)?;
            shim.release(m.token)
                .map_err(|e| format!("release {}: {e}", m.token))?;
            let took = t.elapsed();
            if m.kind == SHMEM && !matches!(filled, Filled::InPlace { moved, .. } if moved > 0) {
                return Err(format!("token {}: shmem came back {filled:?}", m.token));
            }
            verify(&fd, m)?;
            println!(
                "SHIM token {} ({}): {} MiB identical ({} pages checked), position and seals back, restored in {:.1} ms ({filled:?})",
                m.token,
                if m.kind == HUGETLB { "hugetlb" } else { "shmem" },
                m.size >> 20,
                m.pages.len(),
                took.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// A 64-bit sum of one page, a multiply per word: position-independent,
    /// so a page that comes back elsewhere or half-overwritten differs.
    fn page_sum(page: &[u8]) -> u64 {
        page.chunks_exact(8).fold(0xCBF2_9CE4_8422_2325, |h, w| {
            let w = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
            (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29)
        })
    }

    /// The sum of every page of `bytes`.
    fn page_sums(bytes: &[u8]) -> Vec<u64> {
        bytes.chunks(PAGE).map(page_sum).collect()
    }

    /// Every page's sum, every word's pattern, the position and the seals
    /// of a restored file against what stage 1 recorded.
    fn verify(fd: &OwnedFd, m: &Meta) -> Result<(), String> {
        let map = Mapping::new(fd.as_raw_fd(), m.size as usize).map_err(|e| e.to_string())?;
        // SAFETY: the mapping is ours alone while it lives.
        verify_contents(unsafe { map.bytes() }, m)?;
        drop(map);
        verify_position_and_seals(fd, m)
    }

    /// Every page's sum and every word's pattern.
    fn verify_contents(bytes: &[u8], m: &Meta) -> Result<(), String> {
        let sums = page_sums(bytes);
        if sums.len() != m.pages.len() {
            return Err(format!(
                "token {}: {} pages, {} recorded",
                m.token,
                sums.len(),
                m.pages.len()
            ));
        }
        let bad: Vec<usize> = (0..sums.len()).filter(|&i| sums[i] != m.pages[i]).collect();
        if let Some(first) = bad.first() {
            return Err(format!(
                "token {}: {} of {} pages differ from their recorded sums (first: page {first})",
                m.token,
                bad.len(),
                sums.len()
            ));
        }
        let differs = bytes
            .chunks_exact(8)
            .enumerate()
            .find(|(i, w)| **w != word(m.token, *i as u64).to_ne_bytes());
        if let Some((i, _)) = differs {
            return Err(format!("token {}: word {i} differs", m.token));
        }
        Ok(())
    }

    fn verify_position_and_seals(fd: &OwnedFd, m: &Meta) -> Result<(), String> {
        // SAFETY: plain syscalls on our fd.
        let (pos, seals) = unsafe {
            (
                libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR),
                libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS),
            )
        };
        if pos as u64 != m.pos || seals != m.seals {
            return Err(format!(
                "token {}: position {pos}, seals {seals:#x}",
                m.token
            ));
        }
        Ok(())
    }

    /// Runs stage 1 (stash and publish) or 2 (restore and verify).
    ///
    /// # Errors
    /// What did not hold, as a sentence.
    pub fn run(device: &Path, stage: u32, shmem_mib: u64, hugetlb_mib: u64) -> Result<(), String> {
        let shim = Shim::open(device).map_err(|e| format!("open {}: {e}", device.display()))?;
        match stage {
            1 => stage1(&shim, shmem_mib, hugetlb_mib),
            _ => stage2(&shim),
        }
    }
}

/// The kexec case of `luo bench`: time to stash memfds (stage 1, before the
/// kexec) and to restore each into a fresh memfd (stage 2, after), with row
/// names matching the device rows so that the side-by-side table lines them
/// up with the in-kernel module's preserve and retrieve. Each shmem size is
/// stashed twice: one comes back in place (`LUO_SHIM_ADOPT`), its twin by
/// copying (the path a module without ADOPT, or hugetlb, takes).
pub mod bench {
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::Instant;

    use crate::bench::{filled_memfd, size_name, Row, StageReport};
    use crate::kexec::{restore_memfd_with, Filled, StashedFile};
    use crate::memfd::{memfd_of_kind, Mapping};

    use super::{Shim, HUGETLB, SHMEM};

    /// What the low two bits of a bench token say about its file.
    const IN_PLACE: u64 = 0;
    const COPY: u64 = 1;
    const HUGE: u64 = 2;
    const HUGE_MAP: u64 = 3;

    fn row(op: String, t: Instant) -> Row {
        Row {
            op,
            micros: vec![t.elapsed().as_secs_f64() * 1e6],
            floor: Vec::new(),
        }
    }

    /// Stashes, per size, a filled shmem memfd and its twin, then one filled
    /// hugetlb memfd of `hugetlb_mib` (none for 0), and publishes.
    ///
    /// # Errors
    /// What failed, as a sentence.
    pub fn stage1(shim: &Shim, sizes_kib: &[u64], hugetlb_mib: u64) -> Result<StageReport, String> {
        let mut rows = Vec::new();
        for &kib in sizes_kib {
            for variant in [IN_PLACE, COPY] {
                let f = filled_memfd(kib).map_err(|e| e.to_string())?;
                let t = Instant::now();
                shim.stash(f.as_fd(), kib << 2 | variant)
                    .map_err(|e| format!("stash {}: {e}", size_name(kib)))?;
                if variant == IN_PLACE {
                    rows.push(row(format!("PRESERVE_FD {}", size_name(kib)), t));
                }
            }
        }
        // hugetlb: one to copy back, its twin to map back.
        for variant in [HUGE, HUGE_MAP] {
            if hugetlb_mib == 0 {
                break;
            }
            let kib = hugetlb_mib << 10;
            let f = memfd_of_kind("luo-bench", HUGETLB, kib << 10)?;
            let map =
                Mapping::new(f.as_raw_fd(), (kib << 10) as usize).map_err(|e| e.to_string())?;
            // SAFETY: the mapping is ours alone while it lives.
            unsafe { map.bytes() }.fill(0x5a);
            drop(map);
            let t = Instant::now();
            shim.stash(f.as_fd(), kib << 2 | variant)
                .map_err(|e| format!("stash {} hugetlb: {e}", size_name(kib)))?;
            if variant == HUGE {
                rows.push(row(format!("PRESERVE_FD {} hugetlb", size_name(kib)), t));
            }
        }
        shim.publish(b"bench")
            .map_err(|e| format!("publish: {e}"))?;
        Ok(StageReport {
            rows,
            session: "kmod-shim".into(),
        })
    }

    /// The alternative for hugetlb: the restored folios mapped through the
    /// module's own file, every page touched (and checked) once.
    fn mapped_and_touched(shim: &Shim, token: u64, size: u64) -> Result<(), String> {
        let fd = shim.map(token).map_err(|e| format!("map {token}: {e}"))?;
        let map = Mapping::new(fd.as_raw_fd(), size as usize).map_err(|e| e.to_string())?;
        // SAFETY: the mapping is ours alone while it lives.
        let bytes = unsafe { map.bytes() };
        if let Some(i) = (0..bytes.len()).step_by(4096).find(|&i| bytes[i] != 0x5a) {
            return Err(format!("mapped token {token}: byte {i} differs"));
        }
        Ok(())
    }

    /// Restores every stash into a fresh memfd: shmem in place and (the
    /// twin) by copying, hugetlb by copying (and its twin mapped instead).
    ///
    /// # Errors
    /// What failed, as a sentence.
    pub fn stage2(shim: &Shim) -> Result<StageReport, String> {
        let mut files = shim.files().map_err(|e| e.to_string())?;
        files.sort_by_key(|f| (f.size, f.token & 3));
        let mut rows = Vec::new();
        for f in files {
            let variant = f.token & 3;
            let stashed = StashedFile {
                session: 0,
                token: f.token,
                shim_token: f.token,
                kind: f.kind,
                size: f.size,
                pos: 0,
                seals: 0,
            };
            let name = size_name(f.size / 1024);
            if variant == HUGE_MAP {
                let t = Instant::now();
                mapped_and_touched(shim, f.token, f.size)?;
                rows.push(row(format!("RETRIEVE_FD {name} hugetlb mapped"), t));
                continue;
            }
            let t = Instant::now();
            let (fd, filled) = restore_memfd_with(shim, &stashed, variant == IN_PLACE)?;
            shim.release(f.token)
                .map_err(|e| format!("release {}: {e}", f.token))?;
            let op = match variant {
                IN_PLACE => format!("RETRIEVE_FD {name}"),
                COPY => format!("RETRIEVE_FD {name} copy"),
                _ => format!("RETRIEVE_FD {name} hugetlb"),
            };
            rows.push(row(op, t));
            let expected = match variant {
                IN_PLACE if f.kind == SHMEM => matches!(filled, Filled::InPlace { .. }),
                _ => filled == Filled::Copied,
            };
            if !expected {
                return Err(format!("{} came back {filled:?}", size_name(f.size / 1024)));
            }
            drop(fd);
        }
        Ok(StageReport {
            rows,
            session: "kmod-shim".into(),
        })
    }
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
