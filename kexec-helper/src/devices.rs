//! VFIO devices and iommufds after a real kexec. Nothing of them crossed
//! it but their record: each file's object (PCI address, ids, command
//! register) and the iommufd FLB's spaces (every IOAS, every mapping with
//! the preserved memfd behind it, every device's attachment). Once the
//! memfds are restored, each space is made anew and each device bound to
//! it, and the new fds become the files' carried fds, as after a
//! simulated update. A device that cannot be brought back fails only its
//! own retrieve; a space that cannot, only its own files'.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use luo_handlers::vfio::dma::{flb_spaces, Held, Space, FLB_COMPATIBLE};
use luo_handlers::vfio::rebuild::{rebuild_device, rebuild_space, Failure, RebuiltSpace};
use luo_handlers::vfio::{Object, DEVICE_COMPATIBLE, IOMMUFD_COMPATIBLE};
use luo_store::{FileImage, StoreImage};

/// What [`rebuild_all`] did.
#[derive(Debug, Default)]
pub struct Devices {
    /// Files (session id, token) that could not be brought back, and why.
    pub lost: Vec<((u64, u64), Failure)>,
    /// The spaces as they are now (new IOAS ids), for the DMA record.
    pub spaces: Vec<Space>,
    /// Devices brought back.
    pub devices: usize,
    /// Time spent making the iommufds and their mappings.
    pub map_time: std::time::Duration,
    /// Time spent binding, opening and attaching the devices.
    pub bind_time: std::time::Duration,
}

/// The outgoing session id of the session named `name` in `image`.
fn session_id(image: &StoreImage, name: &str) -> Option<u64> {
    image
        .sessions
        .iter()
        .find(|s| !s.incoming && session_name(&s.name) == name)
        .map(|s| s.id)
}

/// The session name as the DMA record writes it.
fn session_name(bytes: &[u8]) -> String {
    luo_store::SessionName::new(bytes).map_or_else(
        |_| String::from_utf8_lossy(bytes).into_owned(),
        |n| n.to_string(),
    )
}

/// Rebuilds every space the iommufd FLB of `image` carried and every VFIO
/// file of its outgoing sessions; the new fds go into `fds` under each
/// file's carried key, next to the restored memfds they map.
pub fn rebuild_all(image: &StoreImage, fds: &mut HashMap<String, OwnedFd>) -> Devices {
    let mut out = Devices::default();
    let spaces: Vec<Space> = image
        .flb_outgoing
        .iter()
        .find(|f| f.compatible == FLB_COMPATIBLE)
        .and_then(|f| flb_spaces(&f.data).ok())
        .unwrap_or_default();
    let wanted = |space: &Space| {
        image
            .sessions
            .iter()
            .filter(|s| !s.incoming)
            .flat_map(|s| s.files.iter().map(move |f| (s, f)))
            .any(|(s, f)| {
                (f.handler == DEVICE_COMPATIBLE
                    && Object::parse(&f.data).is_ok_and(|o| space.devices.contains_key(o.key())))
                    || (f.handler == IOMMUFD_COMPATIBLE
                        && space.held.as_ref().is_some_and(|h| {
                            h.token == f.token && h.session == session_name(&s.name)
                        }))
            })
    };
    let start = std::time::Instant::now();
    let built: Vec<Result<RebuiltSpace, Failure>> = spaces
        .iter()
        .map(|space| {
            if !wanted(space) {
                return Err(Failure {
                    errno: luo_store::Errno::ENOENT,
                    why: "no preserved file uses it".into(),
                });
            }
            let memfd = |h: &Held| {
                let sid = session_id(image, &h.session)?;
                fds.get(&FileImage::carried_key(sid, h.token))
                    .map(AsFd::as_fd)
            };
            rebuild_space(space, &memfd)
        })
        .collect();
    out.map_time = start.elapsed();
    let start = std::time::Instant::now();
    for s in image.sessions.iter().filter(|s| !s.incoming) {
        let name = session_name(&s.name);
        for f in &s.files {
            let key = (s.id, f.token);
            let fd = if f.handler == DEVICE_COMPATIBLE {
                device(&spaces, &built, &f.data)
            } else if f.handler == IOMMUFD_COMPATIBLE {
                iommufd(&spaces, &built, &name, f.token)
            } else {
                continue;
            };
            match fd {
                Ok(fd) => {
                    out.devices += usize::from(f.handler == DEVICE_COMPATIBLE);
                    fds.insert(FileImage::carried_key(s.id, f.token), fd);
                }
                Err(failure) => out.lost.push((key, failure)),
            }
        }
    }
    out.bind_time = start.elapsed();
    out.spaces = spaces
        .into_iter()
        .zip(&built)
        .filter_map(|(space, built)| Some(renumbered(space, built.as_ref().ok()?)))
        .collect();
    out
}

fn device(
    spaces: &[Space],
    built: &[Result<RebuiltSpace, Failure>],
    data: &[u8],
) -> Result<OwnedFd, Failure> {
    let object = Object::parse(data).map_err(|errno| Failure {
        errno,
        why: "its record is unreadable".into(),
    })?;
    let i = spaces
        .iter()
        .position(|s| s.devices.contains_key(object.key()))
        .ok_or_else(|| Failure {
            errno: luo_store::Errno::ENODEV,
            why: format!("{} has no recorded iommufd", object.key()),
        })?;
    let space = built[i].as_ref().map_err(Clone::clone)?;
    rebuild_device(&object, spaces[i].devices[object.key()], space)
}

fn iommufd(
    spaces: &[Space],
    built: &[Result<RebuiltSpace, Failure>],
    session: &str,
    token: u64,
) -> Result<OwnedFd, Failure> {
    let i = spaces
        .iter()
        .position(|s| {
            s.held
                .as_ref()
                .is_some_and(|h| h.session == session && h.token == token)
        })
        .ok_or_else(|| Failure {
            errno: luo_store::Errno::ENODEV,
            why: "no device used this iommufd".into(),
        })?;
    let space = built[i].as_ref().map_err(Clone::clone)?;
    space.iommufd_fd().map_err(|errno| Failure {
        errno,
        why: "dup the new iommufd".into(),
    })
}

/// `space` with the ids of the IOASes made for it.
fn renumbered(mut space: Space, built: &RebuiltSpace) -> Space {
    space.anchors.clear();
    for m in &mut space.mappings {
        m.ioas = built.ioas.get(&m.ioas).copied().unwrap_or(m.ioas);
    }
    for pt in space.devices.values_mut().flatten() {
        *pt = built.ioas.get(pt).copied().unwrap_or(*pt);
    }
    space
}
