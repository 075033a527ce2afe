//! Sessions and their file sets (`luo_session.c`, `luo_file.c`).

use std::os::fd::{AsFd, OwnedFd};

use crate::handler::{FileState, RetrieveStatus};
use crate::limits::{Count, Owner};
use crate::name::SessionName;

/// Unique id of a session in this daemon (never reused).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Which list a session is on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Created in this epoch; will be carried across the next update.
    Outgoing,
    /// Carried from the previous epoch.
    Incoming,
}

/// One preserved file (`struct luo_file`).
#[derive(Debug)]
pub struct LuoFile {
    /// Index of its handler in the store's registry.
    pub handler: usize,
    /// The token it was preserved under.
    pub token: u64,
    /// The preserved file (outgoing) or the retrieved one (incoming).
    pub file: Option<OwnedFd>,
    /// The handler's serialized state.
    pub data: Vec<u8>,
    /// What carries the object across the update (incoming files).
    pub carried: Option<OwnedFd>,
    /// Outcome of the first retrieve.
    pub retrieve_status: RetrieveStatus,
}

impl LuoFile {
    /// The view handed to handler callbacks.
    pub fn state(&self) -> FileState<'_> {
        FileState {
            file: self.file.as_ref().map(|f| f.as_fd()),
            data: &self.data,
            carried: self.carried.as_ref().map(|f| f.as_fd()),
            retrieve_status: self.retrieve_status,
        }
    }

    /// What it is charged to its session's owner: one file and the fds held.
    pub(crate) fn charge(&self) -> Count {
        Count {
            sessions: 0,
            files: 1,
            fds: usize::from(self.file.is_some()) + usize::from(self.carried.is_some()),
        }
    }
}

/// A session (`struct luo_session`).
#[derive(Debug)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// Its name.
    pub name: SessionName,
    /// Which list it is on.
    pub direction: Direction,
    /// Incoming only: a session fd has been handed out.
    pub retrieved: bool,
    /// Its files, in preservation order.
    pub files: Vec<LuoFile>,
    /// Who created it (None: recorded before owners were).
    pub owner: Option<Owner>,
}

impl Session {
    /// Whether a token is already used in this session.
    pub fn token_used(&self, token: u64) -> bool {
        self.files.iter().any(|f| f.token == token)
    }

    /// The file with this token.
    pub fn file_mut(&mut self, token: u64) -> Option<&mut LuoFile> {
        self.files.iter_mut().find(|f| f.token == token)
    }

    /// What it is charged to its owner: itself and its files.
    pub(crate) fn charge(&self) -> Count {
        let mut c = Count {
            sessions: 1,
            files: self.files.len(),
            fds: 0,
        };
        c.fds = self.files.iter().map(|f| f.charge().fds).sum();
        c
    }
}
