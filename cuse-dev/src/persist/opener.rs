//! The session-file opener: a small child process that opens session files
//! on the daemon's FUSE mount and passes them to the daemon.
//!
//! Opening a file on its own mount needs the daemon to answer the `OPEN`, so
//! it cannot happen on the daemon's own thread. It is not a thread of the
//! daemon either: a thread blocked in a FUSE request cannot exit until the
//! request is answered, so a killed daemon with such a thread would never
//! finish dying. A separate process can wait; the next daemon answers it.
//!
//! Protocol on a `SOCK_SEQPACKET` pair: the daemon grants credits (one byte
//! each); for each credit the opener opens the next `s<N>` and sends
//! `N` (8 bytes) with the fd. First it reports whether binding the device
//! worked: `u64::MAX` and an errno (0 for success).

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use crate::sys;

/// Slot number of the "bound" report.
pub const BOUND: u64 = u64::MAX;

/// What the opener does.
#[derive(Debug, Clone)]
pub struct Opener {
    /// The FUSE mount.
    pub fs: PathBuf,
    /// Where to bind the device (None: already bound).
    pub bind_device: Option<PathBuf>,
    /// First session-file number.
    pub first_slot: u64,
}

/// Starts the opener; returns the daemon's end of the socket and its pid.
/// Must be called while the daemon has no other threads.
///
/// # Errors
/// socketpair or fork failures.
pub fn spawn(opener: &Opener) -> std::io::Result<(OwnedFd, i32)> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    // The child's copy of `ours` goes with every other fd but its socket
    // (`sys::keep_only_fd3`).
    let pid = sys::fork_single_threaded(|| run(opener, theirs))?;
    Ok((ours, pid))
}

/// Starts a new opener for a daemon that has threads (one that replaces an
/// opener that died): `luo opener`, a fresh process, with its socket as fd
/// 3. It binds nothing.
///
/// # Errors
/// socketpair or spawn failures.
pub fn respawn(fs: &std::path::Path, first_slot: u64) -> std::io::Result<(OwnedFd, i32)> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("opener")
        .arg("--fs")
        .arg(fs)
        .arg("--first-slot")
        .arg(first_slot.to_string());
    sys::fd3_and_death_signal_on_spawn(&mut cmd, theirs.as_fd());
    let child = cmd.spawn()?;
    drop(theirs);
    Ok((ours, child.id() as i32))
}

/// `luo opener`: serves the protocol on fd 3 (see [`respawn`]). Never
/// returns.
pub fn serve_fd3(fs: PathBuf, first_slot: u64) -> ! {
    let opener = Opener {
        fs,
        bind_device: None,
        first_slot,
    };
    match sys::take_inherited_fd3() {
        Ok(sock) => run(&opener, sock),
        Err(e) => {
            eprintln!("luo opener: fd 3 is not the daemon's socket ({e})");
            sys::exit_now(1)
        }
    }
}

/// The child: never returns.
fn run(opener: &Opener, sock: OwnedFd) -> ! {
    // The opener keeps only its socket (as fd 3) and the standard fds.
    let sock = sys::keep_only_fd3(sock);
    let bound = match &opener.bind_device {
        Some(device) => sys::bind(&opener.fs.join("liveupdate"), device),
        None => Ok(()),
    };
    let errno = bound
        .err()
        .map_or(0, |e| e.raw_os_error().unwrap_or(libc::EIO));
    let mut report = BOUND.to_le_bytes().to_vec();
    report.extend_from_slice(&errno.to_le_bytes());
    if errno != 0 || sys::send_with_fd(sock, &report, None).is_err() {
        let _ = sys::send_with_fd(sock, &report, None);
        sys::exit_now(1);
    }
    let mut credit = [0u8; 1];
    for n in opener.first_slot.. {
        match sys::recv_with_fd(sock, &mut credit) {
            Ok((1, _)) => {}
            _ => break,
        }
        let Ok(fd) = sys::open_rdwr(&opener.fs.join(format!("s{n}")), 0) else {
            break;
        };
        if sys::send_with_fd(sock, &n.to_le_bytes(), Some(std::os::fd::AsFd::as_fd(&fd))).is_err() {
            break;
        }
    }
    sys::exit_now(0)
}
