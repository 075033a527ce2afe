//! The DMA record (see `luo_handlers::vfio::dma`): the iommufd and VFIO
//! device calls of `luo run` trees, recorded as they are trapped and then
//! run by the kernel; which iommufd a caller's fd is; and the check that a
//! device is handed over only with memory that survives the update.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use luo_handlers::vfio::dma::{Anchor, Backing, DmaTable, Held, Mapping, Spaces};
use luo_handlers::vfio::uapi as v;
use luo_handlers::vfio::{device_key, is_iommufd, Object, DEVICE_COMPATIBLE};
use luo_store::{Errno, FileId, Lookup, Result, Store};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::caller::Caller;
use super::Daemon;
use crate::persist::Header;
use crate::uapi::CallerMem;
use crate::{log, sys};

/// The DMA record, shared with the device handler and the iommufd FLB.
pub(super) struct Dma {
    pub(super) table: DmaTable,
}

impl Dma {
    /// As `header` left it.
    pub(super) fn from_header(header: &Header) -> Dma {
        let table = DmaTable::default();
        *table.lock() = header.dma.clone();
        Dma { table }
    }

    /// Writes its part of the journal header.
    pub(super) fn save_into(&self, header: &mut Header) {
        header.dma = self.table.lock().clone();
    }
}

/// `T` read from the caller's memory at `addr`.
fn read<T: FromBytes + IntoBytes + Immutable>(caller: &Caller, addr: u64) -> Option<T> {
    let mut buf = vec![0u8; size_of::<T>()];
    caller.mem().read(addr, &mut buf).ok()?;
    T::read_from_bytes(&buf).ok()
}

/// The space of the iommufd at `at`: one it was seen at before, else the
/// one LUO holds as a preserved file, else a new one.
fn space_at(store: &Store, spaces: &mut Spaces, at: Anchor) -> u64 {
    let same = |a: &Anchor| sys::same_file((a.pid, a.fd), (at.pid, at.fd)) == Some(true);
    let me = std::process::id() as i32;
    let held_here = |h: &Held| {
        held_fd(store, h).is_some_and(|fd| sys::same_file((me, fd), (at.pid, at.fd)) == Some(true))
    };
    let found =
        spaces.find(|s| s.anchors.iter().any(same) || s.held.as_ref().is_some_and(held_here));
    match found {
        Some(space) => {
            if !space.anchors.contains(&at) {
                space.anchors.push(at);
            }
            space.id
        }
        None => spaces.add(at).id,
    }
}

/// Whether a session still has the file `held` names.
fn held_exists(store: &Store, held: &Held) -> bool {
    store
        .sessions()
        .filter(|s| s.name.to_string() == held.session)
        .any(|s| s.files.iter().any(|f| f.token == held.token))
}

/// The daemon's fd of the file LUO holds as `held`, in either direction.
fn held_fd(store: &Store, held: &Held) -> Option<i32> {
    store
        .sessions()
        .filter(|s| s.name.to_string() == held.session)
        .flat_map(|s| &s.files)
        .filter(|f| f.token == held.token)
        .find_map(|f| {
            f.file
                .as_ref()
                .or(f.carried.as_ref())
                .map(AsRawFd::as_raw_fd)
        })
}

/// The keys of the devices LUO holds.
fn held_devices(store: &Store) -> Vec<String> {
    store
        .sessions()
        .flat_map(|s| &s.files)
        .filter(|f| store.handler_compatible(f.handler) == DEVICE_COMPATIBLE)
        .filter_map(|f| Some(Object::parse(&f.data).ok()?.key().to_owned()))
        .collect()
}

