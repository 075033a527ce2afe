//! Faults from outside: the daemon's state dir fills up. A change whose
//! record cannot be saved is refused with ENOSPC and never acknowledged;
//! everything acknowledged before survives a SIGKILL and restart; the daemon
//! takes changes again by itself once there is room.

mod client;
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use client::{create, fd_args, ioctl, probe_device};
use common::{temp_dir, Daemon};

const PRESERVE: u64 = 0xBA40;
/// More sessions than a 1 MiB state dir can record.
const MAX_SESSIONS: u64 = 50_000;
/// Calls a client makes after the first refusal.
const RETRIES: u64 = 3000;

fn memfd(token: u64) -> OwnedFd {
    // SAFETY: the name is a valid C string.
    let m = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"fill".as_ptr(), 0)) };
    let data = token.to_le_bytes();
    // SAFETY: writes 8 bytes from a live buffer.
    let written = unsafe { libc::write(m.as_raw_fd(), data.as_ptr().cast(), 8) };
    assert_eq!(written, 8);
    m
}

/// One session holding one memfd, or the errno that refused it (a session
/// whose file was refused is closed again).
fn session_with_file(dev: &OwnedFd, name: &str, token: u64) -> Result<OwnedFd, i32> {
    let s = create(dev.as_raw_fd(), name)?;
    let m = memfd(token);
    ioctl(s.as_raw_fd(), PRESERVE, &mut fd_args(m.as_raw_fd(), token))?;
    Ok(s)
}

fn open_device(path: &str) -> OwnedFd {
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    OwnedFd::from(f)
}

#[test]
#[ignore = "runs under `luo run`, started by a_full_state_dir_refuses_changes_and_loses_nothing"]
fn probe_fill() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let mut held = Vec::new();
    let refused = loop {
        let n = held.len() as u64;
        assert!(
            n < MAX_SESSIONS,
            "{n} sessions taken: the full state dir never refused one"
        );
        match session_with_file(&dev, &format!("fill-{n}"), n) {
            Ok(s) => held.push(s),
            Err(e) => break e,
        }
    };
    assert_eq!(
        refused,
        libc::ENOSPC,
        "refused with errno {refused}, not ENOSPC"
    );
    // A client that keeps trying neither gets through nor wears the daemon
    // down (refused calls are not saved).
    for i in 0..RETRIES {
        match session_with_file(&dev, &format!("retry-{i}"), i) {
            Err(libc::ENOSPC) => {}
            other => panic!(
                "retry {i} against a full state dir: {:?}",
                other.map(|_| ())
            ),
        }
    }
    println!("ACKED {}", held.len());
    drop(dev);
    client::hold_until_update(held);
}

#[test]
#[ignore = "runs under `luo run`, started by a_full_state_dir_refuses_changes_and_loses_nothing"]
fn probe_one_more() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let s = session_with_file(&dev, "after-room", 7).expect("a session once there is room");
    drop(dev);
    client::hold_until_update(vec![s]);
}

fn mount_tmpfs(dir: &std::path::Path, size: &str, remount: bool) {
    let mut c = Command::new("mount");
    c.args(["-t", "tmpfs", "-o"]);
    let opts = if remount {
        format!("remount,size={size}")
    } else {
        format!("size={size},mode=0700")
    };
    let ok = c.arg(opts).arg("luo-state").arg(dir).status().unwrap();
    assert!(ok.success(), "mount {size} on {}", dir.display());
}

