//! What owners other than root hold and may hold (see the `limits` module).

use super::Store;
use crate::limits::{Count, Limits, Refusal, Usage};

/// Owners and limits (see the `limits` module).
impl Store {
    /// Sets what owners other than root may hold; sessions and files they
    /// already hold stay.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Sets how many more fds the daemon may open for owners other than
    /// root (None: no budget). Their files are budgeted two fds each.
    pub fn set_fd_room(&mut self, room: Option<usize>) {
        self.fd_room = room;
    }

    /// The fds the store holds (preserved, carried and retrieved files).
    pub fn held_fds(&self) -> usize {
        self.usage.held_fds()
    }

    /// The fds the store may still come to hold for the files it has: each
    /// preserved file at most two (carried across an update, and retrieved),
    /// minus those it holds now.
    pub fn fds_to_come(&self) -> usize {
        self.usage.all_fds_to_come()
    }

    /// What the sessions of a uid hold (root and unknown owners: nothing).
    pub fn charged_to_uid(&self, uid: u32) -> Count {
        self.usage.uid(uid)
    }

    /// What the sessions created in a `luo run` tree by owners other than
    /// root hold.
    pub fn charged_to_tree(&self, token: u64) -> Count {
        self.usage.tree(token)
    }

    /// Why the last CREATE_SESSION or SESSION_PRESERVE_FD was refused, if a
    /// limit refused it.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    /// Takes [`Store::refusal`].
    pub fn take_refusal(&mut self) -> Option<Refusal> {
        self.refusal.take()
    }

    /// Counts again what every owner holds.
    pub(super) fn recount(&mut self) {
        self.usage = Usage::default();
        for s in self.sessions.values() {
            self.usage.add(s.owner.as_ref(), s.charge());
        }
    }
}
