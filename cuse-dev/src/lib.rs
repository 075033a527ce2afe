//! The userspace `/dev/liveupdate` device.
//!
//! Linux's Live Update Orchestrator is driven through a character device; this
//! crate serves the same uAPI from a daemon. The device is a FUSE file mounted
//! at the device path (a CUSE character device where the kernel has CUSE); its
//! ioctls are decoded exactly as `luo_core.c` and `luo_session.c` decode them,
//! and the daemon reads and writes the caller's struct in the caller's memory.
//!
//! Three ioctls return a new fd, which neither FUSE nor CUSE can put into a
//! caller. Programs started with `luo run` carry a seccomp user-notification
//! filter for exactly those three; the daemon answers them and installs the fd
//! with `SECCOMP_IOCTL_NOTIF_ADDFD`.
//!
//! The modules are layers; each imports only from the ones listed before it
//! (see `ARCHITECTURE.md`):
//!
//! - [`sys`]: the raw syscalls the daemon makes (mount, sockets, epoll, fds).
//! - [`wire`]: the FUSE/CUSE wire protocol, bytes in and replies out.
//! - `uapi`: the LUO uAPI, its command table and decoding rules.
//! - `caller`: the calling process: its memory, its fds, the seccomp bridge.
//! - [`persist`]: what outlives a daemon: journal, keeper, opener, recovery.
//! - [`control`]: the control socket's protocol and server.
//! - [`daemon`]: the daemon, one file per concern.
//! - [`client`]: `luo run`, the client side of the fd bridge.
//! - [`tools`]: `luo bench`, `demo`, `oracle` and `shim-check`, which use the
//!   layers above and are used by none of them.

mod caller;
pub mod client;
pub mod control;
pub mod daemon;
pub mod fuzzing;
pub mod log;
pub mod persist;
pub mod profile;
pub mod sys;
pub mod tools;
mod uapi;
pub mod wire;
