//! The daemon never does for a caller what the kernel would refuse it.
//!
//! Each test plays an attacker against a real daemon: an unprivileged process
//! (`nobody`) inside a `luo run` tree, or a root process handing the daemon an
//! fd the kernel would not accept. See `SECURITY.md` for the threat model.

mod client;
mod common;
mod stuck_fuse;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use client::*;

/// `/proc/self/fd/N` of one of our fds.
fn proc_fd(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn memfd_with(data: &[u8]) -> std::fs::File {
    let mut f = std::fs::File::from(memfd());
    f.write_all(data).unwrap();
    f
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_caller_cannot_use_a_device_it_cannot_open"]
fn probe_owner_stage1() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = create(dev.as_raw_fd(), "vm").unwrap();
    let ram = memfd_with(b"guest ram");
    preserve(s.as_raw_fd(), ram.as_raw_fd(), 1).unwrap();
    // A file this process may only read, preserved through a read-only fd.
    let file = memfd_with(b"read only");
    let ro = open_with(
        &format!("/proc/self/fd/{}", file.as_raw_fd()),
        libc::O_RDONLY,
    )
    .unwrap();
    preserve(s.as_raw_fd(), ro.as_raw_fd(), 2).unwrap();
    // An O_PATH fd is no file to preserve (the kernel's fget refuses it).
    let m = memfd();
    let opath = open_with(&proc_fd(&m), libc::O_PATH).unwrap();
    assert_eq!(
        preserve(s.as_raw_fd(), opath.as_raw_fd(), 3),
        Err(libc::EBADF)
    );
    hold_until_update(vec![s, ram.into(), file.into()]);
}

#[test]
#[ignore = "runs under `luo run` as nobody, started by an_unprivileged_caller_cannot_use_a_device_it_cannot_open"]
fn probe_attacker() {
    let Some(path) = probe_device() else { return };
    become_nobody();
    assert_eq!(open(&path).err(), Some(libc::EACCES), "the device is 0600");
    // O_PATH needs no permission; the kernel refuses every ioctl on it.
    let p = open_with(&path, libc::O_PATH).unwrap();
    assert_eq!(create(p.as_raw_fd(), "mine").err(), Some(libc::EBADF));
    assert_eq!(retrieve(p.as_raw_fd(), "vm").err(), Some(libc::EBADF));
    for cmd in [CREATE, RETRIEVE, PRESERVE, RETRIEVE_FD, FINISH, GET_NAME] {
        let mut a = session_args(72, "vm");
        assert_eq!(ioctl(p.as_raw_fd(), cmd, &mut a), Err(libc::EBADF));
    }
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_caller_cannot_use_a_device_it_cannot_open"]
fn probe_owner_stage2() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = retrieve(dev.as_raw_fd(), "vm").unwrap();
    // A session fd reopened O_PATH is refused too.
    let opath = open_with(&proc_fd(&s), libc::O_PATH).unwrap();
    assert_eq!(retrieve_fd(opath.as_raw_fd(), 1).err(), Some(libc::EBADF));
    let mut ram = std::fs::File::from(retrieve_fd(s.as_raw_fd(), 1).unwrap());
    ram.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    ram.read_to_string(&mut back).unwrap();
    assert_eq!(back, "guest ram", "the attacker changed nothing");
    ram.write_all(b"!").unwrap();
    // The read-only file comes back read-only.
    let mut ro = std::fs::File::from(retrieve_fd(s.as_raw_fd(), 2).unwrap());
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { libc::fcntl(ro.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    assert_eq!(
        ro.write(b"x").unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    ro.seek(SeekFrom::Start(0)).unwrap();
    back.clear();
    ro.read_to_string(&mut back).unwrap();
    assert_eq!(back, "read only");
    assert_eq!(retrieve_fd(s.as_raw_fd(), 3).err(), Some(libc::ENOENT));
    let mut fin = [8u8, 0, 0, 0, 0, 0, 0, 0];
    ioctl(s.as_raw_fd(), FINISH, &mut fin).unwrap();
}

#[test]
fn an_unprivileged_caller_cannot_use_a_device_it_cannot_open() {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    daemon.run_probe("probe_owner_stage1");
    let update = daemon.update();
    assert!(
        update.status.success(),
        "{}",
        String::from_utf8_lossy(&update.stderr)
    );
    // Root holds the device open while the attacker tries.
    let holder = open(daemon.device.to_str().unwrap()).unwrap();
    daemon.run_probe("probe_attacker");
    let status = daemon.status_json();
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{status}");
    assert_eq!(sessions[0]["name"], "vm");
    assert_eq!(sessions[0]["retrieved"], false, "{status}");
    drop(holder);
    daemon.run_probe("probe_owner_stage2");
}

// ---- Paths the daemon acts on as root -----------------------------------

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A root-owned 0600 file holding "secret", for an attacker to aim at.
fn victim(dir: &Path) -> PathBuf {
    let victim = dir.join("victim");
    std::fs::write(&victim, "secret").unwrap();
    chmod(&victim, 0o600);
    victim
}

fn assert_untouched(victim: &Path, identity: (u64, u64)) {
    let m = std::fs::symlink_metadata(victim).unwrap();
    assert_eq!((m.dev(), m.ino()), identity, "nothing is mounted over it");
    let bytes = std::fs::read(victim).unwrap();
    assert!(
        bytes == b"secret",
        "written through: it holds {} other bytes",
        bytes.len()
    );
    assert_eq!(m.mode() & 0o7777, 0o600);
}

fn identity(path: &Path) -> (u64, u64) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// Asserts a refused start: non-zero exit and every `words` in its sentence.
fn assert_refused(out: &std::process::Output, words: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the daemon started:\n{err}");
    for w in words {
        assert!(err.contains(w), "{w:?} is not in:\n{err}");
    }
    err
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_link_planted_at_the_journals_temporary_name_is_never_written_through() {
    common::require_capable();
    let dir = common::temp_dir("planted");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let victim = victim(&dir);
    let before = identity(&victim);
    let tmp = state.join("state.tmp");
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    let mut daemon = common::Daemon::start_at(dir.clone(), dir.join("liveupdate"), state.clone());
    let update = daemon.update();
    assert!(update.status.success());
    assert_untouched(&victim, before);
    let image = std::fs::symlink_metadata(state.join("state.img")).unwrap();
    assert!(image.is_file(), "the journal is a file of its own");
    assert_eq!(image.mode() & 0o777, 0o600);
    // Planted again while no daemon runs: the next one rewrites the journal.
    daemon.kill(libc::SIGTERM);
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    daemon.start_again();
    assert!(daemon.update().status.success());
    assert_untouched(&victim, before);
    assert!(std::fs::symlink_metadata(state.join("state.img"))
        .unwrap()
        .is_file());
}

#[test]
fn a_state_dir_another_user_owns_or_may_write_to_is_refused_and_left_alone() {
    common::require_capable();
    let dir = common::temp_dir("owner");
    let victim = victim(&dir);
    let before = identity(&victim);
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::symlink(&victim, state.join("state.tmp")).unwrap();
    let state_s = state.display().to_string();
    for (uid, mode, why) in [
        (65534, 0o755, "is owned by uid 65534, not by root"),
        (65534, 0o700, "is owned by uid 65534, not by root"),
        (0, 0o775, "is writable by its group (mode 0775)"),
        (0, 0o1777, "is writable by its group and others (mode 1777)"),
    ] {
        std::os::unix::fs::lchown(&state, Some(uid), Some(uid)).unwrap();
        chmod(&state, mode);
        let out = common::refused_start(&dir.join("liveupdate"), &state);
        let cannot = format!("cannot use {state_s} as the state dir: {state_s} {why}");
        assert_refused(&out, &[&cannot]);
        // Nothing written, nothing changed.
        assert_eq!(entries(&state), ["state.tmp"]);
        let m = std::fs::symlink_metadata(&state).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (uid, mode));
        assert_untouched(&victim, before);
        assert!(!dir.join("liveupdate").exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_state_dir_reached_through_a_symbolic_link_is_refused() {
    common::require_capable();
    let dir = common::temp_dir("state-link");
    let real = dir.join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for state in [link.clone(), link.join("state")] {
        let out = common::refused_start(&dir.join("liveupdate"), &state);
        let what = format!(
            "cannot use {} as the state dir: {} is a symbolic link (to {})",
            state.display(),
            link.display(),
            real.display()
        );
        assert_refused(&out, &[&what]);
        assert!(entries(&real).is_empty(), "nothing written");
        assert_eq!(std::fs::metadata(&real).unwrap().mode() & 0o7777, 0o755);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tmpfs mounted at a path; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf) -> Tmpfs {
        std::fs::create_dir(&at).unwrap();
        let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: every pointer is a valid C string or null.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        std::fs::write(at.join("marker"), "mounted").unwrap();
        Tmpfs(at)
    }

    fn mounted(&self) -> bool {
        self.0.join("marker").exists()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_device_path_linked_to_a_mount_point_is_refused_and_nothing_unmounted() {
    common::require_capable();
    let dir = common::temp_dir("device-mnt");
    let tmpfs = Tmpfs::mount(dir.join("mnt"));
    let device = dir.join("liveupdate");
    std::os::unix::fs::symlink(&tmpfs.0, &device).unwrap();
    let out = common::refused_start(&device, &dir.join("state"));
    let what = format!(
        "cannot use {} as the device: {} is a symbolic link (to {})",
        device.display(),
        device.display(),
        tmpfs.0.display()
    );
    assert!(tmpfs.mounted(), "the tmpfs was unmounted");
    assert_refused(&out, &[&what]);
    drop(tmpfs);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_path_linked_to_a_root_file_is_refused_and_the_file_untouched() {
    common::require_capable();
    let dir = common::temp_dir("device-file");
    let victim = victim(&dir);
    let before = identity(&victim);
    let device = dir.join("liveupdate");
    std::os::unix::fs::symlink(&victim, &device).unwrap();
    let out = common::refused_start(&device, &dir.join("state"));
    assert_refused(&out, &["as the device", "is a symbolic link"]);
    assert_untouched(&victim, before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_path_in_a_directory_others_may_change_is_refused_unless_sticky() {
    common::require_capable();
    let dir = common::temp_dir("device-dir");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let out = common::refused_start(&open.join("liveupdate"), &dir.join("state"));
    let what = format!(
        "its directory {} is writable by its group and others (mode 0777) and not sticky",
        open.display()
    );
    assert_refused(&out, &["as the device", &what]);
    assert!(entries(&open).is_empty(), "nothing created");
    // A sticky one (like /tmp) is fine: others cannot rename or remove our entry.
    chmod(&open, 0o1777);
    let device = open.join("liveupdate");
    let daemon = common::Daemon::start_at(dir.clone(), device.clone(), dir.join("state"));
    assert!(daemon.status_ok());
    assert!(
        std::fs::metadata(&device).unwrap().is_file(),
        "the device is served"
    );
}

/// A process that binds `socket` as root, then becomes `uid` and listens
/// there, answering every connection as a keeper with nothing would; it
/// reports each request it hears on a pipe.
struct FakeKeeper {
    pid: libc::pid_t,
    heard: OwnedFd,
}

impl FakeKeeper {
    fn start(socket: &Path, uid: libc::uid_t) -> FakeKeeper {
        // Everything the child needs is made before the fork: a child of a
        // threaded process may only make async-signal-safe calls.
        // SAFETY: sockaddr_un is plain data.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = socket.as_os_str().as_encoded_bytes();
        assert!(path.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        let answer = b"{\"ok\":true,\"keys\":[],\"pid\":1}\n";
        let mut ready = [0; 2];
        // SAFETY: ready has room for two fds.
        let piped = unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(piped, 0);
        // SAFETY: the child makes only async-signal-safe calls, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: raw syscalls on plain data prepared above; never returns.
            unsafe { fake_keeper(&addr, uid, ready[1], answer) };
        }
        // SAFETY: the write end is ours to close; the read end is a fresh fd
        // we own.
        let heard = unsafe {
            libc::close(ready[1]);
            OwnedFd::from_raw_fd(ready[0])
        };
        let mut byte = [0u8];
        let mut pipe = std::fs::File::from(heard.try_clone().unwrap());
        pipe.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"r", "the fake keeper listens");
        FakeKeeper { pid, heard }
    }

    /// How many requests it heard so far.
    fn requests_heard(&self) -> usize {
        let mut n = 0;
        while sys_readable(&self.heard) {
            let mut byte = [0u8];
            let mut pipe = std::fs::File::from(self.heard.try_clone().unwrap());
            pipe.read_exact(&mut byte).unwrap();
            n += 1;
        }
        n
    }
}

/// Whether `fd` has something to read right now.
fn sys_readable(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd; a zero timeout never blocks.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

/// The fake keeper's child: bind as root, become `uid`, listen, report ready,
/// then for each connection report a request if one comes and answer.
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn fake_keeper(addr: &libc::sockaddr_un, uid: libc::uid_t, ready: i32, answer: &[u8]) -> ! {
    // SAFETY: the caller is a forked child; every call is async-signal-safe
    // and takes pointers to live data.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let ok = libc::bind(s, (addr as *const libc::sockaddr_un).cast(), len) == 0
            && libc::syscall(libc::SYS_setresgid, uid, uid, uid) == 0
            && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
            && libc::listen(s, 16) == 0;
        if !ok {
            libc::_exit(1);
        }
        libc::write(ready, b"r".as_ptr().cast(), 1);
        let mut buf = [0u8; 4096];
        loop {
            let c = libc::accept(s, std::ptr::null_mut(), std::ptr::null_mut());
            if c < 0 {
                continue;
            }
            let mut p = libc::pollfd {
                fd: c,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut p, 1, 2000) == 1 && libc::read(c, buf.as_mut_ptr().cast(), 4096) > 0
            {
                libc::write(ready, b"h".as_ptr().cast(), 1);
            }
            libc::write(c, answer.as_ptr().cast(), answer.len());
            libc::close(c);
        }
    }
}

impl Drop for FakeKeeper {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child take no pointers.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

#[test]
fn a_keeper_socket_answered_by_another_user_is_refused() {
    common::require_capable();
    let dir = common::temp_dir("fake-keeper");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let socket = state.join("keeper.sock");
    let fake = FakeKeeper::start(&socket, 65534);
    let out = common::refused_start(&dir.join("liveupdate"), &state);
    let what = format!(
        "cannot trust the fd keeper: {} is answered by a process of uid 65534, not by root",
        socket.display()
    );
    assert_eq!(fake.requests_heard(), 0, "the daemon talked to it");
    assert_refused(&out, &[&what]);
    assert!(!dir.join("liveupdate").exists(), "nothing set up");
    assert!(socket.exists(), "its socket is left for the admin to see");
    drop(fake);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- the control socket ---------------------------------------------------

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

/// `luo ARGS --state-dir STATE` as `uid`/`gid`, given at most `limit` to end
/// (killed then): its output, and whether it ended in time.
fn luo_as(uid: u32, gid: u32, args: &[&str], state: &Path, limit: Duration) -> (bool, String) {
    let child = std::process::Command::new(common::LUO)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .uid(uid)
        .gid(gid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let (in_time, out) = match rx.recv_timeout(limit) {
        Ok(out) => (true, out),
        Err(_) => {
            // SAFETY: kill takes no pointers; the child is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (false, rx.recv().unwrap())
        }
    };
    let ok = in_time && out.status.success();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (ok, text)
}

/// `luo status` as root must answer within `limit` while others misbehave.
fn assert_status_answers(daemon: &common::Daemon, limit: Duration) {
    let t = Instant::now();
    let (ok, text) = luo_as(0, 0, &["status"], &daemon.state, limit);
    assert!(ok, "status did not answer within {limit:?}: {text}");
    eprintln!("status answered in {:?}", t.elapsed());
}

#[test]
#[ignore = "runs under `luo run`, started by a_client_that_never_reads_its_answer_stalls_nobody"]
fn probe_many_sessions() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let sessions: Vec<OwnedFd> = (0..3000)
        .map(|i| create(dev.as_raw_fd(), &format!("{i:0>60}")).unwrap())
        .collect();
    hold_until_update(sessions);
}

#[test]
fn a_control_client_that_trickles_its_request_stalls_nobody() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let socket = daemon.state.join("control.sock");
    // One byte every second: the daemon used to wait for each (5 s apiece).
    let slow = UnixStream::connect(&socket).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let trickle = std::thread::spawn(move || {
        for b in br#"{"op":"status"}"# {
            if stop.load(std::sync::atomic::Ordering::Relaxed) || (&slow).write_all(&[*b]).is_err()
            {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    // And one that connects and says nothing at all.
    let _silent = UnixStream::connect(&socket).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_status_answers(&daemon, Duration::from_secs(3));
    assert_status_answers(&daemon, Duration::from_secs(3));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    trickle.join().unwrap();
}

#[test]
fn a_client_that_never_reads_its_answer_stalls_nobody() {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    // An answer far larger than a socket buffer: 3000 sessions.
    daemon.run_probe("probe_many_sessions");
    let socket = daemon.state.join("control.sock");
    let mut idle = Vec::new();
    for _ in 0..3 {
        let s = UnixStream::connect(&socket).unwrap();
        (&s).write_all(b"{\"op\":\"status\"}\n").unwrap();
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_status_answers(&daemon, Duration::from_secs(5));
}

#[test]
fn a_request_without_end_is_cut_off() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let socket = daemon.state.join("control.sock");
    let s = UnixStream::connect(&socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < 50 << 20 {
        match (&s).write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(
        sent < 4 << 20,
        "the daemon took {sent} bytes of a request without a newline"
    );
    // It said why before it closed.
    let mut answer = String::new();
    let _ = (&s).read_to_string(&mut answer);
    assert!(
        answer.contains("without a newline") || answer.is_empty(),
        "{answer}"
    );
    assert_status_answers(&daemon, Duration::from_secs(3));
}

#[test]
fn the_control_socket_serves_root_and_the_status_group_only_status() {
    common::require_capable();
    let daemon = common::Daemon::start_with_args(&["--status-group", "65534"]);
    let state = &daemon.state;
    let long = Duration::from_secs(10);
    let (ok, text) = luo_as(65534, 65534, &["status"], state, long);
    assert!(ok, "the status group may ask for status: {text}");
    for args in [&["update", "--simulate"][..], &["shutdown"]] {
        let (ok, text) = luo_as(65534, 65534, args, state, long);
        assert!(!ok, "{args:?} by the status group: {text}");
        assert!(text.contains("only root may ask that"), "{text}");
    }
    // Neither root nor in the group: cannot even reach the socket.
    let (ok, text) = luo_as(65533, 65533, &["status"], state, long);
    assert!(!ok, "{text}");
    assert!(daemon.status_ok(), "the daemon still serves");
}

#[test]
fn the_control_socket_checks_who_connects_not_only_its_file_mode() {
    common::require_capable();
    let daemon = common::Daemon::start();
    // An administrator opens the socket to everyone by mistake.
    chmod(&daemon.state, 0o711);
    chmod(&daemon.state.join("control.sock"), 0o666);
    let long = Duration::from_secs(10);
    for args in [&["status"][..], &["update", "--simulate"], &["shutdown"]] {
        let (ok, text) = luo_as(65534, 65534, args, &daemon.state, long);
        assert!(!ok, "{args:?} by nobody: {text}");
        assert!(text.contains("control requests need root"), "{text}");
    }
    assert!(daemon.status_ok(), "the daemon still serves");
}

// ---- callers that would stall the daemon -----------------------------------

fn pipe_pair() -> [i32; 2] {
    let mut p = [0; 2];
    // SAFETY: p has room for two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    p
}

/// A page of the stuck filesystem's file, mapped (nothing read yet).
fn stuck_page(path: &str) -> (OwnedFd, *mut u8) {
    let f = open_with(path, libc::O_RDONLY).unwrap();
    // SAFETY: maps 4 KiB of a file we hold; nothing is read until touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (f, p.cast())
}

#[test]
#[ignore = "runs under `luo run`, started by a_caller_on_a_filesystem_that_never_answers_stalls_nobody"]
fn probe_stuck_fuse() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    let s = create(dev.as_raw_fd(), "s").unwrap();
    let file = std::env::var("LUO_STUCK_FILE").unwrap();
    let (f, page) = stuck_page(&file);
    // Its fd: no handler takes it, and nothing asks its filesystem.
    assert_eq!(preserve(s.as_raw_fd(), f.as_raw_fd(), 1), Err(libc::ENOENT));
    // Its pages as an ioctl struct: the daemon gives up on them. (A child
    // asks: the access left waiting holds its address space's lock, so its
    // own next page fault would wait too. That harms only itself.)
    let [r, w] = pipe_pair();
    // SAFETY: the child makes two ioctls, writes their errnos and exits.
    if unsafe { libc::fork() } == 0 {
        let errnos = [
            ioctl_ptr(s.as_raw_fd(), GET_NAME, page).err().unwrap_or(0),
            ioctl_ptr(dev.as_raw_fd(), CREATE, page).err().unwrap_or(0),
        ];
        // SAFETY: writes a live buffer, then ends without unwinding.
        unsafe {
            libc::write(w, errnos.as_ptr().cast(), 8);
            libc::_exit(0);
        }
    }
    let mut errnos = [0i32; 2];
    // SAFETY: reads into a live buffer of its own length.
    assert_eq!(unsafe { libc::read(r, errnos.as_mut_ptr().cast(), 8) }, 8);
    assert_eq!(errnos, [libc::EFAULT; 2], "through FUSE, and trapped");
    // And serves us as ever.
    let m = memfd();
    preserve(s.as_raw_fd(), m.as_raw_fd(), 2).unwrap();
    assert_eq!(get_name(s.as_raw_fd()).unwrap(), "s");
    // Closing it would wait on the server too (FLUSH); the test's end
    // aborts the filesystem, and then this process can exit.
    std::mem::forget(f);
}

#[test]
fn a_caller_on_a_filesystem_that_never_answers_stalls_nobody() {
    common::require_capable();
    let mut daemon = common::Daemon::start();
    let fs = stuck_fuse::StuckFs::mount(&daemon.dir.join("stuck"));
    let mut probe = daemon.probe_command("probe_stuck_fuse");
    probe.env("LUO_STUCK_FILE", fs.file());
    probe.stdout(std::process::Stdio::piped());
    let mut child = probe.spawn().unwrap();
    // The probe's own closes of the stuck file wait until the filesystem
    // goes away: read its verdict, then abort the filesystem, then reap it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while !text.contains("test result") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => text.push_str(&(line + "\n")),
            Err(_) => {
                let _ = child.kill();
                panic!("the daemon stalled on the stuck filesystem:\n{text}");
            }
        }
    }
    assert!(text.contains("1 passed"), "{text}");
    assert!(daemon.alive(), "the daemon died");
    assert_status_answers(&daemon, Duration::from_secs(3));
    assert!(
        fs.ignored.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the daemon never touched the stuck file: the test tested nothing"
    );
    drop(fs);
    assert!(child.wait().unwrap().success());
}

// ---- Limits per owner ---------------------------------------------------

/// Sessions created (each kept) until one fails; returns them and the errno.
fn create_until_refused(dev: i32, prefix: &str) -> (Vec<OwnedFd>, i32) {
    let mut made = Vec::new();
    loop {
        match create(dev, &format!("{prefix}{}", made.len() + 1)) {
            Ok(s) => made.push(s),
            Err(e) => return (made, e),
        }
        assert!(made.len() < 1000, "no limit");
    }
}

/// Fresh memfds preserved into `session` until one fails; returns them, the
/// refused memfd (still ours) and the errno.
fn preserve_until_refused(session: i32, first_token: u64) -> (Vec<OwnedFd>, OwnedFd, i32) {
    let mut done = Vec::new();
    loop {
        let m = memfd_with(b"ours").into();
        let token = first_token + done.len() as u64;
        match preserve(session, std::os::fd::AsRawFd::as_raw_fd(&m), token) {
            Ok(()) => done.push(m),
            Err(e) => return (done, m, e),
        }
        assert!(done.len() < 1000, "no limit");
    }
}

/// Keeps `fds` open until the update, without the device (which only one
/// process may have open at a time): `dev` is this process's copy, closed
/// first so that the holder does not inherit it.
fn hold_without_device(dev: i32, fds: Vec<OwnedFd>) {
    // SAFETY: closing our own fd, which no one uses after this.
    unsafe { libc::close(dev) };
    hold_until_update(fds);
}

/// The refused memfd is still the caller's, with what it held.
fn assert_still_ours(m: OwnedFd) {
    let mut f = std::fs::File::from(m);
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "ours");
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_stops_exactly_at_its_limits_and_root_does_not"]
fn probe_nobody_to_its_limits() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    let d = dev.as_raw_fd();
    let (mut sessions, err) = create_until_refused(d, "n");
    assert_eq!((sessions.len(), err), (3, libc::EMFILE), "sessions");
    let (mut files, refused, err) = preserve_until_refused(sessions[0].as_raw_fd(), 1);
    assert_eq!((files.len(), err), (5, libc::ENOSPC), "files");
    assert_still_ours(refused);
    // Into another of its sessions, too: the files count per uid.
    let (more, _, err) = preserve_until_refused(sessions[1].as_raw_fd(), 1);
    assert_eq!((more.len(), err), (0, libc::ENOSPC));
    // Nothing was lost: every session is there, with its name.
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(get_name(s.as_raw_fd()).unwrap(), format!("n{}", i + 1));
    }
    // A session closed makes room at once (the close is seen first).
    drop(sessions.pop());
    let again = create(d, "again").unwrap();
    assert_eq!(create(d, "over").err(), Some(libc::EMFILE));
    drop(again);
    // Kept: 2 sessions, 5 files.
    files.extend(sessions);
    hold_without_device(dev.into_raw_fd(), files);
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_stops_exactly_at_its_limits_and_root_does_not"]
fn probe_root_past_the_limits() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let tag = std::process::id();
    let mut keep = Vec::new();
    for i in 0..6 {
        keep.push(create(dev.as_raw_fd(), &format!("root-{tag}-{i}")).unwrap());
    }
    let s = keep[0].as_raw_fd();
    for token in 0..8 {
        let m = memfd();
        preserve(s, m.as_raw_fd(), token).unwrap();
        keep.push(m);
    }
    hold_without_device(dev.into_raw_fd(), keep);
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_stops_exactly_at_its_limits_and_root_does_not"]
fn probe_nobody_after_restart() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    // Its 2 sessions and 5 files from before the restart still count.
    let d = dev.as_raw_fd();
    let (sessions, err) = create_until_refused(d, "after");
    assert_eq!((sessions.len(), err), (1, libc::EMFILE), "sessions");
    let (files, refused, err) = preserve_until_refused(sessions[0].as_raw_fd(), 1);
    assert_eq!((files.len(), err), (0, libc::ENOSPC), "files");
    assert_still_ours(refused);
}

#[test]
fn an_unprivileged_owner_stops_exactly_at_its_limits_and_root_does_not() {
    common::require_capable();
    let mut daemon = common::Daemon::start_with_args(&[
        "--max-sessions-per-uid",
        "3",
        "--max-files-per-uid",
        "5",
    ]);
    daemon.run_probe("probe_nobody_to_its_limits");
    daemon.run_probe("probe_root_past_the_limits");
    let log = daemon.log();
    for line in [
        ", uid 65534 is at its limit of 3 sessions per uid; refused with EMFILE \
         (--max-sessions-per-uid)",
        ", uid 65534 is at its limit of 5 files per uid; refused with ENOSPC \
         (--max-files-per-uid)",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    assert!(log.contains("luo run tree of pid "), "{log}");
    // The owners are in the journal: a restarted daemon counts them again.
    daemon.restart_after(libc::SIGKILL);
    daemon.run_probe("probe_nobody_after_restart");
    daemon.run_probe("probe_root_past_the_limits");
    let sessions = daemon.status_json()["sessions"].as_array().unwrap().len();
    assert_eq!(sessions, 2 + 6 + 6, "nobody's 2, root's 6 twice");
}

#[test]
#[ignore = "runs under `luo run`, started by a_luo_run_tree_stops_at_its_limits_whatever_uids_it_runs_as"]
fn probe_two_uids_in_one_tree() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let d = dev.as_raw_fd();
    in_child_as(65534, || {
        let a = create(d, "a1").unwrap();
        let b = create(d, "a2").unwrap();
        let mut keep = Vec::new();
        for token in 0..2 {
            let m = memfd();
            preserve(a.as_raw_fd(), m.as_raw_fd(), token).unwrap();
            keep.push(m);
        }
        keep.extend([a, b]);
        hold_without_device(d, keep);
    });
    in_child_as(65533, || {
        // The tree holds 2 sessions and 2 files of uid 65534.
        let (sessions, err) = create_until_refused(d, "b");
        assert_eq!(
            (sessions.len(), err),
            (1, libc::EMFILE),
            "sessions per tree"
        );
        let (mut files, refused, err) = preserve_until_refused(sessions[0].as_raw_fd(), 1);
        assert_eq!((files.len(), err), (2, libc::ENOSPC), "files per tree");
        assert_still_ours(refused);
        files.extend(sessions);
        hold_without_device(d, files);
    });
    // Root in the same tree is not limited.
    let r = create(d, "root").unwrap();
    let m = memfd();
    preserve(r.as_raw_fd(), m.as_raw_fd(), 1).unwrap();
    hold_without_device(dev.into_raw_fd(), vec![r, m]);
}

#[test]
#[ignore = "runs under `luo run`, started by a_luo_run_tree_stops_at_its_limits_whatever_uids_it_runs_as"]
fn probe_another_tree() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_uid(65533);
    let (sessions, err) = create_until_refused(dev.as_raw_fd(), "c");
    assert_eq!(
        (sessions.len(), err),
        (3, libc::EMFILE),
        "a tree of its own"
    );
}

#[test]
fn a_luo_run_tree_stops_at_its_limits_whatever_uids_it_runs_as() {
    common::require_capable();
    let mut daemon = common::Daemon::start_with_args(&[
        "--max-sessions-per-tree",
        "3",
        "--max-files-per-tree",
        "4",
    ]);
    daemon.run_probe("probe_two_uids_in_one_tree");
    daemon.run_probe("probe_another_tree");
    let log = daemon.log();
    for line in [
        "is at its limit of 3 sessions per tree (uid 65533 asked); refused with EMFILE \
         (--max-sessions-per-tree)",
        "is at its limit of 4 files per tree (uid 65533 asked); refused with ENOSPC \
         (--max-files-per-tree)",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
}

/// `comm` of this test binary: its file name, cut to 15 bytes.
fn own_comm() -> String {
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    name.chars().take(15).collect()
}

#[test]
#[ignore = "runs under `luo run`, started by an_update_refused_by_a_resized_memfd_names_the_tree_that_blocks_it"]
fn probe_nobody_resizes_what_it_preserved() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    let s = create(dev.as_raw_fd(), "vetoed").unwrap();
    let m = memfd();
    preserve(s.as_raw_fd(), m.as_raw_fd(), 0x77).unwrap();
    // SAFETY: ftruncate takes no pointers.
    assert_eq!(unsafe { libc::ftruncate(m.as_raw_fd(), 4096) }, 0);
    println!("TREE ROOT PID {}", std::process::id());
    hold_without_device(dev.into_raw_fd(), vec![s, m]);
}

#[test]
fn an_update_refused_by_a_resized_memfd_names_the_tree_that_blocks_it() {
    common::require_capable();
    let daemon = common::Daemon::start();
    let out = daemon
        .probe_command("probe_nobody_resizes_what_it_preserved")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let pid: i32 = text
        .lines()
        .find_map(|l| l.split("TREE ROOT PID ").nth(1))
        .unwrap_or_else(|| panic!("no pid in:\n{text}"))
        .parse()
        .unwrap();
    let update = daemon.update();
    assert!(!update.status.success());
    let err = String::from_utf8_lossy(&update.stderr);
    let names = format!(
        "session vetoed (luo run tree of pid {pid} `{}`, uid 65534) token 0x77 (memfd-v1) \
         refused the freeze: EPERM",
        own_comm()
    );
    assert!(err.contains(&names), "no {names:?} in:\n{err}");
    assert!(err.contains("resized after it was preserved"), "{err}");
    assert_eq!(daemon.status_json()["epoch"], 0);
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_never_takes_the_fds_kept_for_root"]
fn probe_nobody_to_the_fd_reserve() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    let s = create(dev.as_raw_fd(), "many").unwrap();
    let (mut files, refused, err) = preserve_until_refused(s.as_raw_fd(), 1);
    assert_eq!(err, libc::ENOSPC);
    // 1300 fds, 1024 kept for root: each file is budgeted two of the rest.
    assert!((50..=138).contains(&files.len()), "{}", files.len());
    assert_still_ours(refused);
    files.push(s);
    hold_without_device(dev.into_raw_fd(), files);
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_never_takes_the_fds_kept_for_root"]
fn probe_root_into_the_reserve() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    let s = create(dev.as_raw_fd(), "root").unwrap();
    let mut keep = Vec::new();
    for token in 0..400 {
        let m = memfd();
        preserve(s.as_raw_fd(), m.as_raw_fd(), token).unwrap();
        keep.push(m);
    }
    keep.push(s);
    hold_without_device(dev.into_raw_fd(), keep);
}

#[test]
#[ignore = "runs under `luo run`, started by an_unprivileged_owner_never_takes_the_fds_kept_for_root"]
fn probe_nobody_finds_no_room() {
    let Some(path) = probe_device() else { return };
    let dev = open(&path).unwrap();
    become_nobody();
    let s = create(dev.as_raw_fd(), "late").unwrap();
    let (files, refused, err) = preserve_until_refused(s.as_raw_fd(), 1);
    assert_eq!((files.len(), err), (0, libc::ENOSPC));
    assert_still_ours(refused);
}

#[test]
fn an_unprivileged_owner_never_takes_the_fds_kept_for_root() {
    common::require_capable();
    let mut daemon = common::Daemon::start_with_fd_limit(Some(1300), &[]);
    // Without CAP_SYS_RESOURCE the daemon keeps the limit it was given.
    assert_eq!(daemon.fd_limit(), 1300, "the daemon raised its fd limit");
    daemon.run_probe("probe_nobody_to_the_fd_reserve");
    // Root preserves past the ceiling, into the reserve.
    daemon.run_probe("probe_root_into_the_reserve");
    daemon.run_probe("probe_nobody_finds_no_room");
    let log = daemon.log();
    assert!(
        log.contains(", 276 of 1300 fds (the rest kept for root)"),
        "{log}"
    );
    let line = "uid 65534: the files of non-root owners may come to need ";
    assert!(log.contains(line), "no {line:?} in:\n{log}");
    assert!(log.contains("reserve kept for root; refused with ENOSPC (RLIMIT_NOFILE)"));
}
