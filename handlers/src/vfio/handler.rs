//! File handlers for a VFIO device opened through its cdev and for an
//! iommufd: across a simulated update (a VMM restart, no kexec) the daemon
//! keeps the very open file, so the device is never reset, its iommufd
//! keeps every IO address space and mapping, and DMA goes on during the
//! blackout. The retrieved fd is the same open file description.
//!
//! A real kexec cannot carry either: `luo kexec` refuses such a session (it
//! cannot be stashed), with nothing changed.

use std::os::fd::{BorrowedFd, OwnedFd};

use luo_store::{Errno, FileHandler, FileId, FileState, FlbId, Preserved, Result};

use super::dma::DmaTable;
use super::ioctl::device_info;
use crate::sys;

/// What a character device is, as `/sys/dev/char/MAJ:MIN` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CharDevice {
    /// Its name under `/dev` (`vfio/devices/vfio0`, `iommu`).
    devname: String,
    /// The PCI address of the device behind it, if any (`0000:00:01.0`).
    pci: Option<String>,
}

/// The character device `file` is open on, if it is one. Answered from
/// cached attributes and sysfs, never by the file's filesystem or the
/// device: a caller's file may be on a filesystem that never answers.
fn char_device(file: BorrowedFd<'_>) -> Option<CharDevice> {
    let st = sys::stat_cached(file).ok()?;
    if st.kind != libc::S_IFCHR {
        return None;
    }
    let (major, minor) = (libc::major(st.rdev), libc::minor(st.rdev));
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

/// How the DMA record names the VFIO device `file` is open on (its PCI
/// address, else its device node), if it is one.
pub fn device_key(file: BorrowedFd<'_>) -> Option<String> {
    let dev = char_device(file).filter(|d| d.devname.starts_with("vfio/devices/vfio"))?;
    Some(dev.pci.unwrap_or(dev.devname))
}

/// Whether `file` is an iommufd.
pub fn is_iommufd(file: BorrowedFd<'_>) -> bool {
    char_device(file).is_some_and(|d| d.devname == "iommu")
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
    /// Devices: what each iommufd maps, and the FLB that hands it over.
    dma: Option<(DmaTable, FlbId)>,
}

impl VfioHandler {
    /// The handler of VFIO device cdevs, whose DMA is recorded in `table`
    /// and handed over by the FLB `flb`.
    pub fn device(table: DmaTable, flb: FlbId) -> VfioHandler {
        VfioHandler {
            kind: Kind::Device,
            dma: Some((table, flb)),
        }
    }

    /// The handler of iommufds.
    pub fn iommufd() -> VfioHandler {
        VfioHandler {
            kind: Kind::Iommufd,
            dma: None,
        }
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
        if !char_device(file).is_some_and(|d| self.takes(&d)) {
            return false;
        }
        // A device fd not bound to an iommufd reaches nothing: refused as a
        // file no handler takes.
        self.kind == Kind::Iommufd || device_info(file).is_ok()
    }

    fn get_id(&self, file: BorrowedFd<'_>) -> Result<FileId> {
        // One open file per device node: a device opened twice is refused
        // (EBUSY), as one device cannot be handed over twice.
        let st = sys::stat_cached(file)?;
        Ok(FileId {
            dev: st.rdev,
            ino: st.ino,
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

    fn describe(&self, state: &FileState<'_>) -> Option<String> {
        let text = std::str::from_utf8(state.data).ok()?;
        let (object, key) = match text.split_once(' ') {
            Some((devname, pci)) => (format!("{pci}, /dev/{devname}"), pci),
            None => (format!("/dev/{text}"), text),
        };
        let Some((table, _)) = &self.dma else {
            return Some(object);
        };
        let spaces = table.lock();
        let through = match spaces.of_device(key) {
            Some(space) => match &space.held {
                Some(h) => format!("DMA through the iommufd at {} token {}", h.session, h.token),
                None => "DMA through an iommufd that is not preserved".to_owned(),
            },
            None => "DMA unknown".to_owned(),
        };
        Some(format!("{object}, {through}"))
    }

    fn flbs(&self) -> Vec<FlbId> {
        self.dma.iter().map(|(_, flb)| *flb).collect()
    }
}
