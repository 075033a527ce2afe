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
}

impl Daemon {
    pub(super) fn attr(&self, ino: u64) -> Option<Attr> {
        let (mode, (uid, gid)) = match ino {
            ROOT_INO => (libc::S_IFDIR | 0o755, (0, 0)),
            DEVICE_INO => (
                libc::S_IFREG | self.node.device_mode,
                self.node.device_owner,
            ),
            ino if self.files.slots.contains_key(&ino) => (libc::S_IFREG | 0o600, (0, 0)),
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

    pub(super) fn entry(&self, unique: u64, ino: u64) {
        let attr = self.attr(ino).expect("entry for a known inode");
        self.chan.reply_struct(
            unique,
            &EntryOut {
                nodeid: ino,
                attr,
                ..Default::default()
            },
        );
    }

    pub(super) fn lookup(&mut self, h: &InHeader, name: &[u8]) {
        if h.nodeid != ROOT_INO {
            return self.chan.reply_err(h.unique, Errno::ENOENT);
        }
        if name == b"liveupdate" {
            return self.entry(h.unique, DEVICE_INO);
        }
        let slot = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.strip_prefix('s'))
            .and_then(|n| n.parse::<u64>().ok());
        match slot {
            Some(n) if h.pid as i32 == self.files.opener_tid && n < SLOT_BASE => {
                self.files.slots.entry(SLOT_BASE + n).or_insert(None);
                self.files.next_slot = self.files.next_slot.max(n + 1);
                self.entry(h.unique, SLOT_BASE + n);
            }
            _ => self.chan.reply_err(h.unique, Errno::ENOENT),
        }
    }

    pub(super) fn setattr(&mut self, h: &InHeader, s: SetattrIn) {
        if h.nodeid != DEVICE_INO {
            return self.chan.reply_err(h.unique, Errno::EPERM);
        }
        if s.valid & FATTR_MODE != 0 {
            self.node.device_mode = s.mode & 0o7777;
        }
        if s.valid & FATTR_UID != 0 {
            self.node.device_owner.0 = s.uid;
        }
        if s.valid & FATTR_GID != 0 {
            self.node.device_owner.1 = s.gid;
        }
        let attr = self.attr(DEVICE_INO).expect("device inode");
        self.chan.reply_struct(
            h.unique,
            &AttrOut {
                attr,
                ..Default::default()
            },
        );
    }

    pub(super) fn open(&mut self, h: &InHeader) {
        let flags = FOPEN_DIRECT_IO | FOPEN_NOFLUSH | FOPEN_NONSEEKABLE;
        match h.nodeid {
            DEVICE_INO => {
                if self.node.device_holder.is_some() {
                    self.settle_releases();
                }
                if self.node.device_holder.is_some() {
                    return self.chan.reply_err(h.unique, Errno::EBUSY);
                }
                let fh = self.node.next_fh;
                self.node.next_fh += 1;
                self.node.device_holder = Some(fh);
                self.chan.reply_struct(
                    h.unique,
                    &OpenOut {
                        fh,
                        open_flags: flags,
                        backing_id: 0,
                    },
                );
            }
            ino if self.files.slots.contains_key(&ino) && h.pid as i32 == self.files.opener_tid => {
                self.chan.reply_struct(
                    h.unique,
                    &OpenOut {
                        fh: ino,
                        open_flags: flags,
                        backing_id: 0,
                    },
                );
            }
            _ => self.chan.reply_err(h.unique, Errno::EACCES),
        }
    }

    pub(super) fn release(&mut self, ino: u64, fh: u64) {
        if ino == DEVICE_INO {
            if self.node.device_holder == Some(fh) {
                self.node.device_holder = None;
            }
            return;
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
