//! What each iommufd maps, and which devices DMA through it: the state the
//! kernel keeps inside iommufd and a userspace LUO has to learn from the
//! calls themselves.
//!
//! `luo run` traps the iommufd calls that change mappings
//! (`IOMMU_IOAS_MAP`, `IOMMU_IOAS_MAP_FILE`, `IOMMU_IOAS_COPY`,
//! `IOMMU_IOAS_UNMAP`, `IOMMU_DESTROY`) and the device calls that bind and
//! attach (`VFIO_DEVICE_BIND_IOMMUFD`, `VFIO_DEVICE_ATTACH_IOMMUFD_PT`); the
//! daemon records each in a [`Space`] (one per iommufd) and lets the kernel
//! run it. An iommufd has no identity of its own that userspace can read
//! (every open of `/dev/iommu` is the same inode), so a space is found again
//! by comparing open files (`kcmp`) with the fds it was last seen at.
//!
//! The record is what the caller asked for, read before the kernel runs the
//! call: a call the kernel then refuses is still recorded, and a caller that
//! rewrites its arguments in between misleads only the record of its own
//! device. What the record is used for is conservative either way: a device
//! whose space ever mapped memory that is not a preserved memfd is refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use luo_store::{Errno, FileId, Flb, Result};
use serde::{Deserialize, Serialize};

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// A file (`IOMMU_IOAS_MAP_FILE`): which, and from which offset.
    File {
        /// The file.
        file: FileId,
        /// Its offset at the mapping's first IOVA.
        start: u64,
    },
    /// A process's memory (`IOMMU_IOAS_MAP` of a user address): pinned
    /// pages that no update carries.
    Memory,
    /// A copy of mappings the record cannot tell apart.
    Unknown,
}

/// One mapping of an IO address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// The IOAS.
    pub ioas: u32,
    /// Its first IOVA, when the caller fixed it (`IOMMU_IOAS_MAP_FIXED_IOVA`).
    pub iova: Option<u64>,
    /// Its length in bytes.
    pub length: u64,
    /// What it maps.
    pub backing: Backing,
    /// `IOMMU_IOAS_MAP_*` flags.
    pub flags: u32,
    /// Where the file that backs it is preserved, filled in when a kexec
    /// is prepared (file identities do not survive one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserved_as: Option<Held>,
}

impl Mapping {
    fn within(&self, ioas: u32, iova: u64, length: u64) -> bool {
        self.ioas == ioas
            && self.iova.is_some_and(|start| {
                start >= iova && start.saturating_add(self.length) <= iova.saturating_add(length)
            })
    }
}

/// An open file as a process holds it: where a space was last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The process (thread-group id).
    pub pid: i32,
    /// The fd.
    pub fd: i32,
}

/// Where LUO holds an iommufd that was preserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Its session's name.
    pub session: String,
    /// Its token.
    pub token: u64,
}

/// One iommufd: its mappings and the devices bound to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Never reused.
    pub id: u64,
    /// Fds the iommufd was seen at.
    pub anchors: Vec<Anchor>,
    /// Where LUO holds it, once preserved.
    pub held: Option<Held>,
    /// Its mappings, in the order they were made.
    pub mappings: Vec<Mapping>,
    /// Devices bound to it, with the IOAS or page table each is attached to.
    pub devices: BTreeMap<String, Option<u32>>,
}

/// Why a device cannot be handed over with its DMA, as a sentence.
pub type Unmet = String;

impl Space {
    /// Records `IOMMU_IOAS_MAP` / `IOMMU_IOAS_MAP_FILE`.
    pub fn map(&mut self, mapping: Mapping) {
        self.mappings.push(mapping);
    }

    /// Records `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`; all of the
    /// IOAS for `iova == 0, length == u64::MAX`, as the kernel reads it.
    /// Mappings whose IOVA the caller left to the kernel stay recorded: the
    /// record cannot tell whether the range covered them.
    pub fn unmap(&mut self, ioas: u32, iova: u64, length: u64) {
        let all = iova == 0 && length == u64::MAX;
        self.mappings.retain(|m| {
            !(m.ioas == ioas && (all && m.iova.is_some() || m.within(ioas, iova, length)))
        });
    }

