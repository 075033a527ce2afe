//! A benchmark, not run by `cargo test`: 10 000 sessions of 10 memfds each
//! (one page apiece), then what it costs — the memory of the daemon and of
//! its keeper, the state journal's size, and how long a daemon SIGKILLed
//! with all of it takes to come back — and then every page of every file
//! retrieved and compared. `LUO_SCALE_SESSIONS` and `LUO_SCALE_FILES` (per
//! session) change the counts; the daemon and its keeper hold one fd per
//! file, and the daemon keeps room for two, so its `RLIMIT_NOFILE` must be
//! above twice the files (a daemon without `CAP_SYS_RESOURCE` keeps the one
//! it was started with):
//!
//! ```sh
//! cargo test --release --test scale -- --ignored --nocapture
//! ```

mod client;
mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Instant;

use client::{ioctl, probe_device};
use common::Daemon;

const PAGE: usize = 4096;

fn sessions() -> u64 {
    std::env::var("LUO_SCALE_SESSIONS").map_or(10_000, |v| v.parse().unwrap())
}

fn files() -> u64 {
    std::env::var("LUO_SCALE_FILES").map_or(10, |v| v.parse().unwrap())
}

/// The page file `token` of session `i` holds.
fn contents(i: u64, token: u64) -> Vec<u8> {
    let seed = (i << 8 | token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..PAGE as u64 / 8)
        .flat_map(|w| (seed ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).to_le_bytes())
        .collect()
}

fn new_fd(buf: &[u8]) -> OwnedFd {
    // SAFETY: the ioctl returned a new fd that we now own.
    unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(buf[4..8].try_into().unwrap())) }
}

/// Room for every session fd this process holds: the soft limit up to the
/// hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill, then to set.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur > sessions() + 64,
        "an fd limit of {} cannot hold {} sessions",
        lim.rlim_cur,
        sessions()
    );
}

#[test]
#[ignore = "runs under `luo run`, started by ten_thousand_sessions_of_ten_files"]
fn probe_scale_fill() {
    let Some(path) = probe_device() else { return };
    raise_fd_limit();
    let dev = client::open(&path).expect("open the device");
    let start = Instant::now();
    let mut held = Vec::new();
    for i in 0..sessions() {
        let s = client::create(dev.as_raw_fd(), &format!("scale-{i}")).expect("CREATE_SESSION");
        for token in 0..files() {
            // SAFETY: the name is a valid C string.
            let fd = unsafe { libc::memfd_create(c"scale".as_ptr(), 0) };
            assert!(fd >= 0);
            // SAFETY: a fresh fd we own.
            let m = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            std::io::Write::write_all(&mut &m, &contents(i, token)).unwrap();
            client::preserve(s.as_raw_fd(), m.as_raw_fd(), token).expect("PRESERVE_FD");
        }
        held.push(s);
    }
    println!("FILLED {:.0}", start.elapsed().as_secs_f64() * 1e3);
    drop(dev);
    client::hold_until_update(held);
}

#[test]
#[ignore = "runs under `luo run`, started by ten_thousand_sessions_of_ten_files"]
fn probe_scale_check() {
    let Some(path) = probe_device() else { return };
    raise_fd_limit();
    let dev = client::open(&path).expect("open the device");
    let start = Instant::now();
    let mut back = vec![0u8; PAGE + 1];
    for i in 0..sessions() {
        let mut a = client::session_args(72, &format!("scale-{i}"));
        ioctl(dev.as_raw_fd(), client::RETRIEVE, &mut a).expect("RETRIEVE_SESSION");
        let s = new_fd(&a);
        for token in 0..files() {
            let m = client::retrieve_fd(s.as_raw_fd(), token).expect("RETRIEVE_FD");
            // SAFETY: reads into a live buffer of that size.
            let n = unsafe { libc::pread(m.as_raw_fd(), back.as_mut_ptr().cast(), back.len(), 0) };
            assert_eq!(n, PAGE as isize, "session {i} token {token}: size");
            assert!(
                back[..PAGE] == contents(i, token)[..],
                "session {i} token {token}: contents differ"
            );
        }
        let mut fin = vec![0u8; 8];
        fin[..4].copy_from_slice(&8u32.to_ne_bytes());
        ioctl(s.as_raw_fd(), client::FINISH, &mut fin).expect("FINISH");
    }
    println!("CHECKED {:.0}", start.elapsed().as_secs_f64() * 1e3);
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The pid of the keeper serving this daemon's state dir.
fn keeper_pid(daemon: &Daemon) -> i32 {
    let socket = daemon.state.join("keeper.sock");
    let want = socket.to_str().unwrap().as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.contains(&&b"keeper"[..]) && args.contains(&want.as_slice())
            })
        })
        .expect("the keeper runs")
}