impl Daemon {
    /// Records a trapped iommufd or device call on `file`, the caller's
    /// `fd`, which the kernel runs next. What cannot be read is not
    /// recorded: the kernel refuses such a call too.
    pub(super) fn record_dma(
        &mut self,
        caller: &Caller,
        (fd, file): (i32, BorrowedFd<'_>),
        cmd: u32,
        arg: u64,
    ) {
        let Some(pid) = sys::tgid(caller.tid()) else {
            return;
        };
        let at = Anchor { pid, fd };
        let recorded = if let Some(device) = device_key(file) {
            self.record_device_call(caller, &device, pid, cmd, arg)
        } else if is_iommufd(file) {
            self.record_iommufd_call(caller, at, cmd, arg)
        } else {
            None
        };
        if recorded.is_some() {
            self.prune_dma();
            self.saved.dirty = true;
        }
    }

    fn record_device_call(
        &mut self,
        caller: &Caller,
        device: &str,
        pid: i32,
        cmd: u32,
        arg: u64,
    ) -> Option<()> {
        match cmd {
            v::VFIO_DEVICE_BIND_IOMMUFD => {
                let a: v::BindIommufd = read(caller, arg)?;
                let iommufd = caller.get_fd(a.iommufd).ok()?;
                let ours = is_iommufd(iommufd.as_fd());
                caller.dispose(iommufd);
                if !ours {
                    return None;
                }
                let at = Anchor { pid, fd: a.iommufd };
                let id = space_at(&self.store, &mut self.dma.table.lock(), at);
                self.dma.table.lock().bind(device, id);
            }
            v::VFIO_DEVICE_ATTACH_IOMMUFD_PT => {
                let a: v::AttachPt = read(caller, arg)?;
                self.dma.table.lock().attach(device, a.pt_id);
            }
            _ => return None,
        }
        Some(())
    }

    fn record_iommufd_call(
        &mut self,
        caller: &Caller,
        at: Anchor,
        cmd: u32,
        arg: u64,
    ) -> Option<()> {
        let fixed = |flags: u32, iova: u64| (flags & v::MAP_FIXED_IOVA != 0).then_some(iova);
        let mapping = match cmd {
            v::IOMMU_IOAS_MAP => {
                let a: v::IoasMap = read(caller, arg)?;
                Some(Mapping {
                    ioas: a.ioas_id,
                    iova: fixed(a.flags, a.iova),
                    length: a.length,
                    backing: Backing::Memory,
                    flags: a.flags,
                    preserved_as: None,
                })
            }
            v::IOMMU_IOAS_MAP_FILE => {
                let a: v::IoasMapFile = read(caller, arg)?;
                let backing = caller.get_fd(a.fd).ok()?;
                let (dev, ino) = sys::dev_ino(backing.as_fd()).ok()?;
                caller.dispose(backing);
                Some(Mapping {
                    ioas: a.ioas_id,
                    iova: fixed(a.flags, a.iova),
                    length: a.length,
                    backing: Backing::File {
                        file: FileId { dev, ino },
                        start: a.start,
                    },
                    flags: a.flags,
                    preserved_as: None,
                })
            }
            _ => None,
        };
        let change: Box<dyn FnOnce(&mut luo_handlers::vfio::dma::Space)> = match (cmd, mapping) {
            (_, Some(m)) => Box::new(move |s| s.map(m)),
            (v::IOMMU_IOAS_COPY, None) => {
                let a: v::IoasCopy = read(caller, arg)?;
                let dst = (a.dst_ioas_id, fixed(a.flags, a.dst_iova));
                Box::new(move |s| s.copy((a.src_ioas_id, a.src_iova), a.length, dst, a.flags))
            }
            (v::IOMMU_IOAS_UNMAP, None) => {
                let a: v::IoasUnmap = read(caller, arg)?;
                Box::new(move |s| s.unmap(a.ioas_id, a.iova, a.length))
            }
            (v::IOMMU_DESTROY, None) => {
                let a: v::Destroy = read(caller, arg)?;
                Box::new(move |s| s.destroy(a.id))
            }
            _ => return None,
        };
        let mut spaces = self.dma.table.lock();
        let id = space_at(&self.store, &mut spaces, at);
        change(spaces.find(|s| s.id == id)?);
        Some(())
    }

    /// Forgets what no process, session or preserved device holds any more.
    pub(super) fn prune_dma(&mut self) {
        // Without a recorded iommufd there is nothing to prune, and no
        // reason to look through every preserved file (this runs on every
        // SESSION_PRESERVE_FD).
        if self.dma.table.lock().spaces.is_empty() {
            return;
        }
        let devices = held_devices(&self.store);
        let mut spaces = self.dma.table.lock();
        for s in &mut spaces.spaces {
            if s.held
                .as_ref()
                .is_some_and(|h| !held_exists(&self.store, h))
            {
                s.held = None;
            }
        }
        spaces.prune(
            |a| sys::same_file((a.pid, a.fd), (a.pid, a.fd)) == Some(true),
            |s| s.held.is_some() || s.devices.keys().any(|d| devices.contains(d)),
        );
    }

    /// Names, in each mapping of a device about to cross a kexec, where the
    /// memfd behind it is preserved (its identity will not survive).
    ///
    /// # Errors
    /// A sentence naming a device whose DMA reaches a file no longer
    /// preserved.
    pub(super) fn name_dma_files(&mut self) -> std::result::Result<(), String> {
        let devices = held_devices(&self.store);
        let lookup = self.store.lookup();
        let outgoing = |f: FileId| {
            lookup.outgoing(f).map(|(session, token)| Held {
                session: session.to_string(),
                token,
            })
        };
        self.dma.table.lock().name_files(&devices, outgoing)
    }

    /// Records that the iommufd preserved at `(session, token)` was the
    /// caller's `at`.
    pub(super) fn hold_iommufd(&mut self, at: Anchor, session: String, token: u64) {
        let mut spaces = self.dma.table.lock();
        let id = space_at(&self.store, &mut spaces, at);
        if let Some(space) = spaces.find(|s| s.id == id) {
            space.held = Some(Held { session, token });
        }
    }
}

/// Refuses a VFIO device whose DMA reaches memory no update carries (or
/// that was bound where the record could not see), with a log line that
/// says why: ENOENT, as for a file no handler takes.
pub(super) fn check_device(
    table: &DmaTable,
    file: BorrowedFd<'_>,
    lookup: &Lookup<'_>,
    caller: &Caller,
) -> Result<()> {
    let Some(device) = device_key(file) else {
        return Ok(());
    };
    let spaces = table.lock();
    spaces
        .check(&device, |f| lookup.outgoing(f).is_some())
        .map_err(|why| {
            log::warn(format_args!(
                "pid {} ({}): VFIO device {device} not preserved: {why}",
                caller.tid(),
                crate::caller::comm(caller.tid())
            ));
            Errno::ENOENT
        })
}