    /// Records `IOMMU_IOAS_COPY`: the copy maps what the source range maps
    /// when one recorded mapping covers it, else something unknown.
    pub fn copy(&mut self, src: (u32, u64), length: u64, dst: (u32, Option<u64>), flags: u32) {
        let (src_ioas, src_iova) = (src.0, src.1);
        let backing = self
            .mappings
            .iter()
            .find(|m| {
                m.ioas == src_ioas
                    && m.iova.is_some_and(|s| {
                        s <= src_iova
                            && src_iova.saturating_add(length) <= s.saturating_add(m.length)
                    })
            })
            .map_or(Backing::Unknown, |m| match &m.backing {
                Backing::File { file, start } => Backing::File {
                    file: *file,
                    start: start + (src_iova - m.iova.unwrap_or(src_iova)),
                },
                other => other.clone(),
            });
        self.mappings.push(Mapping {
            ioas: dst.0,
            iova: dst.1,
            length,
            backing,
            flags,
            preserved_as: None,
        });
    }

    /// Records `IOMMU_DESTROY` of an IOAS: its mappings go with it.
    pub fn destroy(&mut self, id: u32) {
        self.mappings.retain(|m| m.ioas != id);
        for pt in self.devices.values_mut() {
            if *pt == Some(id) {
                *pt = None;
            }
        }
    }

    /// The files the DMA of this space reaches, each with the first IOVA
    /// of one mapping of it (to name it).
    ///
    /// # Errors
    /// The first mapping of memory no update carries.
    pub fn files(&self) -> std::result::Result<Vec<(FileId, Option<u64>)>, Unmet> {
        let mut files = Vec::new();
        for m in &self.mappings {
            let at = m.iova.map_or_else(
                || "an IOVA the kernel chose".into(),
                |i| format!("IOVA {i:#x}"),
            );
            match &m.backing {
                Backing::File { file, .. } => files.push((*file, m.iova)),
                Backing::Memory => {
                    return Err(format!(
                        "its iommufd maps process memory (IOMMU_IOAS_MAP) at {at} in IOAS {}, \
                         which no update carries; map guest RAM from a preserved memfd with \
                         IOMMU_IOAS_MAP_FILE",
                        m.ioas
                    ))
                }
                Backing::Unknown => {
                    return Err(format!(
                        "its iommufd maps a copy (IOMMU_IOAS_COPY) at {at} in IOAS {} of a \
                         range no single recorded mapping covers",
                        m.ioas
                    ))
                }
            }
        }
        Ok(files)
    }
}

/// Every space the daemon knows of.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spaces {
    /// The spaces.
    pub spaces: Vec<Space>,
    /// The next space id.
    pub next: u64,
}

impl Spaces {
    /// The space whose iommufd is the file `matches` recognises among each
    /// space's anchors, if any.
    pub fn find(&mut self, matches: impl Fn(&Space) -> bool) -> Option<&mut Space> {
        self.spaces.iter_mut().find(|s| matches(s))
    }

    /// A new, empty space first seen at `anchor`.
    pub fn add(&mut self, anchor: Anchor) -> &mut Space {
        self.next += 1;
        self.spaces.push(Space {
            id: self.next,
            anchors: vec![anchor],
            ..Space::default()
        });
        self.spaces.last_mut().expect("just pushed")
    }

    /// The space `device` is bound to, if the bind was seen.
    pub fn of_device(&self, device: &str) -> Option<&Space> {
        self.spaces.iter().find(|s| s.devices.contains_key(device))
    }

    /// Records `VFIO_DEVICE_BIND_IOMMUFD` of `device` to space `space`; a
    /// device is bound to one iommufd at a time.
    pub fn bind(&mut self, device: &str, space: u64) {
        for s in &mut self.spaces {
            if s.id == space {
                s.devices.insert(device.to_owned(), None);
            } else {
                s.devices.remove(device);
            }
        }
    }

    /// Records `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of `device`.
    pub fn attach(&mut self, device: &str, pt: u32) {
        for s in &mut self.spaces {
            if let Some(at) = s.devices.get_mut(device) {
                *at = Some(pt);
            }
        }
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.spaces.is_empty()
    }

