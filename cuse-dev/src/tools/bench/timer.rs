//! One bench row: calls of one ioctl timed, each right after a floor call
//! (the bare round trip of the ioctl's transport), and where the daemon's
//! time went.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use super::ioctl;
use crate::control::{self, Request};
use crate::profile::ProfileRow;
use crate::uapi;

/// One row of results.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// The operation.
    pub op: String,
    /// Per-call latencies in microseconds, sorted.
    pub micros: Vec<f64>,
    /// Latencies of the floor calls interleaved with them, sorted.
    pub floor: Vec<f64>,
    /// The floor is the trapped no-op (see [`Floor`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trapped: bool,
    /// Where the daemon's time went in these calls and their floor calls,
    /// when the device is our daemon's (see `profile`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemon: Vec<ProfileRow>,
}

impl Row {
    /// A row of one sample, without a floor.
    pub fn sample(op: String, micros: f64) -> Row {
        Row {
            op,
            micros: vec![micros],
            floor: Vec::new(),
            trapped: false,
            daemon: Vec::new(),
        }
    }
}

/// The no-op a row's calls are paired with: the bare round trip of the
/// transport the row's ioctl takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// An ioctl on the device that the daemon rejects at once (a command
    /// number out of range → EINVAL, caller memory untouched): a FUSE (or
    /// CUSE) round trip.
    Fuse,
    /// An fd-returning ioctl on no fd (-1 → EBADF): under `luo run`, the
    /// seccomp round trip of a trapped call, up to the daemon finding the
    /// fd is not a LUO file. Elsewhere the kernel refuses it at once.
    Trapped,
}

pub(super) fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Times calls of one ioctl, each preceded by a timed floor call on `dev`.
pub(super) struct Timer<'a> {
    pub(super) dev: &'a File,
    /// Our daemon's control socket, to read where its time went.
    pub(super) socket: Option<std::path::PathBuf>,
}

impl Timer<'_> {
    fn floor(&self, kind: Floor) -> std::io::Result<f64> {
        match kind {
            Floor::Fuse => self.fuse_floor(),
            Floor::Trapped => trapped_floor(),
        }
    }

    /// A no-op ioctl: a command number out of range, rejected before the
    /// caller's memory is touched.
    pub(super) fn fuse_floor(&self) -> std::io::Result<f64> {
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

    pub(super) fn timed<F: FnMut() -> std::io::Result<()>>(
        &self,
        (op, kind): (&'static str, Floor),
        n: usize,
        mut f: F,
    ) -> std::io::Result<Row> {
        let mut micros = Vec::with_capacity(n);
        let mut floor = Vec::with_capacity(n);
        if let Some(s) = &self.socket {
            take_profile(s)?;
        }
        for _ in 0..n {
            floor.push(self.floor(kind)?);
            let t = Instant::now();
            f()?;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
        }
        micros.sort_by(f64::total_cmp);
        floor.sort_by(f64::total_cmp);
        let daemon = match &self.socket {
            Some(s) => take_profile(s)?,
            None => Vec::new(),
        };
        Ok(Row {
            op: op.to_owned(),
            micros,
            floor,
            trapped: kind == Floor::Trapped,
            daemon,
        })
    }
}

/// CREATE_SESSION on fd -1, which fails with EBADF (see [`Floor::Trapped`]).
fn trapped_floor() -> std::io::Result<f64> {
    let mut a = uapi::SessionArgs {
        size: 72,
        fd: -1,
        name: [0; 64],
    };
    let t = Instant::now();
    // SAFETY: an ioctl on fd -1 with a pointer to a live struct of the size
    // the command names.
    let r = unsafe {
        libc::ioctl(
            -1,
            libc::Ioctl::from(uapi::CREATE_SESSION),
            std::ptr::from_mut(&mut a),
        )
    };
    let micros = t.elapsed().as_secs_f64() * 1e6;
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EBADF) if r < 0 => Ok(micros),
        _ => Err(std::io::Error::other(format!(
            "an ioctl on fd -1 did not fail with EBADF ({})",
            std::io::Error::last_os_error()
        ))),
    }
}

/// The daemon's means since the last call, and a fresh start.
///
/// # Errors
/// The daemon does not answer.
fn take_profile(socket: &Path) -> std::io::Result<Vec<ProfileRow>> {
    let resp = control::call(socket, &Request::Profile, None)?;
    if !resp.ok {
        return Err(std::io::Error::other(resp.error.unwrap_or_default()));
    }
    Ok(resp.profile)
}
