//! systemd and the daemon. systemd 262's own LUO client, `test-luo` from
//! Debian sid, passes unmodified across simulated updates. The unit shipped
//! in `systemd/luo.service` passes `systemd-analyze verify`, and the daemon
//! behaves as the unit says. Its `ExecStart=` line is
//! run as systemd would, with `NOTIFY_SOCKET` naming a real datagram socket:
//! `READY=1` comes once the device answers, `STOPPING=1` on SIGTERM, and a
//! SIGTERM to the main process alone (`KillMode=process`) leaves the keeper
//! holding every session for the next start. (No systemd runs as PID 1 on
//! these machines; the manager's side here is the notify socket and signals.)

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::LUO;

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/luo.service");
    std::fs::read_to_string(path).expect("systemd/luo.service")
}

/// The value of `key=` in the unit (its last assignment).
fn setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// The unit's `ExecStart=` arguments after the program.
fn exec_start_args(unit: &str) -> Vec<String> {
    let line = setting(unit, "ExecStart").expect("ExecStart=");
    let mut words = line.split_whitespace().map(str::to_owned);
    assert_eq!(words.next().as_deref(), Some("/usr/local/bin/luo"));
    words.collect()
}

/// `args` with the value after `flag` replaced.
fn with_value(args: &[String], flag: &str, value: &Path) -> Vec<String> {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("ExecStart has no {flag}"));
    let mut out = args.to_vec();
    out[at + 1] = value.to_string_lossy().into_owned();
    out
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let have = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "needs systemd-analyze: apt-get install systemd"
    );
    let dir = common::temp_dir("unit-verify");
    // The unit as installed, with ExecStart= naming the binary under test.
    let unit = unit_text().replace("/usr/local/bin/luo", LUO);
    let path = dir.join("luo.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_unit_keeps_state_across_a_stop_and_names_the_daemons_state_dir() {
    let unit = unit_text();
    assert_eq!(setting(&unit, "Type").as_deref(), Some("notify"));
    assert_eq!(setting(&unit, "KillMode").as_deref(), Some("process"));
    assert_eq!(
        setting(&unit, "RuntimeDirectoryPreserve").as_deref(),
        Some("yes")
    );
    assert!(setting(&unit, "ExecStop").is_none(), "a stop is SIGTERM");
    let runtime = setting(&unit, "RuntimeDirectory").expect("RuntimeDirectory=");
    let args = exec_start_args(&unit);
    let state = args.iter().skip_while(|a| *a != "--state-dir").nth(1);
    assert_eq!(state, Some(&format!("/run/{runtime}")));
}

/// The manager's side of `Type=notify`: a datagram socket.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Manager { socket, path }
    }

    /// The next notification, as `KEY=VALUE` lines.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("a notification within 15 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Starts the unit's `ExecStart=` with `device` and `state` in place of
    /// its paths.
    fn start(&self, device: &Path, state: &Path) -> Child {
        let args = exec_start_args(&unit_text());
        let args = with_value(&with_value(&args, "--device", device), "--state-dir", state);
        Command::new(LUO)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .spawn()
            .unwrap()
    }
}

fn status(state: &Path) -> std::process::Output {
    Command::new(LUO)
        .args(["status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap()
}

fn session_names(state: &Path) -> Vec<String> {
    let out = status(state);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Pids of the keepers serving the state dir `state`.
fn keepers(state: &Path) -> Vec<u32> {
    let socket = state.join("keeper.sock");
    let needle = format!("keeper\0--socket\0{}", socket.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

#[test]
fn the_daemon_is_ready_when_its_device_answers_and_a_stop_keeps_every_session() {
    common::require_capable();
    let dir = common::temp_dir("unit");
    let (device, state) = (dir.join("liveupdate"), dir.join("state"));
    let manager = Manager::new(&dir);

    let mut daemon = manager.start(&device, &state);
    let ready = manager.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    // Ready means ready: the first call after READY=1 is answered.
    let answer = status(&state);
    assert!(
        answer.status.success(),
        "not answering at READY=1: {}",
        String::from_utf8_lossy(&answer.stderr)
    );
    let held = Command::new(LUO)
        .arg("run")
        .arg("--device")
        .arg(&device)
        .args(["--", LUO, "hold-resized", "--device"])
        .arg(&device)
        .args(["--name", "unit"])
        .status()
        .unwrap();
    assert!(held.success());
    let keeper = keepers(&state);
    assert_eq!(keeper.len(), 1, "one keeper");

    // `systemctl stop` with KillMode=process: SIGTERM to the main pid only.
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let stopping = manager.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(daemon.wait().unwrap().success(), "a stop is a clean exit");
    assert_eq!(keepers(&state), keeper, "the keeper outlives the stop");

    // `systemctl start`: the same session, from the same keeper.
    let mut daemon = manager.start(&device, &state);
    let ready = manager.next();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("1 session(s)"), "{ready}");
    assert_eq!(session_names(&state), ["unit"]);

    // `luo shutdown` releases everything and says so; the unit then stops.
    let out = Command::new(LUO)
        .arg("shutdown")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        said.contains("released 1 session(s) holding 1 file(s)"),
        "{said}"
    );
    assert!(manager.next().contains("STOPPING=1"));
    assert!(daemon.wait().unwrap().success());
    for _ in 0..100 {
        if keepers(&state).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(keepers(&state).is_empty(), "the keeper ended");
    common::end_workloads(&state);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `test-luo store` → `luo update` → `test-luo check` twice (PID 1's kexec
/// count, kept in the mapping, goes 1 then 2), and the same for
/// `store-hijack`/`check-hijack`, with `luo fdstore` as PID 1's fd store
/// and systemd-shutdown (`tests/scripts/test-luo.sh`). test-luo opens
/// `/dev/liveupdate` itself, so the daemon serves that path, bound in a
/// private mount namespace.
#[test]
fn systemd_test_luo_passes_unmodified_across_simulated_updates() {
    common::require_capable();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fetched = Command::new(root.join("tests/scripts/fetch-systemd.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "cannot fetch systemd's test-luo from Debian sid (see above)"
    );
    let systemd = String::from_utf8(fetched.stdout).unwrap();
    let work = common::temp_dir("test-luo");
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(root.join("tests/scripts/test-luo.sh"))
        .arg(LUO)
        .arg(systemd.trim())
        .arg(&work)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&work);
    assert!(out.status.success(), "{text}");
    for line in [
        "Verified fd 'testfd1': content matches.",
        "Verified fd 'testfd2': content matches.",
        "All fd store checks passed.",
        "Verified LUO session memfd content matches.",
        "TEST-LUO PASS: store, update, check",
        "kexecs count 1",
        "TEST-LUO PASS: check, store, update, check (kexecs count 2)",
        "hijack fd correctly not restored",
        "TEST-LUO PASS: store-hijack, update, check-hijack",
    ] {
        assert!(text.contains(line), "no '{line}':\n{text}");
    }
}
