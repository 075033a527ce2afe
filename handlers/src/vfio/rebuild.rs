//! After a real kexec: each iommufd made anew, with its IO address spaces
//! and every mapping at the same IOVA from the restored memfds, and each
//! device bound to vfio-pci again, opened, bound to its iommufd, attached
//! as it was and given back its PCI command register. The old kernel
//! stopped the device at shutdown: it was reset, and no DMA ran during the
//! kexec.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use luo_store::Errno;

use super::dma::{Backing, Held, Space};
use super::handler::{pci_ids, Object};
use super::ioctl::{set_pci_command, Iommufd, VfioDevice};

/// Why something could not be rebuilt: the errno its retrieve fails with
/// and a sentence for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// For every retrieve of the file.
    pub errno: Errno,
    /// For the daemon's log.
    pub why: String,
}

fn fail(errno: Errno, why: impl Into<String>) -> Failure {
    Failure {
        errno,
        why: why.into(),
    }
}

/// An iommufd made anew.
#[derive(Debug)]
pub struct RebuiltSpace {
    /// The new iommufd.
    pub iommufd: Iommufd,
    /// Each recorded IOAS id and the id of the IOAS made for it.
    pub ioas: BTreeMap<u32, u32>,
}

/// Makes `space`'s iommufd anew: every IOAS it had, every mapping at its
/// IOVA from the restored file `memfd` gives for where the backing file
/// was preserved.
///
/// # Errors
/// The first thing that could not be made.
pub fn rebuild_space<'f>(
    space: &Space,
    memfd: &dyn Fn(&Held) -> Option<BorrowedFd<'f>>,
) -> Result<RebuiltSpace, Failure> {
    let iommufd = Iommufd::open(Path::new("/dev/iommu"))
        .map_err(|e| fail(e, format!("open /dev/iommu: {e}")))?;
    let mut ids: Vec<u32> = space.mappings.iter().map(|m| m.ioas).collect();
    ids.extend(space.devices.values().flatten());
    let mut ioas = BTreeMap::new();
    for id in ids {
        if let std::collections::btree_map::Entry::Vacant(slot) = ioas.entry(id) {
            let new = iommufd
                .alloc_ioas()
                .map_err(|e| fail(e, format!("IOMMU_IOAS_ALLOC: {e}")))?;
            slot.insert(new);
        }
    }
    for m in &space.mappings {
        let at = m.iova.ok_or_else(|| {
            fail(
                Errno::EINVAL,
                "a mapping at an IOVA the kernel chose cannot be made at the same IOVA again",
            )
        })?;
        let (Backing::File { start, .. }, Some(held)) = (&m.backing, &m.preserved_as) else {
            return Err(fail(
                Errno::EINVAL,
                format!("the mapping at IOVA {at:#x} has no preserved file"),
            ));
        };
        let file = memfd(held).ok_or_else(|| {
            fail(
                Errno::ENOMEM,
                format!(
                    "the memfd at {} token {} it maps at IOVA {at:#x} is not there",
                    held.session, held.token
                ),
            )
        })?;
        iommufd
            .map_file_with(ioas[&m.ioas], (file, *start), m.length, at, m.flags)
            .map_err(|e| fail(e, format!("IOMMU_IOAS_MAP_FILE at IOVA {at:#x}: {e}")))?;
    }
    Ok(RebuiltSpace { iommufd, ioas })
}

/// Whether `pci` is a PCI address (`0000:00:01.0`): it names sysfs paths.
fn is_pci_address(pci: &str) -> bool {
    let b = pci.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
}

/// Waits up to five seconds for `find` to find something.
fn wait_for<T>(mut find: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(found) = find() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds the device at `pci` to vfio-pci (taking it from any other driver)
/// and returns its cdev.
fn claim(pci: &str) -> Result<PathBuf, Failure> {
    let dev = Path::new("/sys/bus/pci/devices").join(pci);
    let write = |path: &Path, what: &str| {
        std::fs::write(path, what).map_err(|e| {
            fail(
                Errno::ENODEV,
                format!("write {what} to {}: {e}", path.display()),
            )
        })
    };
    write(&dev.join("driver_override"), "vfio-pci")?;
    let driver = std::fs::read_link(dev.join("driver")).ok();
    let bound = driver
        .as_ref()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "vfio-pci");
    if !bound {
        if driver.is_some() {
            write(&dev.join("driver/unbind"), pci)?;
        }
        write(Path::new("/sys/bus/pci/drivers_probe"), pci)?;
    }
    let name = wait_for(|| {
        std::fs::read_dir(dev.join("vfio-dev"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("vfio"))
    })
    .ok_or_else(|| fail(Errno::ENODEV, format!("vfio-pci did not take {pci}")))?;
    let cdev = Path::new("/dev/vfio/devices").join(name);
    wait_for(|| cdev.exists().then_some(()))
        .ok_or_else(|| fail(Errno::ENODEV, format!("{} did not appear", cdev.display())))?;
    Ok(cdev)
}

/// Brings the device `object` describes back: bound to vfio-pci, opened,
/// bound to `space`'s new iommufd, attached to the IOAS made for `pt` and
/// given its command register back. The device fd.
///
/// # Errors
/// ENODEV for a device that is gone, is another device now, or that
/// vfio-pci does not take; the kernel's errno for a call it refuses.
pub fn rebuild_device(
    object: &Object,
    pt: Option<u32>,
    space: &RebuiltSpace,
) -> Result<OwnedFd, Failure> {
    let pci = object
        .pci
        .as_deref()
        .filter(|p| is_pci_address(p))
        .ok_or_else(|| fail(Errno::ENODEV, "no PCI address was recorded"))?;
    let ids = pci_ids(pci).ok_or_else(|| fail(Errno::ENODEV, format!("no device at {pci}")))?;
    if object.ids.is_some_and(|was| was != ids) {
        return Err(fail(
            Errno::ENODEV,
            format!(
                "{pci} is {:04x}:{:04x} now, not the device preserved",
                ids.0, ids.1
            ),
        ));
    }
    let cdev = claim(pci)?;
    let device =
        VfioDevice::open(&cdev).map_err(|e| fail(e, format!("open {}: {e}", cdev.display())))?;
    device
        .bind(&space.iommufd)
        .map_err(|e| fail(e, format!("VFIO_DEVICE_BIND_IOMMUFD: {e}")))?;
    if let Some(pt) = pt {
        let new = *space
            .ioas
            .get(&pt)
            .ok_or_else(|| fail(Errno::EINVAL, format!("IOAS {pt} was not recorded")))?;
        device
            .attach(new)
            .map_err(|e| fail(e, format!("VFIO_DEVICE_ATTACH_IOMMUFD_PT: {e}")))?;
    }
    if let Some(command) = object.command {
        set_pci_command(device.fd(), command)
            .map_err(|e| fail(e, format!("restore the PCI command register: {e}")))?;
    }
    device
        .fd()
        .try_clone_to_owned()
        .map_err(|e| fail(Errno::from(e), "dup the device fd"))
}

impl RebuiltSpace {
    /// A new fd of the rebuilt iommufd.
    ///
    /// # Errors
    /// EMFILE and the like.
    pub fn iommufd_fd(&self) -> Result<OwnedFd, Errno> {
        self.iommufd
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(Errno::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pci_address_names_a_sysfs_path() {
        assert!(is_pci_address("0000:00:01.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        for bad in [
            "../../etc/x",
            "0000:00:01.8",
            "0000:00:01",
            "0000:00:01.0/",
            "",
        ] {
            assert!(!is_pci_address(bad), "{bad}");
        }
    }
}
