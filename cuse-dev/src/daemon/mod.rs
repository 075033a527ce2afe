//! The daemon: serves `/dev/liveupdate` and its session files over FUSE,
//! answers trapped ioctls from `luo run` trees, and keeps the LUO store.
//!
//! # Files
//! One FUSE connection is mounted as a directory in the state dir (`fs/`):
//! `fs/liveupdate` is the device, bind-mounted onto the device path;
//! `fs/s<N>` are session files. A helper thread pre-opens session files
//! into a small pool; a new session takes one and the fd is installed in the
//! caller. Because each session file is its own inode, the daemon recognises a
//! session fd handed back to it (through a trapped ioctl) by `fstat` alone, and
//! because it is a real open file, `dup`, `fork` and `SCM_RIGHTS` work and the
//! kernel tells the daemon (FUSE `RELEASE`) when the last reference is gone.
//!
//! # Ordering
//! Everything runs on one thread. FUSE sends `RELEASE` asynchronously, but it
//! is queued before `close(2)` returns; the daemon therefore processes every
//! pending FUSE request before acting on a trapped ioctl, and FUSE requests are
//! served in order, so a close followed at once by an open or a create of the
//! same name sees the close first, as with the kernel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use luo_store::{
    Direction, Errno, FreezeFailure, Limits, Owner, Result, SessionId, SessionName, Store,
};
use thiserror::Error;
use zerocopy::IntoBytes;

use crate::caller::deadline::{Guarded, Runner};
use crate::caller::owners::{self, FdBudget, TreeRoot};
use crate::caller::seccomp::{Listener, Notif};
use crate::caller::{self, CallerMem, PinnedVm, ProcessVm};
use crate::control::server::{ControlServer, Event, Incoming, Policy};
use crate::control::{self, FileStatus, Request as CtlRequest, Response, SessionStatus};
use crate::persist::keeper::Keeper;
use crate::persist::opener::Opener;
use crate::persist::recover;
use crate::persist::{self, Header, Journal, KeptFds, Loaded, Record, SessionRecord};
use crate::wire::abi::*;
use crate::wire::fuse::{self, Channel, Op};
use crate::{log, sys, uapi};
use luo_kexec_helper::failpoint;

const ROOT_INO: u64 = 1;
const DEVICE_INO: u64 = 2;
const SLOT_BASE: u64 = 1 << 32;
const POOL_SIZE: usize = 16;
/// How long a call waits for a session file before the opener is taken
/// for hung and replaced.
const OPENER_PATIENCE_MS: i32 = 5000;

/// After a kexec: kmod-shim and the stashes rebuilt into memfds.
type Rebuilt = Option<(luo_kexec_helper::shim::Shim, Vec<u64>)>;

/// How often the daemon makes sure its keeper is alive (ms).
const KEEPER_CHECK_MS: i32 = 1000;
const TOKEN_FUSE: u64 = 1;
const TOKEN_POOL: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_CONTROL: u64 = 4;
const TOKEN_CUSE: u64 = 5;
const TOKEN_LISTENER_BASE: u64 = 1 << 20;
/// Control connections' tokens (listeners never get this far).
const TOKEN_CONN_BASE: u64 = 1 << 48;

/// Where the daemon lives.
#[derive(Clone, Debug)]
pub struct Config {
    /// The device path (`/dev/liveupdate`).
    pub device: PathBuf,
    /// State dir: FUSE mount, control socket.
    pub state_dir: PathBuf,
    /// Serve the device as a CUSE character device (`/dev/NAME`) instead of
    /// a FUSE file bound onto the device path.
    pub cuse: bool,
    /// A group whose members may ask for `status` (everything else on the
    /// control socket is root's alone).
    pub status_group: Option<u32>,
    /// What session owners other than root may hold (see [`owners`]).
    pub limits: Limits,
}

impl Config {
    fn fs_dir(&self) -> PathBuf {
        self.state_dir.join("fs")
    }

    /// The control socket path.
    pub fn socket(&self) -> PathBuf {
        crate::control::socket_in(&self.state_dir)
    }

    /// The keeper's socket path.
    pub fn keeper_socket(&self) -> PathBuf {
        self.state_dir.join("keeper.sock")
    }

    /// The state image path.
    pub fn image(&self) -> PathBuf {
        self.state_dir.join("state.img")
    }
}

/// Why the daemon could not start or stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The state image of the previous daemon was refused.
    #[error(transparent)]
    Image(#[from] persist::LoadError),
    /// A setup step failed.
    #[error("cannot {what}")]
    Setup {
        /// The step, as a phrase.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn setup<T>(
    what: impl FnOnce() -> String,
    r: std::io::Result<T>,
) -> std::result::Result<T, DaemonError> {
    r.map_err(|source| DaemonError::Setup {
        what: what(),
        source,
    })
}

/// A caller of an ioctl: through FUSE (blocked until we reply) or through a
/// seccomp notification (may vanish; can receive fds). Its memory is reached
/// through the deadline runner (see `deadline.rs`).
struct Caller {
    tid: i32,
    /// Its effective uid.
    uid: u32,
    mem: Guarded,
    runner: Rc<Runner>,
    /// The notification, for a trapped call.
    trap: Option<(Rc<Listener>, u64)>,
    /// The token of its `luo run` tree's listener, for a trapped call.
    tree: Option<u64>,
}

impl Caller {
    /// A FUSE caller: the kernel keeps it blocked, unkillably, until we
    /// reply, so its tid is its own for the whole request.
    fn fuse(tid: i32, uid: u32, runner: &Rc<Runner>) -> Caller {
        Caller {
            tid,
            uid,
            mem: Guarded::new(Arc::new(ProcessVm { tid }), uid, runner),
            runner: runner.clone(),
            trap: None,
            tree: None,
        }
    }

    /// A trapped call of the tree `call.listener`: the caller's memory
    /// pinned and its uid read first, then the call checked to be still
    /// waiting (so what was read is the caller's).
    fn trapped(
        listener: &Rc<Listener>,
        call: &persist::Inflight,
        runner: &Rc<Runner>,
    ) -> Result<Caller> {
        let tid = call.pid as i32;
        let mem = PinnedVm::open(tid)?;
        let uid = owners::effective_uid(tid).ok_or(Errno::ESRCH)?;
        if !listener.id_valid(call.id) {
            return Err(Errno::ESRCH);
        }
        if runner.over_limit(uid) {
            return Err(Errno::EAGAIN);
        }
        Ok(Caller {
            tid,
            uid,
            mem: Guarded::new(Arc::new(mem), uid, runner),
            runner: runner.clone(),
            trap: Some((listener.clone(), call.id)),
            tree: Some(call.listener),
        })
    }

    fn tid(&self) -> i32 {
        self.tid
    }

    /// The caller's memory, each access with a deadline.
    fn mem(&self) -> &Guarded {
        &self.mem
    }

    /// Still waiting for us (always true for FUSE callers, see `caller.rs`).
    fn valid(&self) -> bool {
        self.trap
            .as_ref()
            .is_none_or(|(listener, id)| listener.id_valid(*id))
    }

    fn can_install(&self) -> bool {
        self.trap.is_some()
    }

    /// A copy of the caller's fd `fd`, refused as the kernel's `fdget` would
    /// refuse it: EBADF for a bad number and for an `O_PATH` fd (which was
    /// opened without any permission check and can reach no ioctl); EMFILE
    /// or ENFILE when the daemon has no fd to spare.
    fn get_fd(&self, fd: i32) -> Result<OwnedFd> {
        let pidfd = caller::pidfd_open(self.tid()).map_err(|e| match e {
            Errno::EMFILE | Errno::ENFILE => e,
            _ => Errno::ESRCH,
        })?;
        if !self.valid() {
            return Err(Errno::ESRCH);
        }
        let file = caller::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| match e {
            Errno::ESRCH | Errno::EMFILE | Errno::ENFILE => e,
            _ => Errno::EBADF,
        })?;
        match sys::status_flags(file.as_fd()) {
            Ok(flags) if flags & libc::O_PATH == 0 => Ok(file),
            _ => Err(Errno::EBADF),
        }
    }

    fn install(&self, file: BorrowedFd<'_>) -> Result<i32> {
        match &self.trap {
            Some((listener, id)) => listener.add_fd(*id, file).map_err(|e| match e {
                Errno::ENOENT => Errno::ESRCH,
                other => other,
            }),
            None => Err(Errno::EOPNOTSUPP),
        }
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        if !self.valid() {
            return Err(Errno::ESRCH);
        }
        self.mem().write(addr, bytes)
    }

    /// Closes a copy of one of the caller's fds that the daemon does not
    /// keep, off the daemon's thread: closing a file of a filesystem that
    /// does not answer (FUSE `FLUSH`) would wait for good.
    fn dispose(&self, file: OwnedFd) {
        if self.runner.over_limit(self.uid) {
            // No thread may be spent on this uid; the copy stays open.
            std::mem::forget(file);
            return;
        }
        if self.runner.run(self.uid, move || drop(file)).is_err() {
            log::warn(format_args!(
                "closing a file pid {} passed did not finish; it is left to a helper thread",
                self.tid
            ));
        }
    }
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    store: Store,
    chan: Channel,
    epoll: sys::Epoll,
    // Kept open: epoll watches it.
    _signals: OwnedFd,
    /// Socket to the session-file opener process.
    opener: OwnedFd,
    /// Its pid (the `pid` of its FUSE requests).
    opener_tid: i32,
    /// Session files received from the opener, not yet used.
    pool: VecDeque<(u64, OwnedFd)>,
    spare: Vec<(u64, OwnedFd)>,
    /// FUSE requests read ahead by [`Daemon::settle_releases`], in order.
    backlog: VecDeque<fuse::Request>,
    /// `st_dev` of our FUSE mount: identifies our device and session files.
    fs_dev: u64,
    slots: HashMap<u64, Option<SessionId>>,
    device_holder: Option<u64>,
    next_fh: u64,
    device_mode: u32,
    device_owner: (u32, u32),
    control: Option<ControlServer>,
    listeners: HashMap<u64, Rc<Listener>>,
    /// The process each `luo run` tree started as, by listener token.
    trees: BTreeMap<u64, TreeRoot>,
    /// The fds owners other than root may make the daemon hold.
    fds: FdBudget,
    /// Preserving is refused: the files could take the daemon's own fds.
    fds_short: bool,
    /// Session files the opener sent that the daemon had no fd for.
    lost_slots: usize,
    /// Files of incoming sessions left in their kmod-shim stash after a
    /// kexec until there are huge pages for them.
    waiting: Vec<luo_kexec_helper::handover::StashedFile>,
    next_listener: u64,
    created_device: bool,
    /// The CUSE device's number, once it exists.
    cuse_rdev: Option<u64>,
    /// A CUSE init reply is on its way: label the device after the batch.
    cuse_created: bool,
    /// Where accesses to callers' memory run, each with a deadline.
    runner: Rc<Runner>,
    /// Shim tokens stashed for a kexec being prepared.
    stashed: Vec<u64>,
    /// The cgroup of the current epoch's `luo run` trees.
    workload: Option<luo_kexec_helper::Workload>,
    /// The fds the keeper holds for us.
    kept: KeptFds,
    /// Next session-file number the opener will use.
    next_slot: u64,
    /// Something changed since the image was last written.
    dirty: bool,
    /// The state journal (from the end of start-up on).
    journal: Option<Journal>,
    /// The journal's size when a compaction last failed (the state dir was
    /// full): the next is tried once it has grown by [`persist::RESERVE`].
    compaction_failed_at: Option<u64>,
    /// Changes are refused (ENOSPC) for want of journal room.
    refusing: bool,
    /// When the keeper was last seen alive.
    keeper_checked: std::time::Instant,
    /// When session-file openers exited (the last minute's).
    opener_deaths: Vec<std::time::Instant>,
    /// The session file of each session that has one open.
    session_slot: HashMap<SessionId, u64>,
    /// The trapped call being answered.
    inflight: Option<persist::Inflight>,
    stop: bool,
    /// Stop for good: unmount, release everything, end the keeper.
    teardown: bool,
}

