//! `luo demo`: a VMM-like workload live-updated through the device.
//!
//! The driver starts a private daemon, runs the "VMM" under `luo run`: it
//! fills guest RAM in a memfd from a vCPU thread that keeps dirtying it, pauses
//! the vCPU, records a checksum per page, preserves RAM and its own state and
//! holds them like a VMM waiting for the update. The driver then runs a
//! simulated update (which ends the old VMM), and a new VMM retrieves
//! everything in the new epoch and verifies every page. Reported: the blackout
//! (vCPU pause → first retrieve), the update itself, and the totals.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::control::{self, Request};

mod timeline;
mod vmm;
pub use vmm::vmm;

const SESSION: &str = "demo-vm";

/// The VMM's session: one per backing, so both can be held at once.
fn session_name(backing: Backing) -> &'static str {
    match backing {
        Backing::Shmem => SESSION,
        Backing::Hugetlb => "demo-vm-hugetlb",
    }
}
const RAM_TOKEN: u64 = 1;
const STATE_TOKEN: u64 = 2;
const STATE_MAGIC: u64 = 0x4c55_4f44_454d_4f31; // "LUODEMO1"

/// Why the demo failed.
#[derive(Debug, Error)]
pub enum DemoError {
    /// A step failed.
    #[error("{step} failed")]
    Step {
        /// The step.
        step: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Guest RAM came back different.
    #[error("guest RAM check failed: {0}")]
    Mismatch(String),
}

fn step<T>(step: &str, r: std::io::Result<T>) -> Result<T, DemoError> {
    r.map_err(|source| DemoError::Step {
        step: step.to_owned(),
        source,
    })
}

/// Memory backing the guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backing {
    /// shmem memfd.
    Shmem,
    /// hugetlb memfd (2 MiB pages).
    Hugetlb,
}

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Guest RAM in MiB (shmem).
    pub size_mib: u64,
    /// Guest RAM in MiB for the hugetlb run (0: none).
    pub hugetlb_mib: u64,
    /// Sessions preserved besides the VM's (each with one small memfd).
    pub extra_sessions: usize,
}

// ---- the driver -----------------------------------------------------------

struct DemoDaemon {
    dir: PathBuf,
    child: Child,
}

