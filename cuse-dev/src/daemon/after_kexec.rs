//! After a real kexec: the incoming sessions rebuilt from what kmod-shim
//! brought over, and hugetlb files that wait in their stash for huge pages
//! rebuilt on their first retrieve.

use std::path::Path;

use luo_store::{Errno, FileImage, Result, SessionId};

use super::{Daemon, DaemonError};
use crate::log;

/// After a kexec: kmod-shim and the stashes rebuilt into memfds.
type Rebuilt = Option<(luo_kexec_helper::shim::Shim, Vec<u64>)>;

impl Daemon {
    /// After a kexec: rebuilds the incoming sessions from what kmod-shim
    /// brought over, if it brought anything; returns the shim and the
    /// stashes rebuilt, to let go once saved.
    pub(super) fn adopt_kexec(&mut self) -> std::result::Result<Rebuilt, DaemonError> {
        let Ok(shim) = luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) else {
            return Ok(None);
        };
        match shim.info() {
            Ok(i) if i.state == luo_kexec_helper::shim::STATE_RESTORED && i.blob_len > 0 => {}
            _ => return Ok(None),
        }
        let refused = |what: String| DaemonError::Setup {
            what,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        let blob = shim.fetch().map_err(|e| {
            refused(format!(
                "fetch the previous kernel's state from kmod-shim ({e})"
            ))
        })?;
        let image: luo_kexec_helper::handover::KexecImage = serde_json::from_slice(&blob)
            .map_err(|e| refused(format!("read the previous kernel's state ({e})")))?;
        if image.version != luo_kexec_helper::handover::IMAGE_VERSION {
            return Err(refused(format!(
                "read the previous kernel's state: version {} (this daemon reads {})",
                image.version,
                luo_kexec_helper::handover::IMAGE_VERSION
            )));
        }
        let start = std::time::Instant::now();
        let total: u64 = image.files.iter().map(|f| f.size).sum();
        let mut progress = |n: usize, bytes: u64| {
            if n % 100 == 0 || bytes == total {
                log::info(format_args!(
                    "restored {n} files ({} of {} MiB)",
                    bytes >> 20,
                    total >> 20
                ));
            }
        };
        let mut restored =
            luo_kexec_helper::handover::restore_all(&shim, &image.files, &mut progress);
        for ((session, token), why) in &restored.lost {
            log::warn(format_args!(
                "session {session} token {token:#x} did not come back ({why}); retrieving it fails with EIO"
            ));
        }
        for (f, why) in &restored.waiting {
            log::warn(format_args!(
                "session {} token {:#x} stays in its kmod-shim stash: {why}; retrieving it fails \
                 with ENOMEM until then, and rebuilds it once there are",
                f.session, f.token
            ));
        }
        let mut lost: Vec<((u64, u64), i32)> =
            restored.lost.iter().map(|(k, _)| (*k, libc::EIO)).collect();
        let devices = self.rebuild_devices(&image.store, &mut restored.fds);
        lost.extend(devices);
        self.update.waiting = restored.waiting.into_iter().map(|(f, _)| f).collect();
        let waiting: Vec<(u64, u64)> = self
            .update
            .waiting
            .iter()
            .map(|f| (f.session, f.token))
            .collect();
        let (in_place, copied) = (restored.in_place, restored.copied);
        let keys: std::collections::HashSet<String> = restored.fds.keys().cloned().collect();
        let carried = |(session, token)| keys.contains(&FileImage::carried_key(session, token));
        let incoming = luo_kexec_helper::handover::incoming_image(image.store, &lost, &carried);
        self.store
            .load_image(&incoming, &mut |key| restored.fds.remove(key))
            .map_err(|e| refused(format!("rebuild the incoming sessions: {e}")))?;
        self.store.take_changes();
        log::info(format_args!(
            "after kexec: epoch {}, {} incoming sessions, {} files ({} MiB; {} filled in place, {} copied) in {:.1} ms",
            self.store.epoch(),
            self.store.sessions().count(),
            image.files.len(),
            total >> 20,
            in_place,
            copied,
            start.elapsed().as_secs_f64() * 1e3
        ));
        let rebuilt = image
            .files
            .iter()
            .filter(|f| {
                let key = (f.session, f.token);
                !lost.iter().any(|(k, _)| *k == key) && !waiting.contains(&key)
            })
            .map(|f| f.shim_token)
            .collect();
        Ok(Some((shim, rebuilt)))
    }

