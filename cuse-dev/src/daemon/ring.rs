//! FUSE over io_uring: started once INIT agreed on it, and taken over by
//! every later daemon (a connection that has it keeps it; see
//! `wire::uring`).

use std::os::fd::OwnedFd;

use super::event_loop::TOKEN_RING;
use super::Daemon;
use crate::log;
use crate::persist::{self, Header};
use crate::wire::uring::Layout;

impl Daemon {
    /// INIT's reply agreed on FUSE over io_uring: the buffers are saved
    /// (journal and keeper) before any entry is registered, so a daemon
    /// killed from then on leaves its successor all it needs to answer
    /// the requests the entries hold.
    pub(super) fn begin_ring(&mut self) {
        if let Err(e) = self.chan.open_ring(None) {
            log::warn(format_args!(
                "cannot set up FUSE over io_uring ({e}); requests go on coming through /dev/fuse"
            ));
            return;
        }
        self.saved.dirty = true;
        self.commit();
        self.start_ring();
    }

    /// Adopts the previous daemon's ring buffers (before its saved replies
    /// are sent again; [`Daemon::start_ring`] comes after).
    pub(super) fn adopt_ring(&mut self, header: &Header) {
        let Some(layout) = header.fuse_ring else {
            return;
        };
        let adopted = self
            .saved
            .kept
            .keeper
            .get(persist::RING_KEY)
            .and_then(|memfd| self.adopt(memfd, layout));
        if let Err(e) = adopted {
            // The connection still sends requests to its ring: fresh
            // entries serve them; those the killed daemon held stay
            // unanswered until their callers are killed.
            log::error(format_args!(
                "cannot take over the FUSE io_uring buffers at {:#x} ({e}); \
                 requests the previous daemon had fetched stay unanswered",
                layout.base
            ));
            if let Err(e) = self.chan.open_ring(None) {
                log::error(format_args!("cannot set up FUSE over io_uring either: {e}"));
            }
        }
    }

    fn kick_queues(&self, queues: u16) {
        use std::os::unix::ffi::OsStrExt;
        let Ok(path) = std::ffi::CString::new(self.cfg.fs_dir().as_os_str().as_bytes()) else {
            return;
        };
        if let Err(e) = crate::sys::statfs_from_each_cpu(&path, queues) {
            log::warn(format_args!(
                "cannot prompt the FUSE io_uring queues ({e}); requests made while no daemon \
                 ran are served once another call arrives on their CPU"
            ));
        }
    }

    fn adopt(&mut self, memfd: OwnedFd, layout: Layout) -> std::io::Result<()> {
        self.chan.open_ring(Some((memfd, layout)))
    }

    /// Registers the ring's entries and watches it. Requests callers made
    /// while no daemon ran wait in their CPU's queue for an entry to be
    /// answered; a call from each CPU gets that going.
    pub(super) fn start_ring(&mut self) {
        if self.chan.ring_area().is_none() {
            return;
        }
        match self.chan.start_ring() {
            Ok(held) => {
                let fd = self.chan.ring_fd().expect("the ring started");
                if let Err(e) = self.ev.epoll.add(fd, TOKEN_RING) {
                    log::error(format_args!("cannot watch the FUSE io_uring: {e}"));
                }
                let layout = self.chan.ring_area().expect("the ring started").0;
                log::info(format_args!(
                    "FUSE requests come through io_uring ({} queues of {} entries{})",
                    layout.queues,
                    layout.depth,
                    if held > 0 {
                        format!("; {held} requests the previous daemon fetched are served again")
                    } else {
                        String::new()
                    }
                ));
                self.kick_queues(layout.queues);
            }
            Err(e) => log::warn(format_args!(
                "the kernel refused FUSE over io_uring ({e}); requests go on coming through \
                 /dev/fuse"
            )),
        }
    }
}
