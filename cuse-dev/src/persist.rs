//! What a daemon leaves for the next one: the state image on disk and the
//! fds in the keeper.
//!
//! The image is written before any reply that reports a change leaves the
//! daemon (replies are grouped per batch of requests and the batch's replies
//! are part of the image), so a daemon killed at any point is followed by one
//! that knows every change a caller was told about. FUSE requests the killed
//! daemon had read but not answered are asked for again with
//! `FUSE_NOTIFY_RESEND`; replies it had decided but maybe not delivered are
//! sent again from the image (a reply to an already answered request is
//! ignored by the kernel).

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use luo_store::{
    journal_header, journal_record, read_journal, ImageError, SessionDelta, SessionImage,
    StoreImage,
};
use serde::{Deserialize, Serialize};

use crate::keeper::Keeper;
use crate::owners::TreeRoot;

/// Key of the FUSE connection in the keeper.
pub const FUSE_KEY: &str = "fuse";

/// Key of the CUSE device in the keeper (with the CUSE backend).
pub const CUSE_KEY: &str = "cuse";

/// Key of a `luo run` listener in the keeper.
pub fn listener_key(token: u64) -> String {
    format!("listener/{token}")
}

/// The daemon's own state besides the sessions (small; in every record).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct Header {
    /// The store without its sessions (epoch, ids, FLBs).
    pub store: StoreImage,
    /// Next session-file number to open.
    pub next_slot: u64,
    /// Open handle of the current device opener.
    pub device_holder: Option<u64>,
    /// Next device open handle.
    pub next_fh: u64,
    /// Device permission bits.
    pub device_mode: u32,
    /// Device owner (uid, gid).
    pub device_owner: (u32, u32),
    /// Tokens of the `luo run` listeners.
    pub listeners: Vec<u64>,
    /// The last notification id received on each listener, by token.
    #[serde(default)]
    pub listener_ids: BTreeMap<u64, u64>,
    /// Next listener token.
    pub next_listener: u64,
    /// Whether the daemon created the device path (and removes it at shutdown).
    pub created_device: bool,
    /// The process each `luo run` tree started as, by listener token.
    #[serde(default)]
    pub trees: BTreeMap<u64, TreeRoot>,
    /// Files of incoming sessions still in their kmod-shim stash after a
    /// kexec, waiting for free huge pages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<crate::kexec::StashedFile>,
}

/// A session and the session file that stands for it in clients.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SessionRecord {
    /// The session.
    pub session: SessionImage,
    /// Inode of its session file, while one is open.
    pub slot: Option<u64>,
}

/// Part of a session and the session file that stands for it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct DeltaRecord {
    /// What changed.
    pub delta: SessionDelta,
    /// Inode of its session file, while one is open.
    pub slot: Option<u64>,
}

/// A trapped call being answered when the record was written.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct Inflight {
    /// Token of its listener.
    pub listener: u64,
    /// Notification id.
    pub id: u64,
    /// Caller's thread id.
    pub pid: u32,
    /// ioctl's fd, cmd and arg.
    pub args: [u64; 3],
    /// How it was answered, once decided.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// The answer to a trapped call.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Let the kernel run it (not our file).
    Continue,
    /// Return 0, or fail with this errno.
    Return(i32),
}

/// One journal record: what changed in one commit.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Record {
    /// A full snapshot: forget everything before.
    pub full: bool,
    /// The daemon's state after the commit.
    pub header: Header,
    /// Sessions created or changed as a whole.
    pub sessions: Vec<SessionRecord>,
    /// Sessions of which only some files changed.
    #[serde(default)]
    pub deltas: Vec<DeltaRecord>,
    /// Sessions gone.
    pub removed: Vec<u64>,
    /// Replies of the batch being answered: (unique, whole message).
    pub replies: Vec<crate::fuse::Reply>,
    /// The trapped call being answered, if any.
    #[serde(default)]
    pub inflight: Option<Inflight>,
}

