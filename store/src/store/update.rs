//! The turn of an epoch: every outgoing session frozen (or all of it
//! undone), then flipped to incoming (`liveupdate_reboot()` and the next
//! kernel's view of what it left).

use crate::errno::{Errno, Result};
use crate::handler::RetrieveStatus;
use crate::limits::{Owner, OwnerText};
use crate::name::SessionName;
use crate::session::{Direction, SessionId};

use super::Store;

/// Why freezing the outgoing sessions failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeFailure {
    /// Session whose file refused.
    pub session: SessionName,
    /// Token of that file.
    pub token: u64,
    /// Its handler's compatible string.
    pub compatible: &'static str,
    /// The errno it returned.
    pub errno: Errno,
    /// Who owns that session.
    pub owner: Option<Owner>,
}

impl std::fmt::Display for FreezeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "session {} ({}) token {:#x} ({}) refused the freeze: {}",
            self.session,
            OwnerText(&self.owner),
            self.token,
            self.compatible,
            self.errno
        )
    }
}

impl Store {
    /// Freezes every outgoing session in creation order, each file in
    /// preservation order. If one fails, everything frozen so far is unfrozen
    /// and nothing changes.
    ///
    /// # Errors
    /// Which file refused and why.
    pub fn freeze(&mut self) -> std::result::Result<(), FreezeFailure> {
        let ids: Vec<SessionId> = self.outgoing_ids();
        for id in &ids {
            self.touch_whole(*id);
        }
        let mut done: Vec<(SessionId, usize)> = Vec::new();
        for id in ids {
            let session = self.sessions.get_mut(&id).expect("outgoing session exists");
            for (index, file) in session.files.iter_mut().enumerate() {
                let handler = &self.handlers[file.handler];
                let mut data = file.data.clone();
                if let Err(errno) = handler.freeze(&file.state(), &mut data) {
                    let failure = FreezeFailure {
                        session: session.name.clone(),
                        token: file.token,
                        compatible: handler.compatible(),
                        errno,
                        owner: session.owner.clone(),
                    };
                    self.unfreeze_files(&done);
                    return Err(failure);
                }
                file.data = data;
                done.push((id, index));
            }
        }
        self.frozen = true;
        Ok(())
    }

    fn outgoing_ids(&self) -> Vec<SessionId> {
        self.sessions
            .values()
            .filter(|s| s.direction == Direction::Outgoing)
            .map(|s| s.id)
            .collect()
    }

    fn unfreeze_files(&mut self, files: &[(SessionId, usize)]) {
        for &(id, index) in files {
            if let Some(file) = self.sessions.get(&id).and_then(|s| s.files.get(index)) {
                self.handlers[file.handler].unfreeze(&file.state());
            }
        }
    }

    /// Aborts an update after a successful [`Store::freeze`].
    pub fn unfreeze(&mut self) {
        if !self.frozen {
            return;
        }
        let mut all = Vec::new();
        for id in self.outgoing_ids() {
            let count = self.sessions[&id].files.len();
            all.extend((0..count).map(|i| (id, i)));
        }
        self.unfreeze_files(&all);
        self.frozen = false;
    }

    /// Completes a simulated update after [`Store::freeze`]: the outgoing
    /// sessions become the incoming ones of the next epoch, each preserved file
    /// carried by the fd LUO held. Incoming sessions left over from the epoch
    /// before are dropped, as a kexec drops them.
    ///
    /// # Errors
    /// `EINVAL` if the store is not frozen.
    pub fn flip_epoch(&mut self) -> Result<()> {
        if !self.frozen {
            return Err(Errno::EINVAL);
        }
        let stale: Vec<SessionId> = self.incoming.values().copied().collect();
        for id in stale {
            self.sessions.remove(&id);
            self.changes.changed.remove(&id);
            self.changes.removed.insert(id);
        }
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.touch_whole(id);
        }
        self.incoming = std::mem::take(&mut self.outgoing);
        self.preserved.clear();
        for session in self.sessions.values_mut() {
            session.direction = Direction::Incoming;
            session.retrieved = false;
            for file in &mut session.files {
                file.carried = file.file.take();
                file.retrieve_status = RetrieveStatus::NotAttempted;
            }
        }
        self.flbs.flip();
        self.frozen = false;
        self.epoch += 1;
        self.recount();
        Ok(())
    }
}
