//! Safe wrappers for the mount, socket and polling syscalls the daemon uses.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `mount(2)`.
pub fn mount(
    src: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = CString::new(src)?;
    let target = cstring(target)?;
    let fstype = fstype.map(CString::new).transpose()?;
    let data = data.map(CString::new).transpose()?;
    // SAFETY: every pointer is a valid C string or null, alive for the call.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })?;
    Ok(())
}

/// Bind-mounts `src` onto the file at `target` itself, never through a
/// symbolic link: `target` is opened `O_PATH|O_NOFOLLOW` and the mount goes
/// onto that open file (through its `/proc/self/fd` link, which mount(2)
/// resolves to the opened file), so the entry cannot be swapped for a link
/// between a check and the mount. ELOOP if `target` is a symbolic link.
pub fn bind(src: &Path, target: &Path) -> io::Result<()> {
    let fd = open_flags(target, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
    if file_type(fd.as_fd())? == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    let at = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount(&src.to_string_lossy(), &at, None, libc::MS_BIND, None)
}

/// The `S_IFMT` bits of an open file (an `O_PATH` fd too).
fn file_type(fd: BorrowedFd<'_>) -> io::Result<libc::mode_t> {
    // SAFETY: stat is plain data; fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer; fd is open.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT)
}

/// Lazily unmounts `target`, never through a symbolic link
/// (`UMOUNT_NOFOLLOW`: a link at `target` is not followed, and is no mount).
pub fn umount_detach(target: &Path) -> io::Result<()> {
    let t = cstring(target)?;
    // SAFETY: t is a valid C string.
    check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) })?;
    Ok(())
}

/// `getxattr(2)` into a string.
pub fn getxattr(path: &Path, name: &str) -> io::Result<String> {
    let p = cstring(path)?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: p and n are C strings; buf is writable for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    String::from_utf8(buf).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Opens a path read-write and close-on-exec, plus `extra` flags.
pub fn open_rdwr(path: &Path, extra: libc::c_int) -> io::Result<OwnedFd> {
    open_flags(path, libc::O_RDWR | libc::O_CLOEXEC | extra)
}

fn open_flags(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = cstring(path)?;
    // SAFETY: p is a valid C string.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags) })?;
    // SAFETY: open returned a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `st_dev` and `st_ino` of an fd from the cached inode
/// (`statx(AT_STATX_DONT_SYNC)`): on a FUSE file this sends no request, so
/// the daemon can inspect its own files without waiting on itself.
pub fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    file_identity(fd).map(|id| (id.dev, id.ino))
}

/// [`dev_ino`] of a path, opened `O_PATH` so that no filesystem `open` runs.
pub fn path_dev_ino(path: &Path) -> io::Result<(u64, u64)> {
    let fd = open_flags(path, libc::O_PATH | libc::O_CLOEXEC)?;
    dev_ino(std::os::fd::AsFd::as_fd(&fd))
}

/// What identifies an open file to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Its filesystem.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// A character device.
    pub chr: bool,
    /// The device number, for a device.
    pub rdev: u64,
}

/// The identity of an open file, without syncing anything.
pub fn file_identity(fd: BorrowedFd<'_>) -> io::Result<FileIdentity> {
    // SAFETY: all-zero is a valid statx to overwrite.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC;
    // SAFETY: the path is a valid empty C string; stx is a valid out pointer.
    check(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            libc::STATX_INO | libc::STATX_TYPE,
            &mut stx,
        )
    })?;
    Ok(FileIdentity {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        chr: u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFCHR,
        rdev: libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor),
    })
}

