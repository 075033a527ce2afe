//! Safe wrappers for the syscalls the daemon and its tools make, one file
//! per kind of kernel object; every `unsafe` block of the daemon's own
//! syscalls is here, with its `// SAFETY:` reasoning.

mod event;
mod fs;
mod process;
mod socket;

pub use event::*;
pub use fs::*;
pub use process::*;
pub use socket::*;

use std::ffi::CString;
use std::io;
use std::path::Path;

pub(crate) fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch dir for mount tests (which need root).
    fn scratch(name: &str) -> PathBuf {
        assert_eq!(geteuid(), 0, "needs root (mounts): run as root");
        let dir = std::env::temp_dir().join(format!("luo-sys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn identity(path: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn kcmp_tells_one_open_file_from_another() {
        use std::os::fd::AsRawFd;
        let me = tgid(gettid()).unwrap();
        assert_eq!(me, std::process::id() as i32);
        let a = std::fs::File::open("/dev/null").unwrap();
        let b = std::fs::File::open("/dev/null").unwrap();
        let a2 = a.try_clone().unwrap();
        let (a, b, a2) = (a.as_raw_fd(), b.as_raw_fd(), a2.as_raw_fd());
        assert_eq!(same_file((me, a), (me, a2)), Some(true), "a dup");
        assert_eq!(
            same_file((me, a), (me, b)),
            Some(false),
            "same inode, two opens"
        );
        assert_eq!(same_file((me, a), (me, 999_999)), None, "no such fd");
    }

    #[test]
    fn nothing_is_unmounted_through_a_symbolic_link() {
        let dir = scratch("umount");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        mount("tmpfs", &mnt, Some("tmpfs"), 0, None).unwrap();
        let mounted = identity(&mnt);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&mnt, &link).unwrap();
        assert!(umount_detach(&link).is_err());
        assert_eq!(identity(&mnt), mounted, "the tmpfs was unmounted");
        umount_detach(&mnt).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_is_bound_through_a_symbolic_link() {
        let dir = scratch("bind");
        let src = dir.join("src");
        std::fs::write(&src, "device").unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let before = identity(&victim);
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let bound = bind(&src, &link);
        let after = identity(&victim);
        if after != before {
            let _ = umount_detach(&victim);
        }
        assert_eq!(bound.unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(after, before, "bound over the link's target");
        // The file itself is bound onto, through the fd that was checked.
        let target = dir.join("target");
        std::fs::write(&target, "").unwrap();
        bind(&src, &target).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "device");
        umount_detach(&target).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
