//! Who owns what the daemon holds, and how much more it may hold.
//!
//! Every session records its owner: the effective uid of the process that
//! created it and the `luo run` tree it was created in, named by the process
//! the tree started as (its pid, and its command name once it has run the
//! program). The store charges each session and each file preserved into it
//! to that owner and holds owners other than root to the limits given to
//! `luo daemon` (see [`luo_store::Limits`]). The daemon holds every preserved
//! file, so owners other than root are also kept from taking the fds of the
//! last [`reserve`] below its `RLIMIT_NOFILE`: those are root's.

use luo_store::{Limits, Refusal, Resource, Scope, Tree};
use serde::{Deserialize, Serialize};

/// The daemon's own fds besides the files, listeners and session files it
/// counts (FUSE, epoll, signals, sockets, the journal, stdio).
const OWN_FDS: usize = 64;

/// Fds no owner, root included, may make the daemon hold: what it needs for
/// its own work once everything else is taken (control connections, pidfds
/// of callers, new `luo run` listeners, session files to hand out).
pub const DAEMON_RESERVE: usize = 64;

/// Below this many fds from the ceiling the open fds are counted, not
/// estimated.
const NEAR: usize = 256;

/// The process a `luo run` tree started as: the one that registered it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeRoot {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot), which tells it from a later
    /// process given the same pid.
    pub start: u64,
    /// Its command name, read at the tree's first session (it registers
    /// before it runs the program, which has run by then).
    #[serde(default)]
    pub comm: Option<String>,
}

impl TreeRoot {
    /// The tree started as `pid`.
    pub fn of(pid: i32) -> TreeRoot {
        TreeRoot {
            pid,
            start: stat(pid).map_or(0, |(_, start)| start),
            comm: None,
        }
    }

    /// The tree as a session's owner records it.
    pub fn tree(&mut self, token: u64) -> Tree {
        let (pid, start) = (self.pid, self.start);
        let comm = self.comm.get_or_insert_with(|| match stat(pid) {
            Some((comm, s)) if s == start => comm,
            _ => String::new(), // gone already
        });
        Tree {
            token,
            pid,
            comm: comm.clone(),
        }
    }
}

/// A tree the daemon has no record of (registered by a daemon that kept
/// none).
pub fn unknown_tree(token: u64) -> Tree {
    Tree {
        token,
        pid: 0,
        comm: String::new(),
    }
}

/// Command name and start time of a process (`/proc/PID/stat`).
fn stat(pid: i32) -> Option<(String, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<(String, u64)> {
    // The name may hold spaces and parentheses: it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Field 3 (state) follows the name; the start time is field 22.
    let start = text[close + 1..].split_whitespace().nth(19)?.parse().ok()?;
    Some((comm, start))
}

/// Effective uid of a thread (`/proc/TID/status`). Unlike the owner of its
/// `/proc` files, it does not turn into root when the process makes itself
/// not dumpable.
pub fn effective_uid(tid: i32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    parse_effective_uid(&text)
}

fn parse_effective_uid(status: &str) -> Option<u32> {
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// The fds kept for root out of an `RLIMIT_NOFILE` of `limit`: an eighth,
/// and at least 1024.
pub fn reserve(limit: usize) -> usize {
    (limit / 8).max(1024)
}

/// How many fds the daemon may hold for owners other than root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The daemon's `RLIMIT_NOFILE`.
    pub limit: usize,
    /// The limit minus the reserve: open fds past it are root's only.
    pub ceiling: usize,
}

impl FdBudget {
    /// The budget under an `RLIMIT_NOFILE` of `limit`.
    pub fn new(limit: usize) -> FdBudget {
        FdBudget {
            limit,
            ceiling: limit.saturating_sub(reserve(limit)),
        }
    }

    /// The budget under the daemon's current `RLIMIT_NOFILE`.
    pub fn current() -> FdBudget {
        FdBudget::new(crate::sys::nofile_limit().map_or(1024, |n| n as usize))
    }

    /// Fds the daemon may still open for owners other than root, given the
    /// fds it counts as open (`counted`, which misses only its own few):
    /// an estimate far from the ceiling, counted in `/proc/self/fd` near it.
    pub fn room(&self, counted: usize) -> usize {
        room_under(self.ceiling, counted, open_fds)
    }

    /// Fds the daemon may still open for the files of any owner, root
    /// included: all but [`DAEMON_RESERVE`] of its limit.
    pub fn room_for_all(&self, counted: usize) -> usize {
        room_under(self.limit.saturating_sub(DAEMON_RESERVE), counted, open_fds)
    }
}

/// Fds left below `cap` given `counted` open ones (see [`FdBudget::room`]).
fn room_under(cap: usize, counted: usize, count: impl FnOnce() -> Option<usize>) -> usize {
    let estimate = counted + OWN_FDS;
    let open = if estimate + NEAR < cap {
        estimate
    } else {
        count().unwrap_or(estimate)
    };
    cap.saturating_sub(open)
}

/// The daemon's open fds.
fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// The `luo daemon` flag that sets the limit a refusal names.
pub fn flag(refusal: &Refusal) -> &'static str {
    match (&refusal.scope, refusal.resource) {
        (Scope::Uid { .. }, Resource::Sessions) => "--max-sessions-per-uid",
        (Scope::Uid { .. }, Resource::Files) => "--max-files-per-uid",
        (Scope::Tree { .. }, Resource::Sessions) => "--max-sessions-per-tree",
        (Scope::Tree { .. }, Resource::Files) => "--max-files-per-tree",
        (Scope::Fds { .. }, _) => "RLIMIT_NOFILE",
    }
}

