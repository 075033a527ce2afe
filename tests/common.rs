//! Shared helpers: a daemon on a private device path, and loud skips.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const LUO: &str = env!("CARGO_BIN_EXE_luo");

/// Why this machine cannot run host tests, if it cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (FUSE mounts, seccomp supervision of other processes)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("needs /dev/fuse".into());
    }
    None
}

/// Fails the calling test, naming what fixes it, when this machine cannot
/// run host tests: a test never passes for work it did not do.
pub fn require_capable() {
    if let Some(reason) = skip_reason() {
        panic!(
            "cannot run: {reason}; run the tests as root on a machine with FUSE (`sudo tests/run`)"
        );
    }
}

/// A daemon on a device path inside a fresh temp dir; stopped on drop.
pub struct Daemon {
    pub dir: PathBuf,
    pub device: PathBuf,
    pub state: PathBuf,
    child: Child,
    launch: Launch,
}

/// How a daemon is started, the first time and at every restart.
#[derive(Default)]
struct Launch {
    /// Extra `luo daemon` arguments.
    args: Vec<String>,
    /// Where its stderr goes, if it is kept (see [`Daemon::log`]).
    log: Option<PathBuf>,
    /// Its `RLIMIT_NOFILE` (soft and hard), if not ours.
    nofile: Option<u64>,
}

/// `linux/capability.h`: may raise a hard resource limit.
const CAP_SYS_RESOURCE: libc::c_ulong = 24;

