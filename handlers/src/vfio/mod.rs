//! VFIO devices opened through their cdev (`/dev/vfio/devices/vfioN`) and
//! bound to an iommufd (`/dev/iommu`): the objects a VMM hands over in a live
//! update besides guest RAM.
//!
//! [`ioctl`] wraps the calls; [`uapi`] holds the structs and numbers of
//! `include/uapi/linux/vfio.h` and `iommufd.h`, checked at compile time.

pub mod ioctl;
pub mod uapi;

pub use ioctl::{Iommufd, VfioDevice};
