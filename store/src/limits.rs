//! Who owns a session, what each owner holds, and when an owner may make no
//! more.
//!
//! A session belongs to the uid that created it and to the `luo run` tree it
//! was created in; every file preserved into it is charged to that owner,
//! whoever preserves it. Owners other than root are held to per-uid and
//! per-tree limits, and together to a budget of the daemon's fds (each of
//! their files may come to hold two: the preserved or carried file, and the
//! one retrieved from it). Root is never limited. A refusal changes nothing:
//! CREATE_SESSION fails with `EMFILE`, SESSION_PRESERVE_FD with `ENOSPC`.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::errno::Errno;

/// The `luo run` tree a session was created in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The daemon's token for the tree's seccomp listener.
    pub token: u64,
    /// The pid the tree was started as (0 if unknown).
    pub pid: i32,
    /// That process's command name (`comm`), or "" if unknown.
    pub comm: String,
}

impl fmt::Display for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, self.comm.as_str()) {
            (0, _) => write!(f, "luo run tree {:#x}", self.token),
            (pid, "") => write!(f, "luo run tree of pid {pid}"),
            (pid, comm) => write!(f, "luo run tree of pid {pid} `{comm}`"),
        }
    }
}

/// Who a session belongs to.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Effective uid of the process that created it.
    pub uid: u32,
    /// The `luo run` tree it was created in, if it was created in one.
    #[serde(default)]
    pub tree: Option<Tree>,
}

impl Owner {
    /// Root owns it: no limit applies.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tree {
            Some(tree) => write!(f, "{tree}, uid {}", self.uid),
            None => write!(f, "uid {}", self.uid),
        }
    }
}

/// The owner of a session as a phrase, also when it is unknown (a session
/// recorded by a daemon that did not record owners).
pub(crate) struct OwnerText<'a>(pub &'a Option<Owner>);

impl fmt::Display for OwnerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(owner) => owner.fmt(f),
            None => f.write_str("owner unknown"),
        }
    }
}

/// What owners other than root may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions (outgoing and incoming) of one uid.
    pub sessions_per_uid: usize,
    /// Preserved files of one uid's sessions.
    pub files_per_uid: usize,
    /// Sessions created in one `luo run` tree.
    pub sessions_per_tree: usize,
    /// Preserved files of the sessions created in one `luo run` tree.
    pub files_per_tree: usize,
}

impl Limits {
    /// No limit at all.
    pub const NONE: Limits = Limits {
        sessions_per_uid: usize::MAX,
        files_per_uid: usize::MAX,
        sessions_per_tree: usize::MAX,
        files_per_tree: usize::MAX,
    };

    /// The daemon's defaults.
    pub const DEFAULT: Limits = Limits {
        sessions_per_uid: 1024,
        files_per_uid: 4096,
        sessions_per_tree: 1024,
        files_per_tree: 4096,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::NONE
    }
}

/// What a refused call would have added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// A session (CREATE_SESSION).
    Sessions,
    /// A preserved file (SESSION_PRESERVE_FD).
    Files,
}

impl Resource {
    /// The errno a call refused for this resource fails with.
    pub fn errno(self) -> Errno {
        match self {
            Resource::Sessions => Errno::EMFILE,
            Resource::Files => Errno::ENOSPC,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Resource::Sessions => "sessions",
            Resource::Files => "files",
        }
    }
}

/// Which limit was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The owner's uid holds `limit` sessions or files.
    Uid {
        /// The limit.
        limit: usize,
    },
    /// The owner's tree holds `limit` sessions or files.
    Tree {
        /// The limit.
        limit: usize,
    },
    /// The daemon's fds: owners other than root would need `need` more
    /// than the `room` left above the reserve kept for root.
    Fds {
        /// Fds the daemon may still open for owners other than root.
        room: usize,
        /// Fds their files may come to hold, this one included.
        need: usize,
    },
}

/// A call refused because its owner reached a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The session's owner, charged for the call.
    pub owner: Owner,
    /// What the call would have added.
    pub resource: Resource,
    /// The limit reached.
    pub scope: Scope,
}

impl Refusal {
    /// The errno the call fails with.
    pub fn errno(&self) -> Errno {
        self.resource.errno()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (owner, noun) = (&self.owner, self.resource.noun());
        match (&self.scope, &owner.tree) {
            (Scope::Uid { limit }, _) => {
                write!(f, "{owner} is at its limit of {limit} {noun} per uid")
            }
            (Scope::Tree { limit }, Some(tree)) => write!(
                f,
                "{tree} is at its limit of {limit} {noun} per tree (uid {} asked)",
                owner.uid
            ),
            (Scope::Tree { limit }, None) => write!(f, "{owner}: {limit} {noun} per tree"),
            (Scope::Fds { room, need }, _) => write!(
                f,
                "{owner}: the files of non-root owners may come to need {need} more of \
                 the daemon's fds, and only {room} are left above the reserve kept for root"
            ),
        }?;
        write!(f, "; refused with {:?}", self.errno())
    }
}

