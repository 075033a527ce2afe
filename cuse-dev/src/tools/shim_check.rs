//! Tools for kmod-shim on its own: `luo shim-check` (a known pattern across
//! a real kexec) and the kexec rows of `luo bench`.

/// `luo shim-check`: exercises the shim across a real kexec with a shmem and
/// a hugetlb memfd written with a known pattern (the rig's `shim` scenario).
pub mod check {
    use std::io::{Seek, SeekFrom};
    use std::os::fd::{AsFd, OwnedFd};
    use std::path::Path;
    use std::time::Instant;

    use luo_store::Errno;
    use serde::{Deserialize, Serialize};

    use luo_handlers::mem::Mapping;
    use luo_kexec_helper::handover::{restore_memfd_with, Filled, StashedFile};
    use luo_kexec_helper::shim::{memfd_of_kind, Shim, HUGETLB, SHMEM, STATE_RESTORED};

    /// What stage 1 leaves in the blob about each file.
    #[derive(Serialize, Deserialize, Debug)]
    struct Meta {
        token: u64,
        kind: u32,
        size: u64,
        pos: u64,
        seals: i32,
        /// [`page_sum`] of every page, recorded before the stash.
        pages: Vec<u64>,
    }

    const PAGE: usize = 4096;
    /// The token of a hugetlb file that comes back mapped through the
    /// module (`LUO_SHIM_MAP`) instead of copied.
    const MAPPED: u64 = 3;

    fn word(token: u64, i: u64) -> u64 {
        (i ^ token.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn expect(what: &str, got: Result<(), Errno>, want: Errno) -> Result<(), String> {
        match got {
            Err(e) if e == want => Ok(()),
            other => Err(format!("{what}: expected {want}, got {other:?}")),
        }
    }

    fn stage1(shim: &Shim, shmem_mib: u64, hugetlb_mib: u64) -> Result<(), String> {
        // Bad input first: nothing may change.
        expect(
            "stash of fd -1",
            shim.stash_number(-1, 1).map(|_| ()),
            Errno::EBADF,
        )?;
        expect(
            "stash of a closed fd",
            shim.stash_number(999, 1).map(|_| ()),
            Errno::EBADF,
        )?;
        let (r, _w) = crate::sys::pipe().map_err(|e| format!("pipe: {e}"))?;
        expect(
            "stash of a pipe",
            shim.stash(r.as_fd(), 1).map(|_| ()),
            Errno::EINVAL,
        )?;
        expect(
            "read before a kexec",
            shim.read(1, 0, &mut [0; 8]),
            Errno::ENOENT,
        )?;
        expect(
            "unpublish with nothing published",
            shim.unpublish(),
            Errno::EINVAL,
        )?;
        expect(
            "unstash of an unknown token",
            shim.unstash(99),
            Errno::ENOENT,
        )?;

        let mut metas = Vec::new();
        let mut keep = Vec::new();
        let mapped_mib = if hugetlb_mib > 0 { 4 } else { 0 };
        for (token, kind, mib) in [
            (1u64, SHMEM, shmem_mib),
            (2, HUGETLB, hugetlb_mib),
            (MAPPED, HUGETLB, mapped_mib),
        ] {
            if mib == 0 {
                continue;
            }
            let size = mib << 20;
            let fd = memfd_of_kind("luo-shim-check", kind, size)?;
            let mut map = Mapping::new(fd.as_fd(), size as usize).map_err(|e| e.to_string())?;
            let bytes = map.bytes_mut();
            for (i, w) in bytes.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&word(token, i as u64).to_ne_bytes());
            }
            let pages = page_sums(bytes);
            drop(map);
            let pos = if kind == SHMEM { 12345 } else { 0 };
            let seals = if kind == SHMEM {
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
            } else {
                0
            };
            let mut file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
            file.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
            // The stash must carry the seals; a refusal shows in stage 2.
            let _ = luo_handlers::mem::set_position_and_seals(&fd, pos, seals);
            let t = Instant::now();
            let s = shim
                .stash(fd.as_fd(), token)
                .map_err(|e| format!("stash {token}: {e}"))?;
            println!(
                "SHIM stashed token {token}: {mib} MiB in {} folios in {:.1} ms",
                s.folios,
                t.elapsed().as_secs_f64() * 1e3
            );
            if s.size != size || s.kind != kind {
                return Err(format!("stash {token} reported {s:?}"));
            }
            expect(
                "stash of a used token",
                shim.stash(fd.as_fd(), token).map(|_| ()),
                Errno::EEXIST,
            )?;
            expect(
                "stash of a stashed file",
                shim.stash(fd.as_fd(), 77).map(|_| ()),
                Errno::EBUSY,
            )?;
            metas.push(Meta {
                token,
                kind,
                size,
                pos,
                seals,
                pages,
            });
            keep.push(fd);
        }
        let blob = serde_json::to_vec(&metas).map_err(|e| e.to_string())?;
        shim.publish(&blob).map_err(|e| format!("publish: {e}"))?;
        expect("publish twice", shim.publish(&blob), Errno::EBUSY)?;
        expect(
            "stash after publish",
            shim.stash(keep[0].as_fd(), 9).map(|_| ()),
            Errno::EBUSY,
        )?;
        // A kexec that does not happen: withdraw, then publish again.
        shim.unpublish().map_err(|e| format!("unpublish: {e}"))?;
        shim.publish(&blob)
            .map_err(|e| format!("publish again: {e}"))?;
        let info = shim.info().map_err(|e| e.to_string())?;
        println!("SHIM published {} files, {} bytes", info.files, info.bytes);
        Ok(())
    }

