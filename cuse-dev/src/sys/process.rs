//! Processes: thread ids, resource limits, children, signals and groups.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The caller's thread id.
pub fn gettid() -> i32 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() }
}

/// The process (thread-group id) thread `tid` belongs to.
pub fn tgid(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Whether fd `fd_a` of process `pid_a` and fd `fd_b` of `pid_b` are the
/// same open file (`kcmp(KCMP_FILE)`); None when either is gone.
pub fn same_file((pid_a, fd_a): (i32, i32), (pid_b, fd_b): (i32, i32)) -> Option<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp reads no memory of ours; every argument is a number.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid_a, pid_b, KCMP_FILE, fd_a, fd_b) };
    (r >= 0).then_some(r == 0)
}

/// Raises the open-file limit as far as allowed: the daemon and the keeper
/// hold every preserved file (thousands), far past the usual 1024. As root
/// the hard limit goes up to `fs.nr_open` too.
pub fn raise_fd_limit() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = libc::rlimit {
        rlim_cur: nr_open.max(lim.rlim_max),
        rlim_max: nr_open.max(lim.rlim_max),
    };
    // SAFETY: want is a valid rlimit; failure (not privileged) is handled below.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; the soft limit may always go up to the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Reaps the child `pid` if it has exited (`waitpid` with `WNOHANG`, which
/// never blocks); whether it was reaped or is no child of ours.
pub fn try_reap(pid: i32) -> bool {
    // SAFETY: waitpid with a null status pointer and WNOHANG never blocks
    // and writes nothing.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) != 0 }
}

/// Sends `signal` to `pid`.
pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(pid, signal) };
}

/// Restores SIGPIPE's default action, so that a command-line tool ends
/// quietly when the reader of its output goes away (`luo status | head`).
pub fn default_sigpipe() {
    // SAFETY: setting a signal disposition to its default has no
    // preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The gid of the group named `name` (`getgrnam(3)`).
///
/// # Errors
/// A sentence if there is no such group.
pub fn group_id(name: &str) -> std::result::Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("{name:?} is no group name"))?;
    // SAFETY: c is a valid C string; the result is read at once, before any
    // other getgr* call.
    let group = unsafe { libc::getgrnam(c.as_ptr()) };
    if group.is_null() {
        return Err(format!("there is no group {name:?}"));
    }
    // SAFETY: getgrnam returned a valid group entry.
    Ok(unsafe { (*group).gr_gid })
}

/// The effective uid of this process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// The soft `RLIMIT_NOFILE`, if it can be read.
pub fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out pointer.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some(lim.rlim_cur)
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes of one
/// boot, unlike [`std::time::Instant`].
pub fn monotonic_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Keeps `fds` open in a detached child (its own session, stdio on
/// `/dev/null`) until something ends it, as a VMM waiting for an update
/// holds its session fds; returns at once in the parent.
///
/// # Errors
/// `fork` failures.
pub fn hold_in_child(fds: Vec<OwnedFd>) -> io::Result<()> {
    // SAFETY: the child makes only async-signal-safe calls (setsid, open,
    // dup2, nanosleep) and never returns, so it is sound in a process with
    // threads too.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let _keep = fds;
            // SAFETY: c"/dev/null" is a valid C string; the calls take no
            // other pointers.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
            }
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        _ => Ok(()),
    }
}

/// Whether this process has one thread: a child forked now may run any
/// code.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Threads:", "1"])
    })
}

/// Forks a child that runs `child` and exits; the child's pid.
///
/// # Errors
/// EAGAIN if this process has other threads (a child could then deadlock
/// on a lock one of them held); `fork` failures.
pub fn fork_single_threaded(child: impl FnOnce()) -> io::Result<i32> {
    if !single_threaded() {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "fork needs a single-threaded process",
        ));
    }
    // SAFETY: the process has one thread, so the child may run ordinary
    // code (allocate, take locks).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            child();
            exit_now(0)
        }
        pid => Ok(pid),
    }
}

