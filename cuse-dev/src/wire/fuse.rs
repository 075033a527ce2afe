//! The FUSE wire protocol: a channel on `/dev/fuse` (or `/dev/cuse`), a parser
//! that turns request bytes into [`Op`] without `unsafe`, and reply encoding.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use luo_store::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::wire::abi::*;

/// Size of the read buffer: FUSE wants at least 8 KiB; our requests are small.
const BUFFER_SIZE: usize = 64 * 1024 + 4096;

/// One decoded request.
#[derive(Debug)]
pub struct Request {
    /// Its header (unique id, node, caller's pid/uid/gid).
    pub header: InHeader,
    /// The operation.
    pub op: Op,
    /// It came from the CUSE device rather than the FUSE mount.
    pub cuse: bool,
}

/// Operations, with their decoded arguments.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum Op {
    Init(InitIn),
    CuseInit(CuseInitIn),
    Lookup { name: Vec<u8> },
    Forget,
    BatchForget,
    Getattr,
    Setattr(SetattrIn),
    Open(OpenIn),
    Opendir,
    Release(ReleaseIn),
    Releasedir,
    Readdir,
    Flush,
    Ioctl(IoctlIn),
    Getxattr { size: u32, name: Vec<u8> },
    Listxattr { size: u32 },
    Setxattr,
    Removexattr,
    Statfs,
    Access,
    Read,
    Write,
    Interrupt(InterruptIn),
    Destroy,
    Unknown(u32),
}

fn arg<T: FromBytes>(body: &[u8]) -> io::Result<T> {
    T::read_from_prefix(body)
        .map(|(v, _)| v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "short FUSE request"))
}

fn cstr(bytes: &[u8]) -> Vec<u8> {
    bytes.split(|&b| b == 0).next().unwrap_or_default().to_vec()
}

/// Decodes one request from the bytes a read of the channel returned.
///
/// # Errors
/// `InvalidData` for a request shorter than its header or its arguments.
pub fn parse(bytes: &[u8]) -> io::Result<Request> {
    let header: InHeader = arg(bytes)?;
    let body = &bytes[std::mem::size_of::<InHeader>()..];
    use opcode::*;
    let op = match header.opcode {
        INIT => Op::Init(arg(body)?),
        CUSE_INIT => Op::CuseInit(arg(body)?),
        LOOKUP => Op::Lookup { name: cstr(body) },
        FORGET => Op::Forget,
        BATCH_FORGET => Op::BatchForget,
        GETATTR => Op::Getattr,
        SETATTR => Op::Setattr(arg(body)?),
        OPEN => Op::Open(arg(body)?),
        OPENDIR => Op::Opendir,
        RELEASE => Op::Release(arg(body)?),
        RELEASEDIR => Op::Releasedir,
        READDIR => Op::Readdir,
        FLUSH => Op::Flush,
        IOCTL => Op::Ioctl(arg(body)?),
        GETXATTR => {
            let g: GetxattrIn = arg(body)?;
            Op::Getxattr {
                size: g.size,
                name: cstr(&body[8..]),
            }
        }
        LISTXATTR => Op::Listxattr {
            size: arg::<GetxattrIn>(body)?.size,
        },
        SETXATTR => Op::Setxattr,
        REMOVEXATTR => Op::Removexattr,
        STATFS => Op::Statfs,
        ACCESS => Op::Access,
        READ => Op::Read,
        WRITE => Op::Write,
        INTERRUPT => Op::Interrupt(arg(body)?),
        DESTROY => Op::Destroy,
        other => Op::Unknown(other),
    };
    Ok(Request {
        header,
        op,
        cuse: false,
    })
}

/// Whether an opcode expects no reply at all.
pub fn is_noreply(op: &Op) -> bool {
    matches!(op, Op::Forget | Op::BatchForget | Op::Interrupt(_))
}

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

/// The answer to a FUSE request, as a value: the code that serves a
/// request decides it, and [`Channel::answer`] alone sends it (fuser's
/// `ll::Response`), so that what a request gets can be checked without a
/// mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Success, with this body (empty for most requests).
    Ok(Vec<u8>),
    /// Failure.
    Err(Errno),
}

impl Answer {
    /// Success with no body.
    pub fn empty() -> Answer {
        Answer::Ok(Vec::new())
    }

    /// Success with `value` as the body.
    pub fn of<T: IntoBytes + Immutable>(value: &T) -> Answer {
        Answer::Ok(value.as_bytes().to_vec())
    }

    /// Success with `parts` one after another as the body.
    pub fn parts(parts: &[&[u8]]) -> Answer {
        Answer::Ok(parts.concat())
    }
}

impl From<Errno> for Answer {
    fn from(e: Errno) -> Answer {
        Answer::Err(e)
    }
}

/// A reply held back in a batch: the whole message (its header names the
/// request) and the device it goes to. The route is kept beside the request
/// id, never in it: every bit of the id is the kernel's (a resent request
/// has `FUSE_UNIQUE_RESEND`, bit 63, set).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "ReplyWire")]
pub struct Reply {
    /// The request came from the CUSE device.
    pub cuse: bool,
    /// Header and body.
    pub msg: Vec<u8>,
}

