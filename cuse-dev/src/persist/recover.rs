//! Finding the trapped call a killed daemon had received but not yet saved.
//!
//! The daemon saves a trapped call as in flight right after receiving it, but
//! a daemon killed between the two leaves a caller that the kernel will not
//! notify again: the notification is marked as received, and only its id
//! answers it. Two facts recover it:
//!
//! - the kernel numbers a filter's notifications consecutively, and every id
//!   the daemon received up to the last save is on record, so the lost one is
//!   among the next few ids, and `SECCOMP_IOCTL_NOTIF_ID_VALID` tells which;
//! - its caller still sleeps in the seccomp wait of the ioctl, and
//!   `/proc/TID/syscall` shows the arguments. Every other thread sleeping
//!   there has a notification not yet received: the daemon receives all of
//!   those first, and whoever is left made the lost call.
//!
//! The daemon answers one call at a time, so at most one call is lost; it is
//! answered only when exactly one thread is left and exactly one id is valid.

use std::path::Path;

use crate::caller::seccomp::TRAPPED_SYSCALLS;
use crate::uapi::TRAPPED;

/// How far past the last saved id to look (a signal that restarts a trapped
/// call uses up an id, so the lost call is not always the very next one).
pub const WINDOW: u64 = 512;

/// How far to look when a thread waits in a trapped call and none was found
/// within [`WINDOW`]: calls the daemon answered without saving anything (on
/// fds that are not LUO's, `statfs`) move the kernel's ids on while the
/// saved one stays. About a second of `SECCOMP_IOCTL_NOTIF_ID_VALID` calls,
/// only in that case.
pub const FAR_WINDOW: u64 = 1 << 20;

/// A thread sleeping in a trapped ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    /// Thread id.
    pub tid: u32,
    /// The syscall: `ioctl`, or one of the trapped statfs calls.
    pub nr: i64,
    /// Its first three arguments (an ioctl's fd, cmd and arg).
    pub args: [u64; 3],
}

/// The waiters among `tids`.
pub fn waiters(tids: impl IntoIterator<Item = u32>) -> Vec<Waiter> {
    tids.into_iter().filter_map(waiter).collect()
}

/// Every thread of the cgroup at `cgroup`, or of the whole system if none.
pub fn threads(cgroup: Option<&Path>) -> Vec<u32> {
    match cgroup {
        Some(dir) => std::fs::read_to_string(dir.join("cgroup.threads"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        None => all_threads(),
    }
}

fn all_threads() -> Vec<u32> {
    let numbered = |dir: &Path| -> Vec<u32> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    numbered(Path::new("/proc"))
        .into_iter()
        .flat_map(|pid| numbered(&Path::new("/proc").join(pid.to_string()).join("task")))
        .collect()
}

fn waiter(tid: u32) -> Option<Waiter> {
    let proc = Path::new("/proc").join(tid.to_string());
    let stat = std::fs::read_to_string(proc.join("stat")).ok()?;
    // Asleep: interruptibly until the call is received, and after that too
    // unless a signal came (then killable, `D`).
    if !matches!(state(&stat)?, 'S' | 'D') {
        return None;
    }
    let wchan = std::fs::read_to_string(proc.join("wchan")).unwrap_or_default();
    // Some kernels hide the wait channel ("0"); where shown, it must be seccomp's.
    if !(wchan.is_empty() || wchan == "0" || wchan.contains("seccomp")) {
        return None;
    }
    let (nr, args) = trapped_call(&std::fs::read_to_string(proc.join("syscall")).ok()?)?;
    Some(Waiter { tid, nr, args })
}

/// The state letter of a `/proc/TID/stat` line (the comm may hold spaces
/// and parentheses, so it is found after the last `)`).
fn state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The syscall and first three arguments of a `/proc/TID/syscall` line if
/// it is a trapped call: an ioctl with a trapped command, or a statfs call.
fn trapped_call(line: &str) -> Option<(i64, [u64; 3])> {
    let mut fields = line.split_whitespace();
    let nr = fields.next()?.parse::<i64>().ok()?;
    let mut arg = || u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok();
    let args = [arg()?, arg()?, arg()?];
    let trapped = if nr == libc::SYS_ioctl {
        TRAPPED.contains(&(args[1] as u32))
    } else {
        TRAPPED_SYSCALLS.contains(&nr)
    };
    trapped.then_some((nr, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state("42 (a) b) (c) D 1 2 3"), Some('D'));
        assert_eq!(state("42 (sleep) S 1"), Some('S'));
        assert_eq!(state("garbage"), None);
    }

    #[test]
    fn only_trapped_calls_are_recognised() {
        assert_eq!(
            trapped_call("16 0x5 0xba41 0x7ffc10 0x0 0x0 0x0 0x7ffc00 0x7f00"),
            Some((16, [5, 0xba41, 0x7ffc10]))
        );
        assert_eq!(
            trapped_call("16 0x5 0xba43 0x7ffc10 0x0 0x0 0x0 0x0 0x0"),
            None
        );
        assert_eq!(
            trapped_call("0 0x5 0xba41 0x7ffc10 0x0 0x0 0x0 0x0 0x0"),
            None
        );
        assert_eq!(
            trapped_call("138 0x5 0x7ffc10 0x0 0x0 0x0 0x0 0x0 0x0"),
            Some((138, [5, 0x7ffc10, 0]))
        );
        assert_eq!(
            trapped_call("89 0x5 0x7ffc10 0x0 0x0 0x0 0x0 0x0 0x0"),
            None
        );
        assert_eq!(trapped_call("running"), None);
    }

    #[test]
    fn a_sleeping_thread_is_no_waiter() {
        // This thread is running (R) while it reads its own stat.
        let tid = crate::sys::gettid() as u32;
        assert_eq!(waiter(tid), None);
        assert!(threads(None).contains(&tid));
    }
}
