//! Many clients at once: 16 `luo run` trees create sessions and preserve a
//! memfd in each, while `luo status` polls and a simulated update comes at a
//! random moment. Afterwards every session a client was told it has is there,
//! and every byte of its memfd; then each is retrieved and finished.
//! `LUO_LOAD_COUNT` sets the sessions per client (CI: 40; the documented
//! full run: 1000).

mod client;
mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use client::{fd_args, ioctl, probe_device};
use common::Daemon;

const CLIENTS: u64 = 16;
const PAGE: usize = 4096;

fn count() -> u64 {
    std::env::var("LUO_LOAD_COUNT").map_or(40, |v| v.parse().unwrap())
}

/// What session `name`'s memfd holds: a word pattern seeded by the name.
fn contents(name: &str) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..PAGE / 8)
        .flat_map(|i| {
            (seed ^ i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .to_le_bytes()
        })
        .collect()
}

/// The device, waiting while another client has it open (it is exclusive).
fn open_device(path: &str) -> OwnedFd {
    loop {
        match std::fs::File::options().read(true).write(true).open(path) {
            Ok(f) => return OwnedFd::from(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("open {path}: {e}"),
        }
    }
}

fn new_fd(buf: &[u8]) -> OwnedFd {
    // SAFETY: the ioctl returned a new fd that we now own.
    unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(buf[4..8].try_into().unwrap())) }
}

#[test]
#[ignore = "runs under `luo run`, started by many_clients_at_once_lose_nothing"]
fn probe_load_client() {
    let Some(path) = probe_device() else { return };
    let id: u64 = std::env::var("LUO_LOAD_ID").unwrap().parse().unwrap();
    let mut held = Vec::new();
    for k in 0..count() {
        let name = format!("load-{id}-{k}");
        let dev = open_device(&path);
        let mut a = client::session_args(72, &name);
        if ioctl(dev.as_raw_fd(), client::CREATE, &mut a).is_err() {
            break; // frozen for the update: this epoch is ending
        }
        drop(dev);
        let s = new_fd(&a);
        let m = std::fs::File::from({
            // SAFETY: the name is a valid C string.
            let fd = unsafe { libc::memfd_create(c"load".as_ptr(), 0) };
            assert!(fd >= 0);
            // SAFETY: fresh fd we own.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        std::io::Write::write_all(&mut &m, &contents(&name)).unwrap();
        if ioctl(
            s.as_raw_fd(),
            client::PRESERVE,
            &mut fd_args(m.as_raw_fd(), 0),
        )
        .is_err()
        {
            break;
        }
        println!("ACK {name}");
        held.push(s);
    }
    // Hold every session until the update ends this process.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
#[ignore = "runs under `luo run`, started by many_clients_at_once_lose_nothing"]
fn probe_load_check() {
    let Some(path) = probe_device() else { return };
    let names = std::fs::read_to_string(std::env::var("LUO_LOAD_NAMES").unwrap()).unwrap();
    let dev = open_device(&path);
    let mut checked = 0;
    for line in names.lines() {
        let (name, files) = line.split_once(' ').unwrap();
        let mut a = client::session_args(72, name);
        ioctl(dev.as_raw_fd(), client::RETRIEVE, &mut a).expect("RETRIEVE_SESSION");
        let s = new_fd(&a);
        let mut fin = vec![0u8; 8];
        fin[..4].copy_from_slice(&8u32.to_ne_bytes());
        if files == "0" {
            // Created just before the freeze, its file refused by it.
            ioctl(s.as_raw_fd(), client::FINISH, &mut fin).expect("FINISH");
            checked += 1;
            continue;
        }
        let mut f = fd_args(-1, 0);
        ioctl(s.as_raw_fd(), client::RETRIEVE_FD, &mut f).expect("RETRIEVE_FD");
        let m = new_fd(&f);
        let mut back = vec![0u8; PAGE + 1];
        // SAFETY: reads into a live buffer of that size.
        let n = unsafe { libc::pread(m.as_raw_fd(), back.as_mut_ptr().cast(), back.len(), 0) };
        assert_eq!(n, PAGE as isize, "{name}: size");
        assert!(
            back[..PAGE] == contents(name)[..],
            "{name}: contents differ"
        );
        let mut fin = vec![0u8; 8];
        fin[..4].copy_from_slice(&8u32.to_ne_bytes());
        ioctl(s.as_raw_fd(), client::FINISH, &mut fin).expect("FINISH");
        checked += 1;
    }
    println!("CHECKED {checked}");
}

#[test]
fn many_clients_at_once_lose_nothing() {
    common::require_capable();
    let daemon = Daemon::start_with_args(&[]);
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            daemon
                .probe_command("probe_load_client")
                .env("LUO_LOAD_ID", i.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Status polled throughout; the update at a random moment.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let polls = std::thread::scope(|scope| {
        let poller = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(daemon.status_ok(), "status failed under load");
                n += 1;
            }
            n
        });
        // A random moment within the load: once a random share of the
        // sessions exists.
        let total = CLIENTS * count();
        let target = 1 + u64::from(start.elapsed().subsec_nanos()) % (total * 9 / 10);
        let deadline = Instant::now() + Duration::from_secs(120);
        while (daemon.status_json()["sessions"].as_array().unwrap().len() as u64) < target {
            assert!(
                Instant::now() < deadline,
                "fewer than {target} sessions after 120 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = daemon.update();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        poller.join().unwrap()
    });
    let mut acked = Vec::new();
    for mut c in clients {
        let out = BufReader::new(c.stdout.take().unwrap());
        acked.extend(
            out.lines()
                .map_while(Result::ok)
                .filter_map(|l| l.split("ACK ").nth(1).map(|n| n.trim().to_owned())),
        );
        let _ = c.wait();
    }
    let status = daemon.status_json();
    let sessions = status["sessions"].as_array().unwrap();
    let names: Vec<String> = sessions
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let lines: Vec<String> = sessions
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["name"].as_str().unwrap(),
                s["files"].as_array().unwrap().len()
            )
        })
        .collect();
    for s in sessions {
        let name = s["name"].as_str().unwrap();
        if s["files"].as_array().unwrap().is_empty() {
            assert!(
                !acked.iter().any(|a| a == name),
                "{name} was acknowledged with a file"
            );
        }
    }
    let missing: Vec<&String> = acked.iter().filter(|a| !names.contains(a)).collect();
    assert!(missing.is_empty(), "acknowledged but gone: {missing:?}");
    // Every session there (acknowledged, or in flight at the freeze) is whole.
    let list = daemon.dir.join("names");
    std::fs::write(&list, lines.join("\n")).unwrap();
    let out = daemon
        .probe_command("probe_load_check")
        .env("LUO_LOAD_NAMES", &list)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("CHECKED {}", names.len())),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        daemon.status_json()["sessions"].as_array().unwrap().len(),
        0
    );
    eprintln!(
        "load: {CLIENTS} clients, {} sessions acknowledged and {} carried across an update \
         after {:.0} ms, {polls} status polls meanwhile, every byte checked",
        acked.len(),
        names.len(),
        start.elapsed().as_secs_f64() * 1e3
    );
}