#[test]
fn a_full_state_dir_refuses_changes_and_loses_nothing() {
    common::require_capable();
    let dir = temp_dir("full");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    mount_tmpfs(&state, "1m", false);
    let unmount = scopeguard(state.clone());
    let mut daemon = Daemon::start_at(dir.clone(), dir.join("liveupdate"), state.clone());

    // Sessions until the journal has no room: the last is refused.
    let mut probe = daemon
        .probe_command("probe_fill")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out: Vec<String> = BufReader::new(probe.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(
        probe.wait().unwrap().success(),
        "the fill probe failed:\n{out:?}"
    );
    let acked: usize = out
        .iter()
        .find_map(|l| l.split("ACKED ").nth(1).map(|n| n.trim().parse().unwrap()))
        .expect("the probe reports what was acknowledged");
    assert!(
        acked > 10,
        "only {acked} sessions before the state dir was full"
    );
    let sessions = |d: &Daemon| d.status_json()["sessions"].as_array().unwrap().len();
    assert_eq!(sessions(&daemon), acked, "sessions the daemon has");

    // Room again: the running daemon takes changes by itself.
    mount_tmpfs(&state, "64m", true);
    daemon.run_probe("probe_one_more");
    assert_eq!(sessions(&daemon), acked + 1);

    // Every acknowledged session comes back after a SIGKILL.
    daemon.restart_after(libc::SIGKILL);
    assert_eq!(
        sessions(&daemon),
        acked + 1,
        "sessions after a SIGKILL and restart"
    );
    drop(daemon);
    drop(unmount);
}

/// Unmounts the state tmpfs when the test ends, however it ends.
fn scopeguard(path: std::path::PathBuf) -> impl Drop {
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    Unmount(path)
}

/// Sessions each holding one memfd of 8 known bytes; only the session fds
/// are held afterwards (the memfds live on in the daemon and its keeper).
const KEPT_SESSIONS: u64 = 20;

#[test]
#[ignore = "runs under `luo run`, started by a_keeper_killed_under_a_running_daemon_is_replaced"]
fn probe_some_sessions() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let held: Vec<OwnedFd> = (0..KEPT_SESSIONS)
        .map(|i| session_with_file(&dev, &format!("kept-{i}"), i).unwrap())
        .collect();
    drop(dev);
    client::hold_until_update(held);
}

#[test]
#[ignore = "runs under `luo run`, started by a_keeper_killed_under_a_running_daemon_is_replaced"]
fn probe_check_sessions() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    // Sessions before this one were retrieved and closed (so finished).
    let first: u64 = std::env::var("LUO_FIRST_SESSION").map_or(0, |v| v.parse().unwrap());
    for i in first..KEPT_SESSIONS {
        let mut a = client::session_args(72, &format!("kept-{i}"));
        ioctl(dev.as_raw_fd(), 0xBA01, &mut a).expect("RETRIEVE_SESSION");
        // SAFETY: the ioctl returned a new fd that we now own.
        let s = unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(a[4..8].try_into().unwrap())) };
        let mut f = fd_args(-1, i);
        ioctl(s.as_raw_fd(), 0xBA41, &mut f).expect("RETRIEVE_FD");
        // SAFETY: as above.
        let m = unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(f[4..8].try_into().unwrap())) };
        let mut back = [0u8; 8];
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::pread(m.as_raw_fd(), back.as_mut_ptr().cast(), 8, 0) };
        assert_eq!((n, back), (8, i.to_le_bytes()), "session kept-{i}");
    }
}

/// The pids of the keepers serving `socket`.
fn keepers(socket: &std::path::Path) -> Vec<i32> {
    let want = socket.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.contains(&&b"keeper"[..]) && args.contains(&want.as_bytes())
            })
        })
        .collect()
}

