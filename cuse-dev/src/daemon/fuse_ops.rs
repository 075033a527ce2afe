//! FUSE requests: each opcode to the function that serves it, which
//! decides an [`Answer`]; [`Daemon::serve_request`] sends it, the one place
//! the daemon replies. The answers that need no state (INIT, CUSE_INIT,
//! xattrs, STATFS) are plain functions.

use luo_store::Errno;
use zerocopy::IntoBytes;

use super::caller::Caller;
use super::device_path::cuse_device_name;
use super::node::DEVICE_INO;
use super::Daemon;
use crate::control;
use crate::log;
use crate::profile::{self, Source};
use crate::wire::abi::{
    CuseInitIn, CuseInitOut, GetxattrOut, InHeader, InitIn, InitOut, IoctlIn, IoctlOut, OpenOut,
    StatfsOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use crate::wire::fuse::{self, Answer, Op};

impl Daemon {
    /// Serves one request and sends its answer.
    pub(super) fn serve_request(&mut self, req: fuse::Request) {
        let mut h = req.header;
        if fuse::is_noreply(&req.op) {
            return;
        }
        if req.cuse {
            // Everything on the CUSE device is about the device.
            h.nodeid = DEVICE_INO;
        }
        if changes_state(&req.op) {
            self.saved.dirty = true;
        }
        if matches!(req.op, Op::Ioctl(_)) {
            luo_kexec_helper::failpoint::pass("ioctl-received");
            self.node.ioctl_in_batch = true;
        }
        let answer = self.decide(&h, req.op, req.cuse);
        self.chan.answer(h.unique, answer);
    }

    /// What a request gets.
    fn decide(&mut self, h: &InHeader, op: Op, cuse: bool) -> Answer {
        match op {
            Op::Init(init, flags2) => {
                let ring = self.cfg.fuse_uring && offers_uring(&init, flags2);
                if self.cfg.fuse_uring && !ring {
                    log::info(format_args!(
                        "the kernel does not offer FUSE over io_uring (fuse.enable_uring=0, or \
                         built without CONFIG_FUSE_IO_URING): requests come through /dev/fuse"
                    ));
                }
                self.node.ring_agreed = ring;
                init_answer(init, ring)
            }
            Op::Lookup { name } => self.lookup(h, &name),
            Op::Getattr => self.getattr(h.nodeid),
            Op::Setattr(s) => self.setattr(h, s),
            Op::Open(_) => self.open(h),
            Op::Opendir => Answer::of(&OpenOut::default()),
            Op::Readdir | Op::Releasedir | Op::Flush | Op::Access => Answer::empty(),
            Op::Release(r) => {
                self.release(h.nodeid, r.fh);
                Answer::empty()
            }
            Op::Ioctl(io) => self.fuse_ioctl(h, io),
            Op::Getxattr { size, name } => self.getxattr(h.nodeid, size, &name),
            Op::Listxattr { size } => listxattr(h.nodeid, size),
            Op::Statfs => statfs_answer(),
            Op::Read | Op::Write => Errno::EINVAL.into(),
            Op::Setxattr | Op::Removexattr => Errno::EOPNOTSUPP.into(),
            Op::Destroy => {
                self.ev.stop = true;
                Answer::empty()
            }
            Op::CuseInit(init) if cuse => self.cuse_init(init),
            // FORGET and INTERRUPT never get here (`fuse::is_noreply`).
            Op::CuseInit(_) | Op::Unknown(_) | Op::Forget | Op::BatchForget | Op::Interrupt(_) => {
                Errno::ENOSYS.into()
            }
        }
    }

    /// Creates the character device: the kernel adds `/dev/NAME` once this
    /// reply is delivered (labelled then, see `drain_fuse`).
    fn cuse_init(&mut self, init: CuseInitIn) -> Answer {
        let name = cuse_device_name(&self.cfg.device).unwrap_or_default();
        let answer = cuse_init_answer(init, &name);
        if matches!(answer, Answer::Ok(_)) {
            self.node.cuse_created = true;
        }
        answer
    }

    fn getxattr(&self, ino: u64, size: u32, name: &[u8]) -> Answer {
        if ino != DEVICE_INO || name != control::SOCKET_XATTR.as_bytes() {
            return Errno::ENODATA.into();
        }
        let value = self.cfg.socket().into_os_string().into_encoded_bytes();
        xattr_value(size, &value)
    }

    /// An ioctl through FUSE: the caller is blocked in the kernel until the
    /// answer, so it is reached by its tid.
    fn fuse_ioctl(&mut self, h: &InHeader, io: IoctlIn) -> Answer {
        profile::call(io.cmd, Source::Fuse);
        let result = if h.pid == 0 {
            // The caller is outside our pid namespace: we cannot reach it.
            Err(Errno::EPERM)
        } else {
            let caller = Caller::fuse(h.pid as i32, h.uid, &self.runs.runner);
            if self.runs.runner.over_limit(h.uid) {
                // Its earlier calls left helper threads waiting for good.
                Err(Errno::EAGAIN)
            } else {
                self.ioctl(h.nodeid, io.cmd, io.arg, &caller)
            }
        };
        match result {
            Ok(()) => Answer::of(&IoctlOut::default()),
            Err(e) => e.into(),
        }
    }
}

/// `FUSE_INIT_EXT`: the flags go on in `flags2`.
const INIT_EXT: u32 = 1 << 30;
/// `FUSE_OVER_IO_URING` (bit 41), as a bit of `flags2`.
const OVER_IO_URING2: u32 = 1 << (41 - 32);

/// Whether the kernel offers FUSE over io_uring (it does only while the
/// `fuse.enable_uring` module parameter is on).
pub(super) fn offers_uring(init: &InitIn, flags2: u32) -> bool {
    init.flags & INIT_EXT != 0 && flags2 & OVER_IO_URING2 != 0
}

/// INIT: the protocol version and limits the daemon works with, and FUSE
/// over io_uring if `ring`.
pub(super) fn init_answer(init: InitIn, ring: bool) -> Answer {
    if init.major != KERNEL_VERSION {
        log::warn(format_args!(
            "kernel speaks FUSE {}.{}; need 7.x",
            init.major, init.minor
        ));
        return Errno::EPROTO.into();
    }
    Answer::of(&InitOut {
        major: KERNEL_VERSION,
        minor: init.minor.min(KERNEL_MINOR_VERSION),
        max_readahead: init.max_readahead,
        // Plenty of room so RELEASEs are never held back behind others.
        max_background: u16::MAX,
        congestion_threshold: u16::MAX - 1,
        max_write: 4096,
        time_gran: 1,
        flags: if ring { INIT_EXT } else { 0 },
        flags2: if ring { OVER_IO_URING2 } else { 0 },
        ..Default::default()
    })
}

/// CUSE_INIT: the device `/dev/NAME`, with unrestricted ioctls.
pub(super) fn cuse_init_answer(init: CuseInitIn, name: &str) -> Answer {
    const CUSE_UNRESTRICTED_IOCTL: u32 = 1;
    if init.major != KERNEL_VERSION {
        return Errno::EPROTO.into();
    }
    let out = CuseInitOut {
        major: KERNEL_VERSION,
        minor: init.minor.min(KERNEL_MINOR_VERSION),
        flags: CUSE_UNRESTRICTED_IOCTL,
        max_read: 4096,
        max_write: 4096,
        ..Default::default()
    };
    let info = format!("DEVNAME={name}\0");
    Answer::parts(&[out.as_bytes(), info.as_bytes()])
}

fn statfs_answer() -> Answer {
    Answer::of(&StatfsOut {
        bsize: 4096,
        namelen: 255,
        ..Default::default()
    })
}

/// LISTXATTR: the device has one attribute, naming the control socket.
pub(super) fn listxattr(ino: u64, size: u32) -> Answer {
    let mut list = Vec::new();
    if ino == DEVICE_INO {
        list.extend_from_slice(control::SOCKET_XATTR.as_bytes());
        list.push(0);
    }
    xattr_value(size, &list)
}

/// An xattr value for a caller's buffer of `size` bytes: its length if
/// `size` is 0, ERANGE if it does not fit.
pub(super) fn xattr_value(size: u32, value: &[u8]) -> Answer {
    if size == 0 {
        Answer::of(&GetxattrOut {
            size: value.len() as u32,
            padding: 0,
        })
    } else if (size as usize) < value.len() {
        Errno::ERANGE.into()
    } else {
        Answer::Ok(value.to_vec())
    }
}

/// Whether serving this request may change what the image records. An
/// ioctl that changes no session (GET_NAME, an unknown command) is answered
/// again the same way after a crash, so its reply need not be saved.
pub(super) fn changes_state(op: &Op) -> bool {
    match op {
        Op::Lookup { .. } | Op::Setattr(_) | Op::Open(_) | Op::Release(_) => true,
        Op::Ioctl(io) => crate::uapi::changes_state(io.cmd),
        _ => false,
    }
}