/// Ends this process at once, without running destructors or `atexit`
/// handlers (a forked child's way out).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(code) }
}

/// Has the child that `cmd` spawns start its own session (`setsid`).
pub fn new_session_on_spawn(cmd: &mut std::process::Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            Ok(())
        });
    }
}

/// Has the child that `cmd` spawns get SIGKILL when this process dies and
/// find `fd` as its fd 3.
pub fn fd3_and_death_signal_on_spawn(cmd: &mut std::process::Command, fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    // SAFETY: dup2 and prctl are async-signal-safe and touch no memory; the
    // caller keeps `fd` open until the spawn.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::dup2(raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// In a child just started for the daemon: SIGKILL when the daemon dies,
/// `sock` moved to fd 3 and every fd above it closed. Returns fd 3.
pub fn keep_only_fd3(sock: OwnedFd) -> BorrowedFd<'static> {
    // SAFETY: prctl, dup2 and close_range take no pointers; what is closed
    // is this fresh child's copy of the parent's fds, none of which it
    // uses again.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if sock.as_raw_fd() != 3 {
            libc::dup2(sock.as_raw_fd(), 3);
        }
        libc::close_range(4, u32::MAX, 0);
    }
    std::mem::forget(sock);
    // SAFETY: fd 3 is the socket dup'ed above, open for good.
    unsafe { BorrowedFd::borrow_raw(3) }
}

/// The socket a daemon passes a fresh `luo opener` process as fd 3.
///
/// # Errors
/// EBADF if fd 3 is not an open socket.
pub fn take_inherited_fd3() -> io::Result<OwnedFd> {
    // SAFETY: all-zero is a valid `stat` to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer; fstat of any fd number is harmless.
    let open = unsafe { libc::fstat(3, &mut st) } == 0;
    if !open || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: fd 3 is an open socket, and a fresh process (std opens no fd
    // of its own at start) has nothing else that owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(3) })
}

/// Has the child that `cmd` spawns run `f` between fork and exec.
///
/// # Errors
/// EAGAIN if this process has other threads: the child of a
/// multi-threaded process may only make async-signal-safe calls, and `f`
/// may allocate.
pub fn before_exec_single_threaded(
    cmd: &mut std::process::Command,
    f: impl FnMut() -> io::Result<()> + Send + Sync + 'static,
) -> io::Result<()> {
    if !single_threaded() {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "a child that runs code before exec needs a single-threaded process",
        ));
    }
    // SAFETY: the process has one thread, so the child may run ordinary
    // code before exec.
    unsafe { std::os::unix::process::CommandExt::pre_exec(cmd, f) };
    Ok(())
}

/// `prctl(PR_SET_NO_NEW_PRIVS)`: this process and its children can gain
/// no privileges on exec (needed to install a seccomp filter unprivileged).
///
/// # Errors
/// The kernel's.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Calls `statfs(path)` once from each of CPUs `0..cpus`, in a detached
/// grandchild (reaped by init), returning at once: each call is a FUSE
/// request on that CPU's io_uring queue when `path` is on a FUSE mount.
///
/// # Errors
/// `fork` failures.
pub fn statfs_from_each_cpu(path: &std::ffi::CStr, cpus: u16) -> io::Result<()> {
    // SAFETY: both children make only async-signal-safe calls (fork,
    // sched_setaffinity, statfs, _exit) on memory the parent prepared, so
    // this is sound in any process.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: as above: only async-signal-safe calls, on a cpu_set_t
        // and statfs buffer of the child's own stack.
        0 => unsafe {
            if libc::fork() == 0 {
                for cpu in 0..usize::from(cpus) {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0 {
                        let mut st: libc::statfs = std::mem::zeroed();
                        libc::statfs(path.as_ptr(), &mut st);
                    }
                }
            }
            libc::_exit(0)
        },
        pid => {
            // SAFETY: waits for the child just forked, which exits at once.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            Ok(())
        }
    }
}
