//! A real kexec: load the next kernel with `kexec_file_load(2)` and jump into
//! it with `reboot(LINUX_REBOOT_CMD_KEXEC)`. What must survive is stashed in
//! between (by the daemon, through kmod-shim).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// What to boot.
#[derive(Debug, Clone)]
pub struct Target {
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The new kernel's command line.
    pub cmdline: String,
}

/// Why a kexec could not be prepared or started.
#[derive(Debug, Error)]
pub enum KexecError {
    /// A file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the image.
    #[error("the kernel refused to load {kernel} for kexec")]
    Load {
        /// The image.
        kernel: PathBuf,
        /// Its errno.
        #[source]
        source: std::io::Error,
    },
    /// The running kernel has no `kexec_file_load` (ENOSYS).
    #[error(
        "the running kernel cannot kexec: it has no kexec_file_load (built without \
         CONFIG_KEXEC_FILE)"
    )]
    Unsupported,
    /// The jump itself failed.
    #[error("reboot into the loaded kernel failed")]
    Reboot(#[source] std::io::Error),
}

fn open(path: &Path) -> Result<File, KexecError> {
    File::open(path).map_err(|source| KexecError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Loads `target` as the kernel the next `reboot(KEXEC)` boots.
///
/// # Errors
/// An unreadable file, or the kernel's refusal (a bad image gives ENOEXEC,
/// a kernel without `CONFIG_KEXEC_FILE` ENOSYS, no CAP_SYS_BOOT EPERM).
pub fn load(target: &Target) -> Result<(), KexecError> {
    let kernel = open(&target.kernel)?;
    let initrd = target.initrd.as_deref().map(open).transpose()?;
    let cmdline = CString::new(target.cmdline.as_bytes()).map_err(|_| KexecError::Load {
        kernel: target.kernel.clone(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    let flags = if initrd.is_none() {
        KEXEC_FILE_NO_INITRAMFS
    } else {
        0
    };
    // SAFETY: the fds are open for the call, cmdline is a C string whose
    // length (with its NUL) is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd.as_ref().map_or(-1, |f| f.as_raw_fd()),
            cmdline.as_bytes_with_nul().len() as libc::c_ulong,
            cmdline.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENOSYS) {
            return Err(KexecError::Unsupported);
        }
        return Err(KexecError::Load {
            kernel: target.kernel.clone(),
            source,
        });
    }
    Ok(())
}

/// Forgets a loaded kernel (after a kexec was called off).
pub fn unload() {
    // SAFETY: with KEXEC_FILE_UNLOAD the other arguments are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            KEXEC_FILE_UNLOAD,
        );
    }
}

/// Syncs filesystems and jumps into the loaded kernel; returns only if that
/// failed.
pub fn reboot() -> KexecError {
    // SAFETY: sync and reboot take no pointers; reboot only returns on error.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC);
    }
    KexecError::Reboot(std::io::Error::last_os_error())
}

/// The running kernel's command line (for `--reuse-cmdline`).
///
/// # Errors
/// If `/proc/cmdline` cannot be read.
pub fn current_cmdline() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/cmdline")?.trim().to_owned())
}