/// Runs a probe to its end and returns the number after `key` it printed.
fn probe_figure(daemon: &Daemon, name: &str, key: &str) -> f64 {
    let out = daemon
        .probe_command(name)
        .env("LUO_SCALE_SESSIONS", sessions().to_string())
        .env("LUO_SCALE_FILES", files().to_string())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed:\n{text}\ndaemon log:\n{}",
        daemon.log()
    );
    text.lines()
        .find_map(|l| l.split(key).nth(1).map(|n| n.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{name} printed no {key:?}:\n{text}"))
}

#[test]
#[ignore = "a benchmark: cargo test --release --test scale -- --ignored --nocapture"]
fn ten_thousand_sessions_of_ten_files() {
    common::require_capable();
    let n = sessions();
    let mut daemon = Daemon::start_with_args(&[]);
    let need = 2 * n * files() + 1024;
    assert!(
        daemon.fd_limit() >= need,
        "{n} sessions of {} files need an fd limit of at least {need} in the daemon; it has {} \
         (without CAP_SYS_RESOURCE it keeps the limit it was started with)",
        files(),
        daemon.fd_limit()
    );
    let keeper = keeper_pid(&daemon);
    let (daemon_idle, keeper_idle) = (rss_kib(daemon.pid()), rss_kib(keeper));
    let fill_ms = probe_figure(&daemon, "probe_scale_fill", "FILLED ");
    let (daemon_full, keeper_full) = (rss_kib(daemon.pid()), rss_kib(keeper));
    let journal = |d: &Daemon| std::fs::metadata(d.state.join("state.img")).unwrap().len();
    let journal_full = journal(&daemon);
    let out = daemon.update();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let journal_updated = journal(&daemon);

    let start = Instant::now();
    daemon.restart_after(libc::SIGKILL);
    let restart_ms = start.elapsed().as_secs_f64() * 1e3;
    let daemon_restarted = rss_kib(daemon.pid());
    let sessions_back = daemon.status_json()["sessions"].as_array().unwrap().len() as u64;
    assert_eq!(sessions_back, n, "sessions after the restart");
    let check_ms = probe_figure(&daemon, "probe_scale_check", "CHECKED ");

    let per_session = files();
    let files = n * per_session;
    let per = |kib: u64, base: u64| (kib.saturating_sub(base) * 1024) as f64 / n as f64;
    println!(
        "{n} sessions x {per_session} files ({files} memfds of one page), every page compared"
    );
    println!("| figure | value |");
    println!("|---|---:|");
    println!("| create + preserve, all | {fill_ms:.0} ms |");
    println!(
        "| daemon RSS idle / full / restarted | {:.1} / {:.1} / {:.1} MiB |",
        daemon_idle as f64 / 1024.0,
        daemon_full as f64 / 1024.0,
        daemon_restarted as f64 / 1024.0
    );
    println!(
        "| daemon RSS per session ({per_session} files) | {:.0} B |",
        per(daemon_full, daemon_idle)
    );
    println!(
        "| keeper RSS idle / full | {:.1} / {:.1} MiB ({:.0} B per session) |",
        keeper_idle as f64 / 1024.0,
        keeper_full as f64 / 1024.0,
        per(keeper_full, keeper_idle)
    );
    println!(
        "| journal full / after the update | {:.1} / {:.1} MiB ({:.0} B per session) |",
        journal_full as f64 / 1048576.0,
        journal_updated as f64 / 1048576.0,
        journal_full as f64 / n as f64
    );
    println!("| restart after SIGKILL (replay, keeper fds, ready) | {restart_ms:.0} ms |");
    println!("| retrieve + compare + finish, all | {check_ms:.0} ms |");
}