impl DemoDaemon {
    fn start(exe: &Path) -> Result<DemoDaemon, DemoError> {
        let dir = std::env::temp_dir().join(format!("luo-demo-{}", std::process::id()));
        step("creating the demo directory", std::fs::create_dir_all(&dir))?;
        // Only root may change the device's directory, whatever the umask.
        step(
            "restricting the demo directory",
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)),
        )?;
        let log = step(
            "creating the daemon log",
            File::create(dir.join("daemon.log")),
        )?;
        let child = Command::new(exe)
            .args(["daemon", "--device"])
            .arg(dir.join("liveupdate"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stderr(log)
            .spawn();
        let daemon = DemoDaemon {
            child: step("starting luo daemon", child)?,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while control::call(&daemon.socket(), &Request::Status, None).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(daemon.dir.join("daemon.log")).unwrap_or_default();
                return Err(DemoError::Step {
                    step: "waiting for the daemon".into(),
                    source: std::io::Error::other(format!("not ready after 10 s; its log:\n{log}")),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    fn device(&self) -> PathBuf {
        self.dir.join("liveupdate")
    }

    fn socket(&self) -> PathBuf {
        control::socket_in(&self.dir.join("state"))
    }
}

impl Drop for DemoDaemon {
    fn drop(&mut self) {
        let _ = control::call(&self.socket(), &Request::Shutdown, None);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the whole demo and prints its report.
///
/// # Errors
/// The first failing step, or a page that came back different.
pub fn run(opts: &Options) -> Result<(), DemoError> {
    let exe = step("finding the luo binary", std::env::current_exe())?;
    let daemon = DemoDaemon::start(&exe)?;
    println!(
        "luo demo: daemon serving {} (a FUSE device with a private state dir)",
        daemon.device().display()
    );
    run_one(&exe, &daemon, opts, Backing::Shmem, opts.size_mib)?;
    if opts.hugetlb_mib > 0 {
        match free_huge_mib() {
            Some(free) if free >= opts.hugetlb_mib => {
                run_one(&exe, &daemon, opts, Backing::Hugetlb, opts.hugetlb_mib)?
            }
            free => println!(
                "\nhugetlb: skipped, {} MiB of free 2 MiB huge pages, {} MiB needed \
                 (as root: echo {} > /proc/sys/vm/nr_hugepages)",
                free.unwrap_or(0),
                opts.hugetlb_mib,
                opts.hugetlb_mib / 2 + 8
            ),
        }
    }
    println!("\nluo demo: verified");
    Ok(())
}

fn run_one(
    exe: &Path,
    daemon: &DemoDaemon,
    opts: &Options,
    backing: Backing,
    mib: u64,
) -> Result<(), DemoError> {
    println!(
        "\n== {mib} MiB of {backing:?} guest RAM, {} extra sessions ==",
        opts.extra_sessions
    );
    let timeline = timeline::fresh(&daemon.dir, &format!("{backing:?}"));
    let vmm = |stage| {
        vmm_stage(
            exe,
            daemon,
            &timeline,
            (stage, backing, mib),
            opts.extra_sessions,
        )
    };
    // The update comes once the old VMM holds its sessions, as it would for
    // a real VMM: the old one's exit (unmapping guest RAM) is not waited for.
    let mut old = vmm(1)?;
    wait_held(&mut old, &timeline)?;
    let resp = step(
        "the simulated update",
        control::call(&daemon.socket(), &Request::Update, None),
    )?;
    timeline::mark_in(&timeline, "update answered");
    if !resp.ok {
        return Err(DemoError::Step {
            step: "the simulated update".into(),
            source: std::io::Error::other(resp.error.unwrap_or_default()),
        });
    }
    println!("update: {}", resp.message.unwrap_or_default());
    let new = vmm(2)?;
    wait_vmm(2, new)?;
    // Ended by the update, or by itself once it held its sessions.
    let _ = old.wait();
    println!("  blackout phases:");
    for line in timeline::phases(&timeline, "vCPU paused", "guest RAM retrieved") {
        println!("{line}");
    }
    Ok(())
}

fn vmm_stage(
    exe: &Path,
    d: &DemoDaemon,
    timeline: &Path,
    (stage, backing, mib): (u32, Backing, u64),
    extra: usize,
) -> Result<Child, DemoError> {
    if stage != 1 {
        timeline::mark_in(timeline, "new VMM starting");
    }
    let device = d.device();
    let child = Command::new(exe)
        .arg("run")
        .arg("--device")
        .arg(&device)
        .args(["--", &exe.to_string_lossy(), "demo-vmm", "--device"])
        .arg(&device)
        .args([
            "--stage",
            &stage.to_string(),
            "--size-mib",
            &mib.to_string(),
        ])
        .args(["--extra-sessions", &extra.to_string()])
        .args((stage == 1).then_some("--wait-for-update"))
        .args([
            "--backing",
            if backing == Backing::Shmem {
                "shmem"
            } else {
                "hugetlb"
            },
        ])
        .env(timeline::TIMELINE_ENV, timeline)
        .stdin(Stdio::null())
        .spawn();
    step(&format!("starting VMM stage {stage}"), child)
}

/// Waits until the old VMM holds its sessions (or fails).
fn wait_held(old: &mut Child, timeline: &Path) -> Result<(), DemoError> {
    loop {
        if timeline::has(timeline, "sessions held") {
            return Ok(());
        }
        if let Some(status) = step("waiting for VMM stage 1", old.try_wait())? {
            if timeline::has(timeline, "sessions held") {
                return Ok(());
            }
            return Err(DemoError::Step {
                step: "VMM stage 1".into(),
                source: std::io::Error::other(format!("exited with {status}")),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn wait_vmm(stage: u32, mut child: Child) -> Result<(), DemoError> {
    let status = step(&format!("waiting for VMM stage {stage}"), child.wait())?;
    if status.success() {
        Ok(())
    } else {
        Err(DemoError::Step {
            step: format!("VMM stage {stage}"),
            source: std::io::Error::other(format!("exited with {status}")),
        })
    }
}

fn free_huge_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some(field("HugePages_Free:")? * field("Hugepagesize:")? / 1024)
}

// ---- the VMM ---------------------------------------------------------------
