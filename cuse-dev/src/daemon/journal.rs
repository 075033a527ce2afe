//! Saving: each batch's changes go into the journal before its replies leave
//! (a record, or a full snapshot when the journal has grown), the keeper is
//! handed every fd the state names, and a full state dir refuses changes
//! before they are made.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::rc::Rc;

use luo_store::{Errno, Result, SessionId};

use super::after_kexec::release_stashes;
use super::event_loop::KEEPER_CHECK_MS;
use super::Daemon;
use crate::caller::seccomp::Listener;
use crate::log;
use crate::persist::keeper::Keeper;
use crate::persist::{self, Header, Journal, KeptFds, Record, SessionRecord};
use crate::profile::{self, Phase};
use crate::wire::dev_fuse::Channel;

/// What has been saved, and where.
pub(super) struct Saved {
    /// The fds the keeper holds for us.
    pub(super) kept: KeptFds,
    /// Something changed since the image was last written.
    pub(super) dirty: bool,
    /// The state journal (from the end of start-up on).
    pub(super) journal: Option<Journal>,
    /// The journal's size when a compaction last failed (the state dir was
    /// full): the next is tried once it has grown by [`persist::RESERVE`].
    pub(super) compaction_failed_at: Option<u64>,
    /// Changes are refused (ENOSPC) for want of journal room.
    pub(super) refusing: bool,
    /// When the keeper was last seen alive.
    pub(super) keeper_checked: std::time::Instant,
}

impl Saved {
    /// Nothing saved yet; `kept` mirrors what the keeper holds.
    pub(super) fn new(kept: KeptFds) -> Saved {
        Saved {
            kept,
            dirty: false,
            journal: None,
            compaction_failed_at: None,
            refusing: false,
            keeper_checked: std::time::Instant::now(),
        }
    }
}

