//! `luo bench`: per-call latency of the LUO ioctls on any device path (the
//! in-kernel one or ours), next to the floor of a no-op ioctl round trip.

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
}

impl Row {
    fn pct(&self, p: f64) -> f64 {
        let i = ((self.micros.len() as f64 - 1.0) * p).round() as usize;
        self.micros[i]
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

fn timed<F: FnMut() -> std::io::Result<()>>(
    op: &'static str,
    n: usize,
    mut f: F,
) -> std::io::Result<Row> {
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    Ok(Row { op, micros })
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
    let mut rows = Vec::new();
    let floor_cmd = uapi::io(uapi::IOCTL_TYPE, 0x3f);
    let mut size = 0u32;
    rows.push(timed("no-op ioctl (floor)", n, || {
        match ioctl(&dev, floor_cmd, &mut size) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other.map(|_| ()),
        }
    })?);
    let mut sessions = Vec::with_capacity(n);
    let mut i = 0;
    rows.push(timed("CREATE_SESSION", n, || {
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
    rows.push(timed("SESSION_PRESERVE_FD", n, || {
        let mut a = FdArgs {
            size: 16,
            fd: files[token as usize].as_raw_fd(),
            token,
        };
        token += 1;
        ioctl(session, uapi::PRESERVE_FD, &mut a)
    })?);
    rows.push(timed("SESSION_GET_NAME", n, || {
        let mut a = GetNameArgs {
            size: 72,
            reserved: 0,
            name: [0; 64],
        };
        ioctl(session, uapi::GET_NAME, &mut a)
    })?);
    if let Some(row) = retrieve_rows(device, &dev, &format!("bench-{tag}-1"), n)? {
        rows.push(row);
    }
    Ok(rows)
}

/// RETRIEVE_FD needs an update; only our daemon can simulate one.
fn retrieve_rows(device: &Path, dev: &File, name: &str, n: usize) -> std::io::Result<Option<Row>> {
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
    let incoming = create(dev, name, uapi::RETRIEVE_SESSION)?;
    let mut token = 0u64;
    let mut kept = Vec::with_capacity(n);
    let row = timed("SESSION_RETRIEVE_FD", n, || {
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

/// Prints rows as a Markdown table with the ratio to the floor.
pub fn print(rows: &[Row], device: &Path) {
    let floor = rows[0].pct(0.5);
    println!(
        "device: {}   calls per row: {}",
        device.display(),
        rows[0].micros.len()
    );
    println!("| ioctl | p50 (µs) | p99 (µs) | p50 / floor |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} |",
            r.op,
            r.pct(0.5),
            r.pct(0.99),
            r.pct(0.5) / floor
        );
    }
}
