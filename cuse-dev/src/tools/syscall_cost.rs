//! What `luo run` costs the calls of a program that are not LUO's: the
//! seccomp filter is evaluated on every syscall, and `fstatfs`/`statfs` are
//! trapped whatever their file (the daemon answers a session fd's and lets
//! the kernel run every other). `luo bench --syscalls` times each call here
//! and in a child under `luo run`, side by side.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use crate::client::run::daemon_socket;

/// One call, timed `calls` times: per-call latencies in microseconds, sorted.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Timed {
    /// The call and its file.
    pub call: String,
    /// Sorted latencies (µs).
    pub micros: Vec<f64>,
}

fn timed(call: &str, calls: usize, mut f: impl FnMut() -> i64) -> std::io::Result<Timed> {
    let mut micros = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        if f() < 0 {
            return Err(std::io::Error::other(format!(
                "{call}: {}",
                std::io::Error::last_os_error()
            )));
        }
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    Ok(Timed {
        call: call.to_owned(),
        micros,
    })
}

/// Times, in this process, the calls a program makes on files that are not
/// LUO's: `fstat` (never trapped), `fstatfs` and `statfs` (trapped under
/// `luo run`), `readlink` of an fd's `/proc` path (not trapped).
///
/// # Errors
/// A call that fails.
pub fn measure(calls: usize) -> std::io::Result<Vec<Timed>> {
    let memfd = luo_handlers::mem::create("syscall-cost", luo_handlers::Backing::Shmem, 4096)
        .map_err(std::io::Error::other)?;
    let fd = memfd.as_raw_fd();
    let link = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    let proc = c"/proc";
    // SAFETY: all-zero is a valid stat and statfs to overwrite.
    let (mut st, mut sfs): (libc::stat, libc::statfs) = unsafe { std::mem::zeroed() };
    let mut buf = [0u8; 256];
    let fstat = || {
        // SAFETY: a valid fd and out pointer of the right type.
        i64::from(unsafe { libc::fstat(fd, &mut st) })
    };
    let mut rows = vec![timed("fstat (a memfd)", calls, fstat)?];
    let fstatfs = || {
        // SAFETY: a valid fd and out pointer of the right type.
        i64::from(unsafe { libc::fstatfs(fd, &mut sfs) })
    };
    rows.push(timed("fstatfs (a memfd)", calls, fstatfs)?);
    let statfs = || {
        // SAFETY: a C string and an out pointer of the right type.
        i64::from(unsafe { libc::statfs(proc.as_ptr(), &mut sfs) })
    };
    rows.push(timed("statfs (/proc)", calls, statfs)?);
    let readlink = || {
        // SAFETY: a C string and a buffer of the length passed.
        unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) as i64 }
    };
    rows.push(timed("readlink (/proc/self/fd/N)", calls, readlink)?);
    Ok(rows)
}

fn p50(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// Times the calls here and under `luo run` on `device` (a daemon's), and
/// prints them side by side.
///
/// # Errors
/// No daemon serves `device`, or a run fails.
pub fn compare(device: &Path, calls: usize) -> std::io::Result<()> {
    daemon_socket(device).map_err(std::io::Error::other)?;
    let outside = measure(calls)?;
    let args = ["syscall-cost".into(), "--calls".into(), calls.to_string()];
    let inside: Vec<Timed> = super::under_luo_run(device, &args, "the run under `luo run`")?;
    println!("calls per row: {calls}");
    println!("| call | p50 outside `luo run` (µs) | p50 under `luo run` (µs) | ratio |");
    println!("|---|---:|---:|---:|");
    for (o, i) in outside.iter().zip(&inside) {
        let (a, b) = (p50(&o.micros), p50(&i.micros));
        println!("| {} | {a:.2} | {b:.2} | {:.1} |", o.call, b / a);
    }
    Ok(())
}