/// The limits as one phrase, for the daemon's start-up line.
pub fn describe(limits: &Limits, fds: &FdBudget) -> String {
    format!(
        "limits for uids other than root: {} sessions and {} files per uid, {} sessions and \
         {} files per luo run tree, {} of {} fds (the rest kept for root)",
        limits.sessions_per_uid,
        limits.files_per_uid,
        limits.sessions_per_tree,
        limits.files_per_tree,
        fds.ceiling,
        fds.limit
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_read_whole() {
        let line = "1234 (my (odd) vmm) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    98765 1000000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("my (odd) vmm".into(), 98765)));
        let me = stat(std::process::id() as i32).unwrap();
        assert_eq!(TreeRoot::of(std::process::id() as i32).start, me.1);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_tree_whose_root_is_gone_or_replaced_has_no_command_name() {
        let me = std::process::id() as i32;
        let mut root = TreeRoot::of(me);
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(root.tree(7).comm, comm.trim_end());
        let mut other = TreeRoot {
            start: root.start + 1,
            ..TreeRoot::of(me)
        };
        assert_eq!(other.tree(7).comm, "", "same pid, another process");
        assert_eq!(other.tree(7).pid, me);
    }

    #[test]
    fn the_effective_uid_is_the_second_of_the_four() {
        let status = "Name:\tx\nUid:\t1000\t65534\t1000\t65534\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_effective_uid(status), Some(65534));
        let me = crate::sys::geteuid();
        assert_eq!(effective_uid(std::process::id() as i32), Some(me));
    }

    #[test]
    fn root_keeps_an_eighth_of_the_fds_and_at_least_1024() {
        assert_eq!(FdBudget::new(20_000).ceiling, 20_000 - 2_500);
        assert_eq!(FdBudget::new(4_096).ceiling, 4_096 - 1_024);
        assert_eq!(FdBudget::new(1_048_576).ceiling, 1_048_576 - 131_072);
        assert_eq!(FdBudget::new(512).ceiling, 0);
        // Far from the ceiling the estimate serves; near it the fds are counted.
        let far = FdBudget::new(1 << 20);
        let room = room_under(far.ceiling, 1000, || panic!("counted far from the ceiling"));
        assert_eq!(room, far.ceiling - 1000 - OWN_FDS);
        let near = FdBudget::new(2048);
        assert_eq!(room_under(near.ceiling, 800, || Some(1000)), 1024 - 1000);
        assert_eq!(room_under(near.ceiling, 800, || Some(5000)), 0);
        // Every owner's files may use all but the daemon's own reserve.
        assert_eq!(room_under(2048 - DAEMON_RESERVE, 1800, || Some(1000)), 984);
        assert!(open_fds().unwrap() >= 3, "stdio at least");
    }
}
