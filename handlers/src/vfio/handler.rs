//! File handlers for a VFIO device opened through its cdev and for an
//! iommufd: across a simulated update (a VMM restart, no kexec) the daemon
//! keeps the very open file, so the device is never reset, its iommufd
//! keeps every IO address space and mapping, and DMA goes on during the
//! blackout. The retrieved fd is the same open file description.
//!
//! A real kexec cannot carry either: `luo kexec` refuses such a session (it
//! cannot be stashed), with nothing changed.

use std::os::fd::{BorrowedFd, OwnedFd};

use luo_store::{Errno, FileHandler, FileId, FileState, Preserved, Result};

use crate::sys;

/// What a character device is, as `/sys/dev/char/MAJ:MIN` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CharDevice {
    /// Its name under `/dev` (`vfio/devices/vfio0`, `iommu`).
    devname: String,
    /// The PCI address of the device behind it, if any (`0000:00:01.0`).
    pci: Option<String>,
}

/// The character device `file` is open on, if it is one. Answered by the
/// inode and sysfs, never by the device.
fn char_device(file: BorrowedFd<'_>) -> Option<CharDevice> {
    let st = sys::fstat(file).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFCHR {
        return None;
    }
    let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    let dir = format!("/sys/dev/char/{major}:{minor}");
    let uevent = std::fs::read_to_string(format!("{dir}/uevent")).ok()?;
    let devname = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))?
        .to_owned();
    let pci = std::fs::read_link(format!("{dir}/device"))
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()));
    Some(CharDevice { devname, pci })
}

/// Which of the two kinds a handler takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/dev/vfio/devices/vfioN`, bound to an iommufd.
    Device,
    /// `/dev/iommu`.
    Iommufd,
}

/// The handler of one [`Kind`].
#[derive(Debug)]
pub struct VfioHandler {
    kind: Kind,
}

impl VfioHandler {
    /// A handler for files of `kind`.
    pub fn new(kind: Kind) -> VfioHandler {
        VfioHandler { kind }
    }

    fn takes(&self, dev: &CharDevice) -> bool {
        match self.kind {
            Kind::Device => dev.devname.starts_with("vfio/devices/vfio"),
            Kind::Iommufd => dev.devname == "iommu",
        }
    }
}

impl FileHandler for VfioHandler {
    fn compatible(&self) -> &'static str {
        match self.kind {
            Kind::Device => "vfio-cdev-v1",
            Kind::Iommufd => "iommufd-v1",
        }
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        char_device(file).is_some_and(|d| self.takes(&d))
    }

    fn get_id(&self, file: BorrowedFd<'_>) -> Result<FileId> {
        // One open file per device node: a device opened twice is refused
        // (EBUSY), as one device cannot be handed over twice.
        let st = sys::fstat(file)?;
        Ok(FileId {
            dev: st.st_rdev,
            ino: st.st_ino,
        })
    }

    fn preserve(&self, file: BorrowedFd<'_>) -> Result<Preserved> {
        let dev = char_device(file).ok_or(Errno::EINVAL)?;
        // What the device is, for `luo status` and for a rebuild.
        let data = match dev.pci {
            Some(pci) => format!("{} {pci}", dev.devname),
            None => dev.devname,
        };
        Ok(Preserved {
            data: data.into_bytes(),
        })
    }

    fn unpreserve(&self, _state: &FileState<'_>) {}

    fn retrieve(&self, state: &FileState<'_>) -> Result<OwnedFd> {
        // The same open file: the device stays bound and attached, the
        // iommufd keeps its mappings.
        let carried = state.carried.ok_or(Errno::EIO)?;
        carried.try_clone_to_owned().map_err(Errno::from)
    }

    fn finish(&self, _state: &FileState<'_>) {}
}
