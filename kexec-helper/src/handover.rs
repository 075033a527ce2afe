//! The daemon's half of a real kexec: what it hands to kmod-shim before the
//! jump and how the next kernel's daemon rebuilds the incoming sessions.
//!
//! Before: every outgoing session is frozen, the folios of each preserved
//! memfd are stashed (one shim token per file), and a blob — the store image
//! plus, per file, its stash token, kind, size, position and seals — is
//! published. After: each file is read back into a fresh memfd of the same
//! kind, which becomes the carried fd of an incoming file, exactly as after a
//! simulated update.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use luo_handlers::mem::{self, Mapping};
use luo_store::{Errno, FileImage, StoreImage};
use serde::{Deserialize, Serialize};

use crate::shim::{memfd_of_kind, Shim};

/// The blob's format version.
pub const IMAGE_VERSION: u32 = 1;

/// One stashed file.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StashedFile {
    /// Its session's id.
    pub session: u64,
    /// Its LUO token.
    pub token: u64,
    /// Its stash in the shim.
    pub shim_token: u64,
    /// `shim::SHMEM` or `shim::HUGETLB`.
    pub kind: u32,
    /// Size in bytes.
    pub size: u64,
    /// File position.
    pub pos: u64,
    /// `F_GET_SEALS`.
    pub seals: i32,
}

/// What crosses the kexec besides the folios.
#[derive(Serialize, Deserialize, Debug)]
pub struct KexecImage {
    /// Format version.
    pub version: u32,
    /// The store as it was at the freeze (outgoing sessions).
    pub store: StoreImage,
    /// The stashed files.
    pub files: Vec<StashedFile>,
}

/// How a restored memfd got its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Nothing to fill.
    Empty,
    /// shmem: the restored folios went into its page cache (`moved`), any
    /// of another size were copied by the module (`copied`).
    InPlace {
        /// Folios placed as they are.
        moved: u64,
        /// Folios copied.
        copied: u64,
    },
    /// Read from the shim into a mapping (hugetlb, or a module without
    /// `LUO_SHIM_ADOPT`, or one that refused it).
    Copied,
}

/// A fresh memfd with the contents, size, position and seals of a stashed
/// file; the shim lets the folios go afterwards.
///
/// # Errors
/// What failed, as a sentence.
pub fn restore_memfd(shim: &Shim, f: &StashedFile) -> Result<OwnedFd, String> {
    let (fd, _) = restore_memfd_with(shim, f, true)?;
    shim.release(f.shim_token)
        .map_err(|e| format!("release stash {}: {e}", f.shim_token))?;
    Ok(fd)
}

/// Why a stashed file could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// A hugetlb file and too few free huge pages for it: the stash is
    /// whole and can be rebuilt once the pool has them.
    NoHugePages(String),
    /// Anything else.
    Failed(String),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::NoHugePages(why) | RestoreError::Failed(why) => f.write_str(why),
        }
    }
}

impl From<RestoreError> for String {
    fn from(e: RestoreError) -> String {
        e.to_string()
    }
}

/// Free 2 MiB huge pages (`/sys/kernel/mm/hugepages`), if known.
pub fn free_huge_pages() -> Option<u64> {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The 2 MiB huge pages a hugetlb file of `size` bytes takes.
pub fn huge_pages_for(size: u64) -> u64 {
    size.div_ceil(2 << 20)
}

/// A fresh memfd with the contents, size, position and seals of a stashed
/// file, and how the contents came back; `in_place` false copies even where
/// the shim could fill the file in place. The shim keeps the folios until
/// [`Shim::release`]: the daemon lets them go only once the new memfd is
/// saved with the keeper, so a daemon killed before that loses nothing.
///
/// # Errors
/// [`RestoreError::NoHugePages`] for a hugetlb file the pool has no room for
/// (checked first, and when mapping the new file fails for want of pages);
/// otherwise what failed, as a sentence.
pub fn restore_memfd_with(
    shim: &Shim,
    f: &StashedFile,
    in_place: bool,
) -> Result<(OwnedFd, Filled), RestoreError> {
    let hugetlb = f.kind == crate::shim::HUGETLB;
    let need = huge_pages_for(f.size);
    if hugetlb {
        if let Some(free) = free_huge_pages().filter(|free| *free < need) {
            return Err(short_of_huge_pages(need, free));
        }
    }
    let fd = memfd_of_kind("luo-restored", f.kind, f.size).map_err(RestoreError::Failed)?;
    let filled = fill(shim, f, &fd, in_place).map_err(|e| match e {
        Fill::NoMemory(_) if hugetlb => {
            short_of_huge_pages(need, free_huge_pages().unwrap_or_default())
        }
        Fill::NoMemory(why) | Fill::Failed(why) => RestoreError::Failed(why),
    })?;
    mem::set_position_and_seals(&fd, f.pos, f.seals).map_err(RestoreError::Failed)?;
    Ok((fd, filled))
}

fn short_of_huge_pages(need: u64, free: u64) -> RestoreError {
    RestoreError::NoHugePages(format!(
        "it needs {need} free 2 MiB huge pages and {free} are free (raise vm.nr_hugepages)"
    ))
}

/// Why a fill failed: for want of memory, or otherwise.
enum Fill {
    NoMemory(String),
    Failed(String),
}

/// Fills `fd` from the stash: shmem in place, the rest (or when the module
/// refuses) by copying. A refused or interrupted in-place fill leaves every
/// folio readable, and the copy writes every byte of the same file.
///
/// A write-sealed file is copied: kmod-shim keeps a reference on every
/// folio it placed until the stash is released (after the keeper has the
/// new memfd), and the kernel refuses `F_SEAL_WRITE` with EBUSY while a
/// folio has references beyond the page cache's (`memfd_wait_for_pins`).
/// Such files are immutable data (systemd's mapping, sealed blobs), not
/// guest RAM, and small.
fn fill(shim: &Shim, f: &StashedFile, fd: &OwnedFd, in_place: bool) -> Result<Filled, Fill> {
    if f.size == 0 {
        return Ok(Filled::Empty);
    }
    if in_place && f.kind == crate::shim::SHMEM && f.seals & libc::F_SEAL_WRITE == 0 {
        if let Ok(filled) = adopt_on_every_cpu(shim, f, fd) {
            return Ok(filled);
        }
    }
    copy_in(shim, f, fd)?;
    Ok(Filled::Copied)
}

/// Files at least this large are adopted by one thread per CPU.
const PARALLEL_ADOPT: u64 = 64 << 20;

/// In-place fill, split into one range of folios per CPU for large files
/// (the module places disjoint ranges at once).
fn adopt_on_every_cpu(shim: &Shim, f: &StashedFile, fd: &OwnedFd) -> Result<Filled, Errno> {
    let threads = if f.size >= PARALLEL_ADOPT {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8)) as u64
    } else {
        1
    };
    // At most one folio per page: ranges over that bound cover every folio.
    let per = f.size.div_ceil(4096).div_ceil(threads);
    let results: Vec<Result<crate::shim::Adopt, Errno>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| scope.spawn(move || shim.adopt_range(f.shim_token, fd.as_fd(), i * per, per)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(Errno::EIO)))
            .collect()
    });
    let (mut moved, mut copied) = (0, 0);
    for r in results {
        let a = r?;
        moved += a.moved;
        copied += a.copied;
    }
    Ok(Filled::InPlace { moved, copied })
}