    /// Drops anchors that no longer name an open file (`alive`), then the
    /// spaces no process holds any more unless LUO still needs them (`keep`).
    pub fn prune(&mut self, alive: impl Fn(&Anchor) -> bool, keep: impl Fn(&Space) -> bool) {
        for s in &mut self.spaces {
            s.anchors.retain(&alive);
        }
        self.spaces.retain(|s| !s.anchors.is_empty() || keep(s));
    }

    /// Why `device` cannot be preserved with its DMA, if it cannot:
    /// `outgoing` says where a file is preserved.
    ///
    /// # Errors
    /// A sentence naming the device's unmet need.
    pub fn check(
        &self,
        device: &str,
        outgoing: impl Fn(FileId) -> bool,
    ) -> std::result::Result<(), Unmet> {
        let space = self.of_device(device).ok_or_else(|| {
            "it was bound to its iommufd outside `luo run` (or before this daemon saw it), so \
             what its DMA reaches is unknown; bind it under `luo run`"
                .to_owned()
        })?;
        for (file, iova) in space.files()? {
            if !outgoing(file) {
                let at = iova.map_or_else(String::new, |i| format!(" at IOVA {i:#x}"));
                return Err(format!(
                    "its iommufd maps a file{at} (inode {}) that is not preserved in an \
                     outgoing session; preserve guest RAM before the device",
                    file.ino
                ));
            }
        }
        Ok(())
    }
}

impl Spaces {
    /// Before a kexec: names, in every mapping of a space one of `devices`
    /// is bound to, where the memfd behind it is preserved (`outgoing`), as
    /// file identities do not survive a kexec.
    ///
    /// # Errors
    /// A sentence naming a device whose DMA could not be made again after
    /// the kexec: a mapping of process memory, of a file no longer
    /// preserved, or at an IOVA the kernel chose.
    pub fn name_files(
        &mut self,
        devices: &[String],
        outgoing: impl Fn(FileId) -> Option<Held>,
    ) -> std::result::Result<(), Unmet> {
        for space in &mut self.spaces {
            let Some(device) = space.devices.keys().find(|d| devices.contains(d)).cloned() else {
                continue;
            };
            for m in &mut space.mappings {
                if m.iova.is_none() {
                    return Err(format!(
                        "VFIO device {device}: its iommufd maps at an IOVA the kernel chose, \
                         which cannot be made again at the same IOVA after a kexec; map with \
                         IOMMU_IOAS_MAP_FIXED_IOVA"
                    ));
                }
                let Backing::File { file, .. } = m.backing else {
                    return Err(format!(
                        "VFIO device {device}: its iommufd maps memory no kexec carries"
                    ));
                };
                m.preserved_as = Some(outgoing(file).ok_or_else(|| {
                    format!(
                        "VFIO device {device}: its iommufd maps a memfd (inode {}) that is no \
                         longer preserved",
                        file.ino
                    )
                })?);
            }
        }
        Ok(())
    }
}

/// The spaces an iommufd FLB's serialized state holds.
///
/// # Errors
/// EINVAL for state no iommufd FLB wrote.
pub fn flb_spaces(data: &[u8]) -> Result<Vec<Space>> {
    serde_json::from_slice(data).map_err(|_| Errno::EINVAL)
}

/// The spaces, shared by the daemon (which records calls into them) and the
/// handlers (which describe and hand them over).
#[derive(Clone, Debug, Default)]
pub struct DmaTable(Arc<Mutex<Spaces>>);

impl DmaTable {
    /// The spaces, locked.
    pub fn lock(&self) -> MutexGuard<'_, Spaces> {
        // A panic while holding it leaves plain data behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The iommufd FLB: the spaces of the devices handed over, preserved with
/// the first device and released with the last (`luo_flb.c`).
#[derive(Debug)]
pub struct IommufdFlb {
    table: DmaTable,
}

/// Its compatible string.
pub const FLB_COMPATIBLE: &str = "iommufd-dma-v1";

impl IommufdFlb {
    /// The FLB over `table`.
    pub fn new(table: DmaTable) -> IommufdFlb {
        IommufdFlb { table }
    }

