//! Trapped calls: the fd-returning ioctls of `luo run` trees, received as
//! seccomp notifications, saved as in flight before they are answered, and
//! answered again (or recovered) by the next daemon after a crash.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;

use luo_kexec_helper::failpoint;
use luo_store::{Errno, Result};

use super::caller::Caller;
use super::node::DEVICE_INO;
use super::Daemon;
use crate::caller::deadline::Runner;
use crate::caller::owners::TreeRoot;
use crate::caller::seccomp::{Listener, Notif, TRAPPED_SYSCALLS};
use crate::persist::{self, recover, Header};
use crate::profile::{self, Phase, Source};
use crate::{log, sys};

/// The `luo run` trees and the call being answered.
pub(super) struct Runs {
    /// Each tree's seccomp listener, by token.
    pub(super) listeners: HashMap<u64, Rc<Listener>>,
    pub(super) next_listener: u64,
    /// The process each `luo run` tree started as, by listener token.
    pub(super) trees: BTreeMap<u64, TreeRoot>,
    /// The trapped call being answered.
    pub(super) inflight: Option<persist::Inflight>,
    /// Where accesses to callers' memory run, each with a deadline.
    pub(super) runner: Rc<Runner>,
}

impl Runs {
    /// As `header` left them (the listeners are loaded from the keeper).
    pub(super) fn from_header(header: &Header) -> Runs {
        Runs {
            listeners: HashMap::new(),
            next_listener: header.next_listener,
            trees: header.trees.clone(),
            inflight: None,
            runner: Rc::new(Runner::new()),
        }
    }

    /// Writes its part of the journal header.
    pub(super) fn save_into(&self, header: &mut Header) {
        header.listeners = self.listeners.keys().copied().collect();
        header.listener_ids = self
            .listeners
            .iter()
            .filter_map(|(t, l)| Some((*t, l.last_id()?)))
            .collect();
        header.next_listener = self.next_listener;
        header.trees = self.trees.clone();
    }
}

impl Daemon {
    pub(super) fn on_notification(&mut self, token: u64, events: u32) {
        let Some(listener) = self.runs.listeners.get(&token).cloned() else {
            return;
        };
        profile::arrived();
        let notif = match listener.recv() {
            Ok(n) => {
                profile::received();
                n
            }
            Err(Errno::ENOENT) if events & libc::EPOLLHUP as u32 == 0 => return,
            Err(_) => {
                // Every process of that tree is gone.
                self.ev.epoll.delete(listener.fd().as_raw_fd());
                self.runs.listeners.remove(&token);
                self.runs.trees.remove(&token);
                self.saved.dirty = true;
                self.commit();
                return;
            }
        };
        self.dispatch_trapped(listener, token, &notif);
    }

    /// Answers a received notification: a statfs call at once, an ioctl
    /// through [`Daemon::answer`].
    fn dispatch_trapped(&mut self, listener: Rc<Listener>, token: u64, notif: &Notif) {
        let nr = i64::from(notif.data.nr);
        if TRAPPED_SYSCALLS.contains(&nr) {
            self.answer_statfs(&listener, nr, inflight(token, notif));
        } else {
            self.answer(listener, inflight(token, notif));
        }
    }

    /// Answers a trapped call. A call on one of our files is saved as in
    /// flight before it can have an effect, so that a daemon killed while
    /// answering is followed by one that answers it; until then (the caller
    /// checked, its fd identified) a killed daemon's call is found again by
    /// `recover_lost_call`, and doing it again is harmless.
    pub(super) fn answer(&mut self, listener: Rc<Listener>, call: persist::Inflight) {
        failpoint::pass("received");
        profile::call(call.args[1] as u32, Source::Trap);
        // Apply every close that happened before this call (see module docs).
        self.drain_fuse();
        let caller = Caller::trapped(&listener, &call, &self.runs.runner);
        let result = caller.map(|c| self.trapped(&c, &call));
        let outcome = match result {
            Ok(None) => persist::Outcome::Continue,
            Ok(Some(Ok(()))) => persist::Outcome::Return(0),
            Ok(Some(Err(e))) | Err(e) => persist::Outcome::Return(e.0),
        };
        // Saved with its outcome until the next commit: a daemon killed before
        // the reply is delivered is followed by one that delivers it.
        if self.runs.inflight.is_some() {
            self.runs.inflight = Some(persist::Inflight {
                outcome: Some(outcome),
                ..call
            });
            self.saved.dirty = true;
        }
        self.commit();
        failpoint::pass("decided");
        {
            let _t = profile::enter(Phase::Reply);
            reply(&listener, call.id, outcome);
        }
        profile::done(Source::Trap);
        self.runs.inflight = None;
    }