#[test]
fn a_keeper_killed_under_a_running_daemon_is_replaced() {
    common::require_capable();
    let mut daemon = Daemon::start_with_args(&[]);
    daemon.run_probe("probe_some_sessions");
    let socket = daemon.state.join("keeper.sock");
    let old = keepers(&socket);
    assert_eq!(old.len(), 1, "one keeper: {old:?}");
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(old[0], libc::SIGKILL) };
    // The daemon notices within a second and hands a new keeper every fd.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon.log().contains("nothing was lost") {
        assert!(
            std::time::Instant::now() < deadline,
            "no new keeper:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let new = keepers(&socket);
    assert!(new.len() == 1 && new != old, "keepers {old:?} then {new:?}");
    // So a crash of the daemon now loses nothing either.
    daemon.restart_after(libc::SIGKILL);
    let status = daemon.status_json();
    let sessions = status["sessions"].as_array().unwrap();
    assert_eq!(sessions.len() as u64, KEPT_SESSIONS, "{status}");
    for s in sessions {
        assert_eq!(s["files"].as_array().map(Vec::len), Some(1), "{s}");
    }
    // Every byte of every memfd, after an update.
    let out = daemon.update();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.run_probe("probe_check_sessions");
}

#[test]
fn a_keeper_killed_while_no_daemon_runs_is_reported_with_what_is_lost() {
    common::require_capable();
    let mut daemon = Daemon::start_with_args(&[]);
    daemon.run_probe("probe_some_sessions");
    daemon.kill(libc::SIGKILL);
    for pid in keepers(&daemon.state.join("keeper.sock")) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = daemon.start_failing();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its keeper:\n{err}");
    for words in [
        "no keeper holds the fds",
        "What it held is gone",
        "Move the file away",
    ] {
        assert!(err.contains(words), "no '{words}' in:\n{err}");
    }
    // Moved away, a daemon starts empty.
    std::fs::rename(
        daemon.state.join("state.img"),
        daemon.dir.join("state.img.old"),
    )
    .unwrap();
    daemon.start_again();
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len(),
        0
    );
}

/// The daemon's children that run the daemon's own command line (the
/// session-file opener, forked without exec) or `luo opener`.
fn openers(daemon: i32) -> Vec<i32> {
    let own = std::fs::read(format!("/proc/{daemon}/cmdline")).unwrap();
    let children = std::fs::read_to_string(format!("/proc/{daemon}/task/{daemon}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == own || c.split(|&b| b == 0).any(|a| a == b"opener"))
        })
        .collect()
}

#[test]
fn an_opener_killed_under_a_running_daemon_is_replaced() {
    common::require_capable();
    let daemon = Daemon::start_with_args(&[]);
    let old = openers(daemon.pid());
    assert_eq!(old.len(), 1, "one opener: {old:?}");
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(old[0], libc::SIGKILL) };
    // More sessions than the pool of open session files holds: the rest
    // come from the new opener.
    let mut probe = daemon.probe_command("probe_some_sessions").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let done = loop {
        if let Some(status) = probe.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = probe.kill();
            panic!(
                "no sessions within 60 s of the opener's death:\n{}",
                daemon.log()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(done.success(), "the probe failed:\n{}", daemon.log());
    assert!(
        daemon.log().contains("exited; starting a new one"),
        "{}",
        daemon.log()
    );
    let new = openers(daemon.pid());
    assert!(new.len() == 1 && new != old, "openers {old:?} then {new:?}");
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len() as u64,
        KEPT_SESSIONS
    );
}

#[test]
fn a_hung_opener_is_replaced() {
    common::require_capable();
    let daemon = Daemon::start_with_args(&[]);
    let old = openers(daemon.pid());
    assert_eq!(old.len(), 1, "one opener: {old:?}");
    // Stopped: alive, holding its socket, opening nothing.
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(old[0], libc::SIGSTOP) };
    // More sessions than the pool holds: the rest wait for a new opener.
    let start = std::time::Instant::now();
    let out = daemon
        .probe_command("probe_some_sessions")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        daemon.log()
    );
    let waited = start.elapsed();
    assert!(
        daemon
            .log()
            .contains("sent no session file within 5 s; replacing it"),
        "{}",
        daemon.log()
    );
    let new = openers(daemon.pid());
    assert!(new.len() == 1 && new != old, "openers {old:?} then {new:?}");
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len() as u64,
        KEPT_SESSIONS
    );
    eprintln!("{KEPT_SESSIONS} sessions with the opener stopped: {waited:?}");
}

