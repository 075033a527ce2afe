//! Bad input against the real daemon over FUSE and seccomp: every ioctl is
//! answered with the kernel's errno and the daemon keeps running.
//!
//! The outer tests start a daemon and re-run this test binary under `luo run`
//! with `LUO_PROBE_DEVICE` set; the `probe_*` functions (ignored otherwise) do
//! the ioctls from inside the supervised tree.

mod client;
mod common;

use client::*;

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

#[test]
#[ignore = "runs under `luo run`, started by bad_input_gets_the_kernels_errno"]
fn probe_errnos() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let d = dev.as_raw_fd();
    assert_eq!(open(&path).err(), Some(libc::EBUSY), "exclusive open");

    // Device ioctl decoding.
    assert_eq!(
        ioctl(d, 0xBA02, &mut session_args(72, "x")),
        Err(libc::EINVAL),
        "nr out of range"
    );
    assert_eq!(
        ioctl(d, 0xC048_BA00, &mut session_args(72, "x")),
        Err(libc::ENOTTY),
        "other encoding"
    );
    assert_eq!(
        ioctl(d, CREATE, &mut session_args(71, "x")),
        Err(libc::EINVAL),
        "size too small"
    );
    assert_eq!(
        ioctl(d, CREATE, &mut session_args(0, "x")),
        Err(libc::EINVAL),
        "size zero"
    );
    let mut big = session_args(80, "big");
    big.resize(80, 0);
    assert!(
        ioctl(d, CREATE, &mut big).is_ok(),
        "larger struct, zero tail"
    );
    let mut tail = session_args(80, "tail");
    tail.resize(80, 0);
    tail[79] = 1;
    assert_eq!(
        ioctl(d, CREATE, &mut tail),
        Err(libc::E2BIG),
        "non-zero tail"
    );
    assert_eq!(
        ioctl_ptr(d, CREATE, 8 as *mut u8),
        Err(libc::EFAULT),
        "unreadable pointer"
    );
    assert_eq!(
        ioctl_ptr(d, CREATE, struct_at_page_end(16)),
        Err(libc::EFAULT),
        "struct runs off the map"
    );
    assert_eq!(
        ioctl(d, CREATE, &mut session_args(72, "")),
        Err(libc::EINVAL),
        "empty name"
    );
    let mut nonul = session_args(72, "");
    nonul[8..].fill(b'X');
    assert_eq!(ioctl(d, CREATE, &mut nonul), Err(libc::EINVAL), "no NUL");
    assert_eq!(
        ioctl(d, RETRIEVE, &mut session_args(72, "nope")),
        Err(libc::ENOENT),
        "unknown incoming"
    );

    // Session ioctls.
    let s = create(d, "probe").unwrap();
    let sf = s.as_raw_fd();
    assert_eq!(create(d, "probe").err(), Some(libc::EEXIST));
    assert_eq!(
        ioctl(sf, RETRIEVE_FD, &mut fd_args(-1, 1)),
        Err(libc::EINVAL),
        "retrieve on outgoing"
    );
    assert_eq!(
        ioctl(sf, FINISH, &mut [8, 0, 0, 0, 0, 0, 0, 0]),
        Err(libc::EINVAL),
        "finish on outgoing"
    );
    assert_eq!(
        ioctl(sf, 0xBA44, &mut fd_args(0, 0)),
        Err(libc::EINVAL),
        "session nr out of range"
    );
    assert_eq!(
        ioctl(sf, 0xBA3F, &mut fd_args(0, 0)),
        Err(libc::EINVAL),
        "below session base"
    );
    let mut gn = vec![0u8; 72];
    gn[..4].copy_from_slice(&72u32.to_ne_bytes());
    gn[4] = 1;
    assert_eq!(ioctl(sf, GET_NAME, &mut gn), Err(libc::EINVAL), "reserved");
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(-1, 1)),
        Err(libc::EBADF),
        "bad fd"
    );
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(100_000, 1)),
        Err(libc::EBADF),
        "closed fd"
    );
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(sf, 1)),
        Err(libc::ENOENT),
        "a session fd"
    );
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(d, 1)),
        Err(libc::ENOENT),
        "the device fd"
    );
    let null = open("/dev/null").unwrap();
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(null.as_raw_fd(), 1)),
        Err(libc::ENOENT),
        "/dev/null"
    );
    let m = memfd();
    assert!(ioctl(sf, PRESERVE, &mut fd_args(m.as_raw_fd(), 1)).is_ok());
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(m.as_raw_fd(), 1)),
        Err(libc::EEXIST),
        "token reuse"
    );
    assert_eq!(
        ioctl(sf, PRESERVE, &mut fd_args(m.as_raw_fd(), 2)),
        Err(libc::EBUSY),
        "double preserve"
    );
    assert_eq!(get_name(sf).unwrap(), "probe");

    // A trapped ioctl on an fd that is not ours reaches its own driver.
    assert_eq!(
        ioctl(null.as_raw_fd(), CREATE, &mut session_args(72, "x")),
        Err(libc::ENOTTY)
    );
}