/// What one owner (or all owners other than root) holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Sessions.
    pub sessions: usize,
    /// Preserved files.
    pub files: usize,
    /// Fds the store holds for those files (preserved, carried, retrieved).
    pub fds: usize,
}

impl Count {
    fn add(&mut self, c: Count) {
        self.sessions += c.sessions;
        self.files += c.files;
        self.fds += c.fds;
    }

    fn sub(&mut self, c: Count) {
        self.sessions = self.sessions.saturating_sub(c.sessions);
        self.files = self.files.saturating_sub(c.files);
        self.fds = self.fds.saturating_sub(c.fds);
    }

    fn is_zero(&self) -> bool {
        *self == Count::default()
    }
}

/// What every owner holds, kept up to date by the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Usage {
    by_uid: HashMap<u32, Count>,
    by_tree: HashMap<u64, Count>,
    /// Everything owners other than root hold.
    limited: Count,
    /// Everything every owner holds.
    all: Count,
}

/// Whether an owner is held to limits (not root, and known).
fn limited(owner: Option<&Owner>) -> Option<&Owner> {
    owner.filter(|o| !o.is_root())
}

impl Usage {
    /// Charges `c` to `owner`.
    pub(crate) fn add(&mut self, owner: Option<&Owner>, c: Count) {
        self.all.add(c);
        let Some(owner) = limited(owner) else { return };
        self.limited.add(c);
        self.by_uid.entry(owner.uid).or_default().add(c);
        if let Some(tree) = &owner.tree {
            self.by_tree.entry(tree.token).or_default().add(c);
        }
    }

    /// Gives `c` back to `owner`.
    pub(crate) fn sub(&mut self, owner: Option<&Owner>, c: Count) {
        self.all.sub(c);
        let Some(owner) = limited(owner) else { return };
        self.limited.sub(c);
        sub_entry(&mut self.by_uid, owner.uid, c);
        if let Some(tree) = &owner.tree {
            sub_entry(&mut self.by_tree, tree.token, c);
        }
    }

    /// What a uid holds.
    pub(crate) fn uid(&self, uid: u32) -> Count {
        self.by_uid.get(&uid).copied().unwrap_or_default()
    }

    /// What a tree holds.
    pub(crate) fn tree(&self, token: u64) -> Count {
        self.by_tree.get(&token).copied().unwrap_or_default()
    }

    /// Fds the store holds.
    pub(crate) fn held_fds(&self) -> usize {
        self.all.fds
    }

    /// Fds the files of every owner may still come to hold (see
    /// [`Usage::fds_to_come`]).
    pub(crate) fn all_fds_to_come(&self) -> usize {
        (2 * self.all.files).saturating_sub(self.all.fds)
    }

    /// Whether `owner` may add one of `resource`; `fd_room` is how many
    /// more fds the daemon may open for owners other than root.
    pub(crate) fn admit(
        &self,
        owner: Option<&Owner>,
        resource: Resource,
        limits: &Limits,
        fd_room: Option<usize>,
    ) -> Result<(), Refusal> {
        let Some(owner) = limited(owner) else {
            return Ok(());
        };
        let refuse = |scope| Refusal {
            owner: owner.clone(),
            resource,
            scope,
        };
        let pick = |c: Count| match resource {
            Resource::Sessions => c.sessions,
            Resource::Files => c.files,
        };
        let (per_uid, per_tree) = match resource {
            Resource::Sessions => (limits.sessions_per_uid, limits.sessions_per_tree),
            Resource::Files => (limits.files_per_uid, limits.files_per_tree),
        };
        if pick(self.uid(owner.uid)) >= per_uid {
            return Err(refuse(Scope::Uid { limit: per_uid }));
        }
        if let Some(tree) = &owner.tree {
            if pick(self.tree(tree.token)) >= per_tree {
                return Err(refuse(Scope::Tree { limit: per_tree }));
            }
        }
        match (resource, fd_room) {
            (Resource::Files, Some(room)) => {
                let need = self.fds_to_come() + 2;
                if need > room {
                    return Err(refuse(Scope::Fds { room, need }));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Fds the files of owners other than root may still come to hold:
    /// each file at most two (carried and retrieved), minus what they hold.
    fn fds_to_come(&self) -> usize {
        (2 * self.limited.files).saturating_sub(self.limited.fds)
    }
}

fn sub_entry<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Count>, key: K, c: Count) {
    if let Some(entry) = map.get_mut(&key) {
        entry.sub(c);
        if entry.is_zero() {
            map.remove(&key);
        }
    }
}
