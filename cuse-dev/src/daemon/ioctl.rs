//! The uAPI's handlers: one function per command, picked by [`execute`]
//! (the kernel's `luo_ioctl_ops[].execute`), each handed the decoded call
//! as a [`Ucmd`] that answers through [`Ucmd::respond`]. The device's two
//! commands, CREATE_SESSION and RETRIEVE_SESSION, are here: both hand the
//! caller a session file. The session commands are in `session.rs`.

use std::os::fd::AsFd;

use luo_store::{Direction, Errno, Owner, Result, SessionId, SessionName};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::caller::{refuse, Caller};
use super::node::DEVICE_INO;
use super::Daemon;
use crate::caller::owners;
use crate::log;
use crate::profile::{self, Phase};
use crate::uapi::{self, Command};

/// One decoded call (`struct luo_ucmd`): the caller, where its struct is,
/// the struct as decoded, and the session the call came on.
pub(super) struct Ucmd<'a> {
    pub(super) caller: &'a Caller,
    arg: u64,
    decoded: uapi::Decoded,
    /// None on the device.
    session: Option<SessionId>,
}

impl Ucmd<'_> {
    /// The caller's struct, as the kernel's struct.
    pub(super) fn args<T: FromBytes>(&self) -> T {
        self.decoded.get()
    }

    /// The session the call came on.
    pub(super) fn session(&self) -> Result<SessionId> {
        self.session.ok_or(Errno::EBADF)
    }

    /// Copies `out` back into the caller's struct, as much of it as the
    /// caller's size holds (`luo_ucmd_respond`).
    pub(super) fn respond(&self, out: &(impl IntoBytes + Immutable)) -> Result<()> {
        let len = self.decoded.respond_len();
        self.caller.write(self.arg, &out.as_bytes()[..len])
    }

    /// Copies the struct back as it came: checks that it can be written
    /// before anything changes, or answers a call that returns nothing.
    pub(super) fn respond_unchanged(&self) -> Result<()> {
        let len = self.decoded.respond_len();
        self.caller.write(self.arg, &self.decoded.buf[..len])
    }
}