impl Daemon {
    /// Serves the device in the foreground until SIGTERM/SIGINT (the state
    /// stays with the keeper for the next daemon) or `luo shutdown` (the
    /// device is unmounted and everything released).
    ///
    /// A daemon started while a keeper holds the state of a previous one
    /// resumes it: same mount, same sessions, same session fds in clients.
    ///
    /// # Errors
    /// Setup failures, as sentences naming what could not be done; a state
    /// image that cannot be trusted.
    pub fn run(cfg: Config) -> std::result::Result<(), DaemonError> {
        let mut daemon = Daemon::start(cfg)?;
        log::info(format_args!(
            "{}",
            owners::describe(&daemon.cfg.limits, &daemon.fds)
        ));
        let result = daemon.serve();
        daemon.stop_serving();
        result
    }

    fn start(cfg: Config) -> std::result::Result<Daemon, DaemonError> {
        sys::raise_fd_limit();
        let state = cfg.state_dir.clone();
        setup(
            || format!("use {} as the state dir", state.display()),
            crate::persist::paths::secure_state_dir(&state),
        )?;
        if control::call(&cfg.socket(), &CtlRequest::Status, None).is_ok() {
            return Err(DaemonError::Setup {
                what: format!("start: a daemon already serves {}", cfg.state_dir.display()),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let image_exists = cfg.image().exists();
        let keeper = setup(
            || "trust the fd keeper".into(),
            Keeper::connect(&cfg.keeper_socket()),
        )?;
        match keeper {
            Some(keeper) if image_exists => Daemon::resume(cfg, keeper),
            Some(keeper) => {
                // A daemon that died before it saved anything: start over.
                let _ = keeper.exit();
                Daemon::fresh(cfg)
            }
            None if image_exists => Err(DaemonError::Setup {
                what: format!(
                    "resume from {}: no keeper holds the fds it names (was the machine rebooted, \
                     or the keeper killed while no daemon ran?). What it held is gone: every \
                     preserved memfd that no process still holds open, and the device and \
                     session fds' connection (open session fds now fail with ENOTCONN). Move the \
                     file away to start with no sessions",
                    cfg.image().display()
                ),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            }),
            None => Daemon::fresh(cfg),
        }
    }

    /// A first start: mount, bind the device, start a keeper.
    fn fresh(cfg: Config) -> std::result::Result<Daemon, DaemonError> {
        let created_device = if cfg.cuse {
            cuse_device_name(&cfg.device)?;
            false
        } else {
            prepare_device_path(&cfg.device)?
        };
        let fs = cfg.fs_dir();
        // A stale mount from a daemon whose keeper is gone would make the mkdir fail.
        let _ = sys::umount_detach(&fs);
        setup(
            || format!("create {}", fs.display()),
            crate::persist::paths::trusted_dir(&fs),
        )?;
        let cuse_fd = if cfg.cuse {
            Some(setup(
                || "open /dev/cuse (is CUSE built in or loaded?)".into(),
                sys::open_rdwr(Path::new("/dev/cuse"), libc::O_NONBLOCK),
            )?)
        } else {
            None
        };
        let fuse_fd = setup(
            || "open /dev/fuse (is the fuse module loaded?)".into(),
            sys::open_rdwr(Path::new("/dev/fuse"), libc::O_NONBLOCK),
        )?;
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            fuse_fd.as_raw_fd()
        );
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        setup(
            || format!("mount FUSE at {}", fs.display()),
            sys::mount("luo", &fs, Some("fuse.luo"), flags, Some(&opts)),
        )?;
        let keeper = setup(
            || "start the fd keeper".into(),
            Keeper::spawn(&cfg.keeper_socket()),
        )?;
        let mut kept = setup(|| "ask the fd keeper".into(), KeptFds::new(keeper))?;
        setup(
            || "hand the FUSE connection to the keeper".into(),
            kept.add_missing(&[(persist::FUSE_KEY.to_owned(), fuse_fd.as_fd())]),
        )?;
        if let Some(c) = &cuse_fd {
            setup(
                || "hand the CUSE device to the keeper".into(),
                kept.add_missing(&[(persist::CUSE_KEY.to_owned(), c.as_fd())]),
            )?;
        }
        let header = Header {
            next_fh: 1,
            device_mode: 0o600,
            next_listener: TOKEN_LISTENER_BASE,
            created_device,
            ..Header::default()
        };
        let bind = !cfg.cuse;
        let mut daemon = Daemon::assemble(cfg, fuse_fd, cuse_fd, kept, &header, bind)?;
        let restored = daemon.adopt_kexec()?;
        let path = daemon.cfg.image();
        setup(
            || format!("write the state journal {}", path.display()),
            daemon.snapshot(),
        )?;
        // Saved, and every restored memfd is with the keeper: kmod-shim may
        // let the stashes go. A daemon killed before this point leaves them
        // all, and the next one restores them again.
        if let Some((shim, tokens)) = restored {
            for t in tokens {
                if let Err(e) = shim.release(t) {
                    log::warn(format_args!("kmod-shim kept stash {t}: {e}"));
                }
            }
        }
        Ok(daemon)
    }

    /// Takes over from a daemon that stopped or died: the keeper still holds
    /// the FUSE connection and every fd; the image says what they are.
    fn resume(cfg: Config, keeper: Keeper) -> std::result::Result<Daemon, DaemonError> {
        let loaded = persist::read(&cfg.image())?;
        let kept = setup(|| "ask the fd keeper".into(), KeptFds::new(keeper))?;
        let fuse_fd = setup(
            || "take the FUSE connection back from the keeper".into(),
            kept.keeper.get(persist::FUSE_KEY),
        )?;
        setup(
            || "make the FUSE connection non-blocking".into(),
            sys::set_nonblocking(fuse_fd.as_fd()),
        )?;
        // The CUSE device, if the daemon serves one, lives as long as this fd.
        let cuse_fd = kept.keeper.get(persist::CUSE_KEY).ok();
        if let Some(c) = &cuse_fd {
            setup(
                || "make the CUSE device non-blocking".into(),
                sys::set_nonblocking(c.as_fd()),
            )?;
        }
        let mut daemon = Daemon::assemble(cfg, fuse_fd, cuse_fd, kept, &loaded.header, false)?;
        if daemon.chan.cuse_fd().is_some() {
            daemon.cuse_rdev = sys::path_rdev(&daemon.cfg.device).ok();
        }
        daemon.load(&loaded)?;
        // Replies the previous daemon decided on may not have been delivered.
        for reply in &loaded.replies {
            daemon.chan.resend(reply);
        }
        let path = daemon.cfg.image();
        setup(
            || format!("rewrite the state journal {}", path.display()),
            daemon.snapshot(),
        )?;
        if let Err(e) = daemon.chan.notify_resend() {
            log::warn(format_args!(
                "cannot ask the kernel to resend unanswered requests: {e}"
            ));
        }
        if let Some(w) = &daemon.workload {
            // A daemon killed in the middle of an update may have left it frozen.
            w.thaw();
        }
        if let Some(call) = loaded.inflight {
            daemon.redo(call);
        }
        daemon.recover_lost_call();
        daemon.withdraw_stale_stashes();
        let n = daemon.store.sessions().count();
        log::info(format_args!(
            "resumed epoch {} with {n} sessions from {}",
            daemon.store.epoch(),
            daemon.cfg.image().display()
        ));
        Ok(daemon)
    }

    fn load(&mut self, loaded: &Loaded) -> std::result::Result<(), DaemonError> {
        let keeper = &self.kept.keeper;
        let refused = |reason| persist::LoadError::Refused {
            path: self.cfg.image(),
            reason,
        };
        self.store
            .load_image(&loaded.store_image(), &mut |key| keeper.get(key).ok())
            .map_err(refused)?;
        for token in &loaded.header.listeners {
            let key = persist::listener_key(*token);
            let fd = keeper
                .get(&key)
                .map_err(|_| refused(luo_store::ImageError::MissingFd(key)))?;
            setup(
                || "watch a luo run listener".into(),
                self.epoll.add(fd.as_raw_fd(), *token),
            )?;
            let last = loaded.header.listener_ids.get(token).copied();
            self.listeners
                .insert(*token, Rc::new(Listener::new(fd, last)));
        }
        for r in loaded.sessions.values() {
            if let Some(ino) = r.slot {
                self.slots.insert(ino, Some(SessionId(r.session.id)));
                self.session_slot.insert(SessionId(r.session.id), ino);
            }
        }
        self.device_holder = loaded.header.device_holder;
        // Kept in every record until it is answered again (see `redo`).
        self.inflight = loaded.inflight;
        self.store.take_changes();
        Ok(())
    }

    fn assemble(
        cfg: Config,
        fuse_fd: OwnedFd,
        cuse_fd: Option<OwnedFd>,
        kept: KeptFds,
        image: &Header,
        bind: bool,
    ) -> std::result::Result<Daemon, DaemonError> {
        let fs = cfg.fs_dir();
        // The mount root is reached without a FUSE request (O_PATH, cached attributes).
        let (fs_dev, _) = setup(
            || format!("stat the FUSE mount at {}", fs.display()),
            sys::path_dev_ino(&fs),
        )?;
        let signals = setup(
            || "set up signal handling".into(),
            sys::termination_signalfd(),
        )?;
        let epoll = setup(|| "create an epoll instance".into(), sys::Epoll::new())?;

        let opener = Opener {
            fs,
            bind_device: bind.then(|| cfg.device.clone()),
            first_slot: image.next_slot,
        };
        let (opener, opener_tid) = setup(
            || "start the session-file opener".into(),
            crate::persist::opener::spawn(&opener),
        )?;
        for _ in 0..POOL_SIZE {
            grant_credit(opener.as_fd());
        }
        let mut chan = Channel::new(fuse_fd);
        if let Some(c) = cuse_fd {
            setup(
                || "watch the CUSE device".into(),
                epoll.add(c.as_raw_fd(), TOKEN_CUSE),
            )?;
            chan.attach_cuse(c);
        }
        for (fd, token) in [
            (chan.fd().as_raw_fd(), TOKEN_FUSE),
            (opener.as_raw_fd(), TOKEN_POOL),
            (signals.as_raw_fd(), TOKEN_SIGNAL),
        ] {
            setup(|| "watch the daemon's fds".into(), epoll.add(fd, token))?;
        }
        let workload = workload_tracker(&cfg.state_dir, image.store.epoch);
        let mut store = Store::new();
        let size_lock =
            luo_kexec_helper::shim::ShimSizeLock::new(Path::new(luo_kexec_helper::shim::DEVICE));
        luo_handlers::register_all_with(&mut store, std::sync::Arc::new(size_lock))
            .expect("built-in handlers register once");
        store.set_limits(cfg.limits);
        Ok(Daemon {
            cfg,
            store,
            chan,
            epoll,
            _signals: signals,
            opener,
            opener_tid,
            pool: VecDeque::new(),
            spare: Vec::new(),
            backlog: VecDeque::new(),
            fs_dev,
            slots: HashMap::new(),
            device_holder: None,
            next_fh: image.next_fh,
            device_mode: image.device_mode,
            device_owner: image.device_owner,
            control: None,
            listeners: HashMap::new(),
            trees: image.trees.clone(),
            fds: FdBudget::current(),
            fds_short: false,
            lost_slots: 0,
            waiting: image.waiting.clone(),
            next_listener: image.next_listener,
            workload,
            created_device: image.created_device,
            cuse_rdev: None,
            cuse_created: false,
            runner: Rc::new(Runner::new()),
            stashed: Vec::new(),
            kept,
            next_slot: image.next_slot,
            dirty: false,
            journal: None,
            compaction_failed_at: None,
            refusing: false,
            keeper_checked: std::time::Instant::now(),
            opener_deaths: Vec::new(),
            session_slot: HashMap::new(),
            inflight: None,
            stop: false,
            teardown: false,
        })
    }

    /// Saves what changed (and gives the keeper any new fds). Called before
    /// replies that report changes leave the daemon.
    /// Saves what changed before the replies that report it leave. A
    /// compaction that fails (a full state dir) falls back to an append; an
    /// append goes into room reserved ahead (changes are refused while there
    /// is none, see [`Daemon::room_for_change`]). If even that fails the
    /// daemon exits without answering: nothing unsaved is acknowledged, and
    /// the next `luo daemon` resumes from the last saved state and serves
    /// the unanswered requests again.
    fn commit(&mut self) {
        let gone = self.take_gone_waiting();
        let changes = self.store.take_changes();
        if !self.dirty && changes.is_empty() {
            return;
        }
        let result = match &self.journal {
            None => self.snapshot(),
            Some(j) if j.wants_compaction() && self.may_compact(j.size()) => {
                self.snapshot().or_else(|e| {
                    let size = self.journal.as_ref().map_or(0, Journal::size);
                    log::warn(format_args!(
                        "compacting {} failed ({e}); appending instead",
                        self.cfg.image().display()
                    ));
                    self.compaction_failed_at = Some(size);
                    self.append(&changes)
                })
            }
            Some(_) => self.append(&changes),
        };
        // A keeper that died takes the save down with it: replace it, and
        // the snapshot that hands it every fd saves this change too.
        let result = result.or_else(|e| match self.kept.keeper.list() {
            Ok(_) => Err(e),
            Err(_) => self.replace_keeper(),
        });
        match result {
            Ok(()) => {
                self.dirty = false;
                release_stashes(&gone);
            }
            Err(e) => {
                log::error(format_args!(
                    "saving the state to {} failed: {e}; exiting without answering, so that \
                     nothing unsaved is acknowledged (the next `luo daemon` resumes from the \
                     last saved state)",
                    self.cfg.image().display()
                ));
                std::process::exit(70);
            }
        }
    }

    /// Makes sure the keeper still holds what a crash of this daemon would
    /// need (checked at most every [`KEEPER_CHECK_MS`]).
    fn check_keeper(&mut self) {
        if self.keeper_checked.elapsed().as_millis() < u128::from(KEEPER_CHECK_MS.unsigned_abs()) {
            return;
        }
        self.keeper_checked = std::time::Instant::now();
        if self.kept.keeper.list().is_ok() {
            return;
        }
        if let Err(e) = self.replace_keeper() {
            log::error(format_args!(
                "the fd keeper is gone and no new one could be started ({e}): a crash of this \
                 daemon now loses every preserved file no client holds; stop it with SIGTERM \
                 only after fixing that"
            ));
        }
    }

    /// The keeper died under a running daemon: what it held is closed there,
    /// but the daemon holds every fd itself, so a new keeper is started and
    /// handed all of them again (with a full snapshot naming them).
    fn replace_keeper(&mut self) -> std::io::Result<()> {
        log::error(format_args!(
            "the fd keeper is gone (killed?): starting a new one and handing it every fd again"
        ));
        let keeper = Keeper::spawn(&self.cfg.keeper_socket())?;
        self.kept = KeptFds::new(keeper)?;
        self.snapshot()?;
        let (keys, pid) = self.kept.keeper.list()?;
        log::info(format_args!(
            "a new fd keeper (pid {pid}) holds {} fds; nothing was lost",
            keys.len()
        ));
        Ok(())
    }

    fn may_compact(&self, size: u64) -> bool {
        self.compaction_failed_at
            .is_none_or(|at| size >= at + persist::RESERVE)
    }

    /// Whether a change may be made now: the journal has its reserve. While
    /// it cannot (the state dir is full), changes fail with ENOSPC; changes
    /// that cannot be refused (closes, exits) still fit in the reserve.
    fn room_for_change(&mut self) -> Result<()> {
        let room = self
            .journal
            .as_mut()
            .is_none_or(|j| j.has_room(persist::RESERVE));
        if room != self.refusing {
            return if room { Ok(()) } else { Err(Errno::ENOSPC) };
        }
        self.refusing = !room;
        if room {
            log::info(format_args!(
                "{} has room again: changes are taken again",
                self.cfg.state_dir.display()
            ));
            Ok(())
        } else {
            log::warn(format_args!(
                "{} is full: changes to sessions fail with ENOSPC until there is room \
                 ({} KiB for the state journal)",
                self.cfg.state_dir.display(),
                persist::RESERVE >> 10
            ));
            Err(Errno::ENOSPC)
        }
    }

    fn header(&self) -> Header {
        Header {
            store: self.store.header_image(),
            next_slot: self.next_slot,
            device_holder: self.device_holder,
            next_fh: self.next_fh,
            device_mode: self.device_mode,
            device_owner: self.device_owner,
            listeners: self.listeners.keys().copied().collect(),
            listener_ids: self
                .listeners
                .iter()
                .filter_map(|(t, l)| Some((*t, l.last_id()?)))
                .collect(),
            next_listener: self.next_listener,
            created_device: self.created_device,
            trees: self.trees.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Appends one record of what changed: whole sessions where much changed,
    /// otherwise the session's fields and the files that changed.
    fn append(&mut self, changes: &luo_store::Changes) -> std::io::Result<()> {
        let header = self.header();
        let mut fds = own_fds(&self.chan, &self.listeners);
        // Keeper keys that may have to go: those of whole sessions and of the
        // changed files (`wanted` decides).
        let mut prefixes: Vec<String> = vec!["listener/".into()];
        let mut sessions = Vec::new();
        let mut deltas = Vec::new();
        for (id, dirty) in &changes.changed {
            let slot = self.session_slot.get(id).copied();
            if dirty.whole {
                if let Some((session, f)) = self.store.session_image(*id) {
                    fds.extend(f);
                    sessions.push(SessionRecord { session, slot });
                }
                prefixes.push(format!("s{}/", id.0));
            } else if let Some((delta, f)) = self.store.session_delta(*id, &dirty.files) {
                fds.extend(f);
                deltas.push(persist::DeltaRecord { delta, slot });
                prefixes.extend(dirty.files.iter().map(|t| format!("s{}/t{t}/", id.0)));
            }
        }
        prefixes.extend(changes.removed.iter().map(|id| format!("s{}/", id.0)));
        self.kept.add_missing(&fds)?;
        let record = Record {
            full: false,
            header,
            sessions,
            deltas,
            removed: changes.removed.iter().map(|id| id.0).collect(),
            replies: self.chan.batch(),
            inflight: self.inflight,
        };
        self.journal
            .as_mut()
            .expect("journal exists after start-up")
            .append(&record)?;
        let wanted = fds.iter().map(|(k, _)| k.as_str()).collect();
        self.kept.drop_unwanted(&prefixes, &wanted)
    }

    /// Rewrites the journal as one full snapshot.
    fn snapshot(&mut self) -> std::io::Result<()> {
        let header = self.header();
        let (store, mut fds) = self.store.to_image();
        fds.extend(own_fds(&self.chan, &self.listeners));
        self.kept.add_missing(&fds)?;
        let sessions = store
            .sessions
            .into_iter()
            .map(|session| {
                let slot = self.session_slot.get(&SessionId(session.id)).copied();
                SessionRecord { session, slot }
            })
            .collect();
        let record = Record {
            full: true,
            header,
            sessions,
            deltas: Vec::new(),
            removed: Vec::new(),
            replies: self.chan.batch(),
            inflight: self.inflight,
        };
        self.journal = Some(Journal::create(&self.cfg.image(), &record)?);
        let wanted = fds.iter().map(|(k, _)| k.as_str()).collect();
        self.kept
            .drop_unwanted(&["s".into(), "listener/".into()], &wanted)?;
        self.compaction_failed_at = None;
        Ok(())
    }

    fn serve(&mut self) -> std::result::Result<(), DaemonError> {
        while !self.stop {
            if !self.backlog.is_empty() {
                self.drain_fuse();
            }
            let timeout = match self.expire_control() {
                -1 => KEEPER_CHECK_MS,
                t => t.min(KEEPER_CHECK_MS),
            };
            let events = setup(|| "wait for events".into(), self.epoll.wait(timeout))?;
            self.check_keeper();
            for (token, events) in events {
                match token {
                    TOKEN_FUSE | TOKEN_CUSE => self.drain_fuse(),
                    TOKEN_POOL => self.on_pool_event()?,
                    TOKEN_SIGNAL => {
                        log::info(format_args!("termination signal received; stopping"));
                        self.stop = true;
                    }
                    TOKEN_CONTROL => self.accept_control(),
                    t if t >= TOKEN_CONN_BASE => self.on_control(t),
                    t => self.on_notification(t, events),
                }
                if self.stop {
                    break;
                }
            }
        }
        Ok(())
    }

    fn stop_serving(&mut self) {
        let _ = std::fs::remove_file(self.cfg.socket());
        if !self.teardown {
            self.dirty = true;
            self.commit();
            let n = self.store.sessions().count();
            log::info(format_args!(
                "stopped; {n} sessions and their files stay with the keeper until the next `luo daemon`"
            ));
            return;
        }
        if self.chan.cuse_fd().is_some() {
            if let Some(name) = self.cfg.device.file_name().and_then(|n| n.to_str()) {
                let _ = std::fs::remove_file(
                    Path::new(crate::control::CUSE_LINKS).join(format!("{name}.control")),
                );
            }
        }
        let _ = sys::umount_detach(&self.cfg.device);
        if self.created_device {
            let _ = std::fs::remove_file(&self.cfg.device);
        }
        let _ = sys::umount_detach(&self.cfg.fs_dir());
        let _ = self.kept.keeper.exit();
        let _ = std::fs::remove_file(self.cfg.image());
        if let Some(w) = &self.workload {
            w.remove_if_empty();
        }
        let n: usize = self.store.sessions().map(|s| s.files.len()).sum();
        log::info(format_args!("shut down; {n} preserved files released"));
    }

    /// Takes what the opener sent: the bind report, session files.
    fn on_pool_event(&mut self) -> std::result::Result<(), DaemonError> {
        let mut msg = [0u8; 12];
        loop {
            let (n, fd) = match sys::recv_with_fd_nonblocking(self.opener.as_fd(), &mut msg) {
                Ok(Some(got)) => got,
                Ok(None) => return Ok(()),
                // Killed: end of file, or a reset if a credit was unread.
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    return self.respawn_opener()
                }
                Err(e) => {
                    let what = "hear from the session-file opener".to_owned();
                    return Err(DaemonError::Setup { what, source: e });
                }
            };
            if n == 0 {
                return self.respawn_opener();
            }
            let slot = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes"));
            match (slot, fd) {
                // A replacement opener binds nothing and reports success.
                (crate::persist::opener::BOUND, _) if self.control.is_some() => {}
                (crate::persist::opener::BOUND, _) => {
                    let errno = i32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
                    if errno != 0 {
                        let what = format!("bind the device onto {}", self.cfg.device.display());
                        return Err(DaemonError::Setup {
                            what,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                    self.open_control()?;
                }
                (n, Some(fd)) => self.pool.push_back((SLOT_BASE + n, fd)),
                // The daemon had no fd for it (the kernel closed it): its
                // credit is granted again when a session file is needed.
                (_, None) => self.lost_slots += 1,
            }
        }
    }

    /// The session-file opener exited (killed?): a new one takes over from
    /// the next slot, and gets the credits the pool lacks. One that keeps
    /// dying (5 times within a minute) stops the daemon, which keeps
    /// everything with the keeper for the next one.
    fn respawn_opener(&mut self) -> std::result::Result<(), DaemonError> {
        // SAFETY: reaps our child if it is gone; WNOHANG never blocks.
        unsafe { libc::waitpid(self.opener_tid, std::ptr::null_mut(), libc::WNOHANG) };
        let now = std::time::Instant::now();
        self.opener_deaths
            .retain(|t| now.duration_since(*t).as_secs() < 60);
        self.opener_deaths.push(now);
        if self.opener_deaths.len() >= 5 {
            return Err(DaemonError::Setup {
                what: "keep the session-file opener running".into(),
                source: std::io::Error::other("it exited 5 times within a minute"),
            });
        }
        log::warn(format_args!(
            "the session-file opener (pid {}) exited; starting a new one",
            self.opener_tid
        ));
        let (opener, tid) = setup(
            || "start a new session-file opener".into(),
            crate::persist::opener::respawn(&self.cfg.fs_dir(), self.next_slot),
        )?;
        self.epoll.delete(self.opener.as_raw_fd());
        setup(
            || "watch the new session-file opener".into(),
            self.epoll.add(opener.as_raw_fd(), TOKEN_POOL),
        )?;
        self.opener = opener;
        self.opener_tid = tid;
        self.lost_slots = 0;
        for _ in self.pool.len()..POOL_SIZE {
            grant_credit(self.opener.as_fd());
        }
        Ok(())
    }

    fn open_control(&mut self) -> std::result::Result<(), DaemonError> {
        let path = self.cfg.socket();
        let _ = std::fs::remove_file(&path);
        let listener = setup(
            || format!("listen on {}", path.display()),
            UnixListener::bind(&path),
        )?;
        setup(
            || format!("restrict {}", path.display()),
            crate::persist::paths::share_with_group(
                &path,
                &self.cfg.state_dir,
                self.cfg.status_group,
            ),
        )?;
        let policy = Policy {
            status_group: self.cfg.status_group,
        };
        let server = setup(
            || "make the control socket non-blocking".into(),
            ControlServer::new(listener, policy, TOKEN_CONN_BASE),
        )?;
        setup(
            || "watch the control socket".into(),
            self.epoll.add(server.listener().as_raw_fd(), TOKEN_CONTROL),
        )?;
        self.control = Some(server);
        log::info(format_args!(
            "serving {} (control socket {})",
            self.cfg.device.display(),
            path.display()
        ));
        Ok(())
    }

    // ---- FUSE ----------------------------------------------------------

    /// Serves every FUSE request that is pending right now.
    /// Serves every pending FUSE request as one batch: the replies leave
    /// only after the state they report is saved.
    fn drain_fuse(&mut self) {
        let outermost = self.chan.begin_batch();
        while let Some(req) = self.backlog.pop_front() {
            self.dispatch(req);
        }
        while let Some(req) = self.read_request() {
            self.dispatch(req);
        }
        if outermost {
            self.commit();
            self.chan.end_batch();
            if std::mem::take(&mut self.cuse_created) {
                self.label_cuse_device();
            }
        }
    }

    fn read_request(&mut self) -> Option<fuse::Request> {
        let next = match self.chan.next_request() {
            Ok(None) => self.chan.next_cuse_request(),
            other => other,
        };
        match next {
            Ok(req) => req,
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENODEV) {
                    log::warn(format_args!("the FUSE filesystem was unmounted; stopping"));
                    self.teardown = true;
                } else {
                    log::warn(format_args!("reading FUSE requests failed: {e}; stopping"));
                }
                self.stop = true;
                None
            }
        }
    }

    /// Applies every `RELEASE` already queued behind the request being served,
    /// keeping the other requests for later in their order. A release can be
    /// queued behind an open or a create that it must precede when the last
    /// reference was the daemon's own short-lived copy (taken to identify a
    /// caller's fd) and the caller died meanwhile.
    fn settle_releases(&mut self) {
        while let Some(req) = self.read_request() {
            match req.op {
                Op::Release(_) => self.dispatch(req),
                _ => self.backlog.push_back(req),
            }
        }
    }

    fn dispatch(&mut self, req: fuse::Request) {
        // Replies go where the request came from; a request served while
        // this one waits (see `take_slot`) routes its own.
        let before = self.chan.route(req.cuse);
        self.serve_request(req);
        self.chan.route(before);
    }

    fn serve_request(&mut self, req: fuse::Request) {
        let mut h = req.header;
        if fuse::is_noreply(&req.op) {
            return;
        }
        if req.cuse {
            // Everything on the CUSE device is about the device.
            h.nodeid = DEVICE_INO;
        }
        let u = h.unique;
        if changes_state(&req.op) {
            self.dirty = true;
        }
        match req.op {
            Op::Init(init) => self.reply_init(u, init),
            Op::Lookup { name } => self.lookup(&h, &name),
            Op::Getattr => match self.attr(h.nodeid) {
                Some(attr) => self.chan.reply_struct(
                    u,
                    &AttrOut {
                        attr,
                        ..Default::default()
                    },
                ),
                None => self.chan.reply_err(u, Errno::ENOENT),
            },
            Op::Setattr(s) => self.setattr(&h, s),
            Op::Open(_) => self.open(&h),
            Op::Opendir => self.chan.reply_struct(u, &OpenOut::default()),
            Op::Readdir | Op::Releasedir | Op::Flush | Op::Access => self.chan.reply(u, &[]),
            Op::Release(r) => {
                self.release(h.nodeid, r.fh);
                self.chan.reply(u, &[]);
            }
            Op::Ioctl(io) => self.fuse_ioctl(&h, io),
            Op::Getxattr { size, name } => self.getxattr(&h, size, &name),
            Op::Listxattr { size } => self.listxattr(&h, size),
            Op::Statfs => self.chan.reply_struct(
                u,
                &StatfsOut {
                    bsize: 4096,
                    namelen: 255,
                    ..Default::default()
                },
            ),
            Op::Read | Op::Write => self.chan.reply_err(u, Errno::EINVAL),
            Op::Setxattr | Op::Removexattr => self.chan.reply_err(u, Errno::EOPNOTSUPP),
            Op::Destroy => {
                self.chan.reply(u, &[]);
                self.stop = true;
            }
            Op::CuseInit(init) if req.cuse => self.reply_cuse_init(u, init),
            Op::CuseInit(_) | Op::Unknown(_) => self.chan.reply_err(u, Errno::ENOSYS),
            Op::Forget | Op::BatchForget | Op::Interrupt(_) => {}
        }
    }

    fn reply_init(&mut self, unique: u64, init: InitIn) {
        if init.major != KERNEL_VERSION {
            log::warn(format_args!(
                "kernel speaks FUSE {}.{}; need 7.x",
                init.major, init.minor
            ));
            self.chan.reply_err(unique, Errno::EPROTO);
            return;
        }
        let out = InitOut {
            major: KERNEL_VERSION,
            minor: init.minor.min(KERNEL_MINOR_VERSION),
            max_readahead: init.max_readahead,
            // Plenty of room so RELEASEs are never held back behind others.
            max_background: u16::MAX,
            congestion_threshold: u16::MAX - 1,
            max_write: 4096,
            time_gran: 1,
            ..Default::default()
        };
        self.chan.reply_struct(unique, &out);
    }

    /// Creates the character device: the kernel adds `/dev/NAME` once this
    /// reply is delivered (labelled then, see `drain_fuse`).
    fn reply_cuse_init(&mut self, unique: u64, init: CuseInitIn) {
        const CUSE_UNRESTRICTED_IOCTL: u32 = 1;
        if init.major != KERNEL_VERSION {
            self.chan.reply_err(unique, Errno::EPROTO);
            return;
        }
        let out = CuseInitOut {
            major: KERNEL_VERSION,
            minor: init.minor.min(KERNEL_MINOR_VERSION),
            flags: CUSE_UNRESTRICTED_IOCTL,
            max_read: 4096,
            max_write: 4096,
            ..Default::default()
        };
        let name = cuse_device_name(&self.cfg.device).unwrap_or_default();
        let info = format!("DEVNAME={name}\0");
        self.chan.reply(unique, &[out.as_bytes(), info.as_bytes()]);
        self.cuse_created = true;
    }

    /// Once the CUSE device exists: learns its number (to recognise its fds in
    /// trapped calls) and labels it with the control socket for `luo run`.
    fn label_cuse_device(&mut self) {
        let device = self.cfg.device.clone();
        match sys::path_rdev(&device) {
            Ok(rdev) => self.cuse_rdev = Some(rdev),
            Err(e) => log::warn(format_args!(
                "the CUSE device {} did not appear: {e}",
                device.display()
            )),
        }
        if let Err(e) = link_cuse_control(&device, &self.cfg.socket()) {
            log::warn(format_args!(
                "cannot link {} to the control socket ({e}); `luo run` will not find the daemon",
                device.display()
            ));
        }
    }

    fn attr(&self, ino: u64) -> Option<Attr> {
        let (mode, (uid, gid)) = match ino {
            ROOT_INO => (libc::S_IFDIR | 0o755, (0, 0)),
            DEVICE_INO => (libc::S_IFREG | self.device_mode, self.device_owner),
            ino if self.slots.contains_key(&ino) => (libc::S_IFREG | 0o600, (0, 0)),
            _ => return None,
        };
        Some(Attr {
            ino,
            mode,
            nlink: 1,
            uid,
            gid,
            blksize: 4096,
            ..Default::default()
        })
    }

    fn entry(&self, unique: u64, ino: u64) {
        let attr = self.attr(ino).expect("entry for a known inode");
        self.chan.reply_struct(
            unique,
            &EntryOut {
                nodeid: ino,
                attr,
                ..Default::default()
            },
        );
    }

    fn lookup(&mut self, h: &InHeader, name: &[u8]) {
        if h.nodeid != ROOT_INO {
            return self.chan.reply_err(h.unique, Errno::ENOENT);
        }
        if name == b"liveupdate" {
            return self.entry(h.unique, DEVICE_INO);
        }
        let slot = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.strip_prefix('s'))
            .and_then(|n| n.parse::<u64>().ok());
        match slot {
            Some(n) if h.pid as i32 == self.opener_tid && n < SLOT_BASE => {
                self.slots.entry(SLOT_BASE + n).or_insert(None);
                self.next_slot = self.next_slot.max(n + 1);
                self.entry(h.unique, SLOT_BASE + n);
            }
            _ => self.chan.reply_err(h.unique, Errno::ENOENT),
        }
    }

    fn setattr(&mut self, h: &InHeader, s: SetattrIn) {
        if h.nodeid != DEVICE_INO {
            return self.chan.reply_err(h.unique, Errno::EPERM);
        }
        if s.valid & FATTR_MODE != 0 {
            self.device_mode = s.mode & 0o7777;
        }
        if s.valid & FATTR_UID != 0 {
            self.device_owner.0 = s.uid;
        }
        if s.valid & FATTR_GID != 0 {
            self.device_owner.1 = s.gid;
        }
        let attr = self.attr(DEVICE_INO).expect("device inode");
        self.chan.reply_struct(
            h.unique,
            &AttrOut {
                attr,
                ..Default::default()
            },
        );
    }

    fn open(&mut self, h: &InHeader) {
        let flags = FOPEN_DIRECT_IO | FOPEN_NOFLUSH | FOPEN_NONSEEKABLE;
        match h.nodeid {
            DEVICE_INO => {
                if self.device_holder.is_some() {
                    self.settle_releases();
                }
                if self.device_holder.is_some() {
                    return self.chan.reply_err(h.unique, Errno::EBUSY);
                }
                let fh = self.next_fh;
                self.next_fh += 1;
                self.device_holder = Some(fh);
                self.chan.reply_struct(
                    h.unique,
                    &OpenOut {
                        fh,
                        open_flags: flags,
                        backing_id: 0,
                    },
                );
            }
            ino if self.slots.contains_key(&ino) && h.pid as i32 == self.opener_tid => {
                self.chan.reply_struct(
                    h.unique,
                    &OpenOut {
                        fh: ino,
                        open_flags: flags,
                        backing_id: 0,
                    },
                );
            }
            _ => self.chan.reply_err(h.unique, Errno::EACCES),
        }
    }

    fn release(&mut self, ino: u64, fh: u64) {
        if ino == DEVICE_INO {
            if self.device_holder == Some(fh) {
                self.device_holder = None;
            }
            return;
        }
        if let Some(Some(sid)) = self.slots.remove(&ino) {
            self.session_slot.remove(&sid);
            let name = self
                .store
                .session(sid)
                .map(|s| s.name.to_string())
                .unwrap_or_default();
            if let Some(w) = self.waiting.iter().find(|w| w.session == sid.0) {
                // Closing would finish it and drop the file still in its
                // stash: kept, to be retrieved again (SESSION_FINISH drops it).
                log::warn(format_args!(
                    "session {name} was closed while token {:#x} waits in its kmod-shim stash: \
                     kept for RETRIEVE_SESSION, not finished",
                    w.token
                ));
                self.store.unretrieve_session(sid);
                return;
            }
            if let Err(e) = self.store.release_session(sid) {
                log::warn(format_args!("session {name} could not finish on close ({e}); it stays until the next update"));
            }
        }
    }

    fn getxattr(&self, h: &InHeader, size: u32, name: &[u8]) {
        if h.nodeid != DEVICE_INO || name != control::SOCKET_XATTR.as_bytes() {
            return self.chan.reply_err(h.unique, Errno::ENODATA);
        }
        let value = self.cfg.socket().into_os_string().into_encoded_bytes();
        self.xattr_value(h.unique, size, &value);
    }

    fn listxattr(&self, h: &InHeader, size: u32) {
        let mut list = Vec::new();
        if h.nodeid == DEVICE_INO {
            list.extend_from_slice(control::SOCKET_XATTR.as_bytes());
            list.push(0);
        }
        self.xattr_value(h.unique, size, &list);
    }

    fn xattr_value(&self, unique: u64, size: u32, value: &[u8]) {
        if size == 0 {
            self.chan.reply_struct(
                unique,
                &GetxattrOut {
                    size: value.len() as u32,
                    padding: 0,
                },
            );
        } else if (size as usize) < value.len() {
            self.chan.reply_err(unique, Errno::ERANGE);
        } else {
            self.chan.reply(unique, &[value]);
        }
    }

    fn fuse_ioctl(&mut self, h: &InHeader, io: IoctlIn) {
        let result = if h.pid == 0 {
            // The caller is outside our pid namespace: we cannot reach it.
            Err(Errno::EPERM)
        } else {
            let caller = Caller::fuse(h.pid as i32, h.uid, &self.runner);
            if self.runner.over_limit(h.uid) {
                // Its earlier calls left helper threads waiting for good.
                Err(Errno::EAGAIN)
            } else {
                self.ioctl(h.nodeid, io.cmd, io.arg, &caller)
            }
        };
        match result {
            Ok(()) => self.chan.reply_struct(h.unique, &IoctlOut::default()),
            Err(e) => self.chan.reply_err(h.unique, e),
        }
    }

    // ---- ioctls ---------------------------------------------------------

    fn ioctl(&mut self, ino: u64, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
        if uapi::changes_state(cmd) {
            self.room_for_change()?;
        }
        if ino == DEVICE_INO {
            return self.device_ioctl(cmd, arg, caller);
        }
        match self.slots.get(&ino) {
            Some(Some(sid)) => self.session_ioctl(*sid, cmd, arg, caller),
            _ => Err(Errno::EBADF),
        }
    }

    fn device_ioctl(&mut self, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
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
                self.spare.push((ino, file));
                return Err(e);
            }
        };
        self.slots.insert(ino, Some(sid));
        self.session_slot.insert(sid, ino);
        let installed = caller.install(file.as_fd());
        match installed {
            Ok(fd) => {
                let mut out = args;
                out.fd = fd;
                caller.write(arg, &out.as_bytes()[..d.respond_len()])
            }
            Err(e) => {
                self.slots.insert(ino, None);
                self.session_slot.remove(&sid);
                self.undo_session(cmd, sid);
                self.spare.push((ino, file));
                Err(e)
            }
        }
    }

    fn check_session_op(&mut self, cmd: u32, name: &SessionName, caller: &Caller) -> Result<()> {
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

    fn session_for(&mut self, cmd: u32, name: SessionName, caller: &Caller) -> Result<SessionId> {
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

    fn store_session_for(
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
    fn owner_of(&mut self, caller: &Caller) -> Owner {
        let tree = caller.tree.map(|token| match self.trees.get_mut(&token) {
            Some(root) => root.tree(token),
            None => owners::unknown_tree(token),
        });
        Owner {
            uid: caller.uid,
            tree,
        }
    }

    /// Logs why a limit refused the last create or preserve, if one did.
    fn log_refusal(&mut self) {
        if let Some(r) = self.store.take_refusal() {
            log::warn(format_args!("{r} ({})", owners::flag(&r)));
        }
    }

    fn undo_session(&mut self, cmd: u32, sid: SessionId) {
        if cmd == uapi::CREATE_SESSION {
            let _ = self.store.release_session(sid);
        } else {
            self.store.unretrieve_session(sid);
        }
    }

    fn session_ioctl(&mut self, sid: SessionId, cmd: u32, arg: u64, caller: &Caller) -> Result<()> {
        let kind = self.store.direction(sid)?;
        let d = uapi::decode(cmd, arg, caller.mem(), Some(kind))?;
        match d.op.cmd {
            uapi::PRESERVE_FD => {
                let a: uapi::FdArgs = d.get();
                self.preserve(sid, (a.fd, a.token), caller)?;
                caller.write(arg, &d.buf[..d.respond_len()])
            }
            uapi::RETRIEVE_FD => self.retrieve_fd(sid, arg, &d, caller),
            uapi::FINISH => {
                let a: uapi::FinishArgs = d.get();
                if a.reserved != 0 {
                    return Err(Errno::EINVAL);
                }
                self.store.finish(sid)?;
                caller.write(arg, &d.buf[..d.respond_len()])
            }
            uapi::GET_NAME => {
                let mut a: uapi::GetNameArgs = d.get();
                if a.reserved != 0 {
                    return Err(Errno::EINVAL);
                }
                a.name = self.store.session(sid).ok_or(Errno::EBADF)?.name.to_field();
                caller.write(arg, &a.as_bytes()[..d.respond_len()])
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    fn retrieve_fd(
        &mut self,
        sid: SessionId,
        arg: u64,
        d: &uapi::Decoded,
        caller: &Caller,
    ) -> Result<()> {
        let mut a: uapi::FdArgs = d.get();
        caller.write(arg, &d.buf[..d.respond_len()])?;
        self.rebuild_waiting(sid, a.token)?;
        let file = self.store.retrieve_fd(sid, a.token)?;
        if !caller.can_install() {
            return Err(refuse(caller, "SESSION_RETRIEVE_FD"));
        }
        a.fd = caller.install(file)?;
        caller.write(arg, &a.as_bytes()[..d.respond_len()])
    }

    /// SESSION_PRESERVE_FD of the caller's `fd` under `token`; the fd is
    /// taken only once the session's owner may hold one more file.
    fn preserve(&mut self, sid: SessionId, (fd, token): (i32, u64), caller: &Caller) -> Result<()> {
        let result = match self.try_preserve(sid, (fd, token), caller) {
            // A queued RELEASE may give back files that hold the owner at
            // its limit.
            Err(Errno::ENOSPC) if self.store.refusal().is_some() || self.fds_short => {
                self.settle_releases();
                self.try_preserve(sid, (fd, token), caller)
            }
            other => other,
        };
        self.log_refusal();
        result
    }

    fn try_preserve(
        &mut self,
        sid: SessionId,
        (fd, token): (i32, u64),
        caller: &Caller,
    ) -> Result<()> {
        let counted =
            self.store.held_fds() + self.listeners.len() + self.pool.len() + self.spare.len();
        // The limit may have been changed since the start (prlimit).
        self.fds = FdBudget::current();
        self.daemon_fd_room(counted)?;
        self.store.set_fd_room(Some(self.fds.room(counted)));
        let fs_dev = self.fs_dev;
        self.store
            .preserve_fd_with(sid, token, |takes| match caller.get_fd(fd) {
                // No fd to spare (root may use them all): no room, not a bad fd.
                Err(Errno::EMFILE | Errno::ENFILE) => Err(Errno::ENOSPC),
                got => got.and_then(|f| Daemon::foreign(fs_dev, f, takes, caller)),
            })
    }

    /// Refuses a file (ENOSPC) once the files preserved, each of which may
    /// come to hold two fds (carried across an update, then retrieved),
    /// could take the fds the daemon keeps for its own work: root is not
    /// limited by owners' budgets, but the daemon never lets itself run out
    /// of fds. Logs once when that begins and once when it ends.
    fn daemon_fd_room(&mut self, counted: usize) -> Result<()> {
        let room = self.fds.room_for_all(counted);
        let need = self.store.fds_to_come() + 2;
        let short = need > room;
        if short != self.fds_short {
            self.fds_short = short;
            if short {
                log::warn(format_args!(
                    "the preserved files may come to need {need} more fds and only {room} are \
                     left of the daemon's RLIMIT_NOFILE of {} ({} kept for its own work): \
                     SESSION_PRESERVE_FD fails with ENOSPC until files are released or the \
                     limit is raised",
                    self.fds.limit,
                    owners::DAEMON_RESERVE
                ));
            } else {
                log::info(format_args!("the daemon has fds to spare again"));
            }
        }
        if short {
            Err(Errno::ENOSPC)
        } else {
            Ok(())
        }
    }

    /// Refuses our own device and session files as files to preserve (no
    /// handler takes them, as in the kernel); handlers must never `fstat` them,
    /// since that would wait on this very thread. A file no handler takes
    /// (`takes`) is closed off this thread: the close of a FUSE file waits
    /// for its server's answer to `FLUSH`.
    fn foreign(
        fs_dev: u64,
        file: OwnedFd,
        takes: &dyn Fn(BorrowedFd<'_>) -> bool,
        caller: &Caller,
    ) -> Result<OwnedFd> {
        let (dev, _) = sys::dev_ino(file.as_fd())?;
        if dev == fs_dev {
            return Err(Errno::ENOENT);
        }
        if !takes(file.as_fd()) {
            caller.dispose(file);
            return Err(Errno::ENOENT);
        }
        Ok(file)
    }

    /// A pre-opened session file; serves FUSE while the opener catches up.
    fn take_slot(&mut self) -> Result<(u64, OwnedFd)> {
        if let Some(s) = self.spare.pop() {
            return Ok(s);
        }
        let mut asked_again = false;
        loop {
            if let Some(slot) = self.pool.pop_front() {
                grant_credit(self.opener.as_fd());
                return Ok(slot);
            }
            if self.lost_slots > 0 {
                // Once per call: a daemon still out of fds fails the call
                // rather than spin with the opener.
                if asked_again {
                    return Err(Errno::EMFILE);
                }
                self.lost_slots -= 1;
                grant_credit(self.opener.as_fd());
                asked_again = true;
            }
            self.wait_for_opener()?;
        }
    }

    fn wait_for_opener(&mut self) -> Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: self.chan.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.opener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, OPENER_PATIENCE_MS) } <= 0 {
            return self.replace_hung_opener();
        }
        if fds[0].revents != 0 {
            self.drain_fuse();
        }
        if fds[1].revents != 0 && self.on_pool_event().is_err() {
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// The opener sent no session file for [`OPENER_PATIENCE_MS`] (stopped,
    /// or stuck): it is killed and a new one takes over; the call that
    /// waited goes on waiting for the new one's files.
    fn replace_hung_opener(&mut self) -> Result<()> {
        log::warn(format_args!(
            "the session-file opener (pid {}) sent no session file within {} s; replacing it",
            self.opener_tid,
            OPENER_PATIENCE_MS / 1000
        ));
        // SAFETY: kill takes no pointers; the pid is our own child.
        unsafe { libc::kill(self.opener_tid, libc::SIGKILL) };
        // Reaped once it is gone (a killed waiter on a FUSE request goes at
        // once; never wait long here).
        for _ in 0..100 {
            // SAFETY: waitpid on our own child; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(self.opener_tid, std::ptr::null_mut(), libc::WNOHANG) };
            if r != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.respawn_opener().map_err(|e| {
            log::error(format_args!("{e}"));
            Errno::EAGAIN
        })
    }

    // ---- seccomp ----------------------------------------------------------

    fn on_notification(&mut self, token: u64, events: u32) {
        let Some(listener) = self.listeners.get(&token).cloned() else {
            return;
        };
        let notif = match listener.recv() {
            Ok(n) => n,
            Err(Errno::ENOENT) if events & libc::EPOLLHUP as u32 == 0 => return,
            Err(_) => {
                // Every process of that tree is gone.
                self.epoll.delete(listener.fd().as_raw_fd());
                self.listeners.remove(&token);
                self.trees.remove(&token);
                self.dirty = true;
                self.commit();
                return;
            }
        };
        self.answer(listener, inflight(token, &notif));
    }

    /// Answers a trapped call. It is saved as in flight first, so that a
    /// daemon killed while answering is followed by one that answers it.
    fn answer(&mut self, listener: Rc<Listener>, call: persist::Inflight) {
        failpoint::pass("received");
        // With no room for the journal every call that would change a
        // session is refused (ENOSPC) before it does, so none has an effect
        // to answer exactly once: nothing is saved for it, and a client
        // retrying against a full disk cannot use up the reserve.
        let saved = self.room_for_change().is_ok();
        if saved {
            self.inflight = Some(call);
            self.dirty = true;
            self.commit();
        }
        // Apply every close that happened before this call (see module docs).
        self.drain_fuse();
        let [fd, cmd, arg] = call.args;
        let caller = Caller::trapped(&listener, &call, &self.runner);
        let result = caller.map(|c| self.trapped(&c, fd as i32, cmd as u32, arg));
        let outcome = match result {
            Ok(None) => persist::Outcome::Continue,
            Ok(Some(Ok(()))) => persist::Outcome::Return(0),
            Ok(Some(Err(e))) | Err(e) => persist::Outcome::Return(e.0),
        };
        // Saved with its outcome until the next commit: a daemon killed before
        // the reply is delivered is followed by one that delivers it.
        if saved {
            self.inflight = Some(persist::Inflight {
                outcome: Some(outcome),
                ..call
            });
            self.dirty = true;
        }
        self.commit();
        failpoint::pass("decided");
        reply(&listener, call.id, outcome);
        self.inflight = None;
    }

    /// Answers the call a killed daemon was answering, if its caller still
    /// waits: with the outcome it saved, or else by doing the call again
    /// (what that daemon did for it and did not save is done again; an fd it
    /// had already installed stays in the caller, unused).
    fn redo(&mut self, call: persist::Inflight) {
        let Some(listener) = self.listeners.get(&call.listener).cloned() else {
            return;
        };
        if !listener.id_valid(call.id) {
            return;
        }
        log::info(format_args!(
            "answering the call pid {} was waiting on when the daemon stopped",
            call.pid
        ));
        match call.outcome {
            Some(outcome) => reply(&listener, call.id, outcome),
            None => self.answer(listener, call),
        }
    }

    /// Answers the call a killed daemon had received but not saved, if there
    /// is one (see the `recover` module), then every call that waits.
    fn recover_lost_call(&mut self) {
        let mut pending: Vec<(u64, Notif)> = Vec::new();
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            self.receive_pending(&mut pending);
            let lost = self.unanswered_ids(&pending);
            if lost.is_empty() {
                break;
            }
            let cgroup = self.workload.as_ref().map(|w| w.path());
            let waiters: Vec<_> = recover::waiters(recover::threads(cgroup))
                .into_iter()
                .filter(|w| !pending.iter().any(|(_, n)| n.pid == w.tid))
                .collect();
            if let ([w], [(token, id)]) = (waiters.as_slice(), lost.as_slice()) {
                log::info(format_args!(
                    "answering the call pid {} made while the daemon was stopping",
                    w.tid
                ));
                let call = persist::Inflight {
                    listener: *token,
                    id: *id,
                    pid: w.tid,
                    args: w.args,
                    outcome: None,
                };
                self.answer(self.listeners[token].clone(), call);
                break;
            }
            if attempt == 4 {
                log::warn(format_args!(
                    "cannot tell which of {} waiting threads made which of {} unanswered calls",
                    waiters.len(),
                    lost.len()
                ));
            }
        }
        for (token, n) in pending {
            if let Some(listener) = self.listeners.get(&token).cloned() {
                self.answer(listener, inflight(token, &n));
            }
        }
    }

    /// Receives every notification waiting to be received.
    fn receive_pending(&mut self, pending: &mut Vec<(u64, Notif)>) {
        for (token, l) in &self.listeners {
            while sys::readable(l.fd()) {
                match l.recv() {
                    Ok(n) => pending.push((*token, n)),
                    Err(_) => break,
                }
            }
        }
    }

    /// Received notifications nobody answered and that are not in `pending`:
    /// those a killed daemon received and did not save.
    fn unanswered_ids(&self, pending: &[(u64, Notif)]) -> Vec<(u64, u64)> {
        let mut lost: Vec<(u64, u64)> = Vec::new();
        for (token, l) in &self.listeners {
            let Some(last) = l.last_id() else { continue };
            for id in (1..=recover::WINDOW).map(|k| last.wrapping_add(k)) {
                let known =
                    pending.iter().any(|(_, n)| n.id == id) || lost.iter().any(|(_, i)| *i == id);
                if !known && l.id_valid(id) {
                    lost.push((*token, id));
                }
            }
        }
        lost
    }

    /// Handles a trapped ioctl, or returns None to let the kernel run it
    /// (the fd is not ours).
    fn trapped(&mut self, caller: &Caller, fd: i32, cmd: u32, arg: u64) -> Option<Result<()>> {
        // The copy only identifies the file; it is closed at once so that it
        // is never the reference that keeps a dead caller's file open.
        let file = match caller.get_fd(fd) {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        let id = sys::file_identity(file.as_fd());
        let ino = match id {
            Ok(id) if id.chr && self.cuse_rdev.is_some_and(|r| r == id.rdev) => DEVICE_INO,
            Ok(id) if !id.chr && id.dev == self.fs_dev => id.ino,
            // Not ours: the kernel runs the ioctl.
            _ => {
                caller.dispose(file);
                return None;
            }
        };
        // Ours (opened FOPEN_NOFLUSH, or the CUSE device): closing sends nothing.
        drop(file);
        Some(self.ioctl(ino, cmd, arg, caller))
    }

    // ---- control socket ---------------------------------------------------

    fn accept_control(&mut self) {
        if let Some(c) = &mut self.control {
            c.accept(&self.epoll);
        }
    }

    /// Drops stalled control connections; the event loop's timeout (ms).
    fn expire_control(&mut self) -> i32 {
        let next = self.control.as_mut().and_then(|c| c.expire(&self.epoll));
        next.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32 + 1)
    }

    fn on_control(&mut self, token: u64) {
        let Some(c) = &mut self.control else { return };
        let Event::Request(incoming) = c.on_event(token, &self.epoll) else {
            return;
        };
        let response = self.control_request(incoming, token);
        if let Some(c) = &mut self.control {
            c.answer(token, &response, &self.epoll);
        }
    }

    fn control_request(&mut self, incoming: Incoming, token: u64) -> Response {
        match incoming.request {
            CtlRequest::Status => self.status(),
            CtlRequest::Register => match incoming.fd {
                Some(fd) => self.register(fd, incoming.pid),
                None => Response::error("register needs a seccomp listener fd attached"),
            },
            CtlRequest::Update => self.simulate_update(),
            CtlRequest::KexecPrepare => self.kexec_prepare(token),
            CtlRequest::KexecAbort => self.kexec_abort(),
            CtlRequest::Shutdown => {
                self.stop = true;
                self.teardown = true;
                Response {
                    ok: true,
                    message: Some("shutting down".into()),
                    ..Response::default()
                }
            }
        }
    }

    fn register(&mut self, fd: OwnedFd, pid: i32) -> Response {
        let token = self.next_listener;
        self.next_listener += 1;
        if let Err(e) = self.epoll.add(fd.as_raw_fd(), token) {
            return Response::error(format!("cannot watch the listener: {e}"));
        }
        if let Some(workload) = &self.workload {
            if let Err(e) = workload.add(pid) {
                self.epoll.delete(fd.as_raw_fd());
                return Response::error(log::error_chain(&e));
            }
        }
        self.listeners
            .insert(token, Rc::new(Listener::new(fd, None)));
        self.trees.insert(token, TreeRoot::of(pid));
        log::debug(format_args!("registered luo run tree of pid {pid}"));
        self.dirty = true;
        self.commit();
        Response {
            ok: true,
            ..Response::default()
        }
    }

    /// Freezes the old workload and every outgoing session, stashes each
    /// preserved memfd through kmod-shim and publishes the state for the next
    /// kernel. On any failure everything is undone and nothing changed.
    fn kexec_prepare(&mut self, token: u64) -> Response {
        let shim = match luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) {
            Ok(s) => s,
            Err(e) => {
                return Response::error(format!(
                    "kexec needs kmod-shim ({}: {e}; load luo_shim.ko)",
                    luo_kexec_helper::shim::DEVICE
                ))
            }
        };
        let start = std::time::Instant::now();
        // Processes blocked in a request to us are served so they can freeze.
        let workload = self.workload.take();
        let frozen = workload
            .as_ref()
            .map_or(Ok(()), |w| w.freeze(&mut || self.drain_fuse()));
        self.workload = workload;
        if let Err(e) = frozen {
            self.thaw_workload();
            return Response::error(format!(
                "kexec aborted, nothing changed: {}",
                log::error_chain(&e)
            ));
        }
        self.drain_fuse();
        if let Err(f) = self.store.freeze() {
            self.thaw_workload();
            let why = refused_freeze(&f);
            return Response::error(format!("kexec aborted, nothing changed: {why}"));
        }
        // Progress goes out as the client takes it (never waiting on it).
        let mut control = self.control.take();
        let mut progress = |text: String| {
            let line = Response {
                ok: true,
                progress: Some(text),
                ..Response::default()
            };
            if let Some(c) = &mut control {
                c.progress(token, &line);
            }
        };
        let stashed = self.stash_and_publish(&shim, &mut progress);
        self.control = control;
        match stashed {
            Ok((files, bytes)) => {
                let message = format!(
                    "stashed {files} files ({} MiB) and the state of {} sessions in {:.1} ms; ready to reboot",
                    bytes >> 20,
                    self.store.sessions().count(),
                    start.elapsed().as_secs_f64() * 1e3
                );
                log::info(format_args!("{message}"));
                Response {
                    ok: true,
                    message: Some(message),
                    ..Response::default()
                }
            }
            Err(e) => {
                self.undo_stash(&shim);
                self.store.unfreeze();
                self.thaw_workload();
                Response::error(format!("kexec aborted, nothing changed: {e}"))
            }
        }
    }

    fn thaw_workload(&self) {
        if let Some(w) = &self.workload {
            w.thaw();
        }
    }

    /// Stashes every outgoing file and publishes the blob; returns the number
    /// of files and bytes.
    fn stash_and_publish(
        &mut self,
        shim: &luo_kexec_helper::shim::Shim,
        progress: &mut dyn FnMut(String),
    ) -> std::result::Result<(usize, u64), String> {
        let total: usize = self
            .store
            .sessions()
            .filter(|s| s.direction == Direction::Outgoing)
            .map(|s| s.files.len())
            .sum();
        let mut files = Vec::new();
        let mut bytes = 0u64;
        for s in self
            .store
            .sessions()
            .filter(|s| s.direction == Direction::Outgoing)
        {
            for f in &s.files {
                let Some(fd) = &f.file else { continue };
                let shim_token = self.stashed.len() as u64 + 1;
                let st = shim.stash(fd.as_fd(), shim_token).map_err(|e| {
                    format!(
                        "session {} token {:#x} cannot be stashed: {e}",
                        s.name, f.token
                    )
                })?;
                self.stashed.push(shim_token);
                luo_kexec_helper::failpoint::pass("stashed");
                let (pos, seals) = luo_handlers::mem::position_and_seals(fd);
                bytes += st.size;
                files.push(luo_kexec_helper::handover::StashedFile {
                    session: s.id.0,
                    token: f.token,
                    shim_token,
                    kind: st.kind,
                    size: st.size,
                    pos,
                    seals,
                });
                if files.len() % 64 == 0 || files.len() == total {
                    progress(format!(
                        "stashed {} of {total} files ({} MiB)",
                        files.len(),
                        bytes >> 20
                    ));
                }
            }
        }
        let image = luo_kexec_helper::handover::KexecImage {
            version: luo_kexec_helper::handover::IMAGE_VERSION,
            store: self.store.to_image().0,
            files,
        };
        let n = image.files.len();
        let blob = serde_json::to_vec(&image).map_err(|e| e.to_string())?;
        shim.publish(&blob)
            .map_err(|e| format!("publishing the state failed: {e}"))?;
        Ok((n, bytes))
    }

    fn undo_stash(&mut self, shim: &luo_kexec_helper::shim::Shim) {
        let _ = shim.unpublish();
        for t in std::mem::take(&mut self.stashed) {
            let _ = shim.unstash(t);
        }
    }

    /// The kexec did not happen: everything back as it was.
    fn kexec_abort(&mut self) -> Response {
        if let Ok(shim) =
            luo_kexec_helper::shim::Shim::open(std::path::Path::new(luo_kexec_helper::shim::DEVICE))
        {
            self.undo_stash(&shim);
        }
        self.store.unfreeze();
        self.thaw_workload();
        log::info(format_args!("kexec called off; sessions unfrozen"));
        Response {
            ok: true,
            message: Some("kexec called off; every session is as it was".into()),
            ..Response::default()
        }
    }

    /// The stash of an incoming file that waits for huge pages, if it does.
    fn waiting_for(
        &self,
        sid: SessionId,
        token: u64,
    ) -> Option<&luo_kexec_helper::handover::StashedFile> {
        self.waiting
            .iter()
            .find(|f| f.session == sid.0 && f.token == token)
    }

    /// Rebuilds a file that waits in its stash for huge pages, before its
    /// first retrieve: ENOMEM while the pool is still short (nothing
    /// changes; the next retrieve tries again). Once rebuilt the new memfd
    /// is saved with the keeper before kmod-shim lets the stash go.
    fn rebuild_waiting(&mut self, sid: SessionId, token: u64) -> Result<()> {
        let Some(f) = self.waiting_for(sid, token).cloned() else {
            return Ok(());
        };
        let shim = luo_kexec_helper::shim::Shim::open(Path::new(luo_kexec_helper::shim::DEVICE))
            .map_err(|e| {
                log::warn(format_args!(
                    "session {} token {token:#x} waits in kmod-shim, which cannot be opened: {e}",
                    sid.0
                ));
                Errno::EIO
            })?;
        let fd = match luo_kexec_helper::handover::restore_memfd_with(&shim, &f, true) {
            Ok((fd, _)) => fd,
            Err(luo_kexec_helper::handover::RestoreError::NoHugePages(why)) => {
                log::warn(format_args!(
                    "session {} token {token:#x} stays in its kmod-shim stash: {why}; ENOMEM",
                    sid.0
                ));
                return Err(Errno::ENOMEM);
            }
            Err(luo_kexec_helper::handover::RestoreError::Failed(why)) => {
                log::warn(format_args!(
                    "session {} token {token:#x} could not be rebuilt from its stash ({why}); EIO",
                    sid.0
                ));
                return Err(Errno::EIO);
            }
        };
        self.store.carry(sid, token, fd)?;
        self.waiting.retain(|w| w.shim_token != f.shim_token);
        self.dirty = true;
        self.commit();
        if let Err(e) = shim.release(f.shim_token) {
            log::warn(format_args!("kmod-shim kept stash {}: {e}", f.shim_token));
        }
        log::info(format_args!(
            "session {} token {token:#x} rebuilt from its stash ({} MiB)",
            sid.0,
            f.size >> 20
        ));
        Ok(())
    }

    /// Takes the waiting files that are gone (finished or released
    /// unretrieved, as the kernel drops them) off the list; their stashes go
    /// once that is saved (see [`Daemon::commit`]).
    fn take_gone_waiting(&mut self) -> Vec<u64> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let store = &self.store;
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|f| {
                store
                    .session(SessionId(f.session))
                    .is_none_or(|s| !s.files.iter().any(|x| x.token == f.token))
            });
        self.waiting = kept;
        if !gone.is_empty() {
            self.dirty = true;
        }
        gone.into_iter().map(|f| f.shim_token).collect()
    }

    /// A daemon killed while preparing a kexec may have left stashes (and a
    /// publication) in kmod-shim that nobody will use: withdrawn, so that
    /// the next kexec starts clean and the module can be unloaded.
    fn withdraw_stale_stashes(&mut self) {
        let Ok(shim) = luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) else {
            return;
        };
        let Ok(info) = shim.info() else { return };
        if info.state == luo_kexec_helper::shim::STATE_RESTORED || info.files == 0 {
            return;
        }
        let _ = shim.unpublish();
        let tokens: Vec<u64> = shim
            .files()
            .unwrap_or_default()
            .iter()
            .map(|f| f.token)
            .collect();
        for t in &tokens {
            let _ = shim.unstash(*t);
        }
        log::info(format_args!(
            "withdrew {} stashes a kexec that did not happen left in kmod-shim",
            tokens.len()
        ));
    }

    /// After a kexec: rebuilds the incoming sessions from what kmod-shim
    /// brought over, if it brought anything.
    /// Returns the shim and the stashes rebuilt, to let go once saved.
    fn adopt_kexec(&mut self) -> std::result::Result<Rebuilt, DaemonError> {
        let Ok(shim) = luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) else {
            return Ok(None);
        };
        match shim.info() {
            Ok(i) if i.state == luo_kexec_helper::shim::STATE_RESTORED && i.blob_len > 0 => {}
            _ => return Ok(None),
        }
        let refused = |what: String| DaemonError::Setup {
            what,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let blob = shim.fetch().map_err(|e| {
            refused(format!(
                "fetch the previous kernel's state from kmod-shim ({e})"
            ))
        })?;
        let image: luo_kexec_helper::handover::KexecImage = serde_json::from_slice(&blob)
            .map_err(|e| refused(format!("read the previous kernel's state ({e})")))?;
        if image.version != luo_kexec_helper::handover::IMAGE_VERSION {
            return Err(refused(format!(
                "read the previous kernel's state: version {} (this daemon reads {})",
                image.version,
                luo_kexec_helper::handover::IMAGE_VERSION
            )));
        }
        let start = std::time::Instant::now();
        let total: u64 = image.files.iter().map(|f| f.size).sum();
        let mut progress = |n: usize, bytes: u64| {
            if n % 100 == 0 || bytes == total {
                log::info(format_args!(
                    "restored {n} files ({} of {} MiB)",
                    bytes >> 20,
                    total >> 20
                ));
            }
        };
        let mut restored =
            luo_kexec_helper::handover::restore_all(&shim, &image.files, &mut progress);
        for ((session, token), why) in &restored.lost {
            log::warn(format_args!(
                "session {session} token {token:#x} did not come back ({why}); retrieving it fails with EIO"
            ));
        }
        for (f, why) in &restored.waiting {
            log::warn(format_args!(
                "session {} token {:#x} stays in its kmod-shim stash: {why}; retrieving it fails \
                 with ENOMEM until then, and rebuilds it once there are",
                f.session, f.token
            ));
        }
        let lost: Vec<(u64, u64)> = restored.lost.iter().map(|(k, _)| *k).collect();
        self.waiting = restored.waiting.into_iter().map(|(f, _)| f).collect();
        let waiting: Vec<(u64, u64)> = self.waiting.iter().map(|f| (f.session, f.token)).collect();
        let (in_place, copied) = (restored.in_place, restored.copied);
        let incoming = luo_kexec_helper::handover::incoming_image(image.store, &lost, &waiting);
        self.store
            .load_image(&incoming, &mut |key| restored.fds.remove(key))
            .map_err(|e| refused(format!("rebuild the incoming sessions: {e}")))?;
        self.store.take_changes();
        log::info(format_args!(
            "after kexec: epoch {}, {} incoming sessions, {} files ({} MiB; {} filled in place, {} copied) in {:.1} ms",
            self.store.epoch(),
            self.store.sessions().count(),
            image.files.len(),
            total >> 20,
            in_place,
            copied,
            start.elapsed().as_secs_f64() * 1e3
        ));
        let rebuilt = image
            .files
            .iter()
            .filter(|f| {
                let key = (f.session, f.token);
                !lost.contains(&key) && !waiting.contains(&key)
            })
            .map(|f| f.shim_token)
            .collect();
        Ok(Some((shim, rebuilt)))
    }

    fn simulate_update(&mut self) -> Response {
        let mut workload = self.workload.take();
        let result = luo_kexec_helper::simulate(self, workload.as_mut());
        self.workload = workload;
        match result {
            Ok(report) => {
                let message = format!(
                    "updated to epoch {} in {:.1} ms; {} processes of the old epoch ended",
                    report.epoch,
                    report.took.as_secs_f64() * 1e3,
                    report.ended
                );
                log::info(format_args!("{message}"));
                Response {
                    message: Some(message),
                    ..self.status()
                }
            }
            Err(e) => {
                let text = log::error_chain(&e);
                log::warn(format_args!("{text}"));
                Response::error(text)
            }
        }
    }

    fn status(&mut self) -> Response {
        self.drain_fuse();
        let sessions = self
            .store
            .sessions()
            .map(|s| SessionStatus {
                name: s.name.to_string(),
                direction: match s.direction {
                    Direction::Outgoing => "outgoing".into(),
                    Direction::Incoming => "incoming".into(),
                },
                retrieved: s.retrieved,
                files: s
                    .files
                    .iter()
                    .map(|f| FileStatus {
                        token: f.token,
                        handler: self.store.handler_compatible(f.handler).into(),
                        retrieved: f.retrieve_status == luo_store::RetrieveStatus::Retrieved,
                        waiting: self.waiting_for(s.id, f.token).map(|w| {
                            let need = luo_kexec_helper::handover::huge_pages_for(w.size);
                            format!("in its kmod-shim stash until {need} 2 MiB huge pages are free")
                        }),
                    })
                    .collect(),
            })
            .collect();
        Response {
            ok: true,
            device: Some(self.cfg.device.display().to_string()),
            epoch: self.store.epoch(),
            sessions,
            luo_run_trees: self.listeners.len(),
            ..Response::default()
        }
    }
}

impl luo_kexec_helper::Updatable for Daemon {
    fn serve(&mut self) {
        self.drain_fuse();
    }

    fn freeze_sessions(&mut self) -> std::result::Result<(), String> {
        self.drain_fuse();
        self.store.freeze().map_err(|f| refused_freeze(&f))
    }

    fn flip(&mut self) -> u64 {
        self.store
            .flip_epoch()
            .expect("sessions were frozen just before");
        // Session fds of the old epoch no longer name sessions.
        for slot in self.slots.values_mut() {
            *slot = None;
        }
        self.session_slot.clear();
        // Saved before the old workload is killed: its closing session fds
        // must find the sessions already incoming, in this daemon or the next.
        self.dirty = true;
        self.commit();
        self.store.epoch()
    }
}

/// A refused freeze as a sentence naming the session, its owner and the
/// file.
fn refused_freeze(f: &FreezeFailure) -> String {
    if f.errno == Errno::EPERM && f.compatible.starts_with("memfd") {
        // The kernel fails the resize itself; we can only refuse the update.
        format!("{f}; the memfd was resized after it was preserved")
    } else {
        f.to_string()
    }
}

/// An error and its causes as one sentence.
/// Where the workload of `luo run` trees is tracked: a cgroup v2 directory
/// named after the state dir, or none (with a warning) if cgroup v2 is not
/// available.
fn workload_tracker(state_dir: &Path, epoch: u64) -> Option<luo_kexec_helper::Workload> {
    let root = luo_kexec_helper::cgroup2_mount().or_else(|| {
        let own = state_dir.join("cgroup");
        std::fs::create_dir_all(&own).ok()?;
        sys::mount("cgroup2", &own, Some("cgroup2"), 0, None).ok()?;
        Some(own)
    });
    let Some(root) = root else {
        log::warn(format_args!(
            "no cgroup v2: updates will not end the processes of `luo run`"
        ));
        return None;
    };
    let name = state_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    match luo_kexec_helper::Workload::new(&root.join("luo").join(name), epoch) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn(format_args!(
                "{}; updates will not end the processes of `luo run`",
                log::error_chain(&e)
            ));
            None
        }
    }
}

/// Delivers the outcome of a trapped call.
/// Lets kmod-shim drop these stashes (files no session holds any more).
fn release_stashes(tokens: &[u64]) {
    if tokens.is_empty() {
        return;
    }
    if let Ok(shim) = luo_kexec_helper::shim::Shim::open(Path::new(luo_kexec_helper::shim::DEVICE))
    {
        for t in tokens {
            let _ = shim.release(*t);
        }
    }
}

fn reply(listener: &Listener, id: u64, outcome: persist::Outcome) {
    match outcome {
        persist::Outcome::Continue => listener.continue_syscall(id),
        persist::Outcome::Return(0) => listener.respond(id, Ok(())),
        persist::Outcome::Return(errno) => listener.respond(id, Err(Errno(errno))),
    }
}

/// A received notification as the trapped call to answer.
fn inflight(listener: u64, n: &Notif) -> persist::Inflight {
    persist::Inflight {
        listener,
        id: n.id,
        pid: n.pid,
        args: [n.data.args[0], n.data.args[1], n.data.args[2]],
        outcome: None,
    }
}

/// The fds of the connection and the listeners, by key.
fn own_fds<'a>(
    chan: &'a Channel,
    listeners: &'a HashMap<u64, Rc<Listener>>,
) -> Vec<(String, BorrowedFd<'a>)> {
    let mut fds = vec![(persist::FUSE_KEY.to_owned(), chan.fd())];
    if let Some(c) = chan.cuse_fd() {
        fds.push((persist::CUSE_KEY.to_owned(), c));
    }
    fds.extend(
        listeners
            .iter()
            .map(|(t, l)| (persist::listener_key(*t), l.fd())),
    );
    fds
}

