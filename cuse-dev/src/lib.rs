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
//! with `SECCOMP_IOCTL_NOTIF_ADDFD`. See `daemon.rs` for how session fds are
//! made and recognised.

pub mod bench;
pub mod caller;
pub mod control;
pub mod control_server;
pub mod daemon;
pub mod deadline;
pub mod demo;
pub mod failpoint;
pub mod fuse;
pub mod fuse_abi;
pub mod fuzzing;
pub mod keeper;
pub mod kexec;
pub mod log;
pub mod memfd;
pub mod opener;
pub mod oracle;
pub mod owners;
pub mod paths;
pub mod persist;
pub mod recover;
pub mod run;
pub mod seccomp;
pub mod shim;
pub mod sys;
pub mod uapi;
