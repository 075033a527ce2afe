//! The daemon: serves `/dev/liveupdate` and its session files over FUSE,
//! answers trapped ioctls from `luo run` trees, and keeps the LUO store.
//!
//! # Files
//! One FUSE connection is mounted as a directory in the state dir (`fs/`):
//! `fs/liveupdate` is the device, bind-mounted onto the device path;
//! `fs/s<N>` are session files. A child process, the opener, pre-opens
//! session files into a small pool (`pool.rs`); a new session takes one and
//! the fd is installed in the caller. Because each session file is its own
//! inode, the daemon recognises a session fd handed back to it (through a
//! trapped ioctl) by `fstat` alone, and because it is a real open file,
//! `dup`, `fork` and `SCM_RIGHTS` work and the kernel tells the daemon (FUSE
//! `RELEASE`) when the last reference is gone.
//!
//! # Ordering
//! Everything runs on one thread (`event_loop.rs`). FUSE sends `RELEASE`
//! asynchronously, but it is queued before `close(2)` returns; the daemon
//! therefore processes every pending FUSE request before acting on a trapped
//! ioctl, and FUSE requests are served in order, so a close followed at once
//! by an open or a create of the same name sees the close first, as with the
//! kernel.
//!
//! # Layout
//! One file per concern, each an `impl Daemon` block over the state group it
//! owns: `start.rs` and `device_path.rs` (start-up), `event_loop.rs`,
//! `fuse_ops.rs` and `node.rs` (FUSE requests), `ioctl.rs` and `session.rs`
//! (the uAPI), `caller.rs` (who calls), `pool.rs` (session files),
//! `trap.rs` (calls trapped by seccomp), `journal.rs` (saving),
//! `control.rs` (the control socket), `kexec.rs` and `after_kexec.rs` (a
//! real kexec).

mod after_kexec;
mod caller;
mod control;
mod device_path;
mod dma;
mod event_loop;
mod fuse_ops;
mod ioctl;
mod journal;
mod kexec;
mod node;
mod pool;
mod ring;
mod session;
mod start;
mod statfs;
#[cfg(test)]
mod tests;
mod trap;

use std::path::PathBuf;

use luo_store::{Limits, Store};
use thiserror::Error;

use crate::caller::owners::{self, FdBudget};
use crate::persist;
use crate::wire::dev_fuse::Channel;
use crate::{log, sys};
use event_loop::Loop;
use journal::Saved;
use kexec::Update;
use node::DeviceNode;
use pool::SessionFiles;
use trap::Runs;

/// Where the daemon lives.
#[derive(Clone, Debug)]
pub struct Config {
    /// The device path (`/dev/liveupdate`).
    pub device: PathBuf,
    /// State dir: FUSE mount, control socket.
    pub state_dir: PathBuf,
    /// Serve the device as a CUSE character device (`/dev/NAME`) instead of
    /// a FUSE file bound onto the device path.
    pub cuse: bool,
    /// A group whose members may ask for `status` (everything else on the
    /// control socket is root's alone).
    pub status_group: Option<u32>,
    /// Take FUSE over io_uring when the kernel offers it in INIT (the
    /// `fuse.enable_uring` module parameter); `/dev/fuse` otherwise.
    pub fuse_uring: bool,
    /// What session owners other than root may hold (see `caller::owners`).
    pub limits: Limits,
}

impl Config {
    /// The FUSE mount holding the device and session files.
    pub(super) fn fs_dir(&self) -> PathBuf {
        self.state_dir.join("fs")
    }

    /// The control socket path.
    pub fn socket(&self) -> PathBuf {
        crate::control::socket_in(&self.state_dir)
    }

    /// The keeper's socket path.
    pub fn keeper_socket(&self) -> PathBuf {
        self.state_dir.join("keeper.sock")
    }

    /// The state image path.
    pub fn image(&self) -> PathBuf {
        self.state_dir.join("state.img")
    }
}

/// Why the daemon could not start or stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The state image of the previous daemon was refused.
    #[error(transparent)]
    Image(#[from] persist::LoadError),
    /// A setup step failed.
    #[error("cannot {what}")]
    Setup {
        /// The step, as a phrase.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn setup<T>(
    what: impl FnOnce() -> String,
    r: std::io::Result<T>,
) -> std::result::Result<T, DaemonError> {
    r.map_err(|source| DaemonError::Setup {
        what: what(),
        source,
    })
}

/// The running daemon: the store it serves, the channel it serves it on,
/// and its state in a few groups, each kept by the file that owns it.
pub struct Daemon {
    cfg: Config,
    store: Store,
    chan: Channel,
    /// The event loop (`event_loop.rs`).
    ev: Loop,
    /// The device inode and, with CUSE, the character device (`node.rs`).
    node: DeviceNode,
    /// Session files and their opener (`pool.rs`).
    files: SessionFiles,
    /// `luo run` trees and their trapped calls (`trap.rs`).
    runs: Runs,
    /// The journal and the keeper (`journal.rs`).
    saved: Saved,
    /// A kexec being prepared or just adopted, and the workload (`kexec.rs`).
    update: Update,
    /// What each iommufd maps, and its devices (`dma.rs`).
    dma: dma::Dma,
    /// The fds owners other than root may make the daemon hold.
    fds: FdBudget,
    /// Preserving is refused: the files could take the daemon's own fds.
    fds_short: bool,
}

impl Daemon {
    /// Serves the device in the foreground until SIGTERM/SIGINT (the state
    /// stays with the keeper for the next daemon) or `luo shutdown` (the
    /// device is unmounted and everything released).
    ///
    /// A daemon started while a keeper holds the state of a previous one
    /// resumes it: same mount, same sessions, same session fds in clients.
    ///
    /// # Errors
    /// Setup failures, as sentences naming what could not be done; a state
    /// image that cannot be trusted.
    pub fn run(cfg: Config) -> std::result::Result<(), DaemonError> {
        let mut daemon = Daemon::start(cfg)?;
        log::info(format_args!(
            "{}",
            owners::describe(&daemon.cfg.limits, &daemon.fds)
        ));
        // READY=1 goes out once the device is bound and the control socket
        // listens (see `open_control`), from the loop below.
        let result = daemon.serve();
        daemon.tell_manager("STOPPING=1");
        daemon.stop_serving();
        result
    }
}

impl Daemon {
    /// Tells a service manager (`Type=notify`) how the daemon is doing; a
    /// manager that cannot be reached is logged, never fatal.
    fn tell_manager(&self, state: &str) {
        if let Err(e) = sys::notify(state) {
            log::warn(format_args!("cannot notify the service manager: {e}"));
        }
    }
}
