//! The store: both session lists, the preserved-file index, handlers and FLBs.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::errno::{Errno, Result};
use crate::flb::FlbRegistry;
use crate::handler::{FileHandler, FileId, RetrieveStatus};
use crate::limits::{Limits, Owner, Refusal, Resource, Usage};
use crate::name::SessionName;
use crate::session::{Direction, LuoFile, Session, SessionId};

mod changes;
mod owners;
mod update;

pub use changes::{Changes, Dirty};
pub use update::FreezeFailure;

/// What a preserve may ask about while it holds the caller's file (see
/// [`Store::preserve_fd_with`]).
pub struct Lookup<'a> {
    handlers: &'a [Box<dyn FileHandler>],
    preserved: &'a HashMap<FileId, SessionId>,
    sessions: &'a BTreeMap<SessionId, Session>,
}

impl Lookup<'_> {
    /// Whether any handler takes `file`.
    pub fn takes(&self, file: BorrowedFd<'_>) -> bool {
        self.handlers.iter().any(|h| h.can_preserve(file))
    }

    /// The outgoing session and token `id` is preserved under, if it is.
    pub fn outgoing(&self, id: FileId) -> Option<(&SessionName, u64)> {
        let session = self.sessions.get(self.preserved.get(&id)?)?;
        if session.direction != Direction::Outgoing {
            return None;
        }
        let file = session.files.iter().find(|f| {
            f.file
                .as_ref()
                .is_some_and(|fd| self.handlers[f.handler].get_id(fd.as_fd()) == Ok(id))
        })?;
        Some((&session.name, file.token))
    }
}

/// The LUO object model of one daemon.
#[derive(Default)]
pub struct Store {
    handlers: Vec<Box<dyn FileHandler>>,
    /// Registered FLBs.
    pub flbs: FlbRegistry,
    sessions: BTreeMap<SessionId, Session>,
    outgoing: HashMap<SessionName, SessionId>,
    incoming: HashMap<SessionName, SessionId>,
    preserved: HashMap<FileId, SessionId>,
    next_id: u64,
    epoch: u64,
    frozen: bool,
    /// Changes since the last [`Store::take_changes`].
    changes: Changes,
    /// What owners other than root may hold.
    limits: Limits,
    /// How many more fds the daemon may open for owners other than root
    /// (None: no budget).
    fd_room: Option<usize>,
    /// What every owner holds.
    usage: Usage,
    /// Why the last create or preserve was refused, if a limit refused it.
    refusal: Option<Refusal>,
}

impl Store {
    /// An empty store in epoch 0.
    pub fn new() -> Store {
        Store::default()
    }

    /// Registers a file handler; handlers are asked in registration order.
    ///
    /// # Errors
    /// `EEXIST` for a duplicate compatible string.
    pub fn register_handler(&mut self, handler: Box<dyn FileHandler>) -> Result<usize> {
        if self
            .handlers
            .iter()
            .any(|h| h.compatible() == handler.compatible())
        {
            return Err(Errno::EEXIST);
        }
        self.handlers.push(handler);
        Ok(self.handlers.len() - 1)
    }