#[test]
#[ignore = "runs under `luo run`, started by incoming_sessions_follow_the_kernel"]
fn probe_incoming_stage1() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = create(dev.as_raw_fd(), "carried").unwrap();
    let m = memfd();
    // SAFETY: writes 5 bytes from a live buffer.
    let written = unsafe { libc::write(m.as_raw_fd(), b"guest".as_ptr().cast(), 5) };
    assert_eq!(written, 5);
    ioctl(s.as_raw_fd(), PRESERVE, &mut fd_args(m.as_raw_fd(), 1)).unwrap();
    hold_until_update(vec![s]);
}

#[test]
#[ignore = "runs under `luo run`, started by a refused freeze test"]
fn probe_resized_stage1() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = create(dev.as_raw_fd(), "resized").unwrap();
    let m = memfd();
    ioctl(s.as_raw_fd(), PRESERVE, &mut fd_args(m.as_raw_fd(), 0x77)).unwrap();
    // The kernel would refuse this with EPERM; here the freeze refuses it.
    // SAFETY: ftruncate takes no pointers.
    assert_eq!(unsafe { libc::ftruncate(m.as_raw_fd(), 4096) }, 0);
    hold_until_update(vec![s, m]);
}

#[test]
#[ignore = "runs under `luo run`, started by incoming_sessions_follow_the_kernel"]
fn probe_incoming_stage2() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let d = dev.as_raw_fd();

    let mut r = session_args(72, "carried");
    ioctl(d, RETRIEVE, &mut r).unwrap();
    // SAFETY: the ioctl returned a new fd that we now own.
    let inc = unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(r[4..8].try_into().unwrap())) };
    let i = inc.as_raw_fd();
    assert_eq!(get_name(i).unwrap(), "carried");
    assert_eq!(
        ioctl(d, RETRIEVE, &mut session_args(72, "carried")),
        Err(libc::EINVAL),
        "retrieved twice"
    );
    assert_eq!(
        ioctl(i, PRESERVE, &mut fd_args(memfd().as_raw_fd(), 9)),
        Err(libc::EINVAL),
        "preserve on incoming"
    );
    assert_eq!(
        ioctl(i, RETRIEVE_FD, &mut fd_args(-1, 99)),
        Err(libc::ENOENT),
        "unknown token"
    );
    let mut a = fd_args(-1, 1);
    ioctl(i, RETRIEVE_FD, &mut a).unwrap();
    let mut b = fd_args(-1, 1);
    ioctl(i, RETRIEVE_FD, &mut b).unwrap();
    let fa = i32::from_ne_bytes(a[4..8].try_into().unwrap());
    let fb = i32::from_ne_bytes(b[4..8].try_into().unwrap());
    assert_ne!(fa, fb);
    // A second retrieve returns the same open file: a seek on one moves the other.
    // SAFETY: lseek takes no pointers.
    let (sa, sb) = unsafe {
        (
            libc::lseek(fa, 2, libc::SEEK_SET),
            libc::lseek(fb, 0, libc::SEEK_CUR),
        )
    };
    assert_eq!((sa, sb), (2, 2));
    let mut back = [0u8; 8];
    // SAFETY: reads into a live buffer of its own length.
    let n = unsafe { libc::pread(fa, back.as_mut_ptr().cast(), back.len(), 0) };
    assert_eq!(&back[..n as usize], b"guest");
    let mut fin = [8u8, 0, 0, 0, 1, 0, 0, 0];
    assert_eq!(
        ioctl(i, FINISH, &mut fin),
        Err(libc::EINVAL),
        "finish with reserved set"
    );
    fin[4] = 0;
    assert!(ioctl(i, FINISH, &mut fin).is_ok());
    drop(inc);
    // A finished, closed incoming session is gone.
    assert_eq!(
        ioctl(d, RETRIEVE, &mut session_args(72, "carried")),
        Err(libc::ENOENT)
    );
}

