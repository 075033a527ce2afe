//! File handlers for a VFIO device opened through its cdev and for an
//! iommufd: across a simulated update (a VMM restart, no kexec) the daemon
//! keeps the very open file, so the device is never reset, its iommufd
//! keeps every IO address space and mapping, and DMA goes on during the
//! blackout. The retrieved fd is the same open file description.
//!
//! A real kexec cannot carry either: the old kernel stops the device and
//! the IOMMU. What crosses it is each file's [`Object`] and the iommufd
//! FLB's record of every mapping; the next kernel's daemon rebuilds the
//! device from them (see [`super::rebuild`]) and hands it over the same way.

use std::os::fd::{BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use luo_store::{Errno, FileHandler, FileId, FileState, FlbId, Preserved, Result};

use super::dma::DmaTable;
use super::ioctl::{device_info, pci_command};
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

/// What a preserved VFIO file is: its serialized data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// Its name under `/dev` (`vfio/devices/vfio0`, `iommu`).
    pub devname: String,
    /// The PCI address of the device, if it is one (`0000:00:01.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
    /// Its PCI vendor and device ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<(u16, u16)>,
    /// Its PCI command register at the freeze (bus mastering on or off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<u16>,
}

impl Object {
    /// The object `data` describes.
    ///
    /// # Errors
    /// EINVAL for data no VFIO handler wrote.
    pub fn parse(data: &[u8]) -> Result<Object> {
        serde_json::from_slice(data).map_err(|_| Errno::EINVAL)
    }

    /// How the DMA record names it: its PCI address, else its device node.
    pub fn key(&self) -> &str {
        self.pci.as_deref().unwrap_or(&self.devname)
    }

    fn to_data(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an object serializes")
    }
}

/// A PCI device's vendor and device ids, from sysfs.
pub fn pci_ids(pci: &str) -> Option<(u16, u16)> {
    let read = |what: &str| {
        let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{pci}/{what}")).ok()?;
        u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
    };
    Some((read("vendor")?, read("device")?))
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

    /// The handler of iommufds, handed over with the FLB `flb`.
    pub fn iommufd(table: DmaTable, flb: FlbId) -> VfioHandler {
        VfioHandler {
            kind: Kind::Iommufd,
            dma: Some((table, flb)),
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
            Kind::Device => DEVICE_COMPATIBLE,
            Kind::Iommufd => IOMMUFD_COMPATIBLE,
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
        let ids = dev.pci.as_deref().and_then(pci_ids);
        let object = Object {
            devname: dev.devname,
            pci: dev.pci,
            ids,
            command: None,
        };
        Ok(Preserved {
            data: object.to_data(),
        })
    }

    fn unpreserve(&self, _state: &FileState<'_>) {}

    fn freeze(&self, state: &FileState<'_>, data: &mut Vec<u8>) -> Result<()> {
        // Whether the device masters the bus, for a rebuild after a kexec.
        if self.kind == Kind::Device {
            let mut object = Object::parse(state.data)?;
            let file = state.file.ok_or(Errno::EBADF)?;
            object.command = Some(pci_command(file)?);
            *data = object.to_data();
        }
        Ok(())
    }

    fn retrieve(&self, state: &FileState<'_>) -> Result<OwnedFd> {
        // The same open file (or, after a kexec, the one rebuilt for it):
        // the device stays bound and attached, the iommufd keeps its
        // mappings.
        let carried = state.carried.ok_or(Errno::EIO)?;
        carried.try_clone_to_owned().map_err(Errno::from)
    }

    fn finish(&self, _state: &FileState<'_>) {}

    fn describe(&self, state: &FileState<'_>) -> Option<String> {
        let object = Object::parse(state.data).ok()?;
        let node = format!("/dev/{}", object.devname);
        let Some(pci) = &object.pci else {
            return Some(node);
        };
        let Some((table, _)) = &self.dma else {
            return Some(format!("{pci}, {node}"));
        };
        let spaces = table.lock();
        let through = match spaces.of_device(pci) {
            Some(space) => match &space.held {
                Some(h) => format!("DMA through the iommufd at {} token {}", h.session, h.token),
                None => "DMA through an iommufd that is not preserved".to_owned(),
            },
            None => "DMA unknown".to_owned(),
        };
        Some(format!("{pci}, {node}, {through}"))
    }

    fn flbs(&self) -> Vec<FlbId> {
        self.dma.iter().map(|(_, flb)| *flb).collect()
    }
}

/// The compatible string of the VFIO device handler.
pub const DEVICE_COMPATIBLE: &str = "vfio-cdev-v1";

/// The compatible string of the iommufd handler.
pub const IOMMUFD_COMPATIBLE: &str = "iommufd-v1";
