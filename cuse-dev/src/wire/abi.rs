//! FUSE and CUSE wire structs (`include/uapi/linux/fuse.h`), shared by the
//! FUSE-file backend and, later, the CUSE backend.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Protocol major version.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version this server speaks.
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// Opcodes this server handles.
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const CUSE_INIT: u32 = 4096;
}

/// `FOPEN_DIRECT_IO`: no page cache (so no mmap of the device).
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `FOPEN_NONSEEKABLE`.
pub const FOPEN_NONSEEKABLE: u32 = 1 << 2;
/// `FOPEN_NOFLUSH`: close(2) sends no FLUSH (so the daemon may close its own
/// copies of session files without waiting on itself).
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
/// `FUSE_IOCTL_COMPAT`: a 32-bit caller.
pub const FUSE_IOCTL_COMPAT: u32 = 1 << 0;
/// `FATTR_MODE` in `fuse_setattr_in.valid`.
pub const FATTR_MODE: u32 = 1 << 0;
/// `FATTR_UID`.
pub const FATTR_UID: u32 = 1 << 1;
/// `FATTR_GID`.
pub const FATTR_GID: u32 = 1 << 2;
/// `FATTR_SIZE`.
pub const FATTR_SIZE: u32 = 1 << 3;

macro_rules! wire {
    ($($(#[$m:meta])* pub struct $name:ident { $($f:ident : $t:ty),* $(,)? } = $size:expr;)*) => {
        $(
            $(#[$m])*
            #[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
            #[repr(C)]
            #[allow(missing_docs)]
            pub struct $name { $(pub $f: $t),* }
            const _: () = assert!(std::mem::size_of::<$name>() == $size);
        )*
    };
}

wire! {
    /// `struct fuse_in_header`.
    pub struct InHeader { len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32,
        pid: u32, total_extlen: u16, padding: u16 } = 40;
    /// `struct fuse_out_header`.
    pub struct OutHeader { len: u32, error: i32, unique: u64 } = 16;
    /// `struct fuse_init_in` (first 16 bytes, present in every version).
    pub struct InitIn { major: u32, minor: u32, max_readahead: u32, flags: u32 } = 16;
    /// `struct fuse_init_out`.
    pub struct InitOut { major: u32, minor: u32, max_readahead: u32, flags: u32,
        max_background: u16, congestion_threshold: u16, max_write: u32, time_gran: u32,
        max_pages: u16, map_alignment: u16, flags2: u32, max_stack_depth: u32,
        request_timeout: u16, unused: [u16; 11] } = 64;
    /// `struct cuse_init_in`.
    pub struct CuseInitIn { major: u32, minor: u32, unused: u32, flags: u32 } = 16;
    /// `struct cuse_init_out`.
    pub struct CuseInitOut { major: u32, minor: u32, unused: u32, flags: u32, max_read: u32,
        max_write: u32, dev_major: u32, dev_minor: u32, spare: [u32; 10] } = 72;
    /// `struct fuse_attr`.
    pub struct Attr { ino: u64, size: u64, blocks: u64, atime: u64, mtime: u64, ctime: u64,
        atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, nlink: u32, uid: u32,
        gid: u32, rdev: u32, blksize: u32, flags: u32 } = 88;
    /// `struct fuse_entry_out`.
    pub struct EntryOut { nodeid: u64, generation: u64, entry_valid: u64, attr_valid: u64,
        entry_valid_nsec: u32, attr_valid_nsec: u32, attr: Attr } = 128;
    /// `struct fuse_attr_out`.
    pub struct AttrOut { attr_valid: u64, attr_valid_nsec: u32, dummy: u32, attr: Attr } = 104;
    /// `struct fuse_setattr_in`.
    pub struct SetattrIn { valid: u32, padding: u32, fh: u64, size: u64, lock_owner: u64,
        atime: u64, mtime: u64, ctime: u64, atimensec: u32, mtimensec: u32, ctimensec: u32,
        mode: u32, unused4: u32, uid: u32, gid: u32, unused5: u32 } = 88;
    /// `struct fuse_open_in`.
    pub struct OpenIn { flags: u32, open_flags: u32 } = 8;
    /// `struct fuse_open_out`.
    pub struct OpenOut { fh: u64, open_flags: u32, backing_id: i32 } = 16;
    /// `struct fuse_release_in`.
    pub struct ReleaseIn { fh: u64, flags: u32, release_flags: u32, lock_owner: u64 } = 24;
    /// `struct fuse_ioctl_in`.
    pub struct IoctlIn { fh: u64, flags: u32, cmd: u32, arg: u64, in_size: u32, out_size: u32 } = 32;
    /// `struct fuse_ioctl_out`.
    pub struct IoctlOut { result: i32, flags: u32, in_iovs: u32, out_iovs: u32 } = 16;
    /// `struct fuse_getxattr_in`.
    pub struct GetxattrIn { size: u32, padding: u32 } = 8;
    /// `struct fuse_getxattr_out`.
    pub struct GetxattrOut { size: u32, padding: u32 } = 8;
    /// `struct fuse_kstatfs` inside `fuse_statfs_out`.
    pub struct StatfsOut { blocks: u64, bfree: u64, bavail: u64, files: u64, ffree: u64,
        bsize: u32, namelen: u32, frsize: u32, padding: u32, spare: [u32; 6] } = 80;
    /// `struct fuse_interrupt_in`.
    pub struct InterruptIn { unique: u64 } = 8;
}
