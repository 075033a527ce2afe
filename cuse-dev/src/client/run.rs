//! `luo run -- CMD`: runs a program tree under the seccomp filter whose
//! listener goes to the daemon, so fd-returning ioctls get real fds.

use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::caller::seccomp;
use crate::control::{self, Request, CUSE_LINKS};
use crate::sys;

/// Why `luo run` could not start the program.
#[derive(Debug, Error)]
pub enum RunError {
    /// The device does not name a daemon.
    #[error("no luo daemon serves {device}: {source} (start one with `luo daemon --device {device}`)", device = .device.display())]
    NoDaemon {
        /// The device path.
        device: PathBuf,
        /// Why the lookup failed.
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The control socket of the daemon serving `device`: named by the FUSE
/// file's `user.luo.control` attribute, or, for a CUSE character device
/// (which cannot carry user attributes), by the link the daemon keeps in
/// [`CUSE_LINKS`].
///
/// # Errors
/// `NoDaemon` if neither names one.
pub fn daemon_socket(device: &Path) -> Result<PathBuf, RunError> {
    sys::getxattr(device, control::SOCKET_XATTR)
        .map(PathBuf::from)
        .or_else(|e| cuse_link(device).ok_or(e))
        .map_err(|source| RunError::NoDaemon {
            device: device.to_owned(),
            source,
        })
}

/// The control socket a CUSE device's link names, if the device is a
/// character device and the link leads to a socket.
fn cuse_link(device: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    if !std::fs::metadata(device).ok()?.file_type().is_char_device() {
        return None;
    }
    let name = device.file_name()?.to_str()?;
    let link = Path::new(CUSE_LINKS).join(format!("{name}.control"));
    let target = std::fs::read_link(&link).ok()?;
    std::fs::metadata(&target)
        .ok()?
        .file_type()
        .is_socket()
        .then_some(target)
}

fn has_cap_sys_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // CAP_SYS_ADMIN is capability 21.
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or("0");
    u64::from_str_radix(eff, 16).is_ok_and(|caps| caps & (1 << 21) != 0)
}

/// Hands the listener to the daemon. A daemon that is restarting is waited
/// for (up to 10 s). Runs between fork and exec: errors are printed here, as
/// only an errno reaches the parent.
fn register(socket: &Path, listener: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match control::call(socket, &Request::Register, Some(listener)) {
            Ok(resp) if resp.ok => return Ok(()),
            Ok(resp) => {
                eprintln!(
                    "luo run: the daemon refused: {}",
                    resp.error.unwrap_or_default()
                );
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("luo run: no daemon answers at {}: {e}", socket.display());
                return Err(e);
            }
        }
    }
}

/// Runs `argv` under the filter and returns its exit code (128+signal if it
/// was killed).
///
/// # Errors
/// No daemon, or the program cannot be started.
pub fn run(device: &Path, argv: &[String]) -> Result<i32, RunError> {
    let socket = daemon_socket(device)?;
    let privileged = has_cap_sys_admin();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // Between fork and exec: the filter, the daemon told of it, and the
    // first trapped call made (`luo run` is single-threaded, so this may
    // allocate).
    sys::before_exec_single_threaded(&mut cmd, move || {
        if !privileged {
            sys::no_new_privs()?;
        }
        let listener = seccomp::install_filter().map_err(std::io::Error::from)?;
        register(&socket, listener.as_fd())?;
        seccomp::first_call();
        Ok(())
    })
    .map_err(|source| RunError::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    let status = cmd.status().map_err(|source| RunError::Spawn {
        program: argv[0].clone(),
        source,
    })?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
