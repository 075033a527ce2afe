//! The filesystem the daemon serves: the root, the device inode and the
//! session-file inodes; their attributes, lookups, opens and releases.

use luo_store::Errno;

use super::pool::SLOT_BASE;
use super::Daemon;
use crate::log;
use crate::persist::Header;
use crate::wire::abi::{
    Attr, AttrOut, EntryOut, InHeader, OpenOut, SetattrIn, FATTR_GID, FATTR_MODE, FATTR_UID,
    FOPEN_DIRECT_IO, FOPEN_NOFLUSH, FOPEN_NONSEEKABLE,
};
use crate::wire::fuse::Answer;

pub(super) const ROOT_INO: u64 = 1;
pub(super) const DEVICE_INO: u64 = 2;

/// The device inode (and, with CUSE, the character device).
pub(super) struct DeviceNode {
    /// The file handle of the device's one open file description.
    pub(super) device_holder: Option<u64>,
    pub(super) next_fh: u64,
    pub(super) device_mode: u32,
    pub(super) device_owner: (u32, u32),
    /// The daemon created the device path (removed at shutdown).
    pub(super) created_device: bool,
    /// The CUSE device's number, once it exists.
    pub(super) cuse_rdev: Option<u64>,
    /// A CUSE init reply is on its way: label the device after the batch.
    pub(super) cuse_created: bool,
    /// INIT agreed on FUSE over io_uring: the ring starts once the reply
    /// is delivered.
    pub(super) ring_agreed: bool,
    /// The batch being served has an ioctl (for the `ioctl-saved` crash
    /// point).
    pub(super) ioctl_in_batch: bool,
}

impl DeviceNode {
    /// As `header` left it (not held: a resume loads the holder).
    pub(super) fn from_header(header: &Header) -> DeviceNode {
        DeviceNode {
            device_holder: None,
            next_fh: header.next_fh,
            device_mode: header.device_mode,
            device_owner: header.device_owner,
            created_device: header.created_device,
            cuse_rdev: None,
            cuse_created: false,
            ring_agreed: false,
            ioctl_in_batch: false,
        }
    }

    /// Writes its part of the journal header.
    pub(super) fn save_into(&self, header: &mut Header) {
        header.device_holder = self.device_holder;
        header.next_fh = self.next_fh;
        header.device_mode = self.device_mode;
        header.device_owner = self.device_owner;
        header.created_device = self.created_device;
    }

    /// The attributes of inode `ino`; `slot` says whether it is a session
    /// file.
    pub(super) fn attr(&self, ino: u64, slot: bool) -> Option<Attr> {
        let (mode, (uid, gid)) = match ino {
            ROOT_INO => (libc::S_IFDIR | 0o755, (0, 0)),
            DEVICE_INO => (libc::S_IFREG | self.device_mode, self.device_owner),
            _ if slot => (libc::S_IFREG | 0o600, (0, 0)),
            _ => return None,
        };
        Some(Attr {
            ino,
            mode,
            nlink: 1,
            uid,
            gid,
            blksize: 4096,
            ..Default::default()
        })
    }

    /// `chmod` and `chown` of the device.
    pub(super) fn set(&mut self, s: &SetattrIn) {
        if s.valid & FATTR_MODE != 0 {
            self.device_mode = s.mode & 0o7777;
        }
        if s.valid & FATTR_UID != 0 {
            self.device_owner.0 = s.uid;
        }
        if s.valid & FATTR_GID != 0 {
            self.device_owner.1 = s.gid;
        }
    }

    /// Opens the device: a new file handle, or None while it is open (the
    /// device is exclusive, as `/dev/liveupdate` is).
    pub(super) fn open(&mut self) -> Option<u64> {
        if self.device_holder.is_some() {
            return None;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.device_holder = Some(fh);
        Some(fh)
    }

    /// The device's file handle `fh` was released.
    pub(super) fn release(&mut self, fh: u64) {
        if self.device_holder == Some(fh) {
            self.device_holder = None;
        }
    }
}

/// The number of the session file named `s<N>`.
pub(super) fn slot_number(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name)
        .ok()?
        .strip_prefix('s')?
        .parse::<u64>()
        .ok()
        .filter(|n| *n < SLOT_BASE)
}

