//! The event loop: one thread, one epoll set, a token per source; FUSE
//! requests are served in batches whose replies leave only once the state
//! they report is saved.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::{setup, Daemon, DaemonError};
use crate::control::server::ControlServer;
use crate::profile::{self, Phase, Source};
use crate::wire::dev_fuse::Route;
use crate::wire::fuse::{self, Op};
use crate::{log, sys};

/// How often the daemon makes sure its keeper is alive (ms).
pub(super) const KEEPER_CHECK_MS: i32 = 1000;
pub(super) const TOKEN_FUSE: u64 = 1;
pub(super) const TOKEN_POOL: u64 = 2;
pub(super) const TOKEN_SIGNAL: u64 = 3;
pub(super) const TOKEN_CONTROL: u64 = 4;
pub(super) const TOKEN_CUSE: u64 = 5;
pub(super) const TOKEN_RING: u64 = 6;
/// `luo run` listeners' tokens start here.
pub(super) const TOKEN_LISTENER_BASE: u64 = 1 << 20;
/// Control connections' tokens (listeners never get this far).
pub(super) const TOKEN_CONN_BASE: u64 = 1 << 48;

/// What the event loop waits on and whether it goes on.
pub(super) struct Loop {
    pub(super) epoll: sys::Epoll,
    // Kept open: epoll watches it.
    _signals: OwnedFd,
    /// The control socket, once the device is in place.
    pub(super) control: Option<ControlServer>,
    /// FUSE requests read ahead by [`Daemon::settle_releases`], in order.
    pub(super) backlog: VecDeque<fuse::Request>,
    pub(super) stop: bool,
    /// Stop for good: unmount, release everything, end the keeper.
    pub(super) teardown: bool,
}

impl Loop {
    /// A loop on `epoll`, which watches `signals`.
    pub(super) fn new(epoll: sys::Epoll, signals: OwnedFd) -> Loop {
        Loop {
            epoll,
            _signals: signals,
            control: None,
            backlog: VecDeque::new(),
            stop: false,
            teardown: false,
        }
    }
}

impl Daemon {
    pub(super) fn serve(&mut self) -> std::result::Result<(), DaemonError> {
        while !self.ev.stop {
            if !self.ev.backlog.is_empty() {
                self.drain_fuse();
            }
            let timeout = match self.expire_control() {
                -1 => KEEPER_CHECK_MS,
                t => t.min(KEEPER_CHECK_MS),
            };
            let events = setup(|| "wait for events".into(), self.ev.epoll.wait(timeout))?;
            self.check_keeper();
            if events.is_empty() && self.chan.ring_pending() {
                self.drain_fuse();
            }
            for (token, events) in events {
                match token {
                    TOKEN_FUSE | TOKEN_CUSE | TOKEN_RING => self.drain_fuse(),
                    TOKEN_POOL => self.on_pool_event()?,
                    TOKEN_SIGNAL => {
                        log::info(format_args!("termination signal received; stopping"));
                        self.ev.stop = true;
                    }
                    TOKEN_CONTROL => self.accept_control(),
                    t if t >= TOKEN_CONN_BASE => self.on_control(t),
                    t => self.on_notification(t, events),
                }
                if self.ev.stop {
                    break;
                }
            }
        }
        Ok(())
    }

    pub(super) fn stop_serving(&mut self) {
        let _ = std::fs::remove_file(self.cfg.socket());
        if !self.ev.teardown {
            self.saved.dirty = true;
            self.commit();
            let n = self.store.sessions().count();
            log::info(format_args!(
                "stopped; {n} sessions and their files stay with the keeper until the next `luo daemon`"
            ));
            return;
        }
        // The ring goes before the mount: the kernel tears the connection's
        // ring down when the mount goes, and waits for requests it is
        // handing to this thread, which cannot take them while it waits.
        self.chan.close_ring();
        if self.chan.cuse_fd().is_some() {
            if let Some(name) = self.cfg.device.file_name().and_then(|n| n.to_str()) {
                let _ = std::fs::remove_file(
                    Path::new(crate::control::CUSE_LINKS).join(format!("{name}.control")),
                );
            }
        }
        let _ = sys::umount_detach(&self.cfg.device);
        if self.node.created_device {
            let _ = std::fs::remove_file(&self.cfg.device);
        }
        let _ = sys::umount_detach(&self.cfg.fs_dir());
        let _ = std::fs::remove_dir(self.cfg.fs_dir());
        let _ = self.saved.kept.keeper.exit();
        let _ = std::fs::remove_file(self.cfg.image());
        if let Some(w) = &self.update.workload {
            w.remove_if_empty();
        }
        let n: usize = self.store.sessions().map(|s| s.files.len()).sum();
        log::info(format_args!("shut down; {n} preserved files released"));
    }

    /// Serves every FUSE request that is pending right now.
    /// Serves every pending FUSE request as one batch: the replies leave
    /// only after the state they report is saved.
    pub(super) fn drain_fuse(&mut self) {
        let outermost = self.chan.begin_batch();
        while let Some(req) = self.ev.backlog.pop_front() {
            self.dispatch(req);
        }
        while let Some(req) = self.read_request() {
            self.dispatch(req);
        }
        if outermost {
            self.commit();
            if std::mem::take(&mut self.node.ioctl_in_batch) {
                luo_kexec_helper::failpoint::pass("ioctl-saved");
            }
            {
                let _t = profile::enter(Phase::Reply);
                self.chan.end_batch();
            }
            profile::done(Source::Fuse);
            if std::mem::take(&mut self.node.cuse_created) {
                self.label_cuse_device();
            }
            if std::mem::take(&mut self.node.ring_agreed) {
                self.begin_ring();
            }
        }
    }

    fn read_request(&mut self) -> Option<fuse::Request> {
        profile::arrived();
        let next = match self.chan.next_request() {
            Ok(None) => self.chan.next_cuse_request(),
            other => other,
        };
        match next {
            Ok(req) => {
                profile::received();
                req
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENODEV) {
                    log::warn(format_args!("the FUSE filesystem was unmounted; stopping"));
                    self.ev.teardown = true;
                } else {
                    log::warn(format_args!("reading FUSE requests failed: {e}; stopping"));
                }
                self.ev.stop = true;
                None
            }
        }
    }

    /// Applies every `RELEASE` already queued behind the request being served,
    /// keeping the other requests for later in their order. A release can be
    /// queued behind an open or a create that it must precede when the last
    /// reference was the daemon's own short-lived copy (taken to identify a
    /// caller's fd) and the caller died meanwhile.
    ///
    /// Over io_uring the kernel hands out only as many requests as the
    /// ring has free entries, and the batch holds its entries until its
    /// replies leave: what is decided so far is saved and answered first,
    /// until no more requests come.
    pub(super) fn settle_releases(&mut self) {
        loop {
            if self.chan.ring_fd().is_some() {
                self.commit();
                self.chan.send_held();
            }
            let mut read = false;
            while let Some(req) = self.read_request() {
                read = true;
                match req.op {
                    Op::Release(_) => self.dispatch(req),
                    _ => self.ev.backlog.push_back(req),
                }
            }
            if !read || self.chan.ring_fd().is_none() {
                return;
            }
        }
    }

    fn dispatch(&mut self, req: fuse::Request) {
        // Replies go where the request came from; a request served while
        // this one waits (see `take_slot`) routes its own.
        let before = self.chan.route(Route::of(&req));
        self.serve_request(req);
        self.chan.route(before);
    }
}
