//! The structs and ioctl numbers of `include/uapi/linux/vfio.h` and
//! `include/uapi/linux/iommufd.h` (Linux 7.2) that device handover uses:
//! the daemon decodes callers' arguments with them (`zerocopy`), and their
//! layouts are checked at compile time against rust-vmm's bindings.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `VFIO_TYPE` and `IOMMUFD_TYPE`: both are `';'`.
const TYPE: u32 = b';' as u32;

/// `_IO(';', nr)`.
const fn io(nr: u32) -> u32 {
    (TYPE << 8) | nr
}

/// `VFIO_BASE`.
const VFIO_BASE: u32 = 100;

/// `VFIO_DEVICE_GET_INFO`.
pub const VFIO_DEVICE_GET_INFO: u32 = io(VFIO_BASE + 7);
/// `VFIO_DEVICE_GET_REGION_INFO`.
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = io(VFIO_BASE + 8);
/// `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_RESET: u32 = io(VFIO_BASE + 11);
/// `VFIO_DEVICE_BIND_IOMMUFD`.
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = io(VFIO_BASE + 18);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = io(VFIO_BASE + 19);

/// `IOMMU_DESTROY`.
pub const IOMMU_DESTROY: u32 = io(0x80);
/// `IOMMU_IOAS_ALLOC`.
pub const IOMMU_IOAS_ALLOC: u32 = io(0x81);
/// `IOMMU_IOAS_COPY`.
pub const IOMMU_IOAS_COPY: u32 = io(0x83);
/// `IOMMU_IOAS_MAP`.
pub const IOMMU_IOAS_MAP: u32 = io(0x85);
/// `IOMMU_IOAS_UNMAP`.
pub const IOMMU_IOAS_UNMAP: u32 = io(0x86);
/// `IOMMU_IOAS_MAP_FILE`.
pub const IOMMU_IOAS_MAP_FILE: u32 = io(0x8f);

/// `IOMMU_IOAS_MAP_FIXED_IOVA`.
pub const MAP_FIXED_IOVA: u32 = 1 << 0;
/// `IOMMU_IOAS_MAP_WRITEABLE`.
pub const MAP_WRITEABLE: u32 = 1 << 1;
/// `IOMMU_IOAS_MAP_READABLE`.
pub const MAP_READABLE: u32 = 1 << 2;

/// `VFIO_PCI_BAR0_REGION_INDEX`.
pub const PCI_BAR0_REGION: u32 = 0;
/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const PCI_CONFIG_REGION: u32 = 7;

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_device_bind_iommufd` up to `out_devid` (its `argsz`
/// minimum; the token pointer after it is for `VFIO_DEVICE_BIND_FLAG_TOKEN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
}

/// `struct vfio_device_attach_iommufd_pt` up to `pt_id` (its `argsz`
/// minimum; `pasid` is for `VFIO_DEVICE_ATTACH_PASID`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct AttachPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
}

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Destroy {
    pub size: u32,
    pub id: u32,
}

/// `struct iommu_ioas_map_file`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoasMapFile {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub fd: i32,
    pub start: u64,
    pub length: u64,
    pub iova: u64,
}

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoasMap {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

/// `struct iommu_ioas_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoasCopy {
    pub size: u32,
    pub flags: u32,
    pub dst_ioas_id: u32,
    pub src_ioas_id: u32,
    pub length: u64,
    pub dst_iova: u64,
    pub src_iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

const _: () = assert!(size_of::<DeviceInfo>() == 24);
const _: () = assert!(size_of::<RegionInfo>() == 32);
const _: () = assert!(size_of::<BindIommufd>() == 16);
const _: () = assert!(size_of::<AttachPt>() == 12);
const _: () = assert!(size_of::<Destroy>() == 8);
const _: () = assert!(size_of::<IoasMapFile>() == 40);
const _: () = assert!(size_of::<IoasUnmap>() == 24);
const _: () = assert!(size_of::<IoasMap>() == 40);
const _: () = assert!(size_of::<IoasCopy>() == 40);
const _: () = assert!(IOMMU_IOAS_MAP == 0x3b85 && IOMMU_IOAS_COPY == 0x3b83);
const _: () = assert!(VFIO_DEVICE_BIND_IOMMUFD == 0x3b76);
const _: () = assert!(VFIO_DEVICE_ATTACH_IOMMUFD_PT == 0x3b77);
const _: () = assert!(VFIO_DEVICE_GET_REGION_INFO == 0x3b6c);
const _: () = assert!(IOMMU_IOAS_ALLOC == 0x3b81);
const _: () = assert!(IOMMU_IOAS_MAP_FILE == 0x3b8f);

/// Each struct here has the layout of rust-vmm's bindings of the same
/// header (`iommufd-bindings`, `vfio-bindings`), up to the fields read: the
/// daemon decodes callers' arguments with these.
const _: () = {
    use std::mem::offset_of;

    use iommufd_bindings::iommufd as i;
    use vfio_bindings::bindings::vfio as v;
    assert!(size_of::<IoasMap>() == size_of::<i::iommu_ioas_map>());
    assert!(offset_of!(IoasMap, user_va) == offset_of!(i::iommu_ioas_map, user_va));
    assert!(offset_of!(IoasMap, iova) == offset_of!(i::iommu_ioas_map, iova));
    assert!(size_of::<IoasMapFile>() == size_of::<i::iommu_ioas_map_file>());
    assert!(offset_of!(IoasMapFile, fd) == offset_of!(i::iommu_ioas_map_file, fd));
    assert!(offset_of!(IoasMapFile, iova) == offset_of!(i::iommu_ioas_map_file, iova));
    assert!(size_of::<IoasCopy>() == size_of::<i::iommu_ioas_copy>());
    assert!(offset_of!(IoasCopy, src_ioas_id) == offset_of!(i::iommu_ioas_copy, src_ioas_id));
    assert!(offset_of!(IoasCopy, src_iova) == offset_of!(i::iommu_ioas_copy, src_iova));
    assert!(size_of::<IoasUnmap>() == size_of::<i::iommu_ioas_unmap>());
    assert!(offset_of!(IoasUnmap, length) == offset_of!(i::iommu_ioas_unmap, length));
    assert!(size_of::<Destroy>() == size_of::<i::iommu_destroy>());
    assert!(size_of::<DeviceInfo>() == size_of::<v::vfio_device_info>());
    assert!(size_of::<RegionInfo>() == size_of::<v::vfio_region_info>());
    assert!(offset_of!(BindIommufd, iommufd) == offset_of!(v::vfio_device_bind_iommufd, iommufd));
    assert!(offset_of!(AttachPt, pt_id) == offset_of!(v::vfio_device_attach_iommufd_pt, pt_id));
};
