//! Preparing a real kexec: the workload and every outgoing session frozen,
//! each preserved memfd stashed in kmod-shim and the state published; all
//! of it undone if anything fails or the kexec is called off.

use std::os::fd::AsFd;
use std::path::Path;

use luo_kexec_helper::handover::StashedFile;
use luo_store::Direction;

use luo_handlers::vfio::{DEVICE_COMPATIBLE, IOMMUFD_COMPATIBLE};

use super::control::refused_freeze;
use super::Daemon;
use crate::control::Response;
use crate::persist::Header;
use crate::{log, sys};

/// A live update in progress, and what an adopted kexec left waiting.
pub(super) struct Update {
    /// Shim tokens stashed for a kexec being prepared.
    pub(super) stashed: Vec<u64>,
    /// Files of incoming sessions left in their kmod-shim stash after a
    /// kexec until there are huge pages for them.
    pub(super) waiting: Vec<StashedFile>,
    /// The cgroup of the current epoch's `luo run` trees.
    pub(super) workload: Option<luo_kexec_helper::Workload>,
}

impl Update {
    /// Writes its part of the journal header.
    pub(super) fn save_into(&self, header: &mut Header) {
        header.waiting = self.waiting.clone();
    }
}

impl Daemon {
    /// Freezes the old workload and every outgoing session, stashes each
    /// preserved memfd through kmod-shim and publishes the state for the next
    /// kernel. On any failure everything is undone and nothing changed.
    pub(super) fn kexec_prepare(&mut self, token: u64) -> Response {
        let shim = match luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) {
            Ok(s) => s,
            Err(e) => {
                return Response::error(format!(
                    "kexec needs kmod-shim ({}: {e}; load luo_shim.ko)",
                    luo_kexec_helper::shim::DEVICE
                ))
            }
        };
        let start = std::time::Instant::now();
        // Processes blocked in a request to us are served so they can freeze.
        let workload = self.update.workload.take();
        let frozen = workload
            .as_ref()
            .map_or(Ok(()), |w| w.freeze(&mut || self.drain_fuse()));
        self.update.workload = workload;
        if let Err(e) = frozen {
            self.thaw_workload();
            return Response::error(format!(
                "kexec aborted, nothing changed: {}",
                log::error_chain(&e)
            ));
        }
        self.drain_fuse();
        self.prune_dma();
        if let Err(f) = self.store.freeze() {
            self.thaw_workload();
            let why = refused_freeze(&f);
            return Response::error(format!("kexec aborted, nothing changed: {why}"));
        }
        // Progress goes out as the client takes it (never waiting on it).
        let mut control = self.ev.control.take();
        let mut progress = |text: String| {
            let line = Response {
                ok: true,
                progress: Some(text),
                ..Response::default()
            };
            if let Some(c) = &mut control {
                c.progress(token, &line);
            }
        };
        let stashed = self.stash_and_publish(&shim, &mut progress);
        self.ev.control = control;
        match stashed {
            Ok((files, bytes)) => {
                let message = format!(
                    "stashed {files} files ({} MiB) and the state of {} sessions in {:.1} ms; ready to reboot",
                    bytes >> 20,
                    self.store.sessions().count(),
                    start.elapsed().as_secs_f64() * 1e3
                );
                log::info(format_args!("{message}"));
                Response {
                    ok: true,
                    message: Some(message),
                    ..Response::default()
                }
            }
            Err(e) => {
                self.undo_stash(&shim);
                self.store.unfreeze();
                self.thaw_workload();
                Response::error(format!("kexec aborted, nothing changed: {e}"))
            }
        }
    }

    fn thaw_workload(&self) {
        if let Some(w) = &self.update.workload {
            w.thaw();
        }
    }

    /// Stashes every outgoing file and publishes the blob; returns the number
    /// of files and bytes.
    fn stash_and_publish(
        &mut self,
        shim: &luo_kexec_helper::shim::Shim,
        progress: &mut dyn FnMut(String),
    ) -> std::result::Result<(usize, u64), String> {
        let total: usize = self
            .store
            .sessions()
            .filter(|s| s.direction == Direction::Outgoing)
            .map(|s| s.files.len())
            .sum();
        let mut files = Vec::new();
        let mut bytes = 0u64;
        for s in self
            .store
            .sessions()
            .filter(|s| s.direction == Direction::Outgoing)
        {
            for f in &s.files {
                let Some(fd) = &f.file else { continue };
                // VFIO files are made again from their record.
                let handler = self.store.handler_compatible(f.handler);
                if [DEVICE_COMPATIBLE, IOMMUFD_COMPATIBLE].contains(&handler) {
                    continue;
                }
                let shim_token = self.update.stashed.len() as u64 + 1;
                let st = shim.stash(fd.as_fd(), shim_token).map_err(|e| {
                    format!(
                        "session {} token {:#x} cannot be stashed: {e}",
                        s.name, f.token
                    )
                })?;
                self.update.stashed.push(shim_token);
                luo_kexec_helper::failpoint::pass("stashed");
                let (pos, seals) = luo_handlers::mem::position_and_seals(fd);
                bytes += st.size;
                files.push(luo_kexec_helper::handover::StashedFile {
                    session: s.id.0,
                    token: f.token,
                    shim_token,
                    kind: st.kind,
                    size: st.size,
                    pos,
                    seals,
                });
                if files.len() % 64 == 0 || files.len() == total {
                    progress(format!(
                        "stashed {} of {total} files ({} MiB)",
                        files.len(),
                        bytes >> 20
                    ));
                }
            }
        }
        self.name_dma_files()?;
        let image = luo_kexec_helper::handover::KexecImage {
            version: luo_kexec_helper::handover::IMAGE_VERSION,
            store: self.store.to_image().0,
            files,
        };
        let n = image.files.len();
        let blob = serde_json::to_vec(&image).map_err(|e| e.to_string())?;
        shim.publish(&blob)
            .map_err(|e| format!("publishing the state failed: {e}"))?;
        Ok((n, bytes))
    }

    fn undo_stash(&mut self, shim: &luo_kexec_helper::shim::Shim) {
        let _ = shim.unpublish();
        for t in std::mem::take(&mut self.update.stashed) {
            let _ = shim.unstash(t);
        }
    }

    /// The kexec did not happen: everything back as it was.
    pub(super) fn kexec_abort(&mut self) -> Response {
        if let Ok(shim) =
            luo_kexec_helper::shim::Shim::open(std::path::Path::new(luo_kexec_helper::shim::DEVICE))
        {
            self.undo_stash(&shim);
        }
        self.store.unfreeze();
        self.thaw_workload();
        log::info(format_args!("kexec called off; sessions unfrozen"));
        Response {
            ok: true,
            message: Some("kexec called off; every session is as it was".into()),
            ..Response::default()
        }
    }

    /// A daemon killed while preparing a kexec may have left stashes (and a
    /// publication) in kmod-shim that nobody will use: withdrawn, so that
    /// the next kexec starts clean and the module can be unloaded.
    pub(super) fn withdraw_stale_stashes(&mut self) {
        let Ok(shim) = luo_kexec_helper::shim::Shim::open(std::path::Path::new(
            luo_kexec_helper::shim::DEVICE,
        )) else {
            return;
        };
        let Ok(info) = shim.info() else { return };
        if info.state == luo_kexec_helper::shim::STATE_RESTORED || info.files == 0 {
            return;
        }
        let _ = shim.unpublish();
        let tokens: Vec<u64> = shim
            .files()
            .unwrap_or_default()
            .iter()
            .map(|f| f.token)
            .collect();
        for t in &tokens {
            let _ = shim.unstash(*t);
        }
        log::info(format_args!(
            "withdrew {} stashes a kexec that did not happen left in kmod-shim",
            tokens.len()
        ));
    }
}

/// Where the workload of `luo run` trees is tracked: a cgroup v2 directory
/// named after the state dir, or none (with a warning) if cgroup v2 is not
/// available.
pub(super) fn workload_tracker(state_dir: &Path, epoch: u64) -> Option<luo_kexec_helper::Workload> {
    let root = luo_kexec_helper::cgroup2_mount().or_else(|| {
        let own = state_dir.join("cgroup");
        std::fs::create_dir_all(&own).ok()?;
        sys::mount("cgroup2", &own, Some("cgroup2"), 0, None).ok()?;
        Some(own)
    });
    let Some(root) = root else {
        log::warn(format_args!(
            "no cgroup v2: updates will not end the processes of `luo run`"
        ));
        return None;
    };
    let name = state_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    match luo_kexec_helper::Workload::new(&root.join("luo").join(name), epoch) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn(format_args!(
                "{}; updates will not end the processes of `luo run`",
                log::error_chain(&e)
            ));
            None
        }
    }
}
