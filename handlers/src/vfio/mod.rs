//! VFIO devices opened through their cdev (`/dev/vfio/devices/vfioN`) and
//! bound to an iommufd (`/dev/iommu`): the objects a VMM hands over in a live
//! update besides guest RAM.
//!
//! [`handler`] preserves both across a simulated update; [`ioctl`] wraps
//! the calls; [`uapi`] holds the structs and numbers of
//! `include/uapi/linux/vfio.h` and `iommufd.h`, checked at compile time.

pub mod handler;
pub mod ioctl;
pub mod uapi;

pub use handler::{Kind, VfioHandler};
pub use ioctl::{Iommufd, VfioDevice};
