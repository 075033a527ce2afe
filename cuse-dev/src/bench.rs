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
#[derive(Debug)]
pub struct Row {
    /// The operation.
    pub op: &'static str,
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
        Ok(Row { op, micros, floor })
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

/// Runs the workload and returns its rows.
///
/// # Errors
/// Any ioctl failure, with the step it happened in.
pub fn run(device: &Path, n: usize) -> std::io::Result<Vec<Row>> {
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
    let session = &sessions[0];
    let files: Vec<File> = (0..n).map(|_| memfd()).collect::<std::io::Result<_>>()?;
    let mut token = 0u64;
    rows.push(timer.timed("SESSION_PRESERVE_FD", n, || {
        let mut a = FdArgs {
            size: 16,
            fd: files[token as usize].as_raw_fd(),
            token,
        };
        token += 1;
        ioctl(session, uapi::PRESERVE_FD, &mut a)
    })?);
    rows.push(timer.timed("SESSION_GET_NAME", n, || {
        let mut a = GetNameArgs {
            size: 72,
            reserved: 0,
            name: [0; 64],
        };
        ioctl(session, uapi::GET_NAME, &mut a)
    })?);
    if let Some(row) = retrieve_rows(device, &timer, &format!("bench-{tag}-1"), n)? {
        rows.push(row);
    }
    Ok(rows)
}

/// RETRIEVE_FD needs an update; only our daemon can simulate one.
fn retrieve_rows(
    device: &Path,
    timer: &Timer<'_>,
    name: &str,
    n: usize,
) -> std::io::Result<Option<Row>> {
    let Ok(socket) = daemon_socket(device) else {
        eprintln!(
            "note: {} is not a luo daemon; RETRIEVE_FD needs a kexec there and is skipped",
            device.display()
        );
        return Ok(None);
    };
    let resp = control::call(&socket, &Request::Update, None)?;
    if !resp.ok {
        return Err(std::io::Error::other(resp.error.unwrap_or_default()));
    }
    let incoming = create(timer.dev, name, uapi::RETRIEVE_SESSION)?;
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
    Ok(Some(row))
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
