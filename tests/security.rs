//! The daemon never does for a caller what the kernel would refuse it.
//!
//! Each test plays an attacker against a real daemon: an unprivileged process
//! (`nobody`) inside a `luo run` tree, or a root process handing the daemon an
//! fd the kernel would not accept. See `SECURITY.md` for the threat model.

mod client;
mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};

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
    skip_unless_capable!();
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
