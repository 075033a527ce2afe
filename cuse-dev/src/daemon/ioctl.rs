//! Ioctls on the device: the check that the journal has room, the route to
//! the device or to a session, and CREATE_SESSION / RETRIEVE_SESSION, which
//! hand the caller a session file.

use std::os::fd::AsFd;

use luo_store::{Direction, Errno, Owner, Result, SessionId, SessionName};
use zerocopy::IntoBytes;

use super::caller::{refuse, Caller};
use super::node::DEVICE_INO;
use super::Daemon;
use crate::caller::owners;
use crate::{log, uapi};

impl Daemon {
    pub(super) fn ioctl(&mut self, ino: u64, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
        if uapi::changes_state(cmd) {
            self.room_for_change()?;
        }
        if ino == DEVICE_INO {
            return self.device_ioctl(cmd, arg, caller);
        }
        match self.files.slots.get(&ino) {
            Some(Some(sid)) => self.session_ioctl(*sid, cmd, arg, caller),
            _ => Err(Errno::EBADF),
        }
    }

    pub(super) fn device_ioctl(&mut self, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
        let d = uapi::decode(cmd, arg, caller.mem(), None)?;
        let args: uapi::SessionArgs = d.get();
        let name = SessionName::from_field(&args.name)?;
        let what = if cmd == uapi::CREATE_SESSION {
            "CREATE_SESSION"
        } else {
            "RETRIEVE_SESSION"
        };
        if !caller.can_install() {
            self.check_session_op(cmd, &name, caller)?;
            return Err(refuse(caller, what));
        }
        // Checks the struct can be written back before anything changes.
        caller.write(arg, &d.buf[..d.respond_len()])?;
        let (ino, file) = self.take_slot()?;
        let sid = match self.session_for(cmd, name, caller) {
            Ok(sid) => sid,
            Err(e) => {
                self.files.spare.push((ino, file));
                return Err(e);
            }
        };
        self.files.slots.insert(ino, Some(sid));
        self.files.session_slot.insert(sid, ino);
        let installed = caller.install(file.as_fd());
        match installed {
            Ok(fd) => {
                let mut out = args;
                out.fd = fd;
                caller.write(arg, &out.as_bytes()[..d.respond_len()])
            }
            Err(e) => {
                self.files.slots.insert(ino, None);
                self.files.session_slot.remove(&sid);
                self.undo_session(cmd, sid);
                self.files.spare.push((ino, file));
                Err(e)
            }
        }
    }

    pub(super) fn check_session_op(
        &mut self,
        cmd: u32,
        name: &SessionName,
        caller: &Caller,
    ) -> Result<()> {
        if cmd == uapi::CREATE_SESSION {
            let owner = self.owner_of(caller);
            let created = self.store.create_session_as(name.clone(), Some(owner));
            self.log_refusal();
            self.store.release_session(created?)
        } else {
            let found = self
                .store
                .sessions()
                .find(|s| s.direction == Direction::Incoming && &s.name == name);
            match found {
                None => Err(Errno::ENOENT),
                Some(s) if s.retrieved => Err(Errno::EINVAL),
                Some(_) => Ok(()),
            }
        }
    }

    pub(super) fn session_for(
        &mut self,
        cmd: u32,
        name: SessionName,
        caller: &Caller,
    ) -> Result<SessionId> {
        let result = match self.store_session_for(cmd, &name, caller) {
            // The session in the way, or one that holds the owner at its
            // limit, may be released by a queued RELEASE.
            Err(Errno::EEXIST | Errno::EINVAL | Errno::EMFILE) => {
                self.settle_releases();
                self.store_session_for(cmd, &name, caller)
            }
            other => other,
        };
        self.log_refusal();
        result
    }

    pub(super) fn store_session_for(
        &mut self,
        cmd: u32,
        name: &SessionName,
        caller: &Caller,
    ) -> Result<SessionId> {
        if cmd == uapi::CREATE_SESSION {
            let owner = self.owner_of(caller);
            self.store.create_session_as(name.clone(), Some(owner))
        } else {
            self.store.retrieve_session(name)
        }
    }

    /// Who a session the caller creates belongs to: its uid and its tree.
    pub(super) fn owner_of(&mut self, caller: &Caller) -> Owner {
        let tree = caller
            .tree
            .map(|token| match self.runs.trees.get_mut(&token) {
                Some(root) => root.tree(token),
                None => owners::unknown_tree(token),
            });
        Owner {
            uid: caller.uid,
            tree,
        }
    }

    /// Logs why a limit refused the last create or preserve, if one did.
    pub(super) fn log_refusal(&mut self) {
        if let Some(r) = self.store.take_refusal() {
            log::warn(format_args!("{r} ({})", owners::flag(&r)));
        }
    }

    pub(super) fn undo_session(&mut self, cmd: u32, sid: SessionId) {
        if cmd == uapi::CREATE_SESSION {
            let _ = self.store.release_session(sid);
        } else {
            self.store.unretrieve_session(sid);
        }
    }
}
