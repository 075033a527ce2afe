//! The paths the daemon acts on as root, and when it trusts them.
//!
//! The daemon writes its journal and sockets in the state dir, and mounts and
//! unmounts at the device path. As root it could be made to do that somewhere
//! else: through a symbolic link another user planted, or in a directory
//! another user owns and fills. So the state dir must be reached without a
//! symbolic link and be owned and writable only by root; the device path must
//! not be a symbolic link, in a directory only root may change (or a sticky
//! one, such as `/tmp`, where users may change only their own entries); and
//! every file the daemon creates is created new (`O_EXCL|O_NOFOLLOW`).
//!
//! Every refusal is an error whose text is the reason, as a sentence.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::sys::{self, fstat, openat};

/// A refusal whose text is `reason`.
fn untrusted(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, reason)
}

/// Who the daemon runs as, in words.
fn us() -> String {
    match euid() {
        0 => "root".to_owned(),
        uid => format!("uid {uid}"),
    }
}

fn euid() -> u32 {
    sys::geteuid()
}

/// Opens the next component `name` of a path as a directory, never through a
/// symbolic link; creates it with `mode` if it is missing. `walked` is the
/// path so far, for the sentence.
fn step(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mode: libc::mode_t,
    flags: libc::c_int,
    walked: &Path,
) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match openat(dir, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            if let Err(e) = sys::mkdirat(dir, name, mode) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            openat(dir, name, flags).map_err(|e| explain(e, walked))
        }
        other => other.map_err(|e| explain(e, walked)),
    }
}

/// Says which component is a symbolic link when that is why an open failed
/// (`O_NOFOLLOW|O_DIRECTORY` fails a link with ENOTDIR or ELOOP).
fn explain(e: io::Error, walked: &Path) -> io::Error {
    match std::fs::symlink_metadata(walked) {
        Ok(m) if m.file_type().is_symlink() => untrusted(symlink_sentence(walked)),
        _ => e,
    }
}

fn symlink_sentence(path: &Path) -> String {
    let target = std::fs::read_link(path).unwrap_or_default();
    format!(
        "{} is a symbolic link (to {}); give the path without symbolic links",
        path.display(),
        target.display()
    )
}

/// Opens the directory `dir` without following a symbolic link in any
/// component of its path, creating missing components (0755, the last one
/// `mode`). The last one is opened with `flags` (`O_RDONLY` or `O_PATH`), the
/// others `O_PATH`.
///
/// # Errors
/// A component that is a symbolic link (a sentence naming it), or I/O errors.
pub fn open_dir_nofollow(
    dir: &Path,
    mode: libc::mode_t,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let start = if dir.is_absolute() { "/" } else { "." };
    let mut fd = openat_cwd(start)?;
    let mut walked = PathBuf::new();
    let names: Vec<&OsStr> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::new("..")),
            _ => None,
        })
        .collect();
    walked.push(start);
    for (i, name) in names.iter().enumerate() {
        walked.push(name);
        let last = i + 1 == names.len();
        let (mode, flags) = if last {
            (mode, flags)
        } else {
            (0o755, libc::O_PATH)
        };
        fd = step(fd.as_fd(), name, mode, flags, &walked)?;
    }
    Ok(fd)
}

fn openat_cwd(dir: &str) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    openat(sys::cwd(), OsStr::new(dir), flags)
}

/// Refuses an open directory (at `path`) that is not owned by the daemon's
/// user or that its group or others may write to.
fn check_private(dir: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let st = fstat(dir)?;
    if st.st_uid != euid() {
        return Err(untrusted(format!(
            "{} is owned by uid {}, not by {}; it must be owned by {} and writable only by it",
            path.display(),
            st.st_uid,
            us(),
            us()
        )));
    }
    if st.st_mode & 0o022 != 0 {
        return Err(untrusted(format!(
            "{} is writable by {} (mode {:04o}); it must be writable only by {}",
            path.display(),
            writers(st.st_mode),
            st.st_mode & 0o7777,
            us()
        )));
    }
    Ok(())
}

fn writers(mode: libc::mode_t) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "its group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

/// Makes the state dir ready: reached without symbolic links, owned by the
/// daemon's user (root) and writable by no one else, then mode 0700. A missing
/// one is created 0700. Nothing is created or changed when it is refused.
///
/// # Errors
/// Why it is refused, as a sentence; I/O errors.
pub fn secure_state_dir(dir: &Path) -> io::Result<()> {
    let fd = open_dir_nofollow(dir, 0o700, libc::O_RDONLY)?;
    check_private(fd.as_fd(), dir)?;
    sys::fchmod(fd.as_fd(), 0o700)
}

