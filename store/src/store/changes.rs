//! What changed since the last save: the store marks sessions and files as
//! it changes them, and the daemon takes the marks to save only those.

use std::collections::{BTreeMap, BTreeSet};

use super::Store;
use crate::session::SessionId;

/// What changed in one session since the last [`Store::take_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything may have changed (new, frozen, flipped, files removed).
    pub whole: bool,
    /// Tokens of files added or changed (the session's own fields are always
    /// saved with them).
    pub files: BTreeSet<u64>,
}

/// Changes since the last [`Store::take_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Sessions changed, and how.
    pub changed: BTreeMap<SessionId, Dirty>,
    /// Sessions gone.
    pub removed: BTreeSet<SessionId>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

impl Store {
    pub(super) fn dirty(&mut self, id: SessionId) -> Option<&mut Dirty> {
        self.sessions
            .contains_key(&id)
            .then(|| self.changes.changed.entry(id).or_default())
    }

    /// The session's own fields changed.
    pub(super) fn touch(&mut self, id: SessionId) {
        self.dirty(id);
    }

    pub(super) fn touch_file(&mut self, id: SessionId, token: u64) {
        if let Some(d) = self.dirty(id) {
            d.files.insert(token);
        }
    }

    pub(super) fn touch_whole(&mut self, id: SessionId) {
        if let Some(d) = self.dirty(id) {
            d.whole = true;
        }
    }

    /// What changed since the last call, so that a caller can save only that.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }
}
