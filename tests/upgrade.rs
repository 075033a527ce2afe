//! Upgrades: a state dir and a keeper left by the previous release resume
//! under this binary.
//!
//! The previous release is the commit named in `tests/previous-release`; its
//! `luo` is built from this clone's history (cached under
//! `$LUO_TEST_CACHE`, default `/var/cache/luo-test`). Its daemon serves a
//! VMM (`luo demo-vmm`) that preserves guest RAM, VMM state and extra
//! sessions; it is then killed, and this binary's daemon takes over the
//! same state dir and keeper. The new binary's VMM retrieves everything and
//! compares every page of guest RAM with the checksums stage 1 recorded.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::LUO;

const EXTRA_SESSIONS: &str = "20";
/// The VMM's sessions: guest RAM and state, and the extra ones.
const SESSIONS: usize = 21;
const RAM_MIB: &str = "32";

/// The previous release's `luo`, built once.
fn previous_luo() -> PathBuf {
    static BUILT: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(|| Mutex::new(None)).lock().unwrap();
    if let Some(bin) = &*built {
        return bin.clone();
    }
    let bin = build_previous();
    *built = Some(bin.clone());
    bin
}

fn build_previous() -> PathBuf {
    let rev = include_str!("previous-release").trim();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cache = std::env::var_os("LUO_TEST_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/luo-test"), PathBuf::from)
        .join(format!("previous-{}", &rev[..12]));
    let bin = cache.join("target/debug/luo");
    if bin.exists() {
        return bin;
    }
    let archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", rev])
        .output()
        .expect("run git");
    assert!(
        archive.status.success(),
        "the previous release {rev} is not in this clone's history ({}); fetch it with \
         `git fetch --unshallow` and run the tests again",
        String::from_utf8_lossy(&archive.stderr).trim()
    );
    let src = cache.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run tar");
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
    drop(tar.stdin.take());
    assert!(tar.wait().unwrap().success(), "unpacking {rev} failed");
    eprintln!(
        "building the previous release {rev} (once; cached in {})",
        cache.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--locked", "-p", "luo-cuse-dev", "--bin", "luo"])
        .env("CARGO_TARGET_DIR", cache.join("target"))
        .current_dir(&src)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "building the previous release {rev} failed"
    );
    bin
}

/// A device path and state dir, and the daemon serving them now.
struct Machine {
    dir: PathBuf,
    device: PathBuf,
    state: PathBuf,
    daemon: Option<Child>,
    /// VMMs holding sessions, ended with the test.
    vmms: Vec<Child>,
}

impl Machine {
    fn new() -> Machine {
        let dir = common::temp_dir("upgrade");
        Machine {
            device: dir.join("liveupdate"),
            state: dir.join("state"),
            dir,
            daemon: None,
            vmms: Vec::new(),
        }
    }

    /// Starts `luo`'s daemon on this machine's paths and waits until it
    /// answers.
    fn start(&mut self, luo: &Path) {
        let child = Command::new(luo)
            .args(["daemon", "--device"])
            .arg(&self.device)
            .arg("--state-dir")
            .arg(&self.state)
            .spawn()
            .expect("start luo daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .luo(luo, &["status", "--state-dir"], true)
            .status
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "{} daemon did not answer",
                luo.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with `signal`; its keeper stays.
    fn stop(&mut self, signal: i32) {
        let mut child = self.daemon.take().expect("a daemon");
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(child.id() as i32, signal) };
        let _ = child.wait();
    }

    /// `luo ARGS...` (with the state dir appended if `state`).
    fn luo(&self, luo: &Path, args: &[&str], state: bool) -> std::process::Output {
        let mut c = Command::new(luo);
        c.args(args);
        if state {
            c.arg(&self.state);
        }
        c.output().unwrap()
    }

    /// `luo demo-vmm` of one stage under `luo run`, both from `luo`.
    fn vmm(&self, luo: &Path, stage: &str) -> Command {
        let mut c = Command::new(luo);
        c.arg("run")
            .arg("--device")
            .arg(&self.device)
            .arg("--")
            .arg(luo)
            .args(["demo-vmm", "--device"])
            .arg(&self.device)
            .args(["--stage", stage, "--size-mib", RAM_MIB])
            .args(["--extra-sessions", EXTRA_SESSIONS, "--backing", "shmem"]);
        c
    }

    /// Stage 1 under `luo`, which goes on holding its sessions until an
    /// update ends it.
    fn preserve(&mut self, luo: &Path) {
        let mut vmm = self.vmm(luo, "1").stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(vmm.stdout.take().unwrap());
        self.vmms.push(vmm);
        for line in out.lines() {
            if line.unwrap().contains("holding them for the update") {
                return;
            }
        }
        panic!("stage 1 ended without preserving");
    }

    /// Stage 2 under `luo`: every session retrieved, every page compared.
    fn retrieve_and_compare(&self, luo: &Path) {
        let out = self.vmm(luo, "2").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "stage 2 failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("match their stage-1 checksums"), "{text}");
        assert!(
            text.contains(&format!(
                "{EXTRA_SESSIONS} extra sessions retrieved, checked"
            )),
            "{text}"
        );
    }

    fn sessions(&self, direction: &str) -> usize {
        let out = self.luo(LUO.as_ref(), &["status", "--json", "--state-dir"], true);
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["direction"] == direction)
            .count()
    }

