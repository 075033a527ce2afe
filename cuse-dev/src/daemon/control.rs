//! Requests on the control socket: status, `luo run` registration, a
//! simulated update, kexec prepare and abort, shutdown.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::rc::Rc;

use luo_store::{Direction, Errno, FreezeFailure};

use super::event_loop::{TOKEN_CONN_BASE, TOKEN_CONTROL};
use super::{setup, Daemon, DaemonError};
use crate::caller::owners::TreeRoot;
use crate::caller::seccomp::Listener;
use crate::control::server::{ControlServer, Event, Incoming, Policy};
use crate::control::{FileStatus, FlbStatus, Request as CtlRequest, Response, SessionStatus};
use crate::log;

impl Daemon {
    pub(super) fn open_control(&mut self) -> std::result::Result<(), DaemonError> {
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
            self.ev
                .epoll
                .add(server.listener().as_raw_fd(), TOKEN_CONTROL),
        )?;
        self.ev.control = Some(server);
        log::info(format_args!(
            "serving {} (control socket {})",
            self.cfg.device.display(),
            path.display()
        ));
        // Both the device and the control socket answer from here on.
        self.tell_manager(&format!(
            "READY=1\nSTATUS=serving {}, {} session(s)",
            self.cfg.device.display(),
            self.store.sessions().count()
        ));
        Ok(())
    }

    pub(super) fn accept_control(&mut self) {
        if let Some(c) = &mut self.ev.control {
            c.accept(&self.ev.epoll);
        }
    }

    /// Drops stalled control connections; the event loop's timeout (ms).
    pub(super) fn expire_control(&mut self) -> i32 {
        let next = self
            .ev
            .control
            .as_mut()
            .and_then(|c| c.expire(&self.ev.epoll));
        next.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32 + 1)
    }

    pub(super) fn on_control(&mut self, token: u64) {
        let Some(c) = &mut self.ev.control else {
            return;
        };
        let Event::Request(incoming) = c.on_event(token, &self.ev.epoll) else {
            return;
        };
        let response = self.control_request(incoming, token);
        if let Some(c) = &mut self.ev.control {
            c.answer(token, &response, &self.ev.epoll);
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
            CtlRequest::Profile => Response {
                ok: true,
                profile: crate::profile::take(),
                ..Response::default()
            },
            CtlRequest::Shutdown => {
                self.ev.stop = true;
                self.ev.teardown = true;
                let mut released = self.status();
                let files: usize = released.sessions.iter().map(|s| s.files.len()).sum();
                released.message = Some(format!(
                    "released {} session(s) holding {files} file(s), ended the keeper and \
                     removed the device {}",
                    released.sessions.len(),
                    released.device.as_deref().unwrap_or("")
                ));
                released
            }
        }
    }

    pub(super) fn register(&mut self, fd: OwnedFd, pid: i32) -> Response {
        let token = self.runs.next_listener;
        self.runs.next_listener += 1;
        if let Err(e) = self.ev.epoll.add(fd.as_raw_fd(), token) {
            return Response::error(format!("cannot watch the listener: {e}"));
        }
        if let Some(workload) = &self.update.workload {
            if let Err(e) = workload.add(pid) {
                self.ev.epoll.delete(fd.as_raw_fd());
                return Response::error(log::error_chain(&e));
            }
        }
        self.runs
            .listeners
            .insert(token, Rc::new(Listener::new(fd, None)));
        self.runs.trees.insert(token, TreeRoot::of(pid));
        log::debug(format_args!("registered luo run tree of pid {pid}"));
        self.saved.dirty = true;
        self.commit();
        Response {
            ok: true,
            ..Response::default()
        }
    }

    fn simulate_update(&mut self) -> Response {
        let mut workload = self.update.workload.take();
        let result = luo_kexec_helper::simulate(self, workload.as_mut());
        self.update.workload = workload;
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

    pub(super) fn status(&mut self) -> Response {
        self.drain_fuse();
        self.prune_dma();
        let flbs = self
            .store
            .flbs
            .list()
            .into_iter()
            .map(|f| FlbStatus {
                compatible: f.compatible,
                outgoing: f.outgoing,
                incoming: f.incoming,
                retrieved: f.retrieved,
                detail: f.detail,
            })
            .collect();
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
                        object: self.store.describe_file(f),
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
            luo_run_trees: self.runs.listeners.len(),
            flbs,
            fuse_transport: Some(
                if self.chan.ring_fd().is_some() {
                    "io_uring"
                } else {
                    "/dev/fuse"
                }
                .into(),
            ),
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
        for slot in self.files.slots.values_mut() {
            *slot = None;
        }
        self.files.session_slot.clear();
        // Saved before the old workload is killed: its closing session fds
        // must find the sessions already incoming, in this daemon or the next.
        self.saved.dirty = true;
        self.commit();
        self.store.epoch()
    }
}

/// A refused freeze as a sentence naming the session, its owner and the
/// file.
pub(super) fn refused_freeze(f: &FreezeFailure) -> String {
    if f.errno == Errno::EPERM && f.compatible.starts_with("memfd") {
        // The kernel fails the resize itself; we can only refuse the update.
        format!("{f}; the memfd was resized after it was preserved")
    } else {
        f.to_string()
    }
}
