//! The processes of one epoch, kept in a cgroup v2 so that every descendant
//! of `luo run` — daemonized, re-parented, `setsid` — can be frozen and ended
//! together.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why the workload could not be tracked or ended.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// A cgroup file operation failed.
    #[error("cannot {what} ({path})")]
    Cgroup {
        /// The step, as a phrase.
        what: &'static str,
        /// The cgroup file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The processes did not freeze or exit in time.
    #[error("the workload in {path} did not {what} within {secs} s")]
    Timeout {
        /// "freeze" or "exit".
        what: &'static str,
        /// The cgroup.
        path: PathBuf,
        /// The bound.
        secs: u64,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WorkloadError {
    let path = path.to_owned();
    move |source| WorkloadError::Cgroup { what, path, source }
}

/// The cgroup of the current epoch's workload.
#[derive(Debug)]
pub struct Workload {
    base: PathBuf,
    current: PathBuf,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Workload {
    /// Tracks workloads under `base` (a directory in a cgroup v2 hierarchy,
    /// created if missing), starting with the cgroup for `epoch`.
    ///
    /// # Errors
    /// If the cgroups cannot be created.
    pub fn new(base: &Path, epoch: u64) -> Result<Workload, WorkloadError> {
        fs::create_dir_all(base).map_err(io_err("create the workload cgroup", base))?;
        let current = base.join(format!("epoch-{epoch}"));
        fs::create_dir_all(&current).map_err(io_err("create the epoch cgroup", &current))?;
        Ok(Workload {
            base: base.to_owned(),
            current,
        })
    }

    /// The current epoch's cgroup.
    pub fn path(&self) -> &Path {
        &self.current
    }

    /// Moves a process (and the children it creates from now on) into the
    /// current epoch.
    ///
    /// # Errors
    /// If the process cannot be moved (gone, or another hierarchy's rules).
    pub fn add(&self, pid: i32) -> Result<(), WorkloadError> {
        let procs = self.current.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .map_err(io_err("move a process into the epoch cgroup", &procs))
    }

    /// The pids currently in the epoch.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.current.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn event(&self, key: &str) -> bool {
        let events = fs::read_to_string(self.current.join("cgroup.events")).unwrap_or_default();
        events.lines().any(|l| l == format!("{key} 1"))
    }

    /// Freezes every process of the epoch; `serve` is called while waiting, so
    /// a process blocked in a request to the caller can finish it and freeze.
    ///
    /// # Errors
    /// If the cgroup cannot be frozen in time.
    pub fn freeze(&self, serve: &mut dyn FnMut()) -> Result<(), WorkloadError> {
        self.write("cgroup.freeze", "1", "freeze the workload")?;
        self.wait(serve, "freeze", |w| {
            !w.event("populated") || w.event("frozen")
        })
    }

    /// Thaws the epoch again (an aborted update).
    pub fn thaw(&self) {
        let _ = self.write("cgroup.freeze", "0", "thaw the workload");
    }

    /// Kills every process of the epoch and waits until each is exiting
    /// (it runs no more code of its own), then starts the cgroup of epoch
    /// `next`. The rest of their exit, unmapping what they mapped (guest
    /// RAM: 130 ms for 4 GiB), is not waited for; their cgroup is removed
    /// once empty, at a later update or at shutdown.
    ///
    /// # Errors
    /// If the processes cannot be killed or do not exit in time.
    pub fn end(&mut self, next: u64, serve: &mut dyn FnMut()) -> Result<(), WorkloadError> {
        if self.write("cgroup.kill", "1", "kill the workload").is_err() {
            // Kernels before 5.14 have no cgroup.kill.
            for pid in self.pids() {
                crate::sys::kill(pid, libc::SIGKILL);
            }
        }
        self.write("cgroup.freeze", "0", "thaw the killed workload")?;
        self.wait(serve, "exit", |w| !w.event("populated") || w.all_exiting())?;
        self.current = self.base.join(format!("epoch-{next}"));
        fs::create_dir_all(&self.current)
            .map_err(io_err("create the epoch cgroup", &self.current))?;
        self.remove_ended();
        Ok(())
    }

    /// Whether every thread of the epoch is exiting (`PF_EXITING`, or gone).
    fn all_exiting(&self) -> bool {
        let Ok(threads) = fs::read_to_string(self.current.join("cgroup.threads")) else {
            return false;
        };
        threads
            .lines()
            .filter_map(|t| t.trim().parse::<i32>().ok())
            .all(exiting)
    }

    /// Removes the cgroups of earlier epochs that no process is left in.
    fn remove_ended(&self) {
        let Ok(dirs) = fs::read_dir(&self.base) else {
            return;
        };
        for d in dirs.flatten() {
            let path = d.path();
            let epoch = d.file_name().to_string_lossy().starts_with("epoch-");
            if epoch && path != self.current {
                let _ = fs::remove_dir(path);
            }
        }
    }

    /// Removes the cgroups again if no process is left in them.
    pub fn remove_if_empty(&self) {
        self.remove_ended();
        let _ = fs::remove_dir(&self.current);
        let _ = fs::remove_dir(&self.base);
    }

    fn write(&self, file: &str, value: &str, what: &'static str) -> Result<(), WorkloadError> {
        let path = self.current.join(file);
        fs::write(&path, value).map_err(io_err(what, &path))
    }

    fn wait(
        &self,
        serve: &mut dyn FnMut(),
        what: &'static str,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), WorkloadError> {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > TIMEOUT {
                return Err(WorkloadError::Timeout {
                    what,
                    path: self.current.clone(),
                    secs: TIMEOUT.as_secs(),
                });
            }
            serve();
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// `PF_EXITING` in `/proc/TID/stat`'s flags.
const PF_EXITING: u64 = 0x4;

/// Whether thread `tid` is exiting or gone.
fn exiting(tid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{tid}/stat")) else {
        return true;
    };
    // After the command (which may hold spaces and parentheses): state,
    // ppid, pgrp, session, tty_nr, tpgid, flags.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// The first cgroup v2 mount in this mount namespace, if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mountpoint = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}
