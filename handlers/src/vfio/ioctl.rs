//! The VFIO and iommufd calls of device handover, on owned fds.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use luo_store::{Errno, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use iommufd_bindings::iommufd::{
    iommu_ioas_alloc, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
};
use iommufd_ioctls::{IommuFd, IommufdError};

use super::uapi::{
    AttachPt, BindIommufd, DeviceInfo, RegionInfo, MAP_FIXED_IOVA, MAP_READABLE, MAP_WRITEABLE,
    PCI_CONFIG_REGION, VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO,
};

/// `ioctl(fd, cmd, arg)` with `arg` the command's struct.
fn call<T: IntoBytes + FromBytes + Immutable>(
    fd: BorrowedFd<'_>,
    cmd: u32,
    arg: &mut T,
) -> Result<()> {
    // SAFETY: arg is a live, writable struct of the size the command reads
    // (each struct's first field, argsz or size, says so to the kernel).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, (arg as *mut T).cast::<u8>()) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn size_of_u32<T>() -> u32 {
    size_of::<T>() as u32
}

fn open_rdwr(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(Errno::from)
}

/// `VFIO_DEVICE_GET_INFO` of a device fd: fails (EINVAL) until the fd is
/// bound to an iommufd, as every call but BIND does.
///
/// # Errors
/// The kernel's.
pub fn device_info(device: BorrowedFd<'_>) -> Result<DeviceInfo> {
    let mut a = DeviceInfo {
        argsz: size_of_u32::<DeviceInfo>(),
        ..DeviceInfo::default()
    };
    call(device, VFIO_DEVICE_GET_INFO, &mut a)?;
    Ok(a)
}

/// Offset of the command register in PCI config space.
const PCI_COMMAND: u64 = 0x04;

/// Where region `index` of `device` is within its fd.
fn region_of(device: BorrowedFd<'_>, index: u32) -> Result<Region> {
    let mut a = RegionInfo {
        argsz: size_of_u32::<RegionInfo>(),
        index,
        ..RegionInfo::default()
    };
    call(device, VFIO_DEVICE_GET_REGION_INFO, &mut a)?;
    Ok(Region {
        offset: a.offset,
        size: a.size,
    })
}

/// The PCI command register of a bound device (bus mastering, memory
/// space).
///
/// # Errors
/// The kernel's.
pub fn pci_command(device: BorrowedFd<'_>) -> Result<u16> {
    let config = region_of(device, PCI_CONFIG_REGION)?;
    let mut b = [0u8; 2];
    File::from(device.try_clone_to_owned()?).read_exact_at(&mut b, config.offset + PCI_COMMAND)?;
    Ok(u16::from_le_bytes(b))
}

/// Sets the PCI command register of a bound device.
///
/// # Errors
/// The kernel's.
pub fn set_pci_command(device: BorrowedFd<'_>, command: u16) -> Result<()> {
    let config = region_of(device, PCI_CONFIG_REGION)?;
    File::from(device.try_clone_to_owned()?)
        .write_all_at(&command.to_le_bytes(), config.offset + PCI_COMMAND)?;
    Ok(())
}

/// An iommufd (`/dev/iommu`). Its calls go through rust-vmm's
/// `iommufd-ioctls`.
pub struct Iommufd {
    /// The open file, lent out as an fd.
    file: File,
    /// The same open file, for `iommufd-ioctls`.
    ioctls: IommuFd,
}

impl std::fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommufd").field("file", &self.file).finish()
    }
}

/// The errno behind an `iommufd-ioctls` error.
fn errno_of(e: &IommufdError) -> Errno {
    let source = std::error::Error::source(e);
    let sys = source.and_then(|s| s.downcast_ref::<vmm_sys_util::errno::Error>());
    let io = source.and_then(|s| s.downcast_ref::<std::io::Error>());
    match (sys, io) {
        (Some(sys), _) => Errno(sys.errno()),
        (None, Some(io)) => Errno(io.raw_os_error().unwrap_or(libc::EIO)),
        (None, None) => Errno::EIO,
    }
}

impl Iommufd {
    /// Opens `/dev/iommu` (or `path`).
    ///
    /// # Errors
    /// The kernel's (ENOENT without `CONFIG_IOMMUFD`).
    pub fn open(path: &Path) -> Result<Iommufd> {
        Iommufd::from_file(open_rdwr(path)?)
    }