    /// Answers the call a killed daemon was answering, if its caller still
    /// waits: with the outcome it saved, or else by doing the call again
    /// (what that daemon did for it and did not save is done again; an fd it
    /// had already installed stays in the caller, unused).
    pub(super) fn redo(&mut self, call: persist::Inflight) {
        let Some(listener) = self.runs.listeners.get(&call.listener).cloned() else {
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
    pub(super) fn recover_lost_call(&mut self) {
        let mut pending: Vec<(u64, Notif)> = Vec::new();
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            self.receive_pending(&mut pending);
            let mut lost = self.unanswered_ids(&pending, recover::WINDOW);
            let cgroup = self.update.workload.as_ref().map(|w| w.path());
            let waiters: Vec<_> = recover::waiters(recover::threads(cgroup))
                .into_iter()
                .filter(|w| !pending.iter().any(|(_, n)| n.pid == w.tid))
                .collect();
            if lost.is_empty() && !waiters.is_empty() {
                // Calls answered without a save (on fds that are not ours,
                // statfs) leave the saved id behind: look further.
                lost = self.unanswered_ids(&pending, recover::FAR_WINDOW);
            }
            if lost.is_empty() {
                break;
            }
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
                let listener = self.runs.listeners[token].clone();
                if w.nr == libc::SYS_ioctl {
                    self.answer(listener, call);
                } else {
                    self.answer_statfs(&listener, w.nr, call);
                }
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
            if let Some(listener) = self.runs.listeners.get(&token).cloned() {
                self.dispatch_trapped(listener, token, &n);
            }
        }
    }

    /// Receives every notification waiting to be received.
    fn receive_pending(&mut self, pending: &mut Vec<(u64, Notif)>) {
        for (token, l) in &self.runs.listeners {
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
    /// Looks `window` ids past the last saved one (past [`recover::WINDOW`],
    /// only up to the first found: one call is in flight at a time).
    fn unanswered_ids(&self, pending: &[(u64, Notif)], window: u64) -> Vec<(u64, u64)> {
        let mut lost: Vec<(u64, u64)> = Vec::new();
        for (token, l) in &self.runs.listeners {
            let Some(last) = l.last_id() else { continue };
            for id in (1..=window).map(|k| last.wrapping_add(k)) {
                let known =
                    pending.iter().any(|(_, n)| n.id == id) || lost.iter().any(|(_, i)| *i == id);
                if !known && l.id_valid(id) {
                    lost.push((*token, id));
                    if window > recover::WINDOW {
                        break;
                    }
                }
            }
        }
        lost
    }

    /// Handles a trapped ioctl, or returns None to let the kernel run it
    /// (the fd is not ours).
    fn trapped(&mut self, caller: &Caller, call: &persist::Inflight) -> Option<Result<()>> {
        let [fd, cmd, arg] = call.args;
        let (fd, cmd) = (fd as i32, cmd as u32);
        // The copy only identifies the file; it is closed at once so that it
        // is never the reference that keeps a dead caller's file open.
        let file = match caller.get_fd(fd) {
            Ok(file) => file,
            Err(e) => {
                profile::not_ours();
                return Some(Err(e));
            }
        };
        let id = sys::file_identity(file.as_fd());
        let ino = match id {
            Ok(id) if id.chr && self.node.cuse_rdev.is_some_and(|r| r == id.rdev) => DEVICE_INO,
            Ok(id) if !id.chr && id.dev == self.files.fs_dev => id.ino,
            // Not ours: the kernel runs the ioctl, once the DMA record has
            // what it changes.
            _ => {
                profile::not_ours();
                if crate::uapi::DMA_RECORDED.contains(&cmd) {
                    self.record_dma(caller, (fd, file.as_fd()), cmd, arg);
                }
                caller.dispose(file);
                return None;
            }
        };
        // Ours (opened FOPEN_NOFLUSH, or the CUSE device): closing sends nothing.
        drop(file);
        self.save_inflight(call);
        Some(self.ioctl(ino, cmd, arg, caller))
    }

    /// Saves a call on one of our files as in flight, before it has any
    /// effect. With no room for the journal every call that would change a
    /// session is refused (ENOSPC) before it does, so none has an effect to
    /// answer exactly once: nothing is saved for it, and a client retrying
    /// against a full disk cannot use up the reserve.
    fn save_inflight(&mut self, call: &persist::Inflight) {
        if self.room_for_change().is_ok() {
            self.runs.inflight = Some(*call);
            self.saved.dirty = true;
            self.commit();
        }
    }
}

pub(super) fn reply(listener: &Listener, id: u64, outcome: persist::Outcome) {
    match outcome {
        persist::Outcome::Continue => listener.continue_syscall(id),
        persist::Outcome::Return(0) => listener.respond(id, Ok(())),
        persist::Outcome::Return(errno) => listener.respond(id, Err(Errno(errno))),
    }
}

/// A received notification as the trapped call to answer.
pub(super) fn inflight(listener: u64, n: &Notif) -> persist::Inflight {
    persist::Inflight {
        listener,
        id: n.id,
        pid: n.pid,
        args: [n.data.args[0], n.data.args[1], n.data.args[2]],
        outcome: None,
    }
}
