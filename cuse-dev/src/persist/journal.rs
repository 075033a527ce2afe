//! The journal being written, and the mirror of what the keeper holds.

use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use luo_store::{journal_header, journal_record};

use super::format::Record;
use crate::persist::keeper::Keeper;

/// Room the journal keeps allocated past its end ([`Journal::reserve`]):
/// enough for the records of changes that cannot be refused (closes, exits)
/// while the state dir is full.
pub const RESERVE: u64 = 256 << 10;

/// The journal being written.
///
/// Records are written at its end with `pwrite` into room allocated
/// beforehand (`fallocate`, size kept), so a full disk refuses a change
/// before it is made rather than tearing the record that reports it; a write
/// that fails all the same is cut off again, so the journal always ends
/// with a whole record.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    /// Size right after the last full snapshot.
    base: u64,
    /// Allocated up to here.
    allocated: u64,
}

impl Journal {
    /// Starts a new journal at `path` holding one full snapshot (always in
    /// the current journal version, whatever version `path` had).
    ///
    /// # Errors
    /// I/O failures, or a record over [`luo_store::MAX_RECORD`] bytes.
    pub fn create(path: &Path, snapshot: &Record) -> std::io::Result<Journal> {
        let mut bytes = journal_header();
        bytes.extend(journal_record(
            &serde_json::to_vec(snapshot).expect("the record serializes"),
        )?);
        // Written aside and renamed: a crash leaves the old journal or the new.
        // No fsync: the journal only has to outlive the daemon, not the
        // machine (after a machine crash the keeper's fds are gone anyway).
        // The file is created new, never through a link left at its name,
        // and kept open for the appends: its name is not opened again.
        let tmp = path.with_extension("tmp");
        remove_stale(&tmp)?;
        let mut file = crate::persist::paths::create_new(&tmp)?;
        let written = std::io::Write::write_all(&mut file, &bytes);
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path)?;
        let mut journal = Journal {
            path: path.to_owned(),
            file,
            size: bytes.len() as u64,
            base: bytes.len() as u64,
            allocated: bytes.len() as u64,
        };
        // Best effort here: every change is refused until there is room.
        let _ = journal.reserve(RESERVE);
        Ok(journal)
    }

    /// Makes sure `room` bytes past the end are allocated (up to the next
    /// 64 KiB, so that this is rarely a syscall).
    ///
    /// # Errors
    /// `ENOSPC` (or the filesystem's error) when the room cannot be had.
    pub fn reserve(&mut self, room: u64) -> std::io::Result<()> {
        if self.allocated >= self.size + room {
            return Ok(());
        }
        let want = (self.size + room).next_multiple_of(64 << 10) - self.size;
        let Err(e) = crate::sys::reserve_space(self.file.as_fd(), self.size, want) else {
            self.allocated = self.size + want;
            return Ok(());
        };
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A filesystem without fallocate: writes are all there is.
            self.allocated = u64::MAX;
            return Ok(());
        }
        Err(e)
    }

    /// Whether `room` bytes past the end are allocated, allocating them
    /// if they can be.
    pub fn has_room(&mut self, room: u64) -> bool {
        self.reserve(room).is_ok() || self.allocated >= self.size + room
    }

    /// Appends one record, into allocated room where there is any; a write
    /// that fails is cut off, so the journal still ends with a whole record.
    ///
    /// # Errors
    /// I/O failures (`ENOSPC` with nothing written when no room can be
    /// allocated for it), or a record over [`luo_store::MAX_RECORD`] bytes.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let bytes = journal_record(&serde_json::to_vec(record).expect("the record serializes"))?;
        let len = bytes.len() as u64;
        if self.allocated < self.size + len {
            self.reserve(len.max(RESERVE))?;
        }
        if let Err(e) = self.file.write_all_at(&bytes, self.size) {
            let _ = self.file.set_len(self.size);
            return Err(e);
        }
        self.size += len;
        Ok(())
    }

    /// Whether the journal has grown enough to be rewritten as a snapshot.
    pub fn wants_compaction(&self) -> bool {
        self.size > (4 * self.base).max(1 << 20)
    }

    /// Bytes written.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes whatever a killed daemon left at `path` (unlink: a symbolic link
/// is removed, not followed).
fn remove_stale(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Mirrors the set of fds the keeper holds.
#[derive(Debug)]
pub struct KeptFds {
    /// The keeper.
    pub keeper: Keeper,
    /// Ordered, so that the keys under a prefix are found without looking
    /// at the others.
    held: BTreeSet<String>,
}

impl KeptFds {
    /// Tracks what `keeper` already holds.
    ///
    /// # Errors
    /// If the keeper cannot be asked.
    pub fn new(keeper: Keeper) -> std::io::Result<KeptFds> {
        let (keys, _) = keeper.list()?;
        Ok(KeptFds {
            keeper,
            held: keys.into_iter().collect(),
        })
    }

    /// Gives the keeper every fd in `fds` it does not hold yet.
    ///
    /// # Errors
    /// If the keeper cannot take one.
    pub fn add_missing(&mut self, fds: &[(String, BorrowedFd<'_>)]) -> std::io::Result<()> {
        for (key, fd) in fds {
            if !self.held.contains(key) {
                self.keeper.put(key, *fd)?;
                self.held.insert(key.clone());
            }
        }
        Ok(())
    }

    /// Lets the keeper close the fds of the given key prefixes that are not in
    /// `wanted` (the fds of changed or removed sessions, of gone listeners).
    ///
    /// # Errors
    /// If the keeper cannot be asked.
    pub fn drop_unwanted(
        &mut self,
        prefixes: &[String],
        wanted: &HashSet<&str>,
    ) -> std::io::Result<()> {
        use std::ops::Bound::{Included, Unbounded};
        let mut gone: Vec<String> = Vec::new();
        for p in prefixes {
            let under = self
                .held
                .range::<str, _>((Included(p.as_str()), Unbounded))
                .take_while(|k| k.starts_with(p.as_str()));
            gone.extend(under.filter(|k| !wanted.contains(k.as_str())).cloned());
        }
        // Prefixes may nest (a session's and one of its files').
        gone.sort_unstable();
        gone.dedup();
        if gone.is_empty() {
            return Ok(());
        }
        for k in &gone {
            self.held.remove(k);
        }
        self.keeper.drop_keys(gone)
    }
}