    /// An iommufd already open (one retrieved after an update).
    ///
    /// # Errors
    /// EMFILE and the like.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Iommufd> {
        Iommufd::from_file(File::from(fd))
    }

    fn from_file(file: File) -> Result<Iommufd> {
        let ioctls = IommuFd::new_from_fd(file.try_clone()?);
        Ok(Iommufd { file, ioctls })
    }

    /// A new IO address space (`IOMMU_IOAS_ALLOC`); its id.
    ///
    /// # Errors
    /// The kernel's.
    pub fn alloc_ioas(&self) -> Result<u32> {
        let mut a = iommu_ioas_alloc {
            size: size_of_u32::<iommu_ioas_alloc>(),
            ..iommu_ioas_alloc::default()
        };
        self.ioctls
            .alloc_iommu_ioas(&mut a)
            .map_err(|e| errno_of(&e))?;
        Ok(a.out_ioas_id)
    }

    /// Maps `length` bytes of `file` from `start` at `iova`, readable and
    /// writable by the device (`IOMMU_IOAS_MAP_FILE`, a memfd's pages
    /// pinned).
    ///
    /// # Errors
    /// The kernel's (EINVAL for a file that is not a memfd).
    pub fn map_file(
        &self,
        ioas: u32,
        file: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> Result<()> {
        let flags = MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE;
        self.map_file_with(ioas, (file, start), length, iova, flags)
    }

    /// [`Iommufd::map_file`] with the caller's `IOMMU_IOAS_MAP_*` flags
    /// (`IOMMU_IOAS_MAP_FIXED_IOVA` is always added).
    ///
    /// # Errors
    /// The kernel's.
    pub fn map_file_with(
        &self,
        ioas: u32,
        (file, start): (BorrowedFd<'_>, u64),
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<()> {
        let a = iommu_ioas_map_file {
            size: size_of_u32::<iommu_ioas_map_file>(),
            flags: flags | MAP_FIXED_IOVA,
            ioas_id: ioas,
            fd: file.as_raw_fd(),
            start,
            length,
            iova,
        };
        self.ioctls
            .map_iommu_ioas_file(&a)
            .map_err(|e| errno_of(&e))
    }

    /// Maps `length` bytes of this process's memory at `addr` to `iova`
    /// (`IOMMU_IOAS_MAP`): the pages are pinned, and no update carries them.
    ///
    /// # Errors
    /// The kernel's (EFAULT for an address not mapped).
    pub fn map_user(&self, ioas: u32, addr: *const u8, length: u64, iova: u64) -> Result<()> {
        let a = iommu_ioas_map {
            size: size_of_u32::<iommu_ioas_map>(),
            flags: MAP_FIXED_IOVA | MAP_READABLE | MAP_WRITEABLE,
            ioas_id: ioas,
            __reserved: 0,
            user_va: addr as u64,
            length,
            iova,
        };
        self.ioctls.map_iommu_ioas(&a).map_err(|e| errno_of(&e))
    }

    /// Unmaps `length` bytes at `iova` (`IOMMU_IOAS_UNMAP`).
    ///
    /// # Errors
    /// The kernel's (ENOENT if nothing is mapped there).
    pub fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<()> {
        let mut a = iommu_ioas_unmap {
            size: size_of_u32::<iommu_ioas_unmap>(),
            ioas_id: ioas,
            iova,
            length,
        };
        self.ioctls
            .unmap_iommu_ioas(&mut a)
            .map_err(|e| errno_of(&e))
    }

    /// Destroys object `id` (`IOMMU_DESTROY`).
    ///
    /// # Errors
    /// The kernel's (EBUSY while a device is attached to it).
    pub fn destroy(&self, id: u32) -> Result<()> {
        self.ioctls
            .destroy_iommu_object(id)
            .map_err(|e| errno_of(&e))
    }

    /// The iommufd's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Where a region of a device is, within its fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// Its size.
    pub size: u64,
}

/// A VFIO device opened through its cdev.
#[derive(Debug)]
pub struct VfioDevice {
    file: File,
}

impl VfioDevice {
    /// Opens `/dev/vfio/devices/vfioN`.
    ///
    /// # Errors
    /// The kernel's.
    pub fn open(path: &Path) -> Result<VfioDevice> {
        Ok(VfioDevice {
            file: open_rdwr(path)?,
        })
    }

    /// A device already open, bound and attached (one retrieved after an
    /// update).
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> VfioDevice {
        VfioDevice {
            file: File::from(fd),
        }
    }

    /// Binds the device to `iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`); its
    /// device id there.
    ///
    /// # Errors
    /// The kernel's.
    pub fn bind(&self, iommufd: &Iommufd) -> Result<u32> {
        let mut a = BindIommufd {
            argsz: size_of_u32::<BindIommufd>(),
            flags: 0,
            iommufd: iommufd.fd().as_raw_fd(),
            out_devid: 0,
        };
        call(self.file.as_fd(), VFIO_DEVICE_BIND_IOMMUFD, &mut a)?;
        Ok(a.out_devid)
    }

    /// Attaches the bound device to IO address space `ioas`
    /// (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`): its DMA is translated by it.
    ///
    /// # Errors
    /// The kernel's.
    pub fn attach(&self, ioas: u32) -> Result<()> {
        let mut a = AttachPt {
            argsz: size_of_u32::<AttachPt>(),
            flags: 0,
            pt_id: ioas,
        };
        call(self.file.as_fd(), VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut a)
    }

    /// Region `index` (`VFIO_DEVICE_GET_REGION_INFO`).
    ///
    /// # Errors
    /// The kernel's.
    pub fn region(&self, index: u32) -> Result<Region> {
        region_of(self.file.as_fd(), index)
    }

    /// Reads `buf.len()` bytes of `region` at `at`.
    ///
    /// # Errors
    /// The kernel's.
    pub fn read(&self, region: Region, at: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, region.offset + at)
            .map_err(Errno::from)
    }

    /// Writes `bytes` into `region` at `at`.
    ///
    /// # Errors
    /// The kernel's.
    pub fn write(&self, region: Region, at: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, region.offset + at)
            .map_err(Errno::from)
    }

    /// The device's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