    fn stage2(shim: &Shim) -> Result<(), String> {
        let info = shim.info().map_err(|e| e.to_string())?;
        if info.state != STATE_RESTORED {
            return Err(format!("the shim did not come back with files: {info:?}"));
        }
        let metas: Vec<Meta> = serde_json::from_slice(&shim.fetch().map_err(|e| e.to_string())?)
            .map_err(|e| format!("the blob: {e}"))?;
        let files = shim.files().map_err(|e| e.to_string())?;
        if files.len() != metas.len() {
            return Err(format!(
                "{} files came back, {} were stashed",
                files.len(),
                metas.len()
            ));
        }
        for m in &metas {
            let f = files
                .iter()
                .find(|f| f.token == m.token)
                .ok_or(format!("token {} did not come back", m.token))?;
            if f.size != m.size || f.kind != m.kind {
                return Err(format!(
                    "token {}: came back as {f:?}, stashed {m:?}",
                    m.token
                ));
            }
            expect(
                "read past the end",
                shim.read(m.token, m.size, &mut [0; 1]),
                Errno::EINVAL,
            )?;
            if m.token == MAPPED {
                let fd = shim
                    .map(m.token)
                    .map_err(|e| format!("map {}: {e}", m.token))?;
                let map = Mapping::new(fd.as_fd(), m.size as usize).map_err(|e| e.to_string())?;
                verify_contents(map.bytes(), m)?;
                expect("map twice", shim.map(m.token).map(|_| ()), Errno::ENOENT)?;
                println!(
                    "SHIM token {} (hugetlb, mapped through the module): {} MiB identical ({} pages checked)",
                    m.token,
                    m.size >> 20,
                    m.pages.len()
                );
                continue;
            }
            let stashed = StashedFile {
                session: 0,
                token: m.token,
                shim_token: m.token,
                kind: m.kind,
                size: m.size,
                pos: m.pos,
                seals: m.seals,
            };
            let t = Instant::now();
            let (fd, filled) = restore_memfd_with(shim, &stashed, true)?;
            shim.release(m.token)
                .map_err(|e| format!("release {}: {e}", m.token))?;
            let took = t.elapsed();
            if m.kind == SHMEM && !matches!(filled, Filled::InPlace { moved, .. } if moved > 0) {
                return Err(format!("token {}: shmem came back {filled:?}", m.token));
            }
            verify(&fd, m)?;
            println!(
                "SHIM token {} ({}): {} MiB identical ({} pages checked), position and seals back, restored in {:.1} ms ({filled:?})",
                m.token,
                if m.kind == HUGETLB { "hugetlb" } else { "shmem" },
                m.size >> 20,
                m.pages.len(),
                took.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// A 64-bit sum of one page, a multiply per word: position-independent,
    /// so a page that comes back elsewhere or half-overwritten differs.
    fn page_sum(page: &[u8]) -> u64 {
        page.chunks_exact(8).fold(0xCBF2_9CE4_8422_2325, |h, w| {
            let w = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
            (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(29)
        })
    }

    /// The sum of every page of `bytes`.
    fn page_sums(bytes: &[u8]) -> Vec<u64> {
        bytes.chunks(PAGE).map(page_sum).collect()
    }

    /// Every page's sum, every word's pattern, the position and the seals
    /// of a restored file against what stage 1 recorded.
    fn verify(fd: &OwnedFd, m: &Meta) -> Result<(), String> {
        let map = Mapping::new(fd.as_fd(), m.size as usize).map_err(|e| e.to_string())?;
        verify_contents(map.bytes(), m)?;
        drop(map);
        verify_position_and_seals(fd, m)
    }

    /// Every page's sum and every word's pattern.
    fn verify_contents(bytes: &[u8], m: &Meta) -> Result<(), String> {
        let sums = page_sums(bytes);
        if sums.len() != m.pages.len() {
            return Err(format!(
                "token {}: {} pages, {} recorded",
                m.token,
                sums.len(),
                m.pages.len()
            ));
        }
        let bad: Vec<usize> = (0..sums.len()).filter(|&i| sums[i] != m.pages[i]).collect();
        if let Some(first) = bad.first() {
            return Err(format!(
                "token {}: {} of {} pages differ from their recorded sums (first: page {first})",
                m.token,
                bad.len(),
                sums.len()
            ));
        }
        let differs = bytes
            .chunks_exact(8)
            .enumerate()
            .find(|(i, w)| **w != word(m.token, *i as u64).to_ne_bytes());
        if let Some((i, _)) = differs {
            return Err(format!("token {}: word {i} differs", m.token));
        }
        Ok(())
    }

    fn verify_position_and_seals(fd: &OwnedFd, m: &Meta) -> Result<(), String> {
        let (pos, seals) = luo_handlers::mem::position_and_seals(fd);
        if pos != m.pos || seals != m.seals {
            return Err(format!(
                "token {}: position {pos}, seals {seals:#x}",
                m.token
            ));
        }
        Ok(())
    }

    /// Runs stage 1 (stash and publish) or 2 (restore and verify).
    ///
    /// # Errors
    /// What did not hold, as a sentence.
    pub fn run(device: &Path, stage: u32, shmem_mib: u64, hugetlb_mib: u64) -> Result<(), String> {
        let shim = Shim::open(device).map_err(|e| format!("open {}: {e}", device.display()))?;
        match stage {
            1 => stage1(&shim, shmem_mib, hugetlb_mib),
            _ => stage2(&shim),
        }
    }
}

/// The kexec case of `luo bench`: time to stash memfds (stage 1, before the
/// kexec) and to restore each into a fresh memfd (stage 2, after), with row
/// names matching the device rows so that the side-by-side table lines them
/// up with the in-kernel module's preserve and retrieve. Each shmem size is
/// stashed twice: one comes back in place (`LUO_SHIM_ADOPT`), its twin by
/// copying (the path a module without ADOPT, or hugetlb, takes).
pub mod bench {
    use std::os::fd::AsFd;
    use std::time::Instant;

    use crate::tools::bench::{filled_memfd, size_name, Row, StageReport};
    use luo_handlers::mem::Mapping;
    use luo_kexec_helper::handover::{restore_memfd_with, Filled, StashedFile};

    use luo_kexec_helper::shim::{memfd_of_kind, Shim, HUGETLB, SHMEM};

    /// What the low two bits of a bench token say about its file.
    const IN_PLACE: u64 = 0;
    const COPY: u64 = 1;
    const HUGE: u64 = 2;
    const HUGE_MAP: u64 = 3;

    fn row(op: String, t: Instant) -> Row {
        Row::sample(op, t.elapsed().as_secs_f64() * 1e6)
    }

    /// Stashes, per size, a filled shmem memfd and its twin, then one filled
    /// hugetlb memfd of `hugetlb_mib` (none for 0), and publishes.
    ///
    /// # Errors
    /// What failed, as a sentence.
    pub fn stage1(shim: &Shim, sizes_kib: &[u64], hugetlb_mib: u64) -> Result<StageReport, String> {
        let mut rows = Vec::new();
        for &kib in sizes_kib {
            for variant in [IN_PLACE, COPY] {
                let f = filled_memfd(kib).map_err(|e| e.to_string())?;
                let t = Instant::now();
                shim.stash(f.as_fd(), kib << 2 | variant)
                    .map_err(|e| format!("stash {}: {e}", size_name(kib)))?;
                if variant == IN_PLACE {
                    rows.push(row(format!("PRESERVE_FD {}", size_name(kib)), t));
                }
            }
        }
        // hugetlb: one to copy back, its twin to map back.
        for variant in [HUGE, HUGE_MAP] {
            if hugetlb_mib == 0 {
                break;
            }
            let kib = hugetlb_mib << 10;
            let f = memfd_of_kind("luo-bench", HUGETLB, kib << 10)?;
            let mut map =
                Mapping::new(f.as_fd(), (kib << 10) as usize).map_err(|e| e.to_string())?;
            map.bytes_mut().fill(0x5a);
            drop(map);
            let t = Instant::now();
            shim.stash(f.as_fd(), kib << 2 | variant)
                .map_err(|e| format!("stash {} hugetlb: {e}", size_name(kib)))?;
            if variant == HUGE {
                rows.push(row(format!("PRESERVE_FD {} hugetlb", size_name(kib)), t));
            }
        }
        shim.publish(b"bench")
            .map_err(|e| format!("publish: {e}"))?;
        Ok(StageReport {
            rows,
            session: "kmod-shim".into(),
        })
    }

    /// The alternative for hugetlb: the restored folios mapped through the
    /// module's own file, every page touched (and checked) once.
    fn mapped_and_touched(shim: &Shim, token: u64, size: u64) -> Result<(), String> {
        let fd = shim.map(token).map_err(|e| format!("map {token}: {e}"))?;
        let mut map = Mapping::new(fd.as_fd(), size as usize).map_err(|e| e.to_string())?;
        let bytes = map.bytes_mut();
        if let Some(i) = (0..bytes.len()).step_by(4096).find(|&i| bytes[i] != 0x5a) {
            return Err(format!("mapped token {token}: byte {i} differs"));
        }
        Ok(())
    }

    /// Restores every stash into a fresh memfd: shmem in place and (the
    /// twin) by copying, hugetlb by copying (and its twin mapped instead).
    ///
    /// # Errors
    /// What failed, as a sentence.
    pub fn stage2(shim: &Shim) -> Result<StageReport, String> {
        let mut files = shim.files().map_err(|e| e.to_string())?;
        files.sort_by_key(|f| (f.size, f.token & 3));
        let mut rows = Vec::new();
        for f in files {
            let variant = f.token & 3;
            let stashed = StashedFile {
                session: 0,
                token: f.token,
                shim_token: f.token,
                kind: f.kind,
                size: f.size,
                pos: 0,
                seals: 0,
            };
            let name = size_name(f.size / 1024);
            if variant == HUGE_MAP {
                let t = Instant::now();
                mapped_and_touched(shim, f.token, f.size)?;
                rows.push(row(format!("RETRIEVE_FD {name} hugetlb mapped"), t));
                continue;
            }
            let t = Instant::now();
            let (fd, filled) = restore_memfd_with(shim, &stashed, variant == IN_PLACE)?;
            shim.release(f.token)
                .map_err(|e| format!("release {}: {e}", f.token))?;
            let op = match variant {
                IN_PLACE => format!("RETRIEVE_FD {name}"),
                COPY => format!("RETRIEVE_FD {name} copy"),
                _ => format!("RETRIEVE_FD {name} hugetlb"),
            };
            rows.push(row(op, t));
            let expected = match variant {
                IN_PLACE if f.kind == SHMEM => matches!(filled, Filled::InPlace { .. }),
                _ => filled == Filled::Copied,
            };
            if !expected {
                return Err(format!("{} came back {filled:?}", size_name(f.size / 1024)));
            }
            drop(fd);
        }
        Ok(StageReport {
            rows,
            session: "kmod-shim".into(),
        })
    }
}