/// A [`Reply`] as journals hold it: earlier daemons wrote `(id, message)`
/// with bit 63 of the id marking the CUSE device.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum ReplyWire {
    Routed { cuse: bool, msg: Vec<u8> },
    Tagged(u64, Vec<u8>),
}

impl From<ReplyWire> for Reply {
    fn from(w: ReplyWire) -> Reply {
        match w {
            ReplyWire::Routed { cuse, msg } => Reply { cuse, msg },
            ReplyWire::Tagged(id, msg) => Reply {
                cuse: id & (1 << 63) != 0,
                msg,
            },
        }
    }
}

impl Reply {
    /// The request this answers.
    pub fn unique(&self) -> u64 {
        self.msg
            .get(8..16)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    }
}

/// The daemon's connection to the kernel: the FUSE mount's `/dev/fuse` fd
/// and, with the CUSE backend, a `/dev/cuse` fd. Replies go to the device the
/// request being served came from (see [`Channel::route`]).
pub struct Channel {
    fd: OwnedFd,
    cuse: Option<OwnedFd>,
    /// Replies go to the CUSE device while set.
    to_cuse: std::cell::Cell<bool>,
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
            to_cuse: std::cell::Cell::new(false),
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

    /// Sends replies to the CUSE device (true) or the FUSE mount from now
    /// on; returns the previous setting, to restore after a nested request.
    pub fn route(&self, to_cuse: bool) -> bool {
        self.to_cuse.replace(to_cuse && self.cuse.is_some())
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

    /// Reads the next request; `Ok(None)` when none is pending.
    ///
    /// # Errors
    /// `ENODEV` once the filesystem is unmounted; other read errors.
    pub fn next_request(&mut self) -> io::Result<Option<Request>> {
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

    /// Sends the replies held back and stops holding them.
    pub fn end_batch(&self) {
        let held = self.batch.borrow_mut().take().unwrap_or_default();
        for reply in held {
            self.write_message(&reply);
        }
    }

    /// Sends a whole message again (a reply saved before a restart); a reply
    /// to a request that was already answered is refused by the kernel and
    /// ignored here.
    pub fn resend(&self, reply: &Reply) {
        self.write_message(reply);
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
        let cuse = self.to_cuse.get();
        if let Some(batch) = self.batch.borrow_mut().as_mut() {
            let mut msg = header.as_bytes().to_vec();
            for p in parts {
                msg.extend_from_slice(p);
            }
            batch.push(Reply { cuse, msg });
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
    use std::os::fd::FromRawFd;

    fn request(opcode: u32, body: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: 7,
            nodeid: 2,
            pid: 99,
            ..Default::default()
        };
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_ioctl() {
        let io = IoctlIn {
            fh: 3,
            cmd: 0xba40,
            arg: 0x1000,
            ..Default::default()
        };
        let r = parse(&request(opcode::IOCTL, io.as_bytes())).unwrap();
        assert_eq!(r.header.pid, 99);
        let Op::Ioctl(got) = r.op else {
            panic!("not an ioctl: {:?}", r.op)
        };
        assert_eq!((got.fh, got.cmd, got.arg), (3, 0xba40, 0x1000));
    }

    #[test]
    fn parses_lookup_and_getxattr_names() {
        let r = parse(&request(opcode::LOOKUP, b"liveupdate\0")).unwrap();
        assert!(matches!(r.op, Op::Lookup { ref name } if name == b"liveupdate"));
        let mut body = GetxattrIn {
            size: 64,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(b"user.luo.control\0");
        let r = parse(&request(opcode::GETXATTR, &body)).unwrap();
        assert!(matches!(r.op, Op::Getxattr { size: 64, ref name } if name == b"user.luo.control"));
    }

    fn seqpacket() -> (OwnedFd, OwnedFd) {
        let mut sv = [0; 2];
        // SAFETY: sv has room for the two fds socketpair returns.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, sv.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: socketpair returned two fresh fds that we own.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
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
        chan.route(false);
        chan.answer(RESENT | 4, Answer::empty());
        chan.route(true);
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

    #[test]
    fn replies_saved_by_earlier_daemons_still_read() {
        let old = serde_json::json!([[(1u64 << 63) | 6, [1, 2]], [4, [3]]]);
        let got: Vec<Reply> = serde_json::from_value(old).unwrap();
        assert_eq!(
            got,
            [
                Reply {
                    cuse: true,
                    msg: vec![1, 2]
                },
                Reply {
                    cuse: false,
                    msg: vec![3]
                }
            ]
        );
    }

    #[test]
    fn short_requests_are_refused() {
        assert!(parse(&[0u8; 10]).is_err());
        assert!(parse(&request(opcode::IOCTL, &[0u8; 8])).is_err());
        assert!(matches!(
            parse(&request(9999, &[])).unwrap().op,
            Op::Unknown(9999)
        ));
    }
}
