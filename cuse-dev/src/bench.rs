//! `luo bench`: per-call latency of the LUO ioctls on any device path (the
//! in-kernel one or ours), next to the floor of a no-op ioctl round trip.
//!
//! Each measured call is paired with a floor call made right before it, so a
//! row's ratio compares the two under the same conditions (CPU placement and
//! load drift a lot on small shared machines).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use zerocopy::IntoBytes;

use crate::control::{self, Request};
use crate::run::daemon_socket;
use crate::uapi::{self, FdArgs, GetNameArgs, SessionArgs};

/// One row of results.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// The operation.
    pub op: String,
    /// Per-call latencies in microseconds, sorted.
    pub micros: Vec<f64>,
    /// Latencies of the floor calls interleaved with them, sorted.
    pub floor: Vec<f64>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Times calls of one ioctl, each preceded by a timed floor call on `dev`.
struct Timer<'a> {
    dev: &'a File,
}

impl Timer<'_> {
    /// A no-op ioctl: a command number out of range, rejected before the
    /// caller's memory is touched.
    fn floor(&self) -> std::io::Result<f64> {
        let mut size = 0u32;
        let t = Instant::now();
        match ioctl(self.dev, uapi::io(uapi::IOCTL_TYPE, 0x3f), &mut size) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(t.elapsed().as_secs_f64() * 1e6),
            Err(e) => Err(e),
            Ok(()) => Err(std::io::Error::other(
                "the no-op ioctl unexpectedly succeeded",
            )),
        }
    }

    fn timed<F: FnMut() -> std::io::Result<()>>(
        &self,
        op: &'static str,
        n: usize,
        mut f: F,
    ) -> std::io::Result<Row> {
        let mut micros = Vec::with_capacity(n);
        let mut floor = Vec::with_capacity(n);
        for _ in 0..n {
            floor.push(self.floor()?);
            let t = Instant::now();
            f()?;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
        }
        micros.sort_by(f64::total_cmp);
        floor.sort_by(f64::total_cmp);
        Ok(Row {
            op: op.to_owned(),
            micros,
            floor,
        })
    }
}

fn ioctl<T: IntoBytes>(fd: &File, cmd: u32, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: arg is a live struct of the size the command expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, (arg as *mut T).cast::<u8>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn name_field(s: &str) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[..s.len()].copy_from_slice(s.as_bytes());
    f
}

fn create(dev: &File, name: &str, cmd: u32) -> std::io::Result<File> {
    let mut a = SessionArgs {
        size: 72,
        fd: -1,
        name: name_field(name),
    };
    ioctl(dev, cmd, &mut a)?;
    // SAFETY: the ioctl returned a new fd that we now own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(a.fd) }))
}

fn memfd() -> std::io::Result<File> {
    let name = CString::new("luo-bench").expect("no NUL");
    // SAFETY: name is a valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn raise_nofile() {
    // SAFETY: rlimit is plain data; getrlimit/setrlimit take valid pointers.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// What a bench stage reports to the orchestrator.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StageReport {
    /// Its rows.
    pub rows: Vec<Row>,
    /// The session stage 1 left for stage 2.
    pub session: String,
}

/// Runs the workload and returns its rows. On our daemon, the preserve side
/// runs under `luo run`, a simulated update follows and RETRIEVE_FD is
/// measured in the new epoch (an update ends the old epoch's processes, so
/// each side runs in its own process); on another device (the kernel's), the
/// preserve side runs here and RETRIEVE_FD, which needs a kexec, is skipped.
///
/// # Errors
/// Any failing step, with what it was.
pub fn run(device: &Path, n: usize) -> std::io::Result<Vec<Row>> {
    let Ok(socket) = daemon_socket(device) else {
        eprintln!(
            "note: {} is not a luo daemon; RETRIEVE_FD needs a kexec there and is skipped",
            device.display()
        );
        return stage1(device, n, false).map(|r| r.rows);
    };
    let first = run_stage(device, n, 1, None)?;
    let resp = control::call(&socket, &Request::Update, None)?;
    if !resp.ok {
        return Err(std::io::Error::other(resp.error.unwrap_or_default()));
    }
    let second = run_stage(device, n, 2, Some(&first.session))?;
    Ok(first.rows.into_iter().chain(second.rows).collect())
}

