//! VFIO devices opened through their cdev (`/dev/vfio/devices/vfioN`) and
//! bound to an iommufd (`/dev/iommu`): the objects a VMM hands over in a live
//! update besides guest RAM.
//!
//! [`handler`] preserves both across a simulated update; [`dma`] records
//! what each iommufd maps and hands it over as an FLB; [`rebuild`] makes
//! both again after a real kexec; [`ioctl`] wraps
//! the calls; [`uapi`] holds the structs and numbers of
//! `include/uapi/linux/vfio.h` and `iommufd.h`, checked at compile time.

pub mod dma;
pub mod handler;
pub mod ioctl;
pub mod rebuild;
pub mod uapi;

pub use dma::{DmaTable, IommufdFlb};
pub use handler::{
    device_key, is_iommufd, Kind, Object, VfioHandler, DEVICE_COMPATIBLE, IOMMUFD_COMPATIBLE,
};
pub use ioctl::{Iommufd, VfioDevice};