    /// `luo update --simulate`, which ends the VMMs of the old epoch.
    fn update(&mut self, luo: &Path) {
        let out = self.luo(luo, &["update", "--simulate", "--state-dir"], true);
        assert!(
            out.status.success(),
            "update failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for mut vmm in self.vmms.drain(..) {
            let _ = vmm.wait();
        }
    }

    /// With no daemon serving it, the FUSE mount would leave every access
    /// waiting: the keeper that holds its connection is ended (aborting
    /// it) and the mounts are detached.
    fn abandon(&self) {
        let keeper = self.state.join("keeper.sock");
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let ours = args.iter().any(|a| *a == b"keeper")
                && args
                    .iter()
                    .any(|a| *a == keeper.as_os_str().as_encoded_bytes());
            if let (true, Ok(pid)) = (ours, entry.file_name().to_string_lossy().parse::<i32>()) {
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for path in [&self.device, &self.state.join("fs")] {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        for vmm in &mut self.vmms {
            let _ = vmm.kill();
            let _ = vmm.wait();
        }
        common::end_workloads(&self.state);
        let shutdown = self.luo(LUO.as_ref(), &["shutdown", "--state-dir"], true);
        if let Some(mut d) = self.daemon.take() {
            if !shutdown.status.success() {
                let _ = d.kill();
            }
            // A daemon shutting down unmounts and ends its keeper before it
            // exits: waited for, never cut short.
            let _ = d.wait();
        }
        if !shutdown.status.success() {
            self.abandon();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The previous release's daemon is killed while a VMM holds its outgoing
/// sessions (journal, keeper, `luo run` listener and tree); this binary
/// resumes, runs the update and hands everything to the new VMM.
#[test]
fn outgoing_sessions_of_the_previous_release_survive_an_upgrade() {
    common::require_capable();
    let prev = previous_luo();
    let new = Path::new(LUO);
    let mut m = Machine::new();
    m.start(&prev);
    m.preserve(&prev);
    m.stop(libc::SIGKILL);
    m.start(new);
    assert_eq!(m.sessions("outgoing"), SESSIONS, "every session resumed");
    m.update(new);
    assert_eq!(m.sessions("incoming"), SESSIONS);
    m.retrieve_and_compare(new);
}

/// The previous release's daemon runs the update and stops; this binary
/// resumes the incoming sessions and hands them to the new VMM.
#[test]
fn incoming_sessions_of_the_previous_release_survive_an_upgrade() {
    common::require_capable();
    let prev = previous_luo();
    let new = Path::new(LUO);
    let mut m = Machine::new();
    m.start(&prev);
    m.preserve(&prev);
    m.update(&prev);
    m.stop(libc::SIGTERM);
    m.start(new);
    assert_eq!(m.sessions("incoming"), SESSIONS, "every session resumed");
    m.retrieve_and_compare(new);
}