fn run_stage(
    device: &Path,
    n: usize,
    stage: u32,
    session: Option<&str>,
) -> std::io::Result<StageReport> {
    let exe = std::env::current_exe()?;
    let mut c = std::process::Command::new(&exe);
    c.arg("run")
        .arg("--device")
        .arg(device)
        .arg("--")
        .arg(&exe)
        .arg("bench")
        .arg("--device")
        .arg(device);
    c.args(["--calls", &n.to_string(), "--stage", &stage.to_string()]);
    if let Some(s) = session {
        c.args(["--session", s]);
    }
    let out = c.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "bench stage {stage} exited with {}",
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Stage 1: CREATE_SESSION, PRESERVE_FD and GET_NAME; with `hold`, the
/// sessions are kept by a detached child for stage 2.
///
/// # Errors
/// Any ioctl failure.
pub fn stage1(device: &Path, n: usize, hold: bool) -> std::io::Result<StageReport> {
    raise_nofile();
    let dev = File::options().read(true).write(true).open(device)?;
    let tag = std::process::id();
    let timer = Timer { dev: &dev };
    let mut rows = Vec::new();
    let mut sessions = Vec::with_capacity(n);
    let mut i = 0;
    rows.push(timer.timed("CREATE_SESSION", n, || {
        i += 1;
        sessions.push(create(
            &dev,
            &format!("bench-{tag}-{i}"),
            uapi::CREATE_SESSION,
        )?);
        Ok(())
    })?);
    let files: Vec<File> = (0..n).map(|_| memfd()).collect::<std::io::Result<_>>()?;
    let mut token = 0u64;
    rows.push(timer.timed("SESSION_PRESERVE_FD", n, || {
        let mut a = FdArgs {
            size: 16,
            fd: files[token as usize].as_raw_fd(),
            token,
        };
        token += 1;
        ioctl(&sessions[0], uapi::PRESERVE_FD, &mut a)
    })?);
    rows.push(timer.timed("SESSION_GET_NAME", n, || {
        let mut a = GetNameArgs {
            size: 72,
            reserved: 0,
            name: [0; 64],
        };
        ioctl(&sessions[0], uapi::GET_NAME, &mut a)
    })?);
    if hold {
        crate::demo::hold(sessions.into_iter().map(OwnedFd::from).collect());
    }
    Ok(StageReport {
        rows,
        session: format!("bench-{tag}-1"),
    })
}

/// Stage 2: RETRIEVE_FD of every file of the session stage 1 left.
///
/// # Errors
/// Any ioctl failure.
pub fn stage2(device: &Path, n: usize, name: &str) -> std::io::Result<StageReport> {
    raise_nofile();
    let dev = File::options().read(true).write(true).open(device)?;
    let timer = Timer { dev: &dev };
    let incoming = create(&dev, name, uapi::RETRIEVE_SESSION)?;
    let mut token = 0u64;
    let mut kept = Vec::with_capacity(n);
    let row = timer.timed("SESSION_RETRIEVE_FD", n, || {
        let mut a = FdArgs {
            size: 16,
            fd: -1,
            token,
        };
        token += 1;
        ioctl(&incoming, uapi::RETRIEVE_FD, &mut a)?;
        // SAFETY: the ioctl returned a new fd that we now own.
        kept.push(unsafe { OwnedFd::from_raw_fd(a.fd) });
        Ok(())
    })?;
    let mut fin = uapi::FinishArgs {
        size: 8,
        reserved: 0,
    };
    ioctl(&incoming, uapi::FINISH, &mut fin)?;
    Ok(StageReport {
        rows: vec![row],
        session: name.to_owned(),
    })
}

/// Prints rows as a Markdown table with each row's ratio to its own floor.
pub fn print(rows: &[Row], device: &Path) {
    let calls = rows.first().map_or(0, |r| r.micros.len());
    println!("device: {}   calls per row: {calls}", device.display());
    println!("| ioctl | p50 (µs) | p99 (µs) | floor p50 (µs) | floor p99 (µs) | p50 / floor p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let (p50, floor50) = (pct(&r.micros, 0.5), pct(&r.floor, 0.5));
        println!(
            "| {} | {p50:.1} | {:.1} | {floor50:.1} | {:.1} | {:.2} |",
            r.op,
            pct(&r.micros, 0.99),
            pct(&r.floor, 0.99),
            p50 / floor50
        );
    }
}