impl Daemon {
    /// Saves what changed (and gives the keeper any new fds) before the
    /// replies that report it leave. A
    /// compaction that fails (a full state dir) falls back to an append; an
    /// append goes into room reserved ahead (changes are refused while there
    /// is none, see [`Daemon::room_for_change`]). If even that fails the
    /// daemon exits without answering: nothing unsaved is acknowledged, and
    /// the next `luo daemon` resumes from the last saved state and serves
    /// the unanswered requests again.
    pub(super) fn commit(&mut self) {
        let gone = self.take_gone_waiting();
        let changes = self.store.take_changes();
        if !self.saved.dirty && changes.is_empty() {
            return;
        }
        let _t = profile::enter(Phase::Journal);
        let result = match &self.saved.journal {
            None => self.snapshot(),
            Some(j) if j.wants_compaction() && self.may_compact(j.size()) => {
                self.snapshot().or_else(|e| {
                    let size = self.saved.journal.as_ref().map_or(0, Journal::size);
                    log::warn(format_args!(
                        "compacting {} failed ({e}); appending instead",
                        self.cfg.image().display()
                    ));
                    self.saved.compaction_failed_at = Some(size);
                    self.append(&changes)
                })
            }
            Some(_) => self.append(&changes),
        };
        // A keeper that died takes the save down with it: replace it, and
        // the snapshot that hands it every fd saves this change too.
        let result = result.or_else(|e| match self.saved.kept.keeper.list() {
            Ok(_) => Err(e),
            Err(_) => self.replace_keeper(),
        });
        match result {
            Ok(()) => {
                self.saved.dirty = false;
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
    pub(super) fn check_keeper(&mut self) {
        if self.saved.keeper_checked.elapsed().as_millis()
            < u128::from(KEEPER_CHECK_MS.unsigned_abs())
        {
            return;
        }
        self.saved.keeper_checked = std::time::Instant::now();
        if self.saved.kept.keeper.list().is_ok() {
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
        self.saved.kept = KeptFds::new(keeper)?;
        self.snapshot()?;
        let (keys, pid) = self.saved.kept.keeper.list()?;
        log::info(format_args!(
            "a new fd keeper (pid {pid}) holds {} fds; nothing was lost",
            keys.len()
        ));
        Ok(())
    }

    fn may_compact(&self, size: u64) -> bool {
        self.saved
            .compaction_failed_at
            .is_none_or(|at| size >= at + persist::RESERVE)
    }

    /// Whether a change may be made now: the journal has its reserve. While
    /// it cannot (the state dir is full), changes fail with ENOSPC; changes
    /// that cannot be refused (closes, exits) still fit in the reserve.
    pub(super) fn room_for_change(&mut self) -> Result<()> {
        let room = self
            .saved
            .journal
            .as_mut()
            .is_none_or(|j| j.has_room(persist::RESERVE));
        if room != self.saved.refusing {
            return if room { Ok(()) } else { Err(Errno::ENOSPC) };
        }
        self.saved.refusing = !room;
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

    /// The journal header: the store's own fields and each group's part.
    pub(super) fn header(&self) -> Header {
        let mut header = Header {
            store: self.store.header_image(),
            ..Header::default()
        };
        self.node.save_into(&mut header);
        self.files.save_into(&mut header);
        self.runs.save_into(&mut header);
        self.update.save_into(&mut header);
        self.dma.save_into(&mut header);
        header.fuse_ring = self.chan.ring_area().map(|(layout, _)| layout);
        header
    }

    /// Appends one record of what changed: whole sessions where much changed,
    /// otherwise the session's fields and the files that changed.
    fn append(&mut self, changes: &luo_store::Changes) -> std::io::Result<()> {
        let header = self.header();
        let mut fds = own_fds(&self.chan, &self.runs.listeners);
        // Keeper keys that may have to go: those of whole sessions and of the
        // changed files (`wanted` decides).
        let mut prefixes: Vec<String> = vec!["listener/".into()];
        let mut sessions = Vec::new();
        let mut deltas = Vec::new();
        for (id, dirty) in &changes.changed {
            let slot = self.files.session_slot.get(id).copied();
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
        {
            let _t = profile::enter(Phase::Keeper);
            self.saved.kept.add_missing(&fds)?;
        }
        let record = Record {
            full: false,
            header,
            sessions,
            deltas,
            removed: changes.removed.iter().map(|id| id.0).collect(),
            replies: self.chan.batch(),
            inflight: self.runs.inflight,
        };
        self.saved
            .journal
            .as_mut()
            .expect("journal exists after start-up")
            .append(&record)?;
        let wanted = fds.iter().map(|(k, _)| k.as_str()).collect();
        let _t = profile::enter(Phase::Keeper);
        self.saved.kept.drop_unwanted(&prefixes, &wanted)
    }

    /// Rewrites the journal as one full snapshot.
    pub(super) fn snapshot(&mut self) -> std::io::Result<()> {
        let header = self.header();
        let (store, mut fds) = self.store.to_image();
        fds.extend(own_fds(&self.chan, &self.runs.listeners));
        self.saved.kept.add_missing(&fds)?;
        let sessions = store
            .sessions
            .into_iter()
            .map(|session| {
                let slot = self.files.session_slot.get(&SessionId(session.id)).copied();
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
            inflight: self.runs.inflight,
        };
        self.saved.journal = Some(Journal::create(&self.cfg.image(), &record)?);
        let wanted = fds.iter().map(|(k, _)| k.as_str()).collect();
        self.saved
            .kept
            .drop_unwanted(&["s".into(), "listener/".into()], &wanted)?;
        self.saved.compaction_failed_at = None;
        Ok(())
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
    if let Some((_, memfd)) = chan.ring_area() {
        fds.push((persist::RING_KEY.to_owned(), memfd));
    }
    fds.extend(
        listeners
            .iter()
            .map(|(t, l)| (persist::listener_key(*t), l.fd())),
    );
    fds
}