    /// Compatible string of a registered handler.
    pub fn handler_compatible(&self, index: usize) -> &'static str {
        self.handlers[index].compatible()
    }

    /// What `file`'s handler says the preserved object is (see
    /// [`FileHandler::describe`]).
    pub fn describe_file(&self, file: &LuoFile) -> Option<String> {
        self.handlers[file.handler].describe(&file.state())
    }

    /// Index of the handler with this compatible string.
    pub fn handler_index(&self, compatible: &str) -> Option<usize> {
        self.handlers
            .iter()
            .position(|h| h.compatible() == compatible)
    }

    /// The current epoch (number of updates since the store was created).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the outgoing sessions are frozen for an update.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// A session by id.
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// All sessions, outgoing and incoming, in creation order.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    fn names(&mut self, direction: Direction) -> &mut HashMap<SessionName, SessionId> {
        match direction {
            Direction::Outgoing => &mut self.outgoing,
            Direction::Incoming => &mut self.incoming,
        }
    }

    fn insert(
        &mut self,
        name: SessionName,
        direction: Direction,
        owner: Option<Owner>,
    ) -> Result<SessionId> {
        if self.names(direction).contains_key(&name) {
            return Err(Errno::EEXIST);
        }
        self.next_id += 1;
        let id = SessionId(self.next_id);
        self.names(direction).insert(name.clone(), id);
        let session = Session {
            id,
            name,
            direction,
            retrieved: false,
            files: Vec::new(),
            owner,
        };
        self.usage.add(session.owner.as_ref(), session.charge());
        self.sessions.insert(id, session);
        self.touch_whole(id);
        Ok(id)
    }

    fn remove(&mut self, id: SessionId) {
        self.changes.changed.remove(&id);
        self.changes.removed.insert(id);
        if let Some(session) = self.sessions.remove(&id) {
            self.usage.sub(session.owner.as_ref(), session.charge());
            self.names(session.direction).remove(&session.name);
        }
    }

    /// CREATE_SESSION for no one in particular (an owner no limit applies
    /// to); see [`Store::create_session_as`].
    ///
    /// # Errors
    /// `EEXIST` if an outgoing session has this name; `EBUSY` while frozen.
    pub fn create_session(&mut self, name: SessionName) -> Result<SessionId> {
        self.create_session_as(name, None)
    }

    /// CREATE_SESSION: a new outgoing session (`luo_session_create`) owned
    /// by `owner`.
    ///
    /// # Errors
    /// `EBUSY` while frozen, `EEXIST` if an outgoing session has this name,
    /// `EMFILE` if the owner is at a session limit (see
    /// [`Store::take_refusal`]).
    pub fn create_session_as(
        &mut self,
        name: SessionName,
        owner: Option<Owner>,
    ) -> Result<SessionId> {
        self.refusal = None;
        if self.frozen {
            return Err(Errno::EBUSY);
        }
        if self.outgoing.contains_key(&name) {
            return Err(Errno::EEXIST);
        }
        let verdict = self.usage.admit(
            owner.as_ref(),
            Resource::Sessions,
            &self.limits,
            self.fd_room,
        );
        self.refuse(verdict)?;
        self.insert(name, Direction::Outgoing, owner)
    }

    /// Records a limit's refusal and turns it into its errno.
    fn refuse(&mut self, verdict: std::result::Result<(), Refusal>) -> Result<()> {
        verdict.map_err(|refusal| {
            let errno = refusal.errno();
            self.refusal = Some(refusal);
            errno
        })
    }

    /// RETRIEVE_SESSION: hands out an incoming session (`luo_session_retrieve`).
    ///
    /// # Errors
    /// `ENOENT` for an unknown name, `EINVAL` if already retrieved.
    pub fn retrieve_session(&mut self, name: &SessionName) -> Result<SessionId> {
        let id = *self.incoming.get(name).ok_or(Errno::ENOENT)?;
        self.touch(id);
        let session = self.sessions.get_mut(&id).ok_or(Errno::ENOENT)?;
        if session.retrieved {
            return Err(Errno::EINVAL);
        }
        session.retrieved = true;
        Ok(id)
    }

    /// The last reference to a session fd is gone (`luo_session_release`):
    /// an outgoing session unpreserves its files (LIFO) and disappears; an
    /// incoming one is finished and disappears, or stays (leaked until the
    /// next update) if it cannot finish.
    ///
    /// # Errors
    /// The finish failure of an incoming session.
    pub fn release_session(&mut self, id: SessionId) -> Result<()> {
        let Some(session) = self.sessions.get(&id) else {
            return Ok(());
        };
        match session.direction {
            Direction::Incoming => self.finish(id)?,
            Direction::Outgoing => self.unpreserve_all(id),
        }
        self.remove(id);
        Ok(())
    }

    fn unpreserve_all(&mut self, id: SessionId) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        while let Some(file) = session.files.pop() {
            self.usage.sub(session.owner.as_ref(), file.charge());
            let handler = &self.handlers[file.handler];
            handler.unpreserve(&file.state());
            self.flbs.file_unpreserve(&handler.flbs());
            if let Some(f) = &file.file {
                if let Ok(fid) = handler.get_id(f.as_fd()) {
                    self.preserved.remove(&fid);
                }
            }
        }
    }

    /// Direction of a session, for the ioctl kind check.
    ///
    /// # Errors
    /// `EBADF` for an unknown session.
    pub fn direction(&self, id: SessionId) -> Result<(Direction, bool)> {
        let s = self.sessions.get(&id).ok_or(Errno::EBADF)?;
        Ok((s.direction, s.retrieved))
    }

    /// SESSION_PRESERVE_FD (`luo_preserve_file`). `file` is the caller's fd as
    /// resolved by the device (its error is reported after the token check, as
    /// the kernel does).
    ///
    /// # Errors
    /// See [`Store::preserve_fd_with`].
    pub fn preserve_fd(&mut self, id: SessionId, token: u64, file: Result<OwnedFd>) -> Result<()> {
        self.preserve_fd_with(id, token, |_| file)
    }

    /// SESSION_PRESERVE_FD, the caller's fd taken by `file` only once the
    /// call is known to be allowed (so a refused call never takes it).
    ///
    /// # Errors
    /// `EBUSY` while frozen, `EINVAL` incoming session, `EEXIST` token used,
    /// `ENOSPC` the session's owner is at a file limit (see
    /// [`Store::take_refusal`]), `EBADF` bad fd, `ENOENT` no handler,
    /// `EBUSY` already preserved, or the handler's/FLB's errno.
    pub fn preserve_fd_with(
        &mut self,
        id: SessionId,
        token: u64,
        file: impl FnOnce(&Lookup<'_>) -> Result<OwnedFd>,
    ) -> Result<()> {
        self.refusal = None;
        self.touch_file(id, token);
        if self.frozen {
            return Err(Errno::EBUSY);
        }
        let session = self.sessions.get(&id).ok_or(Errno::EBADF)?;
        if session.direction != Direction::Outgoing {
            return Err(Errno::EINVAL);
        }
        if session.token_used(token) {
            return Err(Errno::EEXIST);
        }
        let verdict = self.usage.admit(
            session.owner.as_ref(),
            Resource::Files,
            &self.limits,
            self.fd_room,
        );
        self.refuse(verdict)?;
        // `file` may ask whether any handler takes what it found (and, if
        // none does, close it where it cannot wait on its filesystem), and
        // whether what the file depends on is preserved.
        let file = file(&Lookup {
            handlers: &self.handlers,
            preserved: &self.preserved,
            sessions: &self.sessions,
        })?;
        let handler_index = self
            .handlers
            .iter()
            .position(|h| h.can_preserve(file.as_fd()))
            .ok_or(Errno::ENOENT)?;
        let handler = &self.handlers[handler_index];
        let fid = handler.get_id(file.as_fd())?;
        if self.preserved.contains_key(&fid) {
            return Err(Errno::EBUSY);
        }
        let flbs = handler.flbs();
        self.flbs.file_preserve(&flbs)?;
        let preserved = match handler.preserve(file.as_fd()) {
            Ok(p) => p,
            Err(err) => {
                self.flbs.file_unpreserve(&flbs);
                return Err(err);
            }
        };
        self.preserved.insert(fid, id);
        let luo_file = LuoFile {
            handler: handler_index,
            token,
            file: Some(file),
            data: preserved.data,
            carried: None,
            retrieve_status: RetrieveStatus::NotAttempted,
        };
        let session = self.sessions.get_mut(&id).ok_or(Errno::EBADF)?;
        self.usage.add(session.owner.as_ref(), luo_file.charge());
        session.files.push(luo_file);
        Ok(())
    }

    /// Where preserved files are, as a preserve may ask.
    pub fn lookup(&self) -> Lookup<'_> {
        Lookup {
            handlers: &self.handlers,
            preserved: &self.preserved,
            sessions: &self.sessions,
        }
    }

    /// SESSION_RETRIEVE_FD (`luo_retrieve_file`): the file for a token; the
    /// first call rebuilds it, later calls return the same file, a failure is
    /// remembered.
    ///
    /// # Errors
    /// `ENOENT` unknown token, or the handler's (remembered) retrieve errno.
    pub fn retrieve_fd(&mut self, id: SessionId, token: u64) -> Result<BorrowedFd<'_>> {
        self.touch_file(id, token);
        let session = self.sessions.get_mut(&id).ok_or(Errno::EBADF)?;
        let owner = session.owner.as_ref();
        let file = session
            .files
            .iter_mut()
            .find(|f| f.token == token)
            .ok_or(Errno::ENOENT)?;
        match file.retrieve_status {
            RetrieveStatus::Failed(err) => return Err(err),
            RetrieveStatus::Retrieved => {}
            RetrieveStatus::NotAttempted => {
                let handler = &self.handlers[file.handler];
                // The handler's global state first, on demand
                // (`liveupdate_flb_get_incoming` in its retrieve).
                let flbs = handler.flbs();
                let rebuilt = flbs
                    .iter()
                    .try_for_each(|id| self.flbs.get_incoming(*id))
                    .and_then(|()| handler.retrieve(&file.state()));
                match rebuilt {
                    Ok(fd) => {
                        if let Ok(fid) = handler.get_id(fd.as_fd()) {
                            self.preserved.insert(fid, id);
                        }
                        let before = file.charge();
                        file.file = Some(fd);
                        self.usage.sub(owner, before);
                        self.usage.add(owner, file.charge());
                        file.retrieve_status = RetrieveStatus::Retrieved;
                    }
                    Err(err) => {
                        file.retrieve_status = RetrieveStatus::Failed(err);
                        return Err(err);
                    }
                }
            }
        }
        file.file.as_ref().map(|f| f.as_fd()).ok_or(Errno::EIO)
    }

    /// Gives an incoming file that came without its carried fd (rebuilt
    /// late, after the update) that fd, before its first retrieve.
    ///
    /// # Errors
    /// `EBADF` no such session, `ENOENT` no such file, `EINVAL` not an
    /// incoming file waiting for its fd.
    pub fn carry(&mut self, id: SessionId, token: u64, fd: OwnedFd) -> Result<()> {
        let session = self.sessions.get_mut(&id).ok_or(Errno::EBADF)?;
        if session.direction != Direction::Incoming {
            return Err(Errno::EINVAL);
        }
        let owner = session.owner.as_ref();
        let file = session
            .files
            .iter_mut()
            .find(|f| f.token == token)
            .ok_or(Errno::ENOENT)?;
        if file.carried.is_some()
            || file.file.is_some()
            || file.retrieve_status != RetrieveStatus::NotAttempted
        {
            return Err(Errno::EINVAL);
        }
        let before = file.charge();
        file.carried = Some(fd);
        self.usage.sub(owner, before);
        self.usage.add(owner, file.charge());
        self.touch_file(id, token);
        Ok(())
    }

    /// SESSION_FINISH (`luo_file_finish`): all-or-nothing. Every file must
    /// agree (`can_finish`), then all are finished in LIFO order, retrieved or
    /// not.
    ///
    /// # Errors
    /// `EBUSY` if a file cannot finish; nothing is finished then.
    pub fn finish(&mut self, id: SessionId) -> Result<()> {
        self.touch_whole(id);
        let session = self.sessions.get_mut(&id).ok_or(Errno::EBADF)?;
        for file in &session.files {
            if !self.handlers[file.handler].can_finish(&file.state()) {
                return Err(Errno::EBUSY);
            }
        }
        while let Some(file) = session.files.pop() {
            self.usage.sub(session.owner.as_ref(), file.charge());
            let handler = &self.handlers[file.handler];
            handler.finish(&file.state());
            self.flbs.file_finish(&handler.flbs());
            if let Some(f) = &file.file {
                if let Ok(fid) = handler.get_id(f.as_fd()) {
                    self.preserved.remove(&fid);
                }
            }
        }
        Ok(())
    }
}

impl Store {
    /// The last session id handed out.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Installs sessions rebuilt from an image.
    pub(crate) fn restore(&mut self, epoch: u64, next_id: u64, sessions: Vec<Session>) {
        self.epoch = epoch;
        self.next_id = next_id;
        for session in sessions {
            for file in &session.files {
                if let Some(f) = &file.file {
                    if let Ok(fid) = self.handlers[file.handler].get_id(f.as_fd()) {
                        self.preserved.insert(fid, session.id);
                    }
                }
            }
            self.names(session.direction)
                .insert(session.name.clone(), session.id);
            self.sessions.insert(session.id, session);
        }
        self.recount();
    }

    /// Undoes [`Store::retrieve_session`] when the session fd could not be
    /// handed out.
    pub fn unretrieve_session(&mut self, id: SessionId) {
        self.touch(id);
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.direction == Direction::Incoming {
                s.retrieved = false;
            }
        }
    }
}