#[test]
#[ignore = "runs under `luo run`, started by session_fd_lifetime_follows_the_kernel"]
fn probe_lifetime() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let d = dev.as_raw_fd();
    // dup: the session lives while any copy does.
    let s = create(d, "life").unwrap();
    // SAFETY: dup takes no pointers.
    let copy = unsafe { OwnedFd::from_raw_fd(libc::dup(s.as_raw_fd())) };
    drop(s);
    assert_eq!(get_name(copy.as_raw_fd()).unwrap(), "life");
    assert_eq!(
        create(d, "life").err(),
        Some(libc::EEXIST),
        "still alive through the dup"
    );
    drop(copy);
    // A close followed at once by a create of the same name succeeds.
    for _ in 0..200 {
        drop(create(d, "life").unwrap());
    }
    // SCM_RIGHTS: the receiver's copy keeps it alive and works.
    let s = create(d, "passed").unwrap();
    let mut sv = [0; 2];
    // SAFETY: sv has room for two fds.
    let made = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) };
    assert_eq!(made, 0);
    send_fd(sv[0], s.as_raw_fd());
    drop(s);
    let got = recv_fd(sv[1]);
    assert_eq!(get_name(got.as_raw_fd()).unwrap(), "passed");
    // Closing the device lets the next open in at once.
    drop(dev);
    let dev = open(&path).unwrap();
    drop(got);
    assert!(create(dev.as_raw_fd(), "passed").is_ok());
}

fn send_fd(sock: RawFd, fd: RawFd) {
    // SAFETY: both fds stay open for the duration of the call.
    let (sock, fd) = unsafe { (BorrowedFd::borrow_raw(sock), BorrowedFd::borrow_raw(fd)) };
    luo_cuse_dev::sys::send_with_fd(sock, b"x", Some(fd)).unwrap();
}

fn recv_fd(sock: RawFd) -> OwnedFd {
    // SAFETY: sock stays open for the duration of the call.
    let sock = unsafe { BorrowedFd::borrow_raw(sock) };
    let mut byte = [0u8; 1];
    luo_cuse_dev::sys::recv_with_fd(sock, &mut byte)
        .unwrap()
        .1
        .expect("an fd arrived")
}

#[test]
#[ignore = "runs under `luo run`, started by killed_clients_lose_nothing_and_leak_nothing"]
fn probe_killed_client() {
    const ROUNDS: u64 = 60;
    let Some(path) = probe_device() else { return };
    for round in 0..ROUNDS {
        // SAFETY: fork in a test process; the child only does ioctls and _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let dev = open(&path).unwrap();
            let mut keep = Vec::new();
            for i in 0.. {
                if let Ok(s) = create(dev.as_raw_fd(), &format!("k{round}-{i}")) {
                    keep.push(s);
                }
            }
            unreachable!();
        }
        std::thread::sleep(Duration::from_micros(200 + 300 * (round % 10)));
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    // Every session of the killed children is gone: the names are free again.
    let dev = open(&path).unwrap();
    for round in 0..ROUNDS {
        for i in 0..50 {
            let s = create(dev.as_raw_fd(), &format!("k{round}-{i}"));
            assert!(s.is_ok(), "k{round}-{i} leaked: {s:?}");
        }
    }
}

fn run_probe(name: &str) {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    run_probe_on(&mut daemon, name);
}

fn run_probe_on(daemon: &mut common::Daemon, name: &str) {
    daemon.run_probe(name);
}

#[test]
fn bad_input_gets_the_kernels_errno() {
    run_probe("probe_errnos");
}

#[test]
fn incoming_sessions_follow_the_kernel() {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    run_probe_on(&mut daemon, "probe_incoming_stage1");
    let update = daemon.update();
    assert!(
        update.status.success(),
        "update failed: {}",
        String::from_utf8_lossy(&update.stderr)
    );
    assert!(String::from_utf8_lossy(&update.stdout).contains("1 processes of the old epoch ended"));
    run_probe_on(&mut daemon, "probe_incoming_stage2");
}

#[test]
fn a_refused_freeze_changes_nothing() {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    run_probe_on(&mut daemon, "probe_resized_stage1");
    let update = daemon.update();
    assert!(!update.status.success());
    let err = String::from_utf8_lossy(&update.stderr);
    assert!(err.contains("update aborted, nothing changed"), "{err}");
    assert!(err.contains("token 0x77") && err.contains("EPERM"), "{err}");
    // It names whose session refused: the tree it was made in and the uid.
    assert!(
        err.contains("session resized (luo run tree of pid "),
        "{err}"
    );
    assert!(err.contains(", uid 0) token 0x77 (memfd-v1)"), "{err}");
    let status = daemon.status_json();
    assert_eq!(status["epoch"], 0);
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["direction"], "outgoing");
    assert_eq!(sessions[0]["files"].as_array().unwrap().len(), 1);
    // The holder was thawed, not killed: its session is still alive after a while.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len(),
        1
    );
}

#[test]
fn session_fd_lifetime_follows_the_kernel() {
    run_probe("probe_lifetime");
}

#[test]
fn killed_clients_lose_nothing_and_leak_nothing() {
    run_probe("probe_killed_client");
}

