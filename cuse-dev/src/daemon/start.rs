//! Start-up: a first start (mount, bind the device, start a keeper), or a
//! resume from the journal and the keeper a previous daemon left; and the
//! pieces both assemble into a [`Daemon`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use luo_store::{SessionId, Store};

use super::device_path::{cuse_device_name, prepare_device_path};
use super::event_loop::{
    Loop, TOKEN_CUSE, TOKEN_FUSE, TOKEN_LISTENER_BASE, TOKEN_POOL, TOKEN_SIGNAL,
};
use super::journal::Saved;
use super::kexec::{workload_tracker, Update};
use super::node::DeviceNode;
use super::pool::{grant_credit, SessionFiles, POOL_SIZE};
use super::trap::Runs;
use super::{setup, Config, Daemon, DaemonError};
use crate::caller::owners::FdBudget;
use crate::caller::seccomp::Listener;
use crate::control::{self, Request as CtlRequest};
use crate::persist::keeper::Keeper;
use crate::persist::opener::Opener;
use crate::persist::{self, Header, KeptFds, Loaded};
use crate::wire::dev_fuse::Channel;
use crate::{log, sys};

impl Daemon {
    pub(super) fn start(cfg: Config) -> std::result::Result<Daemon, DaemonError> {
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

    /// A first start: mount, bind the device, start a keeper. One that
    /// fails leaves no mount and no empty mount point behind.
    fn fresh(cfg: Config) -> std::result::Result<Daemon, DaemonError> {
        let fs = cfg.fs_dir();
        let started = Daemon::fresh_setup(cfg);
        if started.is_err() {
            let _ = sys::umount_detach(&fs);
            let _ = std::fs::remove_dir(&fs);
        }
        started
    }

    fn fresh_setup(cfg: Config) -> std::result::Result<Daemon, DaemonError> {
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
    pub(super) fn resume(cfg: Config, keeper: Keeper) -> std::result::Result<Daemon, DaemonError> {
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
            daemon.node.cuse_rdev = sys::path_rdev(&daemon.cfg.device).ok();
        }
        daemon.load(&loaded)?;
        daemon.adopt_ring(&loaded.header);
        // Replies the previous daemon decided on may not have been delivered.
        for reply in &loaded.replies {
            daemon.chan.resend(reply);
        }
        daemon.start_ring();
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
        if let Some(w) = &daemon.update.workload {
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

    pub(super) fn load(&mut self, loaded: &Loaded) -> std::result::Result<(), DaemonError> {
        let keeper = &self.saved.kept.keeper;
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
                self.ev.epoll.add(fd.as_raw_fd(), *token),
            )?;
            let last = loaded.header.listener_ids.get(token).copied();
            self.runs
                .listeners
                .insert(*token, Rc::new(Listener::new(fd, last)));
        }
        for r in loaded.sessions.values() {
            if let Some(ino) = r.slot {
                self.files.slots.insert(ino, Some(SessionId(r.session.id)));
                self.files.session_slot.insert(SessionId(r.session.id), ino);
            }
        }
        self.node.device_holder = loaded.header.device_holder;
        // Kept in every record until it is answered again (see `redo`).
        self.runs.inflight = loaded.inflight;
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
        let dma = super::dma::Dma::from_header(image);
        luo_handlers::register_all_with(
            &mut store,
            std::sync::Arc::new(size_lock),
            dma.table.clone(),
        )
        .expect("built-in handlers register once");
        store.set_limits(cfg.limits);
        Ok(Daemon {
            cfg,
            store,
            chan,
            ev: Loop::new(epoll, signals),
            node: DeviceNode::from_header(image),
            files: SessionFiles::new(opener, opener_tid, fs_dev, image.next_slot),
            runs: Runs::from_header(image),
            saved: Saved::new(kept),
            update: Update {
                stashed: Vec::new(),
                waiting: image.waiting.clone(),
                workload,
            },
            dma,
            fds: FdBudget::current(),
            fds_short: false,
        })
    }
}