fn spawn_daemon(device: &Path, state: &Path, env: &[(&str, &str)], launch: &Launch) -> Child {
    let mut c = Command::new(LUO);
    c.args(["daemon", "--device"])
        .arg(device)
        .arg("--state-dir")
        .arg(state)
        .args(&launch.args)
        .envs(env.iter().copied());
    if let Some(log) = &launch.log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        c.stderr(file);
    }
    if let Some(n) = launch.nofile {
        use std::os::unix::process::CommandExt;
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // Without CAP_SYS_RESOURCE (as under a service manager that sets
        // the limit and a capability bounding set) the daemon keeps it.
        // SAFETY: setrlimit and prctl are async-signal-safe and lim lives in
        // the closure.
        unsafe {
            c.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0
                    || libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.spawn().expect("start luo daemon")
}

/// A fresh temp dir (root-owned, 0755) for tests that lay out their own paths.
pub fn temp_dir(what: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!(
        "luo-test-{what}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Starts a daemon that must refuse to start: returns its exit status and
/// stderr. One that is still running after 10 s is shut down and the test
/// fails.
pub fn refused_start(device: &Path, state: &Path) -> std::process::Output {
    let mut child = Command::new(LUO)
        .args(["daemon", "--device"])
        .arg(device)
        .arg("--state-dir")
        .arg(state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start luo daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new(LUO)
        .args(["shutdown", "--state-dir"])
        .arg(state)
        .status();
    let out = child.wait_with_output().unwrap();
    panic!(
        "the daemon started instead of refusing:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// A daemon on the given paths (in `dir`, removed on drop).
    pub fn start_at(dir: PathBuf, device: PathBuf, state: PathBuf) -> Daemon {
        Daemon::launch(dir, device, state, &[], Launch::default())
    }

    /// A daemon with extra environment (such as a crash point).
    pub fn start_with(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in(env, |_| Launch::default())
    }

    /// A daemon with extra `luo daemon` arguments (given again at every
    /// restart), its stderr kept for [`Daemon::log`].
    pub fn start_with_args(args: &[&str]) -> Daemon {
        Daemon::start_with_fd_limit(None, args)
    }

    /// [`Daemon::start_with_args`] with the daemon's `RLIMIT_NOFILE` set
    /// (soft and hard) to `nofile`, if given.
    pub fn start_with_fd_limit(nofile: Option<u64>, args: &[&str]) -> Daemon {
        Daemon::start_in(&[], |dir| Launch {
            args: args.iter().map(|a| a.to_string()).collect(),
            log: Some(dir.join("daemon.log")),
            nofile,
        })
    }

    fn start_in(env: &[(&str, &str)], launch: impl FnOnce(&Path) -> Launch) -> Daemon {
        let dir = temp_dir("daemon");
        let device = dir.join("liveupdate");
        let state = dir.join("state");
        let launch = launch(&dir);
        Daemon::launch(dir, device, state, env, launch)
    }

    /// Starts a daemon on these paths and waits until it answers.
    fn launch(
        dir: PathBuf,
        device: PathBuf,
        state: PathBuf,
        env: &[(&str, &str)],
        launch: Launch,
    ) -> Daemon {
        let child = spawn_daemon(&device, &state, env, &launch);
        let d = Daemon {
            dir,
            device,
            state,
            child,
            launch,
        };
        d.wait_ready();
        d
    }

    /// What the daemon (and every restarted one) wrote to stderr, if it was
    /// started with [`Daemon::start_with_args`].
    pub fn log(&self) -> String {
        let path = self
            .launch
            .log
            .as_ref()
            .expect("a daemon whose stderr is kept");
        std::fs::read_to_string(path).unwrap()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.status_ok() {
            assert!(Instant::now() < deadline, "daemon did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        // tests/run's second pass: the same tests over FUSE over io_uring.
        if let Ok(want) = std::env::var("LUO_TEST_FUSE_TRANSPORT") {
            let status = self.status_json();
            let got = status["fuse_transport"].as_str().unwrap_or("none");
            assert_eq!(got, want, "the daemon takes FUSE requests through {got}");
        }
    }

    /// Kills the daemon with `signal` and starts a new one on the same state.
    pub fn restart_after(&mut self, signal: i32) {
        self.kill(signal);
        self.start_again();
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends the daemon a signal and waits for it to exit.
    pub fn kill(&mut self, signal: i32) {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let _ = self.child.wait();
    }

    /// Starts a daemon on the same state and waits until it is ready.
    pub fn start_again(&mut self) {
        self.child = spawn_daemon(&self.device, &self.state, &[], &self.launch);
        self.wait_ready();
    }

    /// Starts a daemon on the same state and returns its exit status and
    /// stderr, for a start that must fail.
    pub fn start_failing(&self) -> std::process::Output {
        let mut c = Command::new(LUO);
        c.args(["daemon", "--device"])
            .arg(&self.device)
            .arg("--state-dir")
            .arg(&self.state);
        c.output().unwrap()
    }

    pub fn status_ok(&self) -> bool {
        Command::new(LUO)
            .arg("status")
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = Command::new(LUO)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "luo status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `luo update --simulate`.
    pub fn update(&self) -> std::process::Output {
        Command::new(LUO)
            .args(["update", "--simulate", "--state-dir"])
            .arg(&self.state)
            .output()
            .unwrap()
    }

    /// `luo run --device D -- argv`.
    pub fn run(&self, argv: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut c = Command::new(LUO);
        c.arg("run")
            .arg("--device")
            .arg(&self.device)
            .arg("--")
            .args(argv);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// The probe `name` of the calling test binary, run under `luo run` with
    /// `LUO_PROBE_DEVICE` set; asserts it passed and the daemon lives.
    pub fn run_probe(&mut self, name: &str) {
        let out = self.probe_command(name).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name} failed:\n{text}");
        assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
        assert!(self.alive(), "the daemon died");
        assert!(self.status_ok());
    }

    /// The command that runs probe `name` under `luo run`.
    pub fn probe_command(&self, name: &str) -> Command {
        let exe = std::env::current_exe().unwrap();
        let mut c = Command::new(LUO);
        c.arg("run")
            .arg("--device")
            .arg(&self.device)
            .arg("--")
            .arg(exe);
        c.args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        c.env("LUO_PROBE_DEVICE", &self.device);
        c
    }

    /// Waits for the daemon to exit by itself (a crash point).
    pub fn wait_exit(&mut self) {
        let _ = self.child.wait();
    }

    /// The daemon's soft `RLIMIT_NOFILE` (from `/proc/PID/limits`).
    pub fn fd_limit(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Ends the `luo run` workloads of the daemon whose state dir is `state`
/// (holders a test or a failed update left alive), through their cgroups.
pub fn end_workloads(state: &Path) {
    if let Some(root) = luo_kexec_helper::cgroup2_mount() {
        let name = state.to_string_lossy().trim_matches('/').replace('/', "_");
        let base = root.join("luo").join(name);
        for epoch in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let _ = std::fs::write(epoch.path().join("cgroup.kill"), "1");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // End the workloads this daemon's tests left behind (holders that a
        // failed update kept alive).
        end_workloads(&self.state);
        let _ = Command::new(LUO)
            .args(["shutdown", "--state-dir"])
            .arg(&self.state)
            .stdout(std::process::Stdio::null())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}
