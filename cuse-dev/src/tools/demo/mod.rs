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
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::client::ioctl as lu;
use crate::control::{self, Request};
use crate::uapi;

mod timeline;
use timeline::mark;

use luo_handlers::mem::{memfd, Mapping};
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

/// An ioctl's error, with what was being done.
fn context(what: &str) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn session_ioctl(dev: BorrowedFd<'_>, cmd: u32, name: &str) -> std::io::Result<OwnedFd> {
    let what = format!("session {name}");
    if cmd == uapi::CREATE_SESSION {
        lu::create_session(dev, name).map_err(context(&what))
    } else {
        lu::retrieve_session(dev, name).map_err(context(&what))
    }
}

fn preserve(session: BorrowedFd<'_>, fd: BorrowedFd<'_>, token: u64) -> std::io::Result<()> {
    lu::preserve_fd(session, fd, token).map_err(context(&format!("preserving token {token}")))
}

fn retrieve(session: BorrowedFd<'_>, token: u64) -> std::io::Result<File> {
    let file =
        lu::retrieve_fd(session, token).map_err(context(&format!("retrieving token {token}")))?;
    Ok(File::from(file))
}

fn fill(page: &mut [u64], index: u64, generation: u64) {
    page[0] = index;
    page[1] = generation;
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(17) ^ 1;
    for w in &mut page[2..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

fn hash(page: &[u64]) -> u64 {
    page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(5)
    })
}

struct Progress {
    what: &'static str,
    start: Instant,
    shown: bool,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress {
            what,
            start: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if self.start.elapsed() > Duration::from_secs(1) && (done % 4096 == 0 || done == total) {
            print!("\r  {}: {:3}%", self.what, done * 100 / total.max(1));
            let _ = std::io::stdout().flush();
            self.shown = true;
        }
    }

    fn done(self) -> Duration {
        if self.shown {
            println!("\r  {}: done      ", self.what);
        }
        self.start.elapsed()
    }
}

/// One stage of the demo VMM (runs under `luo run`).
///
/// # Errors
/// Device, memory or verification failures.
pub fn vmm(
    device: &Path,
    (stage, wait): (u32, bool),
    backing: Backing,
    mib: u64,
    extra: usize,
) -> Result<(), DemoError> {
    if stage != 1 {
        mark("new VMM running");
    }
    let dev = step(
        "opening the device",
        File::options().read(true).write(true).open(device),
    )?;
    match stage {
        1 => vmm_stage1(dev, backing, (mib, extra), wait),
        _ => vmm_stage2(dev, backing, extra),
    }
}

/// Stage 1; with `wait`, the VMM waits for the update (which ends it)
/// instead of leaving its sessions to a child and exiting.
fn vmm_stage1(
    dev: File,
    backing: Backing,
    (mib, extra): (u64, usize),
    wait: bool,
) -> Result<(), DemoError> {
    let len = mib * 1024 * 1024;
    let flags = if backing == Backing::Hugetlb {
        libc::MFD_HUGETLB
    } else {
        0
    };
    let ram = step("allocating guest RAM", memfd("guest-ram", flags, len))?;
    let mut map = step("mapping guest RAM", Mapping::new(ram.as_fd(), len as usize))?;
    let written = run_vcpu(&mut map);
    println!(
        "stage 1: vCPU wrote {written} pages ({} MiB of RAM), paused",
        mib
    );
    let mut progress = Progress::new("checksumming guest RAM");
    let mut sums = Vec::with_capacity(map.pages());
    for i in 0..map.pages() {
        sums.push(hash(map.page(i)));
        progress.update(i + 1, map.pages());
    }
    progress.done();
    // The checksums only serve the check: written before the pause.
    let state = step("writing the checksums", vmm_state(&sums))?;
    let d = dev.as_fd();
    let session = step(
        "creating the session",
        session_ioctl(d, uapi::CREATE_SESSION, session_name(backing)),
    )?;
    // The blackout starts here: a real VMM stops its vCPUs right before it
    // saves its device state and hands guest RAM to LUO.
    let paused_ns = crate::sys::monotonic_ns();
    timeline::mark_at("vCPU paused", paused_ns);
    step(
        "writing VMM state",
        stamp_state(&state, len, paused_ns, sums.len()),
    )?;
    mark("VMM state written");
    let s = session.as_fd();
    step("preserving guest RAM", preserve(s, ram.as_fd(), RAM_TOKEN))?;
    mark("guest RAM preserved");
    step(
        "preserving VMM state",
        preserve(s, state.as_fd(), STATE_TOKEN),
    )?;
    mark("VMM state preserved");
    let mut held = vec![session];
    for i in 0..extra {
        let name = format!("{SESSION}-{i}");
        let extra_session = step(
            "creating an extra session",
            session_ioctl(d, uapi::CREATE_SESSION, &name),
        )?;
        let small = step("creating a small memfd", memfd("extra", 0, 8))?;
        step(
            "writing a small memfd",
            std::os::unix::fs::FileExt::write_all_at(&small, &(i as u64).to_le_bytes(), 0),
        )?;
        step(
            "preserving a small memfd",
            preserve(extra_session.as_fd(), small.as_fd(), 1),
        )?;
        held.push(extra_session);
    }
    println!(
        "stage 1: preserved guest RAM and VMM state in session {:?} (+{extra} sessions); holding them for the update",
        session_name(backing)
    );
    drop(dev);
    if !wait {
        // Held by a detached child, as a VMM waiting for the update would.
        step("holding the sessions", crate::sys::hold_in_child(held))?;
        mark("sessions held");
        return Ok(());
    }
    mark("sessions held");
    // A VMM waits for the update with its sessions and guest RAM mapped;
    // the update ends it.
    let _keep = (held, map);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Fills every page once, then keeps dirtying pages for a second.
fn run_vcpu(map: &mut Mapping) -> u64 {
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let pages = map.pages();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let pages = pages as u64;
            let mut n = 0u64;
            while n < pages || !stop.load(Ordering::Relaxed) {
                let i = (n % pages) as usize;
                fill(map.page_mut(i), i as u64, n / pages);
                n += 1;
                written.store(n, Ordering::Relaxed);
            }
        });
        let mut progress = Progress::new("vCPU filling guest RAM");
        while (written.load(Ordering::Relaxed) as usize) < pages {
            progress.update(
                written.load(Ordering::Relaxed) as usize / 4096 * 4096,
                pages,
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        progress.done();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
    });
    written.into_inner()
}