/// What a journal adds up to.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The latest header.
    pub header: Header,
    /// Every live session, by id.
    pub sessions: BTreeMap<u64, SessionRecord>,
    /// Replies of the last commit (maybe never delivered).
    pub replies: Vec<crate::fuse::Reply>,
    /// The trapped call being answered at the last commit.
    pub inflight: Option<Inflight>,
}

impl Loaded {
    /// The store image the sessions add up to.
    pub fn store_image(&self) -> StoreImage {
        let mut image = self.header.store.clone();
        image.sessions = self.sessions.values().map(|r| r.session.clone()).collect();
        image
    }
}

/// Why a state image was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable.
    #[error("cannot read the state image {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Corrupted, another version, or inconsistent with the keeper.
    #[error("refusing the state image {path}: {reason}; the preserved fds stay with the keeper")]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: ImageError,
    },
}

/// Reads, checks and replays a journal.
///
/// # Errors
/// See [`LoadError`].
pub fn read(path: &Path) -> Result<Loaded, LoadError> {
    let bytes = read_nofollow(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes, path)
}

/// Checks and replays a journal's bytes (`path` only names it in errors).
///
/// # Errors
/// See [`LoadError`].
pub fn parse(bytes: &[u8], path: &Path) -> Result<Loaded, LoadError> {
    let refused = |reason| LoadError::Refused {
        path: path.to_owned(),
        reason,
    };
    let mut loaded = Loaded::default();
    for payload in read_journal(bytes).map_err(refused)? {
        let record: Record = serde_json::from_slice(payload)
            .map_err(|e| refused(ImageError::Payload(e.to_string())))?;
        if record.full {
            loaded.sessions.clear();
        }
        for id in record.removed {
            loaded.sessions.remove(&id);
        }
        for r in record.sessions {
            loaded.sessions.insert(r.session.id, r);
        }
        for d in record.deltas {
            let Some(r) = loaded.sessions.get_mut(&d.delta.id) else {
                return Err(refused(ImageError::Payload(format!(
                    "a record changes session {}, which no earlier record holds",
                    d.delta.id
                ))));
            };
            r.session.apply(d.delta);
            r.slot = d.slot;
        }
        loaded.header = record.header;
        loaded.replies = record.replies;
        loaded.inflight = record.inflight;
    }
    Ok(loaded)
}