/// Limits this process to the fds it has open now (none to spare).
fn no_fd_to_spare() -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: old is a valid rlimit to fill.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    // The directory's own fd is closed again: `highest` may be it, so the
    // table is full once fds up to `highest` are taken; fill the gaps.
    let full = libc::rlimit {
        rlim_cur: highest,
        rlim_max: old.rlim_max,
    };
    // SAFETY: full is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &full) }, 0);
    let mut fillers = Vec::new();
    loop {
        // SAFETY: dup of stdin; a new fd we own, or -1.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            break;
        }
        fillers.push(fd);
    }
    std::mem::forget(fillers); // held until the probe exits
    old
}

#[test]
#[ignore = "runs under `luo run`, started by a_client_with_no_fd_to_spare_gets_emfile_and_loses_nothing"]
fn probe_full_fd_table() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let mut a = client::session_args(72, "kept-0");
    ioctl(dev.as_raw_fd(), 0xBA01, &mut a).expect("RETRIEVE_SESSION");
    // SAFETY: the ioctl returned a new fd that we now own.
    let s = unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(a[4..8].try_into().unwrap())) };
    let old = no_fd_to_spare();
    let mut f = fd_args(-1, 0);
    assert_eq!(ioctl(s.as_raw_fd(), 0xBA41, &mut f), Err(libc::EMFILE));
    let mut r = client::session_args(72, "kept-1");
    assert_eq!(ioctl(dev.as_raw_fd(), 0xBA01, &mut r), Err(libc::EMFILE));
    let mut c = client::session_args(72, "no-room");
    assert_eq!(ioctl(dev.as_raw_fd(), 0xBA00, &mut c), Err(libc::EMFILE));
    // SAFETY: old is the rlimit getrlimit returned.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    let mut f = fd_args(-1, 0);
    ioctl(s.as_raw_fd(), 0xBA41, &mut f).expect("RETRIEVE_FD once there is room");
    // SAFETY: as above.
    let m = unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(f[4..8].try_into().unwrap())) };
    let mut back = [0u8; 8];
    // SAFETY: reads into a live buffer.
    let n = unsafe { libc::pread(m.as_raw_fd(), back.as_mut_ptr().cast(), 8, 0) };
    assert_eq!((n, back), (8, 0u64.to_le_bytes()));
}

#[test]
fn a_client_with_no_fd_to_spare_gets_emfile_and_loses_nothing() {
    common::require_capable();
    let mut daemon = Daemon::start_with_args(&[]);
    daemon.run_probe("probe_some_sessions");
    let out = daemon.update();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.run_probe("probe_full_fd_table");
    let names: Vec<String> = daemon.status_json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n == "no-room") && names.iter().any(|n| n == "kept-1"),
        "a refused session stayed, or the others are gone: {names:?}"
    );
    // The other sessions are whole (kept-0 was retrieved and closed).
    let out = daemon
        .probe_command("probe_check_sessions")
        .env("LUO_FIRST_SESSION", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

/// Files per session of the fd probes.
const FILES_PER_SESSION: u64 = 10;

#[test]
#[ignore = "runs under `luo run`, started by a_daemon_out_of_fds_refuses_files_and_loses_nothing"]
fn probe_fill_fds() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let mut held = Vec::new();
    let mut token = 0;
    let refused = 'fill: loop {
        assert!(token < 100_000, "{token} files taken: never refused");
        let name = format!("fds-{}", held.len());
        let s = create(dev.as_raw_fd(), &name).expect("CREATE_SESSION before the refusal");
        for _ in 0..FILES_PER_SESSION {
            let m = memfd(token);
            match client::preserve(s.as_raw_fd(), m.as_raw_fd(), token) {
                Ok(()) => token += 1,
                Err(e) => {
                    held.push(s);
                    break 'fill e;
                }
            }
        }
        held.push(s);
    };
    assert_eq!(refused, libc::ENOSPC, "refused with errno {refused}");
    let last = held.last().unwrap().as_raw_fd();
    for i in 0..RETRIES {
        let m = memfd(i);
        assert_eq!(
            client::preserve(last, m.as_raw_fd(), 1_000_000 + i),
            Err(libc::ENOSPC),
            "retry {i} against a daemon out of fds"
        );
    }
    // A session holds no fd of the daemon's: sessions still come and go.
    let extra = create(dev.as_raw_fd(), "no-files").expect("CREATE_SESSION after the refusal");
    assert_eq!(client::get_name(extra.as_raw_fd()).unwrap(), "no-files");
    drop(extra);
    println!("ACKED {token}");
    drop(dev);
    client::hold_until_update(held);
}