/// An open file handle on our filesystem (every open file is direct I/O,
/// sends no FLUSH and cannot seek).
fn opened(fh: u64) -> Answer {
    Answer::of(&OpenOut {
        fh,
        open_flags: FOPEN_DIRECT_IO | FOPEN_NOFLUSH | FOPEN_NONSEEKABLE,
        backing_id: 0,
    })
}

impl Daemon {
    pub(super) fn attr(&self, ino: u64) -> Option<Attr> {
        self.node.attr(ino, self.files.slots.contains_key(&ino))
    }

    pub(super) fn getattr(&self, ino: u64) -> Answer {
        match self.attr(ino) {
            Some(attr) => Answer::of(&AttrOut {
                attr,
                ..Default::default()
            }),
            None => Errno::ENOENT.into(),
        }
    }

    fn entry(&self, ino: u64) -> Answer {
        match self.attr(ino) {
            Some(attr) => Answer::of(&EntryOut {
                nodeid: ino,
                attr,
                ..Default::default()
            }),
            None => Errno::ENOENT.into(),
        }
    }

    /// The device, or a session file the opener looks up (no one else
    /// sees them).
    pub(super) fn lookup(&mut self, h: &InHeader, name: &[u8]) -> Answer {
        if h.nodeid != ROOT_INO {
            return Errno::ENOENT.into();
        }
        if name == b"liveupdate" {
            return self.entry(DEVICE_INO);
        }
        match slot_number(name) {
            Some(n) if h.pid as i32 == self.files.opener_tid => {
                self.files.slots.entry(SLOT_BASE + n).or_insert(None);
                self.files.next_slot = self.files.next_slot.max(n + 1);
                self.entry(SLOT_BASE + n)
            }
            _ => Errno::ENOENT.into(),
        }
    }

    pub(super) fn setattr(&mut self, h: &InHeader, s: SetattrIn) -> Answer {
        if h.nodeid != DEVICE_INO {
            return Errno::EPERM.into();
        }
        self.node.set(&s);
        self.getattr(DEVICE_INO)
    }

    /// The device, once at a time; a session file, by the opener only.
    pub(super) fn open(&mut self, h: &InHeader) -> Answer {
        match h.nodeid {
            DEVICE_INO => {
                if self.node.device_holder.is_some() {
                    self.settle_releases();
                }
                self.node.open().map_or(Errno::EBUSY.into(), opened)
            }
            ino if self.files.slots.contains_key(&ino) && h.pid as i32 == self.files.opener_tid => {
                opened(ino)
            }
            _ => Errno::EACCES.into(),
        }
    }

    /// The last reference to an open file is gone; a session file's
    /// session is released, as closing its fd releases it in the kernel.
    pub(super) fn release(&mut self, ino: u64, fh: u64) {
        if ino == DEVICE_INO {
            return self.node.release(fh);
        }
        if let Some(Some(sid)) = self.files.slots.remove(&ino) {
            self.files.session_slot.remove(&sid);
            let name = self
                .store
                .session(sid)
                .map(|s| s.name.to_string())
                .unwrap_or_default();
            if let Some(w) = self.update.waiting.iter().find(|w| w.session == sid.0) {
                // Closing would finish it and drop the file still in its
                // stash: kept, to be retrieved again (SESSION_FINISH drops it).
                log::warn(format_args!(
                    "session {name} was closed while token {:#x} waits in its kmod-shim stash: \
                     kept for RETRIEVE_SESSION, not finished",
                    w.token
                ));
                self.store.unretrieve_session(sid);
                return;
            }
            if let Err(e) = self.store.release_session(sid) {
                log::warn(format_args!("session {name} could not finish on close ({e}); it stays until the next update"));
            }
        }
    }
}