/// The device number of the character device at `path`.
pub fn path_rdev(path: &Path) -> io::Result<u64> {
    let fd = open_flags(path, libc::O_PATH | libc::O_CLOEXEC)?;
    let id = file_identity(std::os::fd::AsFd::as_fd(&fd))?;
    if !id.chr {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    Ok(id.rdev)
}

/// The file status flags of an open file description (`F_GETFL`): the
/// access mode, `O_PATH`, `O_NONBLOCK`, ….
pub fn status_flags(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GETFL takes no argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// Sets `O_NONBLOCK` on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take integer arguments.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// The caller's thread id.
pub fn gettid() -> i32 {
    // SAFETY: gettid cannot fail.
    unsafe { libc::gettid() }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd.
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// A signalfd for SIGTERM, SIGINT and SIGHUP, which are blocked for the
/// calling thread (call before spawning threads so they inherit the mask).
pub fn termination_signalfd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the libc calls initialise and fill it.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    let fd = check(fd)?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An epoll instance keyed by u64 tokens.
pub struct Epoll(OwnedFd);

impl Epoll {
    /// A new epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fresh fd we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for input under `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event.
        check(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    /// Watches `fd` (already added under `token`) for room to write instead.
    pub fn watch_output(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLOUT as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event.
        check(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) })?;
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits for events; returns (token, events) pairs.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<Vec<(u64, u32)>> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: evs is writable for 64 entries.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 64, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(vec![])
            } else {
                Err(e)
            };
        }
        Ok(evs[..n as usize]
            .iter()
            .map(|e| (e.u64, e.events))
            .collect())
    }
}

/// Sends `data` and optionally one fd over a unix socket.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(4) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at a buffer of CMSG_SPACE(4) bytes, so the
        // first header and its 4-byte payload fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
        }
    }
    // SAFETY: msg and everything it points at are alive for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and at most one fd from a unix socket.
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(4 * 4) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg and its buffers are alive and writable for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut received = Vec::new();
    // SAFETY: the kernel filled msg_control; we walk it with the CMSG macros
    // and only read SCM_RIGHTS payloads, which are arrays of ints.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>().add(i));
                    received.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // Keep the first fd; extra ones are closed by dropping them.
    Ok((n as usize, received.into_iter().next()))
}

/// [`recv_with_fd`] without blocking: `Ok(None)` when nothing is queued.
pub fn recv_with_fd_nonblocking(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    // SAFETY: poll on one valid pollfd with a zero timeout.
    let ready = unsafe {
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut p, 1, 0)
    };
    if ready <= 0 {
        return Ok(None);
    }
    recv_with_fd(sock, buf).map(Some)
}

/// The peer's pid on a unix socket (`SO_PEERCRED`).
pub fn peer_pid(sock: BorrowedFd<'_>) -> io::Result<i32> {
    peer_cred(sock).map(|c| c.pid)
}

/// The peer's uid on a unix socket (`SO_PEERCRED`).
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    peer_cred(sock).map(|c| c.uid)
}

/// The peer's credentials on a unix socket (`SO_PEERCRED`), as they were
/// when it connected.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are valid out pointers of the right size.
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}

/// The peer's supplementary groups on a unix socket (`SO_PEERGROUPS`).
pub fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: groups/len describe a writable buffer of len bytes.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || len as usize <= groups.len() * 4 {
            return Err(e);
        }
        groups.resize(len as usize / 4, 0);
    }
}

/// Whether `fd` has something to read right now.
pub fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd; a zero timeout never blocks.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
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

/// Waits up to `timeout_ms` for any of `fds` to become readable; which
/// are, or None if none became so in time (or the wait failed).
pub fn poll_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout_ms: i32,
) -> Option<[bool; N]> {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: polled is a valid array of N pollfds.
    let n = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    (n > 0).then(|| polled.map(|p| p.revents != 0))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch dir for mount tests, or None when not root.
    fn scratch(name: &str) -> Option<PathBuf> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (mounts)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("luo-sys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Some(dir)
    }

    fn identity(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn nothing_is_unmounted_through_a_symbolic_link() {
        let Some(dir) = scratch("umount") else { return };
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        mount("tmpfs", &mnt, Some("tmpfs"), 0, None).unwrap();
        let mounted = identity(&mnt);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&mnt, &link).unwrap();
        assert!(umount_detach(&link).is_err());
        assert_eq!(identity(&mnt), mounted, "the tmpfs was unmounted");
        umount_detach(&mnt).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_is_bound_through_a_symbolic_link() {
        let Some(dir) = scratch("bind") else { return };
        let src = dir.join("src");
        std::fs::write(&src, "device").unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let before = identity(&victim);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let bound = bind(&src, &link);
        let after = identity(&victim);
        if after != before {
            let _ = umount_detach(&victim);
        }
        assert_eq!(bound.unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(after, before, "bound over the link's target");
        // The file itself is bound onto, through the fd that was checked.
        let target = dir.join("target");
        std::fs::write(&target, "").unwrap();
        bind(&src, &target).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "device");
        umount_detach(&target).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