    fn snapshot(&self) -> Vec<u8> {
        let spaces = self.table.lock();
        let bound: Vec<&Space> = spaces
            .spaces
            .iter()
            .filter(|s| !s.devices.is_empty())
            .collect();
        serde_json::to_vec(&bound).expect("spaces serialize")
    }
}

impl Flb for IommufdFlb {
    fn compatible(&self) -> &'static str {
        FLB_COMPATIBLE
    }

    fn preserve(&mut self) -> Result<Vec<u8>> {
        Ok(self.snapshot())
    }

    fn unpreserve(&mut self, _data: &[u8]) {}

    fn retrieve(&mut self, data: &[u8]) -> Result<()> {
        // Across a simulated update the iommufd itself was kept open: its
        // IOAS and every mapping are there; the record only has to read.
        flb_spaces(data).map(drop)
    }

    fn finish(&mut self, _data: &[u8]) {}

    fn current(&self) -> Option<Vec<u8>> {
        Some(self.snapshot())
    }

    fn describe(&self, data: &[u8]) -> Option<String> {
        let spaces = flb_spaces(data).ok()?;
        let devices: usize = spaces.iter().map(|s| s.devices.len()).sum();
        let mappings: usize = spaces.iter().map(|s| s.mappings.len()).sum();
        let bytes: u64 = spaces
            .iter()
            .flat_map(|s| &s.mappings)
            .map(|m| m.length)
            .sum();
        Some(format!(
            "{} iommufd, {devices} device(s), {mappings} mapping(s) of {} MiB",
            spaces.len(),
            bytes >> 20
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: FileId = FileId { dev: 1, ino: 10 };
    const OTHER: FileId = FileId { dev: 1, ino: 11 };

    fn file(ioas: u32, iova: u64, length: u64, file: FileId, start: u64) -> Mapping {
        Mapping {
            ioas,
            iova: Some(iova),
            length,
            backing: Backing::File { file, start },
            flags: 7,
            preserved_as: None,
        }
    }

    fn bound(mappings: Vec<Mapping>) -> Spaces {
        let mut spaces = Spaces::default();
        let space = spaces.add(Anchor { pid: 1, fd: 3 });
        space.mappings = mappings;
        let id = space.id;
        spaces.bind("0000:00:03.0", id);
        spaces.attach("0000:00:03.0", 2);
        spaces
    }

    #[test]
    fn a_device_mapping_only_preserved_memfds_may_be_handed_over() {
        let spaces = bound(vec![file(2, 0x1000_0000, 64 << 20, RAM, 0)]);
        assert_eq!(spaces.check("0000:00:03.0", |f| f == RAM), Ok(()));
        let unmet = spaces.check("0000:00:03.0", |_| false).unwrap_err();
        assert!(
            unmet.contains("IOVA 0x10000000") && unmet.contains("inode 10"),
            "{unmet}"
        );
    }

    #[test]
    fn process_memory_or_an_unknown_bind_is_refused_with_a_reason() {
        let mut spaces = bound(vec![file(2, 0, 4096, RAM, 0)]);
        spaces.spaces[0].map(Mapping {
            ioas: 2,
            iova: None,
            length: 4096,
            backing: Backing::Memory,
            flags: 7,
            preserved_as: None,
        });
        let unmet = spaces.check("0000:00:03.0", |_| true).unwrap_err();
        assert!(unmet.contains("IOMMU_IOAS_MAP_FILE"), "{unmet}");
        let unmet = spaces.check("0000:00:04.0", |_| true).unwrap_err();
        assert!(unmet.contains("outside `luo run`"), "{unmet}");
    }

    #[test]
    fn unmap_drops_the_mappings_it_covers_and_no_others() {
        let mut spaces = bound(vec![
            file(2, 0x1000, 0x1000, RAM, 0),
            file(2, 0x2000, 0x2000, OTHER, 0),
            file(3, 0x1000, 0x1000, OTHER, 0),
        ]);
        let s = &mut spaces.spaces[0];
        s.unmap(2, 0x1000, 0x2000);
        assert_eq!(s.mappings.len(), 2, "the partly covered one stays");
        s.unmap(2, 0, u64::MAX);
        assert_eq!(s.mappings, [file(3, 0x1000, 0x1000, OTHER, 0)]);
        s.destroy(3);
        assert!(s.mappings.is_empty());
        assert_eq!(s.devices["0000:00:03.0"], Some(2), "IOAS 3 was not its");
        s.destroy(2);
        assert_eq!(s.devices["0000:00:03.0"], None);
    }

    #[test]
    fn a_copy_maps_what_its_source_maps() {
        let mut spaces = bound(vec![file(2, 0x10_0000, 0x10_0000, RAM, 0x4000)]);
        let s = &mut spaces.spaces[0];
        s.copy((2, 0x10_8000), 0x1000, (5, Some(0x9000)), 3);
        assert_eq!(s.mappings[1], {
            let mut m = file(5, 0x9000, 0x1000, RAM, 0xc000);
            m.flags = 3;
            m
        });
        s.copy((2, 0x1f_f000), 0x2000, (5, Some(0)), 3);
        assert_eq!(
            s.mappings[2].backing,
            Backing::Unknown,
            "runs past its source"
        );
        assert!(s.files().is_err());
    }

    #[test]
    fn a_kexec_names_each_mapped_memfd_or_is_refused() {
        let held = Held {
            session: "vm".into(),
            token: 1,
        };
        let devices = ["0000:00:03.0".to_owned()];
        let outgoing = |f: FileId| (f == RAM).then(|| held.clone());
        let mut spaces = bound(vec![file(2, 0, 64 << 20, RAM, 0)]);
        spaces.name_files(&devices, outgoing).unwrap();
        assert_eq!(
            spaces.spaces[0].mappings[0].preserved_as,
            Some(held.clone())
        );
        // A device not crossing the kexec is not looked at.
        let mut other = bound(vec![file(2, 0, 4096, OTHER, 0)]);
        other.name_files(&[], outgoing).unwrap();
        let unmet = other.name_files(&devices, outgoing).unwrap_err();
        assert!(unmet.contains("no longer preserved"), "{unmet}");
        let mut chosen = bound(vec![Mapping {
            iova: None,
            ..file(2, 0, 4096, RAM, 0)
        }]);
        let unmet = chosen.name_files(&devices, outgoing).unwrap_err();
        assert!(unmet.contains("IOMMU_IOAS_MAP_FIXED_IOVA"), "{unmet}");
    }

    #[test]
    fn spaces_go_when_nothing_holds_them() {
        let mut spaces = bound(vec![]);
        spaces.add(Anchor { pid: 2, fd: 4 });
        spaces.add(Anchor { pid: 3, fd: 4 }).held = Some(Held {
            session: "vm".into(),
            token: 1,
        });
        spaces.add(Anchor { pid: 99, fd: 4 });
        let keep = |s: &Space| s.held.is_some() || s.devices.contains_key("0000:00:03.0");
        spaces.prune(|a| a.pid == 99, keep);
        let ids: Vec<u64> = spaces.spaces.iter().map(|s| s.id).collect();
        assert_eq!(ids, [1, 3, 4], "bound, held and alive stay; the rest go");
        // A device bound again elsewhere leaves its first space.
        spaces.bind("0000:00:03.0", 3);
        assert_eq!(spaces.of_device("0000:00:03.0").map(|s| s.id), Some(3));
        spaces.prune(|_| false, keep);
        assert_eq!(spaces.spaces.len(), 1);
    }

    #[test]
    fn the_flb_hands_over_the_spaces_as_they_are_at_the_update() {
        let table = DmaTable::default();
        *table.lock() = bound(vec![file(2, 0, 64 << 20, RAM, 0)]);
        let mut flb = IommufdFlb::new(table.clone());
        let first = flb.preserve().unwrap();
        table.lock().spaces[0].map(file(2, 64 << 20, 64 << 20, RAM, 64 << 20));
        let now = flb.current().unwrap();
        assert_ne!(first, now);
        flb.retrieve(&now).unwrap();
        assert_eq!(flb.retrieve(b"{"), Err(Errno::EINVAL));
        assert_eq!(
            flb.describe(&now).unwrap(),
            "1 iommufd, 1 device(s), 2 mapping(s) of 128 MiB"
        );
    }
}
