//! FUSE requests: each opcode to the function that serves it, and the
//! replies that need no state (INIT, CUSE_INIT, xattrs, IOCTL's envelope).

use luo_store::Errno;
use zerocopy::IntoBytes;

use super::caller::Caller;
use super::device_path::cuse_device_name;
use super::node::DEVICE_INO;
use super::Daemon;
use crate::control;
use crate::log;
use crate::wire::abi::{
    AttrOut, CuseInitIn, CuseInitOut, GetxattrOut, InHeader, InitIn, InitOut, IoctlIn, IoctlOut,
    OpenOut, StatfsOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use crate::wire::fuse::{self, Op};

impl Daemon {
    pub(super) fn serve_request(&mut self, req: fuse::Request) {
        let mut h = req.header;
        if fuse::is_noreply(&req.op) {
            return;
        }
        if req.cuse {
            // Everything on the CUSE device is about the device.
            h.nodeid = DEVICE_INO;
        }
        let u = h.unique;
        if changes_state(&req.op) {
            self.saved.dirty = true;
        }
        match req.op {
            Op::Init(init) => self.reply_init(u, init),
            Op::Lookup { name } => self.lookup(&h, &name),
            Op::Getattr => match self.attr(h.nodeid) {
                Some(attr) => self.chan.reply_struct(
                    u,
                    &AttrOut {
                        attr,
                        ..Default::default()
                    },
                ),
                None => self.chan.reply_err(u, Errno::ENOENT),
            },
            Op::Setattr(s) => self.setattr(&h, s),
            Op::Open(_) => self.open(&h),
            Op::Opendir => self.chan.reply_struct(u, &OpenOut::default()),
            Op::Readdir | Op::Releasedir | Op::Flush | Op::Access => self.chan.reply(u, &[]),
            Op::Release(r) => {
                self.release(h.nodeid, r.fh);
                self.chan.reply(u, &[]);
            }
            Op::Ioctl(io) => self.fuse_ioctl(&h, io),
            Op::Getxattr { size, name } => self.getxattr(&h, size, &name),
            Op::Listxattr { size } => self.listxattr(&h, size),
            Op::Statfs => self.chan.reply_struct(
                u,
                &StatfsOut {
                    bsize: 4096,
                    namelen: 255,
                    ..Default::default()
                },
            ),
            Op::Read | Op::Write => self.chan.reply_err(u, Errno::EINVAL),
            Op::Setxattr | Op::Removexattr => self.chan.reply_err(u, Errno::EOPNOTSUPP),
            Op::Destroy => {
                self.chan.reply(u, &[]);
                self.ev.stop = true;
            }
            Op::CuseInit(init) if req.cuse => self.reply_cuse_init(u, init),
            Op::CuseInit(_) | Op::Unknown(_) => self.chan.reply_err(u, Errno::ENOSYS),
            Op::Forget | Op::BatchForget | Op::Interrupt(_) => {}
        }
    }

    pub(super) fn reply_init(&mut self, unique: u64, init: InitIn) {
        if init.major != KERNEL_VERSION {
            log::warn(format_args!(
                "kernel speaks FUSE {}.{}; need 7.x",
                init.major, init.minor
            ));
            self.chan.reply_err(unique, Errno::EPROTO);
            return;
        }
        let out = InitOut {
            major: KERNEL_VERSION,
            minor: init.minor.min(KERNEL_MINOR_VERSION),
            max_readahead: init.max_readahead,
            // Plenty of room so RELEASEs are never held back behind others.
            max_background: u16::MAX,
            congestion_threshold: u16::MAX - 1,
            max_write: 4096,
            time_gran: 1,
            ..Default::default()
        };
        self.chan.reply_struct(unique, &out);
    }

    /// Creates the character device: the kernel adds `/dev/NAME` once this
    /// reply is delivered (labelled then, see `drain_fuse`).
    pub(super) fn reply_cuse_init(&mut self, unique: u64, init: CuseInitIn) {
        const CUSE_UNRESTRICTED_IOCTL: u32 = 1;
        if init.major != KERNEL_VERSION {
            self.chan.reply_err(unique, Errno::EPROTO);
            return;
        }
        let out = CuseInitOut {
            major: KERNEL_VERSION,
            minor: init.minor.min(KERNEL_MINOR_VERSION),
            flags: CUSE_UNRESTRICTED_IOCTL,
            max_read: 4096,
            max_write: 4096,
            ..Default::default()
        };
        let name = cuse_device_name(&self.cfg.device).unwrap_or_default();
        let info = format!("DEVNAME={name}\0");
        self.chan.reply(unique, &[out.as_bytes(), info.as_bytes()]);
        self.node.cuse_created = true;
    }

    pub(super) fn getxattr(&self, h: &InHeader, size: u32, name: &[u8]) {
        if h.nodeid != DEVICE_INO || name != control::SOCKET_XATTR.as_bytes() {
            return self.chan.reply_err(h.unique, Errno::ENODATA);
        }
        let value = self.cfg.socket().into_os_string().into_encoded_bytes();
        self.xattr_value(h.unique, size, &value);
    }

    pub(super) fn listxattr(&self, h: &InHeader, size: u32) {
        let mut list = Vec::new();
        if h.nodeid == DEVICE_INO {
            list.extend_from_slice(control::SOCKET_XATTR.as_bytes());
            list.push(0);
        }
        self.xattr_value(h.unique, size, &list);
    }

    pub(super) fn xattr_value(&self, unique: u64, size: u32, value: &[u8]) {
        if size == 0 {
            self.chan.reply_struct(
                unique,
                &GetxattrOut {
                    size: value.len() as u32,
                    padding: 0,
                },
            );
        } else if (size as usize) < value.len() {
            self.chan.reply_err(unique, Errno::ERANGE);
        } else {
            self.chan.reply(unique, &[value]);
        }
    }

    pub(super) fn fuse_ioctl(&mut self, h: &InHeader, io: IoctlIn) {
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
            Ok(()) => self.chan.reply_struct(h.unique, &IoctlOut::default()),
            Err(e) => self.chan.reply_err(h.unique, e),
        }
    }
}

/// Whether serving this request may change what the image records.
pub(super) fn changes_state(op: &Op) -> bool {
    matches!(
        op,
        Op::Lookup { .. } | Op::Setattr(_) | Op::Open(_) | Op::Release(_) | Op::Ioctl(_)
    )
}
