//! Holders for update and kexec tests: a session whose memfd cannot be
//! stashed (a page spliced into a pipe) or cannot be frozen (resized after
//! it was preserved), left open in a detached child.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use super::syscalls;
use super::Oracle;

/// Creates session `name` holding a 4 MiB shmem memfd one page of which is
/// spliced into a pipe (`vmsplice`), and leaves both held by a detached
/// child. The pipe's reference keeps that folio from migrating, so where it
/// lies in `ZONE_MOVABLE` or CMA it cannot be pinned for a stash: the
/// refused-stash case of `luo kexec` tests.
///
/// # Errors
/// What failed, as a sentence.
pub fn hold_spliced(device: &Path, name: &str) -> Result<(), String> {
    let o = Oracle {
        label: "hold".into(),
        phase: 1,
    };
    let dev = std::fs::File::options()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("open {}: {e}", device.display()))?;
    let s = o
        .create("create", dev.as_raw_fd(), name.as_bytes())
        .ok_or("CREATE_SESSION failed")?;
    let size = 4 << 20;
    let m = luo_handlers::mem::create("spliced", luo_handlers::Backing::Shmem, size as u64)?;
    let mut map = luo_handlers::mem::Mapping::new(m.as_fd(), size).map_err(|e| e.to_string())?;
    let bytes = map.bytes_mut();
    bytes.fill(0x5a);
    let (r, w) = crate::sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    syscalls::splice_page(w.as_fd(), bytes)?;
    drop(map);
    if o.preserve("preserve", s.as_raw_fd(), m.as_raw_fd(), 1) != 0 {
        return Err("PRESERVE_FD failed".into());
    }
    drop(dev);
    crate::sys::hold_in_child(vec![s, m, r, w]).map_err(|e| format!("fork: {e}"))?;
    Ok(())
}

/// Creates session `name` holding a memfd that is resized after it is
/// preserved (a freeze of it fails, as the kernel's would), and leaves it
/// held by a detached child: the refused-freeze case of update tests. A
/// shmem memfd (`hugetlb` false) cannot be resized where the daemon fixes
/// preserved sizes as the kernel does (kmod-shim loaded): then `ftruncate`
/// fails with EPERM and so does this. A hugetlb memfd grows from 2 to 4 MiB.
///
/// # Errors
/// What failed, as a sentence.
pub fn hold_resized(device: &Path, name: &str, hugetlb: bool) -> Result<(), String> {
    let o = Oracle {
        label: "hold".into(),
        phase: 1,
    };
    let dev = syscalls::open_rdwr(device).map_err(|errno| {
        let e = std::io::Error::from_raw_os_error(errno);
        format!("open {}: {e}", device.display())
    })?;
    let s = o
        .create("create", dev.as_raw_fd(), name.as_bytes())
        .ok_or("CREATE_SESSION failed")?;
    let (m, grown) = if hugetlb {
        let m = luo_handlers::mem::create("resized", luo_handlers::Backing::Hugetlb, 2 << 20)?;
        (m, 4 << 20)
    } else {
        (syscalls::memfd("resized", &[1; 4096]), 8192)
    };
    if o.preserve("preserve", s.as_raw_fd(), m.as_raw_fd(), 1) != 0 {
        return Err("PRESERVE_FD failed".into());
    }
    if syscalls::ftruncate(m.as_fd(), grown) != 0 {
        return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
    }
    drop(dev);
    crate::sys::hold_in_child(vec![s, m]).map_err(|e| format!("fork: {e}"))?;
    Ok(())
}
