//! The device path: checked before anything is mounted on it, named for
//! CUSE, and linked to the control socket once a CUSE device exists.

use std::path::Path;

use super::{setup, Daemon, DaemonError};
use crate::{log, sys};

impl Daemon {
    /// Once the CUSE device exists: learns its number (to recognise its fds in
    /// trapped calls) and labels it with the control socket for `luo run`.
    pub(super) fn label_cuse_device(&mut self) {
        let device = self.cfg.device.clone();
        match sys::path_rdev(&device) {
            Ok(rdev) => self.node.cuse_rdev = Some(rdev),
            Err(e) => log::warn(format_args!(
                "the CUSE device {} did not appear: {e}",
                device.display()
            )),
        }
        if let Err(e) = link_cuse_control(&device, &self.cfg.socket()) {
            log::warn(format_args!(
                "cannot link {} to the control socket ({e}); `luo run` will not find the daemon",
                device.display()
            ));
        }
    }
}

/// Points `luo run` at the control socket: a character device cannot carry
/// the `user.luo.control` attribute, so `/run/luo/NAME.control` links to it.
fn link_cuse_control(device: &Path, socket: &Path) -> std::io::Result<()> {
    let dir = Path::new(crate::control::CUSE_LINKS);
    crate::persist::paths::trusted_dir(dir)?;
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("liveupdate");
    let link = dir.join(format!("{name}.control"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(socket, &link)
}

/// The CUSE device name for a device path: it must be directly in `/dev`,
/// where the kernel creates it.
pub(super) fn cuse_device_name(device: &Path) -> std::result::Result<String, DaemonError> {
    match (device.parent(), device.file_name().and_then(|n| n.to_str())) {
        (Some(dir), Some(name)) if dir == Path::new("/dev") => Ok(name.to_owned()),
        _ => Err(DaemonError::Setup {
            what: format!(
                "serve {} with CUSE: the kernel creates CUSE devices in /dev, so the path must be /dev/NAME",
                device.display()
            ),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }),
    }
}

/// Makes sure the device path exists as something a file can be mounted on;
/// returns whether we created it. Refuses a symbolic link or a directory other
/// users may change (see [`crate::persist::paths`]); nothing is unmounted or mounted
/// through a link.
pub(super) fn prepare_device_path(device: &Path) -> std::result::Result<bool, DaemonError> {
    let refused = |source| DaemonError::Setup {
        what: format!("use {} as the device", device.display()),
        source,
    };
    crate::persist::paths::check_device_dir(device).map_err(refused)?;
    // A daemon killed earlier may have left its bind mount behind.
    let _ = sys::umount_detach(device);
    crate::persist::paths::refuse_symlink(device).map_err(refused)?;
    match std::fs::symlink_metadata(device) {
        Ok(m) if m.is_dir() => Err(DaemonError::Setup {
            what: format!("use {} as the device: it is a directory", device.display()),
            source: std::io::Error::from_raw_os_error(libc::EISDIR),
        }),
        Ok(_) => Ok(false),
        Err(_) => {
            let create = crate::persist::paths::create_new(device);
            setup(|| format!("create {}", device.display()), create)?;
            Ok(true)
        }
    }
}