/// The whole file at `path`, which must not be a symbolic link.
fn read_nofollow(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

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
        let mut file = crate::paths::create_new(&tmp)?;
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
        // SAFETY: plain syscall on our file.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                self.size as i64,
                want as i64,
            )
        };
        if r == 0 {
            self.allocated = self.size + want;
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
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
    held: HashSet<String>,
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
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|k| {
                prefixes.iter().any(|p| k.starts_with(p.as_str())) && !wanted.contains(k.as_str())
            })
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for k in &gone {
            self.held.remove(k);
        }
        self.keeper.drop_keys(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64) -> SessionRecord {
        SessionRecord {
            session: SessionImage {
                id,
                name: format!("vm{id}").into_bytes(),
                incoming: false,
                retrieved: false,
                files: Vec::new(),
                owner: None,
            },
            slot: Some(id + 100),
        }
    }

    /// A snapshot with session 1, then one record for each of sessions 2 and 3.
    fn records() -> [Record; 3] {
        [1, 2, 3].map(|id| Record {
            full: id == 1,
            sessions: vec![session(id)],
            ..Record::default()
        })
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luo-persist-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("state.img")
    }

    fn ids(loaded: &Loaded) -> Vec<u64> {
        loaded.sessions.keys().copied().collect()
    }

    #[test]
    fn a_damaged_record_anywhere_refuses_the_journal_never_fewer_sessions() {
        let path = scratch("damaged");
        let [snapshot, two, three] = records();
        let mut journal = Journal::create(&path, &snapshot).unwrap();
        let second = std::fs::metadata(&path).unwrap().len() as usize;
        journal.append(&two).unwrap();
        let third = std::fs::metadata(&path).unwrap().len() as usize;
        journal.append(&three).unwrap();
        drop(journal);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(ids(&read(&path).unwrap()), [1, 2, 3]);

        // Any bit of the middle record's length (the attacker's finding: one
        // flip made the rest look torn and 3 sessions came back as 1), or a
        // byte of the last record's payload.
        let spots = (second * 8..(second + 4) * 8)
            .map(|bit| (bit / 8, 1u8 << (bit % 8)))
            .chain([(good.len() - 2, 0x20)]);
        for (at, mask) in spots {
            let mut bad = good.clone();
            bad[at] ^= mask;
            std::fs::write(&path, &bad).unwrap();
            match read(&path) {
                Err(LoadError::Refused {
                    reason: ImageError::Corrupted { record, .. },
                    ..
                }) => assert_eq!(record, if at < third { 2 } else { 3 }),
                other => panic!("byte {at} ^ {mask:#x}: {other:?}"),
            }
        }
        // A torn last append is dropped; the rest is there.
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert_eq!(ids(&read(&path).unwrap()), [1, 2]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_link_left_at_the_temporary_name_is_replaced_never_written_through() {
        let path = scratch("planted");
        let dir = path.parent().unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let _ = std::fs::remove_file(dir.join("state.tmp"));
        std::os::unix::fs::symlink(&victim, dir.join("state.tmp")).unwrap();
        let [snapshot, two, _] = records();
        let mut journal = Journal::create(&path, &snapshot).unwrap();
        journal.append(&two).unwrap();
        drop(journal);
        assert!(
            std::fs::read(&victim).unwrap() == b"secret",
            "written through"
        );
        assert!(!dir.join("state.tmp").exists());
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(ids(&read(&path).unwrap()), [1, 2]);
        // Nor is the journal read through a link.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(matches!(read(&path), Err(LoadError::Read { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_record_written_before_owners_were_kept_loads_with_none() {
        let mut record = serde_json::to_value(Record {
            full: true,
            sessions: vec![session(1)],
            ..Record::default()
        })
        .unwrap();
        record["header"].as_object_mut().unwrap().remove("trees");
        record["sessions"][0]["session"]
            .as_object_mut()
            .unwrap()
            .remove("owner");
        let path = scratch("owners");
        let mut bytes = journal_header();
        bytes.extend(journal_record(&serde_json::to_vec(&record).unwrap()).unwrap());
        std::fs::write(&path, bytes).unwrap();
        let loaded = read(&path).unwrap();
        assert!(loaded.header.trees.is_empty());
        assert_eq!(loaded.sessions[&1].session.owner, None);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_version_1_journal_is_resumed_and_rewritten_as_version_2() {
        fn fnv1a(bytes: &[u8]) -> u64 {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        }
        // What the previous build wrote.
        let mut v1 = b"LUOSTATE".to_vec();
        v1.extend(1u32.to_le_bytes());
        v1.extend(0u32.to_le_bytes());
        for r in records() {
            let payload = serde_json::to_vec(&r).unwrap();
            v1.extend((payload.len() as u64).to_le_bytes());
            v1.extend(fnv1a(&payload).to_le_bytes());
            v1.extend(payload);
        }
        let path = scratch("v1");
        std::fs::write(&path, &v1).unwrap();
        let loaded = read(&path).unwrap();
        assert_eq!(ids(&loaded), [1, 2, 3]);
        assert_eq!(loaded.sessions[&3].slot, Some(103));

        // The resumed daemon's snapshot replaces it with version 2.
        let snapshot = Record {
            full: true,
            sessions: loaded.sessions.values().cloned().collect(),
            ..Record::default()
        };
        drop(Journal::create(&path, &snapshot).unwrap());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[8..12], 2u32.to_le_bytes(), "journal version 2");
        assert_eq!(ids(&read(&path).unwrap()), [1, 2, 3]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
