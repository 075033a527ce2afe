//! The FUSE wire protocol: a channel on `/dev/fuse` (or `/dev/cuse`), a parser
//! that turns request bytes into [`Op`] without `unsafe`, and reply encoding.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use luo_store::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::fuse_abi::*;

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

/// A reply message and the request it answers (with [`CUSE_ROUTE`] set in
/// the id if the request came from the CUSE device).
pub type Reply = (u64, Vec<u8>);

/// Marks a [`Reply`] for the CUSE device (request ids never use this bit).
pub const CUSE_ROUTE: u64 = 1 << 63;

/// The daemon's connection to the kernel: the FUSE mount's `/dev/fuse` fd
/// and, with the CUSE backend, a `/dev/cuse` fd. Replies go to the device the
/// request being served came from (see [`Channel::route`]).
pub struct Channel {
    fd: OwnedFd,
    cuse: Option<OwnedFd>,
    /// Replies go to the CUSE device while set.
    to_cuse: std::cell::Cell<bool>,
    buf: Vec<u8>,
    /// While a batch is open, replies are held here (unique, message) until
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

    /// Sends a reply made of `parts` after the header.
    pub fn reply(&self, unique: u64, parts: &[&[u8]]) {
        self.send(unique, 0, parts);
    }

    /// Sends an error reply.
    pub fn reply_err(&self, unique: u64, errno: Errno) {
        self.send(unique, -errno.0, &[]);
    }

    /// Sends a struct as the whole reply.
    pub fn reply_struct<T: IntoBytes + Immutable>(&self, unique: u64, value: &T) {
        self.send(unique, 0, &[value.as_bytes()]);
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
    pub fn batch(&self) -> Vec<(u64, Vec<u8>)> {
        self.batch.borrow().clone().unwrap_or_default()
    }

    /// Sends the replies held back and stops holding them.
    pub fn end_batch(&self) {
        let held = self.batch.borrow_mut().take().unwrap_or_default();
        for (unique, msg) in held {
            self.write_message(unique, &msg);
        }
    }

    /// Sends a whole message again (a reply saved before a restart); a reply
    /// to a request that was already answered is refused by the kernel and
    /// ignored here.
    pub fn resend(&self, unique: u64, msg: &[u8]) {
        self.write_message(unique, msg);
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

    /// The fd a reply to `tagged` goes to, and the request id without the tag.
    fn target(&self, tagged: u64) -> (i32, u64) {
        match &self.cuse {
            Some(c) if tagged & CUSE_ROUTE != 0 => (c.as_raw_fd(), tagged & !CUSE_ROUTE),
            _ => (self.fd.as_raw_fd(), tagged & !CUSE_ROUTE),
        }
    }

    fn write_message(&self, tagged: u64, msg: &[u8]) {
        let (fd, unique) = self.target(tagged);
        // SAFETY: writes msg.len() bytes from a live buffer.
        let n = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            // ENOENT: the caller was interrupted or already answered; nothing to do.
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                crate::log::warn(format_args!("FUSE reply to request {unique} failed: {err}"));
            }
        }
    }

    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let len = (std::mem::size_of::<OutHeader>() + body) as u32;
        let header = OutHeader { len, error, unique };
        let tagged = if self.to_cuse.get() {
            unique | CUSE_ROUTE
        } else {
            unique
        };
        if let Some(batch) = self.batch.borrow_mut().as_mut() {
            let mut msg = header.as_bytes().to_vec();
            for p in parts {
                msg.extend_from_slice(p);
            }
            batch.push((tagged, msg));
            return;
        }
        let (fd, _) = self.target(tagged);
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