/// Whether serving this request may change what the image records.
fn changes_state(op: &Op) -> bool {
    matches!(
        op,
        Op::Lookup { .. } | Op::Setattr(_) | Op::Open(_) | Op::Release(_) | Op::Ioctl(_)
    )
}

/// The answer to an fd-returning ioctl from a caller we cannot give fds to.
fn refuse(caller: &Caller, what: &str) -> Errno {
    let tid = caller.tid();
    log::warn(format_args!(
        "pid {tid} ({}) called {what}, which returns a new fd, outside `luo run`; \
         run the program as `luo run -- PROGRAM` to receive session fds",
        caller::comm(tid)
    ));
    Errno::EOPNOTSUPP
}

/// Points `luo run` at the control socket: a character device cannot carry
/// the `user.luo.control` attribute, so `/run/luo/NAME.control` links to it.
fn link_cuse_control(device: &Path, socket: &Path) -> std::io::Result<()> {
    let dir = Path::new(crate::control::CUSE_LINKS);
    crate::persist::paths::trusted_dir(dir)?;
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("liveupdate");
    let link = dir.join(format!("{name}.control"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(socket, &link)
}

/// The CUSE device name for a device path: it must be directly in `/dev`,
/// where the kernel creates it.
fn cuse_device_name(device: &Path) -> std::result::Result<String, DaemonError> {
    match (device.parent(), device.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) if dir == Path::new("/dev") => Ok(name.to_owned()),
        _ => Err(DaemonError::Setup {
            what: format!(
                "serve {} with CUSE: the kernel creates CUSE devices in /dev, so the path must be /dev/NAME",
                device.display()
            ),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }),
    }
}

/// Makes sure the device path exists as something a file can be mounted on;
/// returns whether we created it. Refuses a symbolic link or a directory other
/// users may change (see [`crate::persist::paths`]); nothing is unmounted or mounted
/// through a link.
fn prepare_device_path(device: &Path) -> std::result::Result<bool, DaemonError> {
    let refused = |source| DaemonError::Setup {
        what: format!("use {} as the device", device.display()),
        source,
    };
    crate::persist::paths::check_device_dir(device).map_err(refused)?;
    // A daemon killed earlier may have left its bind mount behind.
    let _ = sys::umount_detach(device);
    crate::persist::paths::refuse_symlink(device).map_err(refused)?;
    match std::fs::symlink_metadata(device) {
        Ok(m) if m.is_dir() => Err(DaemonError::Setup {
            what: format!("use {} as the device: it is a directory", device.display()),
            source: std::io::Error::from_raw_os_error(libc::EISDIR),
        }),
        Ok(_) => Ok(false),
        Err(_) => {
            let create = crate::persist::paths::create_new(device);
            setup(|| format!("create {}", device.display()), create)?;
            Ok(true)
        }
    }
}

/// Lets the opener open one more session file.
fn grant_credit(opener: BorrowedFd<'_>) {
    let _ = sys::send_with_fd(opener, &[1], None);
}
