//! The state image's records: the daemon's header, sessions, deltas and
//! trapped calls in flight, and reading a journal back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use luo_store::{read_journal, ImageError, SessionDelta, SessionImage, StoreImage};
use serde::{Deserialize, Serialize};

use crate::caller::owners::TreeRoot;

/// Key of the FUSE connection in the keeper.
pub const FUSE_KEY: &str = "fuse";

/// Key of the CUSE device in the keeper (with the CUSE backend).
pub const CUSE_KEY: &str = "cuse";
/// The keeper's key for the memfd of the FUSE io_uring entries' buffers.
pub const RING_KEY: &str = "fuse-ring";

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
    pub waiting: Vec<luo_kexec_helper::handover::StashedFile>,
    /// What each iommufd of `luo run` trees maps, and its devices.
    #[serde(
        default,
        skip_serializing_if = "luo_handlers::vfio::dma::Spaces::is_empty"
    )]
    pub dma: luo_handlers::vfio::dma::Spaces,
    /// FUSE over io_uring: where the entries' buffers are (the keeper holds
    /// their memfd under [`RING_KEY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_ring: Option<crate::wire::uring::Layout>,
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
    pub replies: Vec<crate::wire::fuse::Reply>,
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
    pub replies: Vec<crate::wire::fuse::Reply>,
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