/// Reads the stash into a shared mapping of `fd`.
fn copy_in(shim: &Shim, f: &StashedFile, fd: &OwnedFd) -> Result<(), Fill> {
    let mut map =
        Mapping::new(fd.as_fd(), f.size as usize).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM | libc::ENOSPC) => Fill::NoMemory(e.to_string()),
            _ => Fill::Failed(e.to_string()),
        })?;
    let bytes = map.bytes_mut();
    for start in (0..bytes.len()).step_by(4 << 20) {
        let end = (start + (4 << 20)).min(bytes.len());
        shim.read(f.shim_token, start as u64, &mut bytes[start..end])
            .map_err(|e| Fill::Failed(format!("read stash {}: {e}", f.shim_token)))?;
    }
    Ok(())
}

/// The store image after a kexec: the sessions that were outgoing before the
/// kexec become incoming (those that were incoming are dropped, as a kexec
/// drops them), each file carried by the fd rebuilt for it (`carried` says
/// which have one); a new epoch. A file in `lost` could not be rebuilt: its
/// retrieve fails with that errno, as a failed retrieve does, and the rest
/// of its session is unaffected. A file neither lost nor carried waits to
/// be given its fd when it is rebuilt (see [`Restored::waiting`]).
pub fn incoming_image(
    mut image: StoreImage,
    lost: &[((u64, u64), i32)],
    carried: &dyn Fn((u64, u64)) -> bool,
) -> StoreImage {
    image.epoch += 1;
    image.sessions.retain(|s| !s.incoming);
    for s in &mut image.sessions {
        s.incoming = true;
        s.retrieved = false;
        for f in &mut s.files {
            let key = (s.id, f.token);
            let gone = lost.iter().find(|(k, _)| *k == key).map(|(_, e)| *e);
            f.has_file = false;
            f.has_carried = gone.is_none() && carried(key);
            f.retrieve_status = gone.map_or(0, |e| -e);
        }
    }
    image.flb_incoming = std::mem::take(&mut image.flb_outgoing);
    image
}

/// What [`restore_all`] rebuilt.
#[derive(Debug, Default)]
pub struct Restored {
    /// The fds by the key the store image uses.
    pub fds: HashMap<String, OwnedFd>,
    /// (session, token) of the files that could not be rebuilt, and why.
    pub lost: Vec<((u64, u64), String)>,
    /// hugetlb files left in their stash until the pool has room, and why.
    pub waiting: Vec<(StashedFile, String)>,
    /// Files whose folios went into their new memfd as they were.
    pub in_place: usize,
    /// Files whose contents were copied.
    pub copied: usize,
}

/// Rebuilds every stashed file; the stashes stay in the shim (see
/// [`restore_memfd_with`]). A hugetlb file the huge-page pool has no room
/// for waits in its stash (see [`Restored::waiting`]).
pub fn restore_all(
    shim: &Shim,
    files: &[StashedFile],
    progress: &mut dyn FnMut(usize, u64),
) -> Restored {
    let mut out = Restored::default();
    let mut bytes = 0;
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            crate::failpoint::pass("restored");
        }
        match restore_memfd_with(shim, f, true) {
            Ok((fd, filled)) => {
                match filled {
                    Filled::InPlace { .. } => out.in_place += 1,
                    Filled::Copied => out.copied += 1,
                    Filled::Empty => {}
                }
                out.fds
                    .insert(FileImage::carried_key(f.session, f.token), fd);
            }
            Err(RestoreError::NoHugePages(why)) => out.waiting.push((f.clone(), why)),
            Err(RestoreError::Failed(why)) => out.lost.push(((f.session, f.token), why)),
        }
        bytes += f.size;
        progress(i + 1, bytes);
    }
    out
}