#[test]
#[ignore = "runs under `luo run`, started by a_daemon_out_of_fds_refuses_files_and_loses_nothing"]
fn probe_check_fds() {
    let Some(path) = probe_device() else { return };
    let dev = open_device(&path);
    let acked: u64 = std::env::var("LUO_ACKED").unwrap().parse().unwrap();
    for token in (0..acked).step_by(FILES_PER_SESSION as usize) {
        let name = format!("fds-{}", token / FILES_PER_SESSION);
        let s = client::retrieve(dev.as_raw_fd(), &name).unwrap_or_else(|e| {
            panic!("RETRIEVE_SESSION {name}: errno {e}");
        });
        for t in token..(token + FILES_PER_SESSION).min(acked) {
            let m = client::retrieve_fd(s.as_raw_fd(), t).expect("RETRIEVE_FD");
            let mut back = [0u8; 9];
            // SAFETY: reads into a live buffer.
            let n = unsafe { libc::pread(m.as_raw_fd(), back.as_mut_ptr().cast(), 9, 0) };
            assert_eq!(
                (n, &back[..8]),
                (8, &t.to_le_bytes()[..]),
                "{name} token {t}"
            );
        }
        // Every file retrieved: FINISH, then the session goes with its fd.
        let mut finish = [8, 0, 0, 0, 0, 0, 0, 0];
        ioctl(s.as_raw_fd(), 0xBA42, &mut finish).expect("FINISH");
    }
    // The daemon has fds to spare again.
    let s = session_with_file(&dev, "after-room", 7).expect("a file once there is room");
    drop(s);
}

#[test]
fn a_daemon_out_of_fds_refuses_files_and_loses_nothing() {
    common::require_capable();
    const LIMIT: u64 = 1200;
    let mut daemon = Daemon::start_with_fd_limit(Some(LIMIT), &[]);
    assert_eq!(daemon.fd_limit(), LIMIT, "the daemon raised its fd limit");
    let mut probe = daemon
        .probe_command("probe_fill_fds")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(probe.stdout.take().unwrap()).lines();
    let acked: u64 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split("ACKED ").nth(1).map(|n| n.trim().parse().unwrap()))
        .expect("the probe reports what was acknowledged");
    // Out of fds for files, the daemon still answers everything else.
    assert!(
        daemon.status_ok(),
        "luo status while the daemon is short of fds"
    );
    let out = daemon.update();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(probe.wait().unwrap().success(), "the fill probe failed");
    assert!(
        acked > 100,
        "only {acked} files before the daemon ran short"
    );
    eprintln!("{acked} files preserved under an fd limit of {LIMIT}, then ENOSPC");
    let log = daemon.log();
    let line = format!("left of the daemon's RLIMIT_NOFILE of {LIMIT}");
    assert!(log.contains(&line), "no {line:?} in:\n{log}");

    // Everything acknowledged survives a SIGKILL, and comes back whole: the
    // daemon kept room for every file to be retrieved.
    daemon.restart_after(libc::SIGKILL);
    let out = daemon
        .probe_command("probe_check_fds")
        .env("LUO_ACKED", acked.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