#[test]
fn fd_returning_ioctls_outside_luo_run_are_refused_clearly() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let dev = open(daemon.device.to_str().unwrap()).unwrap();
    assert_eq!(
        create(dev.as_raw_fd(), "outside").err(),
        Some(libc::EOPNOTSUPP)
    );
    // Nothing was created.
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len(),
        0
    );
}

#[test]
fn status_fails_with_a_sentence_when_no_daemon_answers() {
    let out = std::process::Command::new(common::LUO)
        .args(["status", "--state-dir", "/nonexistent/luo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no daemon answers at /nonexistent/luo/control.sock"));
}

#[test]
fn a_finished_luo_run_tree_is_let_go() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let out = daemon.run(&["true"], &[]);
    assert!(out.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while daemon.status_json()["luo_run_trees"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon still serves a finished luo run tree"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bench_measures_every_ioctl_on_the_daemon() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let out = std::process::Command::new(common::LUO)
        .args(["bench", "--calls", "20", "--sizes-kib", "4,1024"])
        .args(["--sessions", "20", "--files", "20", "--device"])
        .arg(&daemon.device)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in [
        "CREATE_SESSION",
        "SESSION_PRESERVE_FD",
        "SESSION_GET_NAME",
        "SESSION_RETRIEVE_FD",
        "PRESERVE_FD 4 KiB",
        "RETRIEVE_FD 1 MiB",
        "20 sessions: CREATE_SESSION + PRESERVE_FD each",
        "RETRIEVE_SESSION",
        "SESSION_FINISH",
        "20 sessions: RETRIEVE_SESSION + FINISH each",
        "20 files: PRESERVE_FD each",
        "20 files: RETRIEVE_FD each",
    ] {
        assert!(text.contains(&format!("| {op} |")), "no {op} row:\n{text}");
    }
}

const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;

/// `fstatfs(fd, buf)`: the filesystem type, or the errno.
fn try_fstatfs(fd: RawFd, buf: *mut libc::statfs) -> Result<i64, i32> {
    // SAFETY: the kernel checks fd and buf (a bad one fails with EFAULT);
    // a good buf is an out pointer of the right type.
    if unsafe { libc::fstatfs(fd, buf) } != 0 {
        return Err(errno());
    }
    // SAFETY: the call succeeded, so buf was valid and is now filled.
    Ok(unsafe { (*buf).f_type })
}

fn fstatfs_type(fd: RawFd) -> i64 {
    // SAFETY: all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    try_fstatfs(fd, &mut st).expect("fstatfs")
}

fn statfs_type(path: &str) -> i64 {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a C string, st an out pointer of the right type.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statfs {path}");
    st.f_type
}

#[test]
#[ignore = "runs under `luo run`, started by session_fds_look_like_the_kernels"]
fn probe_session_fd_identity() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = create(dev.as_raw_fd(), "systemd-like").unwrap();
    let m = memfd();
    // What systemd's fd_is_luo_session() asks: the filesystem, then the name.
    assert_eq!(fstatfs_type(s.as_raw_fd()), ANON_INODE_FS_MAGIC);
    assert_eq!(get_name(s.as_raw_fd()).unwrap(), "systemd-like");
    // The same for the paths that name the fd, and for an incoming session.
    let me = std::process::id();
    for p in [
        format!("/proc/self/fd/{}", s.as_raw_fd()),
        format!("/dev/fd/{}", s.as_raw_fd()),
        format!("/proc/{me}/fd/{}", s.as_raw_fd()),
    ] {
        assert_eq!(statfs_type(&p), ANON_INODE_FS_MAGIC, "{p}");
    }
    // Every other file keeps its own filesystem: a memfd, the device, a
    // directory, the path of another fd.
    let tmpfs = 0x0102_1994;
    assert_eq!(fstatfs_type(m.as_raw_fd()), tmpfs);
    assert_eq!(
        statfs_type(&format!("/proc/self/fd/{}", m.as_raw_fd())),
        tmpfs
    );
    assert_ne!(fstatfs_type(dev.as_raw_fd()), ANON_INODE_FS_MAGIC);
    assert_eq!(statfs_type("/proc"), 0x9fa0);
    // A bad fd or pointer fails as the kernel's call does.
    let bad = std::ptr::dangling_mut::<libc::statfs>();
    assert_eq!(try_fstatfs(9999, std::ptr::null_mut()), Err(libc::EBADF));
    assert_eq!(try_fstatfs(s.as_raw_fd(), bad), Err(libc::EFAULT));
    assert_eq!(try_fstatfs(m.as_raw_fd(), bad), Err(libc::EFAULT));
}

#[test]
fn session_fds_look_like_the_kernels() {
    run_probe("probe_session_fd_identity");
}