/// The VMM state memfd: a 32-byte header, zero until [`stamp_state`], then
/// the checksum of every page.
fn vmm_state(sums: &[u64]) -> std::io::Result<File> {
    let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
    let f = memfd("vmm-state", 0, 32 + bytes.len() as u64)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 32)?;
    Ok(f)
}

/// Writes the state's header: what a VMM saves at the pause.
fn stamp_state(f: &File, len: u64, paused_ns: u64, pages: usize) -> std::io::Result<()> {
    let header: Vec<u8> = [STATE_MAGIC, len, paused_ns, pages as u64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::os::unix::fs::FileExt::write_all_at(f, &header, 0)
}

fn vmm_stage2(dev: File, backing: Backing, extra: usize) -> Result<(), DemoError> {
    let d = dev.as_fd();
    let session = step(
        "retrieving the session",
        session_ioctl(d, uapi::RETRIEVE_SESSION, session_name(backing)),
    )?;
    mark("session retrieved");
    let s = session.as_fd();
    let ram = step("retrieving guest RAM", retrieve(s, RAM_TOKEN))?;
    let first_ns = crate::sys::monotonic_ns();
    timeline::mark_at("guest RAM retrieved", first_ns);
    let state = step("retrieving VMM state", retrieve(s, STATE_TOKEN))?;
    let (len, paused_ns, sums) = read_state(&state)?;
    let t = Instant::now();
    for i in 0..extra {
        let name = format!("{SESSION}-{i}");
        let es = step(
            "retrieving an extra session",
            session_ioctl(d, uapi::RETRIEVE_SESSION, &name),
        )?;
        let small = step("retrieving a small memfd", retrieve(es.as_fd(), 1))?;
        let mut v = [0u8; 8];
        step(
            "reading a small memfd",
            std::os::unix::fs::FileExt::read_exact_at(&small, &mut v, 0),
        )?;
        if u64::from_le_bytes(v) != i as u64 {
            return Err(DemoError::Mismatch(format!("session {name} holds {v:?}")));
        }
        step("finishing an extra session", finish(es.as_fd()))?;
    }
    let extra_time = t.elapsed();
    let map = step("mapping guest RAM", Mapping::new(ram.as_fd(), len as usize))?;
    let mut progress = Progress::new("verifying guest RAM");
    for (i, want) in sums.iter().enumerate() {
        let page = map.page(i);
        if page[0] != i as u64 || hash(page) != *want {
            return Err(DemoError::Mismatch(format!(
                "page {i} differs from what stage 1 recorded"
            )));
        }
        progress.update(i + 1, sums.len());
    }
    let verify_time = progress.done();
    step("finishing the session", finish(s))?;
    let blackout = Duration::from_nanos(first_ns.saturating_sub(paused_ns));
    println!(
        "stage 2: retrieved guest RAM; all {} pages ({} MiB) match their stage-1 checksums",
        sums.len(),
        len >> 20
    );
    println!(
        "  blackout (preserve started -> guest RAM retrieved in the new epoch): {:.1} ms",
        blackout.as_secs_f64() * 1e3
    );
    if extra > 0 {
        println!(
            "  {extra} extra sessions retrieved, checked and finished in {:.1} ms",
            extra_time.as_secs_f64() * 1e3
        );
    }
    println!("  verification: {:.1} ms", verify_time.as_secs_f64() * 1e3);
    Ok(())
}

fn finish(session: BorrowedFd<'_>) -> std::io::Result<()> {
    lu::finish(session).map_err(context("finish"))
}

fn read_state(f: &File) -> Result<(u64, u64, Vec<u64>), DemoError> {
    let mut bytes = vec![0u8; step("sizing VMM state", f.metadata())?.len() as usize];
    step(
        "reading VMM state",
        std::os::unix::fs::FileExt::read_exact_at(f, &mut bytes, 0),
    )?;
    let word = |i: usize| {
        bytes
            .get(i * 8..i * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if word(0) != Some(STATE_MAGIC) {
        return Err(DemoError::Mismatch(
            "the VMM state memfd came back corrupted".into(),
        ));
    }
    let (len, paused, n) = (
        word(1).unwrap_or(0),
        word(2).unwrap_or(0),
        word(3).unwrap_or(0) as usize,
    );
    let sums: Option<Vec<u64>> = (0..n).map(|i| word(4 + i)).collect();
    let sums =
        sums.ok_or_else(|| DemoError::Mismatch("the VMM state memfd is truncated".into()))?;
    Ok((len, paused, sums))
}