/// Sets who may reach the control socket `socket` in `state_dir`: root
/// alone (socket 0600), or also the members of `status_group` (state dir
/// 0710 and socket 0660, both of that group), who may then ask for `status`.
///
/// # Errors
/// I/O errors.
pub fn share_with_group(
    socket: &Path,
    state_dir: &Path,
    status_group: Option<u32>,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(gid) = status_group else {
        return std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600));
    };
    for (path, mode) in [(state_dir, 0o710), (socket, 0o660)] {
        std::os::unix::fs::lchown(path, Some(0), Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// A directory only the daemon's user may change (created 0755 if missing),
/// reached without symbolic links: for files others read but must not plant.
///
/// # Errors
/// Why it is refused, as a sentence; I/O errors.
pub fn trusted_dir(dir: &Path) -> io::Result<()> {
    let fd = open_dir_nofollow(dir, 0o755, libc::O_PATH)?;
    check_private(fd.as_fd(), dir)
}

/// The directory a path's last component is in.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Refuses a device path another user could swap for something else: its
/// directory must be owned by the daemon's user and writable by no one else,
/// or sticky (like `/tmp`: others may not rename or remove our entries).
///
/// # Errors
/// Why it is refused, as a sentence; I/O errors.
pub fn check_device_dir(device: &Path) -> io::Result<()> {
    let dir = parent_of(device);
    let m = std::fs::metadata(dir)?;
    if m.uid() != euid() {
        return Err(untrusted(format!(
            "its directory {} is owned by uid {}, who could replace it; use a directory owned by {}",
            dir.display(),
            m.uid(),
            us()
        )));
    }
    let sticky = m.mode() & libc::S_ISVTX != 0;
    if m.mode() & 0o022 != 0 && !sticky {
        return Err(untrusted(format!(
            "its directory {} is writable by {} (mode {:04o}) and not sticky, so another user could \
             replace it; use a directory only {} may write to",
            dir.display(),
            writers(m.mode()),
            m.mode() & 0o7777,
            us()
        )));
    }
    Ok(())
}

/// Refuses a path that is a symbolic link (not followed).
///
/// # Errors
/// A sentence naming the link and its target.
pub fn refuse_symlink(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(untrusted(symlink_sentence(path))),
        _ => Ok(()),
    }
}

/// Creates `path` as a new file, mode 0600, opened for appending; never
/// through a symbolic link and never an existing file
/// (`O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`).
///
/// # Errors
/// EEXIST if anything is there (a symbolic link too); I/O errors.
pub fn create_new(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luo-paths-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_state_dir_is_created_0700_and_an_own_0755_one_restricted() {
        let dir = scratch("create");
        let state = dir.join("a/b/state");
        secure_state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&dir.join("a")), 0o755);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_state_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_symbolic_link_anywhere_in_the_state_dir_path_is_refused_and_nothing_made() {
        let dir = scratch("links");
        let real = dir.join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.join("link")).unwrap();
        for (state, link) in [
            (dir.join("link"), dir.join("link")),
            (dir.join("link/state"), dir.join("link")),
            (dir.join("link/x/state"), dir.join("link")),
        ] {
            let e = secure_state_dir(&state).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{} is a symbolic link", link.display())),
                "{e}"
            );
            assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0, "nothing made");
            assert_eq!(mode(&real), 0o755, "nothing changed");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_dir_others_may_write_to_is_refused_and_left_alone() {
        let dir = scratch("writable");
        let state = dir.join("state");
        std::fs::create_dir(&state).unwrap();
        for bits in [0o770, 0o707, 0o1777] {
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(bits)).unwrap();
            let e = secure_state_dir(&state).unwrap_err().to_string();
            assert!(e.contains("is writable by"), "{e}");
            assert_eq!(mode(&state), bits);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_device_in_a_directory_others_may_change_is_refused_unless_sticky() {
        let dir = scratch("device");
        let device = dir.join("liveupdate");
        check_device_dir(&device).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_device_dir(&device).unwrap_err().to_string();
        assert!(e.contains("not sticky"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_device_dir(&device).unwrap();
        check_device_dir(Path::new("/tmp/liveupdate")).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_new_file_is_never_created_through_a_symbolic_link() {
        let dir = scratch("create-new");
        let victim = dir.join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let link = dir.join("file");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = create_new(&link).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), &link).unwrap();
        assert!(
            create_new(&link).is_err(),
            "a dangling link is not followed"
        );
        assert!(!dir.join("nowhere").exists());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        refuse_symlink(&link).unwrap_err();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
