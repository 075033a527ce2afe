//! The daemon's end of `/dev/fuse` (and `/dev/cuse`, and FUSE over
//! io_uring when the kernel offers it): requests read, parsed
//! ([`super::fuse::parse`]) and answered, replies held back in a batch until
//! the state they report is saved.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use zerocopy::IntoBytes;

use super::abi::OutHeader;
use super::fuse::{parse, Answer, Reply, Request};
use super::uring::{Layout, Ring};

/// Where the reply being made goes: the device its request came from, and
/// the io_uring entry that holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route {
    cuse: bool,
    slot: Option<u32>,
}

impl Route {
    /// Back where `req` came from.
    pub fn of(req: &Request) -> Route {
        Route {
            cuse: req.cuse,
            slot: req.slot,
        }
    }
}

/// Size of the read buffer: FUSE wants at least 8 KiB; our requests are small.
const BUFFER_SIZE: usize = 64 * 1024 + 4096;

fn read_request(fd: i32, buf: &mut [u8]) -> io::Result<Option<Request>> {
    loop {
        // SAFETY: buf is a writable buffer of buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return parse(&buf[..n as usize]).map(Some);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // ENOENT: the request was interrupted before we read it.
            Some(libc::EINTR) | Some(libc::ENOENT) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// The daemon's connection to the kernel: the FUSE mount's `/dev/fuse` fd,
/// its io_uring once started and, with the CUSE backend, a `/dev/cuse` fd.
/// Replies go where the request being served came from (see
/// [`Channel::route`]).
pub struct Channel {
    fd: OwnedFd,
    cuse: Option<OwnedFd>,
    /// Where replies go now.
    to: std::cell::Cell<Route>,
    /// FUSE over io_uring, once INIT agreed on it.
    ring: std::cell::RefCell<Option<Ring>>,
    /// The ring's layout and the memfd of its buffers.
    ring_area: Option<(Layout, OwnedFd)>,
    buf: Vec<u8>,
    /// While a batch is open, replies are held here until
    /// [`Channel::end_batch`].
    batch: std::cell::RefCell<Option<Vec<Reply>>>,
}

impl Channel {
    /// Wraps an open `/dev/fuse` or `/dev/cuse` fd (which should be
    /// non-blocking so the daemon can drain it).
    pub fn new(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            cuse: None,
            to: std::cell::Cell::new(Route::default()),
            ring: std::cell::RefCell::new(None),
            ring_area: None,
            buf: vec![0; BUFFER_SIZE],
            batch: std::cell::RefCell::new(None),
        }
    }

    /// Adds the CUSE device fd (non-blocking).
    pub fn attach_cuse(&mut self, fd: OwnedFd) {
        self.cuse = Some(fd);
    }

    /// The device fd, for polling and mount options.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The CUSE device fd, if there is one.
    pub fn cuse_fd(&self) -> Option<BorrowedFd<'_>> {
        self.cuse.as_ref().map(|f| f.as_fd())
    }

    /// Sends replies along `to` from now on; returns the previous route, to
    /// restore after a nested request.
    pub fn route(&self, to: Route) -> Route {
        let cuse = to.cuse && self.cuse.is_some();
        self.to.replace(Route { cuse, ..to })
    }

    /// Makes the io_uring for this connection: with fresh buffers, or with
    /// those `adopt` names (a previous daemon's, see `uring`). Replies to
    /// requests the previous daemon fetched can then be sent again
    /// ([`Channel::resend`]) before [`Channel::start_ring`].
    ///
    /// # Errors
    /// The ring or its buffers could not be made.
    pub fn open_ring(&mut self, adopt: Option<(OwnedFd, Layout)>) -> io::Result<()> {
        let ring = match adopt {
            Some((memfd, layout)) => Ring::adopt(self.fd.as_fd(), memfd, layout)?,
            None => Ring::create(self.fd.as_fd())?,
        };
        self.ring_area = Some((ring.layout(), ring.memfd().try_clone_to_owned()?));
        *self.ring.get_mut() = Some(ring);
        Ok(())
    }

    /// Registers the ring's free entries with the kernel; returns how many
    /// requests a previous daemon had fetched and not answered (served
    /// again, like requests the kernel resends).
    ///
    /// # Errors
    /// The kernel refused the ring; requests go on coming through
    /// `/dev/fuse` and the ring is dropped.
    pub fn start_ring(&mut self) -> io::Result<usize> {
        let ring = self.ring.get_mut();
        let started = ring.as_mut().map_or(Ok(0), Ring::start);
        if started.is_err() {
            *ring = None;
            self.ring_area = None;
        }
        started
    }

    /// The ring's layout and buffers' memfd, for the journal and the keeper.
    pub fn ring_area(&self) -> Option<(Layout, BorrowedFd<'_>)> {
        self.ring_area.as_ref().map(|(l, fd)| (*l, fd.as_fd()))
    }

    /// Closes the io_uring (before the mount goes, see `stop_serving`):
    /// the kernel ends the requests it was handing to its entries.
    pub fn close_ring(&mut self) {
        if self.ring.get_mut().take().is_some() {
            // Returning from a syscall runs the closed ring's last work
            // for this thread.
            let _ = crate::sys::poll_readable(&[self.fd.as_fd()], 0);
        }
    }

    /// Whether the io_uring holds a request not read yet: the kernel hands
    /// one over in this thread's task work, which cuts a wait short
    /// (`EINTR`) before the ring's fd is seen readable.
    pub fn ring_pending(&mut self) -> bool {
        self.ring.get_mut().as_mut().is_some_and(Ring::pending)
    }

    /// The fds that turn readable when a FUSE request arrives: `/dev/fuse`
    /// and the io_uring's.
    pub fn request_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.fd.as_fd()];
        if let Some(fd) = self.ring_fd() {
            // SAFETY: the ring's fd is closed only by `close_ring` and
            // `start_ring`, which take `&mut self`: not while this borrow
            // of `self` lives.
            fds.push(unsafe { BorrowedFd::borrow_raw(fd) });
        }
        fds
    }

    /// The io_uring fd, to watch: readable when a request arrived.
    pub fn ring_fd(&self) -> Option<i32> {
        self.ring.borrow().as_ref().map(|r| r.fd().as_raw_fd())
    }

    /// Reads the next CUSE request; `Ok(None)` when none is pending or there
    /// is no CUSE device.
    ///
    /// # Errors
    /// As [`Channel::next_request`].
    pub fn next_cuse_request(&mut self) -> io::Result<Option<Request>> {
        let Some(fd) = self.cuse.as_ref().map(|f| f.as_raw_fd()) else {
            return Ok(None);
        };
        let req = read_request(fd, &mut self.buf)?;
        Ok(req.map(|r| Request { cuse: true, ..r }))
    }

    /// Reads the next request, from the io_uring first; `Ok(None)` when
    /// none is pending.
    ///
    /// # Errors
    /// `ENODEV` once the filesystem is unmounted; other read errors.
    pub fn next_request(&mut self) -> io::Result<Option<Request>> {
        if let Some(ring) = self.ring.get_mut() {
            if let Some((slot, req)) = ring.next_request()? {
                return Ok(Some(Request {
                    slot: Some(slot),
                    ..req
                }));
            }
        }
        read_request(self.fd.as_raw_fd(), &mut self.buf)
    }

    /// Sends the answer to request `unique` (or holds it back while a batch
    /// is open): the one place a reply is made.
    pub fn answer(&self, unique: u64, answer: Answer) {
        match answer {
            Answer::Ok(body) if body.is_empty() => self.send(unique, 0, &[]),
            Answer::Ok(body) => self.send(unique, 0, &[&body]),
            Answer::Err(e) => self.send(unique, -e.0, &[]),
        }
    }

    /// Starts holding replies back; returns false if a batch is already open.
    pub fn begin_batch(&self) -> bool {
        let mut b = self.batch.borrow_mut();
        if b.is_some() {
            return false;
        }
        *b = Some(Vec::new());
        true
    }

    /// The replies held back so far.
    pub fn batch(&self) -> Vec<Reply> {
        self.batch.borrow().clone().unwrap_or_default()
    }

    /// Sends the replies held back so far (their state is saved) and goes
    /// on holding later ones.
    pub fn send_held(&self) {
        let held = self.batch.borrow_mut().as_mut().map(std::mem::take);
        for reply in held.unwrap_or_default() {
            self.write_message(&reply);
        }
        self.flush_ring();
    }

    /// Sends the replies held back and stops holding them.
    pub fn end_batch(&self) {
        let held = self.batch.borrow_mut().take().unwrap_or_default();
        for reply in held {
            self.write_message(&reply);
        }
        self.flush_ring();
    }

    /// Sends a whole message again (a reply saved before a restart); a reply
    /// to a request that was already answered is refused by the kernel and
    /// ignored here. Replies to io_uring requests are queued on the ring
    /// ([`Channel::open_ring`]) and leave with [`Channel::start_ring`].
    pub fn resend(&self, reply: &Reply) {
        self.write_message(reply);
    }

    fn flush_ring(&self) {
        if let Some(ring) = self.ring.borrow_mut().as_mut() {
            if let Err(e) = ring.flush() {
                crate::log::warn(format_args!("FUSE io_uring submit failed: {e}"));
            }
        }
    }

    /// Asks the kernel to queue again every request this connection's server
    /// had read but not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9).
    ///
    /// # Errors
    /// The kernel's refusal (older kernels: EINVAL).
    pub fn notify_resend(&self) -> io::Result<()> {
        const FUSE_NOTIFY_RESEND: i32 = 7;
        let header = OutHeader {
            len: 16,
            error: FUSE_NOTIFY_RESEND,
            unique: 0,
        };
        for fd in std::iter::once(&self.fd).chain(&self.cuse) {
            // SAFETY: writes 16 bytes from a live header.
            let n = unsafe { libc::write(fd.as_raw_fd(), header.as_bytes().as_ptr().cast(), 16) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The fd a reply goes to.
    fn target(&self, cuse: bool) -> i32 {
        match &self.cuse {
            Some(c) if cuse => c.as_raw_fd(),
            _ => self.fd.as_raw_fd(),
        }
    }

    fn write_message(&self, reply: &Reply) {
        let msg = &reply.msg;
        if let Some(slot) = reply.slot {
            if let Some(ring) = self.ring.borrow_mut().as_mut() {
                if let Err(e) = ring.commit(slot, msg) {
                    let unique = reply.unique();
                    crate::log::warn(format_args!("FUSE reply to request {unique} failed: {e}"));
                }
            }
            return;
        }
        // SAFETY: writes msg.len() bytes from a live buffer.
        let n = unsafe { libc::write(self.target(reply.cuse), msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            // ENOENT: the caller was interrupted or already answered; nothing to do.
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                let unique = reply.unique();
                crate::log::warn(format_args!("FUSE reply to request {unique} failed: {err}"));
            }
        }
    }

    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let len = (std::mem::size_of::<OutHeader>() + body) as u32;
        let header = OutHeader { len, error, unique };
        let Route { cuse, slot } = self.to.get();
        if slot.is_some() || self.batch.borrow().is_some() {
            let mut msg = header.as_bytes().to_vec();
            for p in parts {
                msg.extend_from_slice(p);
            }
            let reply = Reply { cuse, slot, msg };
            match self.batch.borrow_mut().as_mut() {
                Some(batch) => batch.push(reply),
                None => {
                    self.write_message(&reply);
                    self.flush_ring();
                }
            }
            return;
        }
        let fd = self.target(cuse);
        let mut iov = vec![libc::iovec {
            iov_base: header.as_bytes().as_ptr() as *mut _,
            iov_len: 16,
        }];
        iov.extend(parts.iter().map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        }));
        // SAFETY: every iovec points at memory borrowed for the duration of the call.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            // ENOENT: the caller was interrupted and the request is gone; nothing to do.
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                crate::log::warn(format_args!("FUSE reply to request {unique} failed: {err}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqpacket() -> (OwnedFd, OwnedFd) {
        crate::sys::seqpacket_pair().unwrap()
    }

    fn received_unique(fd: &OwnedFd) -> Option<u64> {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live buffer of its own length, without waiting.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                64,
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 16).then(|| u64::from_ne_bytes(buf[8..16].try_into().unwrap()))
    }

    #[test]
    fn replies_go_where_their_request_came_from_whatever_the_id() {
        const RESENT: u64 = 1 << 63;
        let (fuse, fuse_peer) = seqpacket();
        let (cuse, cuse_peer) = seqpacket();
        let mut chan = Channel::new(fuse);
        chan.attach_cuse(cuse);
        assert!(chan.begin_batch());
        chan.route(Route::default());
        chan.answer(RESENT | 4, Answer::empty());
        chan.route(Route {
            cuse: true,
            slot: None,
        });
        chan.answer(6, Answer::empty());
        chan.answer(RESENT | 8, Answer::empty());
        // Saved and reloaded, as a restarted daemon resends them.
        let saved = serde_json::to_vec(&chan.batch()).unwrap();
        chan.end_batch();
        assert_eq!(received_unique(&fuse_peer), Some(RESENT | 4));
        assert_eq!(received_unique(&fuse_peer), None);
        assert_eq!(received_unique(&cuse_peer), Some(6));
        assert_eq!(received_unique(&cuse_peer), Some(RESENT | 8));
        let reloaded: Vec<Reply> = serde_json::from_slice(&saved).unwrap();
        for r in &reloaded {
            chan.resend(r);
        }
        assert_eq!(received_unique(&fuse_peer), Some(RESENT | 4));
        assert_eq!(received_unique(&cuse_peer), Some(6));
        assert_eq!(received_unique(&cuse_peer), Some(RESENT | 8));
    }
}