    /// Brings back the VFIO devices and iommufds of `image` (see
    /// `luo_kexec_helper::devices`) and records their new spaces; returns
    /// the files that could not be, each with its errno, after a log line.
    fn rebuild_devices(
        &mut self,
        image: &luo_store::StoreImage,
        fds: &mut std::collections::HashMap<String, std::os::fd::OwnedFd>,
    ) -> Vec<((u64, u64), i32)> {
        let start = std::time::Instant::now();
        let devices = luo_kexec_helper::devices::rebuild_all(image, fds);
        for ((session, token), failure) in &devices.lost {
            log::warn(format_args!(
                "session {session} token {token:#x}: the VFIO file did not come back ({}); \
                 retrieving it fails with {}",
                failure.why, failure.errno
            ));
        }
        if devices.devices > 0 || !devices.spaces.is_empty() {
            let bytes: u64 = devices
                .spaces
                .iter()
                .flat_map(|s| &s.mappings)
                .map(|m| m.length)
                .sum();
            log::info(format_args!(
                "after kexec: {} VFIO devices bound again, {} iommufds with {} MiB mapped made anew \
                 in {:.1} ms (IOASes and mappings {:.1} ms; devices bound and attached, which \
                 pins and maps the RAM, {:.1} ms)",
                devices.devices,
                devices.spaces.len(),
                bytes >> 20,
                start.elapsed().as_secs_f64() * 1e3,
                devices.map_time.as_secs_f64() * 1e3,
                devices.bind_time.as_secs_f64() * 1e3
            ));
        }
        let mut table = self.dma.table.lock();
        for space in devices.spaces {
            table.next += 1;
            let id = table.next;
            table
                .spaces
                .push(luo_handlers::vfio::dma::Space { id, ..space });
        }
        self.saved.dirty = true;
        devices
            .lost
            .into_iter()
            .map(|(k, f)| (k, f.errno.0))
            .collect()
    }

    /// The stash of an incoming file that waits for huge pages, if it does.
    pub(super) fn waiting_for(
        &self,
        sid: SessionId,
        token: u64,
    ) -> Option<&luo_kexec_helper::handover::StashedFile> {
        self.update
            .waiting
            .iter()
            .find(|f| f.session == sid.0 && f.token == token)
    }

    /// Rebuilds a file that waits in its stash for huge pages, before its
    /// first retrieve: ENOMEM while the pool is still short (nothing
    /// changes; the next retrieve tries again). Once rebuilt the new memfd
    /// is saved with the keeper before kmod-shim lets the stash go.
    pub(super) fn rebuild_waiting(&mut self, sid: SessionId, token: u64) -> Result<()> {
        let Some(f) = self.waiting_for(sid, token).cloned() else {
            return Ok(());
        };
        let shim = luo_kexec_helper::shim::Shim::open(Path::new(luo_kexec_helper::shim::DEVICE))
            .map_err(|e| {
                log::warn(format_args!(
                    "session {} token {token:#x} waits in kmod-shim, which cannot be opened: {e}",
                    sid.0
                ));
                Errno::EIO
            })?;
        let fd = match luo_kexec_helper::handover::restore_memfd_with(&shim, &f, true) {
            Ok((fd, _)) => fd,
            Err(luo_kexec_helper::handover::RestoreError::NoHugePages(why)) => {
                log::warn(format_args!(
                    "session {} token {token:#x} stays in its kmod-shim stash: {why}; ENOMEM",
                    sid.0
                ));
                return Err(Errno::ENOMEM);
            }
            Err(luo_kexec_helper::handover::RestoreError::Failed(why)) => {
                log::warn(format_args!(
                    "session {} token {token:#x} could not be rebuilt from its stash ({why}); EIO",
                    sid.0
                ));
                return Err(Errno::EIO);
            }
        };
        self.store.carry(sid, token, fd)?;
        self.update.waiting.retain(|w| w.shim_token != f.shim_token);
        self.saved.dirty = true;
        self.commit();
        if let Err(e) = shim.release(f.shim_token) {
            log::warn(format_args!("kmod-shim kept stash {}: {e}", f.shim_token));
        }
        log::info(format_args!(
            "session {} token {token:#x} rebuilt from its stash ({} MiB)",
            sid.0,
            f.size >> 20
        ));
        Ok(())
    }

    /// Takes the waiting files that are gone (finished or released
    /// unretrieved, as the kernel drops them) off the list; their stashes go
    /// once that is saved (see [`Daemon::commit`]).
    pub(super) fn take_gone_waiting(&mut self) -> Vec<u64> {
        if self.update.waiting.is_empty() {
            return Vec::new();
        }
        let store = &self.store;
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.update.waiting)
            .into_iter()
            .partition(|f| {
                store
                    .session(SessionId(f.session))
                    .is_none_or(|s| !s.files.iter().any(|x| x.token == f.token))
            });
        self.update.waiting = kept;
        if !gone.is_empty() {
            self.saved.dirty = true;
        }
        gone.into_iter().map(|f| f.shim_token).collect()
    }
}

/// Lets kmod-shim drop these stashes (files no session holds any more).
pub(super) fn release_stashes(tokens: &[u64]) {
    if tokens.is_empty() {
        return;
    }
    if let Ok(shim) = luo_kexec_helper::shim::Shim::open(Path::new(luo_kexec_helper::shim::DEVICE))
    {
        for t in tokens {
            let _ = shim.release(*t);
        }
    }
}