/// A command's handler.
type Execute = fn(&mut Daemon, &Ucmd<'_>) -> Result<()>;

/// The handler of each command of the uAPI tables.
fn execute(command: Command) -> Execute {
    match command {
        Command::CreateSession => Daemon::create_session,
        Command::RetrieveSession => Daemon::retrieve_session,
        Command::PreserveFd => Daemon::preserve_fd,
        Command::RetrieveFd => Daemon::retrieve_fd,
        Command::Finish => Daemon::finish,
        Command::GetName => Daemon::get_name,
    }
}

/// How CREATE_SESSION and RETRIEVE_SESSION differ; both hand the caller a
/// session file for a session found by name.
struct ByName {
    /// The command, as log lines name it.
    what: &'static str,
    /// Whether the call would succeed (for a caller that cannot be given
    /// an fd, which is refused only if it would).
    check: fn(&mut Daemon, &SessionName, &Caller) -> Result<()>,
    /// The session, created or retrieved.
    get: fn(&mut Daemon, &SessionName, &Caller) -> Result<SessionId>,
    /// Undoes `get` when the fd could not be installed.
    undo: fn(&mut Daemon, SessionId),
}

const CREATE: ByName = ByName {
    what: "CREATE_SESSION",
    check: Daemon::check_create,
    get: Daemon::create_as_owner,
    undo: Daemon::drop_created,
};

const RETRIEVE: ByName = ByName {
    what: "RETRIEVE_SESSION",
    check: Daemon::check_retrieve,
    get: Daemon::retrieve_by_name,
    undo: Daemon::unretrieve,
};

impl Daemon {
    /// An ioctl on the device (`ino` [`DEVICE_INO`]) or a session file:
    /// refused with ENOSPC if it would change a session and the journal has
    /// no room, decoded as the kernel decodes it, then executed.
    pub(super) fn ioctl(&mut self, ino: u64, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
        if uapi::changes_state(cmd) {
            self.room_for_change()?;
        }
        let (session, kind) = if ino == DEVICE_INO {
            (None, None)
        } else {
            match self.files.slots.get(&ino) {
                Some(Some(sid)) => (Some(*sid), Some(self.store.direction(*sid)?)),
                _ => return Err(Errno::EBADF),
            }
        };
        let decoded = {
            let _t = profile::enter(Phase::Caller);
            uapi::decode(cmd, arg, caller.mem(), kind)?
        };
        let command = decoded.command();
        let ucmd = Ucmd {
            caller,
            arg,
            decoded,
            session,
        };
        execute(command)(self, &ucmd)
    }

    fn create_session(&mut self, u: &Ucmd<'_>) -> Result<()> {
        self.hand_out_session(u, &CREATE)
    }

    fn retrieve_session(&mut self, u: &Ucmd<'_>) -> Result<()> {
        self.hand_out_session(u, &RETRIEVE)
    }

    /// Installs a session file naming the session `how` finds in the
    /// caller, and writes its fd into the caller's struct.
    fn hand_out_session(&mut self, u: &Ucmd<'_>, how: &ByName) -> Result<()> {
        let mut args: uapi::SessionArgs = u.args();
        let name = SessionName::from_field(&args.name)?;
        if !u.caller.can_install() {
            (how.check)(self, &name, u.caller)?;
            return Err(refuse(u.caller, how.what));
        }
        u.respond_unchanged()?;
        let (ino, file) = self.take_slot()?;
        let sid = match self.session_for(&name, u.caller, how) {
            Ok(sid) => sid,
            Err(e) => {
                self.files.spare.push((ino, file));
                return Err(e);
            }
        };
        self.files.slots.insert(ino, Some(sid));
        self.files.session_slot.insert(sid, ino);
        match u.caller.install(file.as_fd()) {
            Ok(fd) => {
                args.fd = fd;
                u.respond(&args)
            }
            Err(e) => {
                self.files.slots.insert(ino, None);
                self.files.session_slot.remove(&sid);
                (how.undo)(self, sid);
                self.files.spare.push((ino, file));
                Err(e)
            }
        }
    }

    fn session_for(
        &mut self,
        name: &SessionName,
        caller: &Caller,
        how: &ByName,
    ) -> Result<SessionId> {
        let result = match (how.get)(self, name, caller) {
            // The session in the way, or one that holds the owner at its
            // limit, may be released by a queued RELEASE.
            Err(Errno::EEXIST | Errno::EINVAL | Errno::EMFILE) => {
                self.settle_releases();
                (how.get)(self, name, caller)
            }
            other => other,
        };
        self.log_refusal();
        result
    }

    /// Who a session the caller creates belongs to: its uid and its tree.
    fn owner_of(&mut self, caller: &Caller) -> Owner {
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

    fn check_create(&mut self, name: &SessionName, caller: &Caller) -> Result<()> {
        let owner = self.owner_of(caller);
        let created = self.store.create_session_as(name.clone(), Some(owner));
        self.log_refusal();
        self.store.release_session(created?)
    }

    fn create_as_owner(&mut self, name: &SessionName, caller: &Caller) -> Result<SessionId> {
        let owner = self.owner_of(caller);
        self.store.create_session_as(name.clone(), Some(owner))
    }

    fn drop_created(&mut self, sid: SessionId) {
        let _ = self.store.release_session(sid);
    }

    fn check_retrieve(&mut self, name: &SessionName, _: &Caller) -> Result<()> {
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

    fn retrieve_by_name(&mut self, name: &SessionName, _: &Caller) -> Result<SessionId> {
        self.store.retrieve_session(name)
    }

    fn unretrieve(&mut self, sid: SessionId) {
        self.store.unretrieve_session(sid);
    }
}
