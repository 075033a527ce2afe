//! Which daemon a subcommand talks to, and the limits `luo daemon` takes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use luo_cuse_dev::{client, control};
use luo_store::Limits;

const DEFAULT_DEVICE: &str = "/dev/liveupdate";
const DEFAULT_STATE_DIR: &str = "/run/luo";

/// Which daemon a subcommand talks to.
pub struct Target {
    pub device: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

impl Target {
    pub fn device(&self) -> PathBuf {
        self.device
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DEVICE))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// The control socket: in --state-dir if given, else the one the daemon
    /// serving --device names, else in the default state dir.
    pub fn socket(&self) -> Result<PathBuf, ExitCode> {
        match (&self.state_dir, &self.device) {
            (None, Some(device)) => client::run::daemon_socket(device).map_err(|e| {
                eprintln!("luo: {e}");
                ExitCode::FAILURE
            }),
            _ => Ok(control::socket_in(&self.state_dir())),
        }
    }
}

pub const LIMITS_HELP: &str = "\
Limits: a session belongs to the uid that created it and to the `luo run` tree
it was created in, and every file preserved into it counts against them.
Sessions and files of uids other than root are limited (CREATE_SESSION then
fails with EMFILE, SESSION_PRESERVE_FD with ENOSPC, and the daemon logs which
limit); root's never are. Uids other than root may also never make the daemon
hold more than its RLIMIT_NOFILE minus a reserve for root (an eighth of it, at
least 1024 fds).";

/// What session owners other than root may hold.
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Sessions (outgoing and incoming) one uid other than root may hold.
    #[arg(long, default_value_t = Limits::DEFAULT.sessions_per_uid)]
    max_sessions_per_uid: usize,
    /// Files the sessions of one uid other than root may hold.
    #[arg(long, default_value_t = Limits::DEFAULT.files_per_uid)]
    max_files_per_uid: usize,
    /// Sessions uids other than root may create in one `luo run` tree.
    #[arg(long, default_value_t = Limits::DEFAULT.sessions_per_tree)]
    max_sessions_per_tree: usize,
    /// Files the sessions created in one `luo run` tree by uids other than
    /// root may hold.
    #[arg(long, default_value_t = Limits::DEFAULT.files_per_tree)]
    max_files_per_tree: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            sessions_per_uid: self.max_sessions_per_uid,
            files_per_uid: self.max_files_per_uid,
            sessions_per_tree: self.max_sessions_per_tree,
            files_per_tree: self.max_files_per_tree,
        }
    }
}

/// Runs `f` with the control socket of the daemon `target` names.
pub fn with_socket(target: &Target, f: impl FnOnce(&Path) -> ExitCode) -> ExitCode {
    match target.socket() {
        Ok(socket) => f(&socket),
        Err(code) => code,
    }
}
