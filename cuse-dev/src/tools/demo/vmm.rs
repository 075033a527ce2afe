//! The demo's VMM, one stage per process under `luo run`: stage 1 fills
//! guest RAM from a vCPU thread, pauses it and preserves RAM and its state;
//! stage 2 retrieves them in the new epoch and checks every page.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use luo_handlers::mem::{memfd, Mapping};

use super::timeline::{self, mark};
use super::{session_name, step, Backing, DemoError, RAM_TOKEN, SESSION, STATE_MAGIC, STATE_TOKEN};
use crate::client::ioctl as lu;
use crate::uapi;

/// An ioctl's error, with what was being done.
fn context(what: &str) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn session_ioctl(dev: BorrowedFd<'_>, cmd: u32, name: &str) -> std::io::Result<OwnedFd> {
    let what = format!("session {name}");
    if cmd == uapi::CREATE_SESSION {
        lu::create_session(dev, name).map_err(context(&what))
    } else {
        lu::retrieve_session(dev, name).map_err(context(&what))
    }
}

fn preserve(session: BorrowedFd<'_>, fd: BorrowedFd<'_>, token: u64) -> std::io::Result<()> {
    lu::preserve_fd(session, fd, token).map_err(context(&format!("preserving token {token}")))
}

fn retrieve(session: BorrowedFd<'_>, token: u64) -> std::io::Result<File> {
    let file =
        lu::retrieve_fd(session, token).map_err(context(&format!("retrieving token {token}")))?;
    Ok(File::from(file))
}

fn fill(page: &mut [u64], index: u64, generation: u64) {
    page[0] = index;
    page[1] = generation;
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.rotate_left(17) ^ 1;
    for w in &mut page[2..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

fn hash(page: &[u64]) -> u64 {
    page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(5)
    })
}

struct Progress {
    what: &'static str,
    start: Instant,
    shown: bool,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress {
            what,
            start: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if self.start.elapsed() > Duration::from_secs(1) && (done % 4096 == 0 || done == total) {
            print!("\r  {}: {:3}%", self.what, done * 100 / total.max(1));
            let _ = std::io::stdout().flush();
            self.shown = true;
        }
    }

    fn done(self) -> Duration {
        if self.shown {
            println!("\r  {}: done      ", self.what);
        }
        self.start.elapsed()
    }
}

/// One stage of the demo VMM (runs under `luo run`).
///
/// # Errors
/// Device, memory or verification failures.
pub fn vmm(
    device: &Path,
    (stage, wait): (u32, bool),
    backing: Backing,
    mib: u64,
    extra: usize,
) -> Result<(), DemoError> {
    if stage != 1 {
        mark("new VMM running");
    }
    let dev = step(
        "opening the device",
        File::options().read(true).write(true).open(device),
    )?;
    match stage {
        1 => vmm_stage1(dev, backing, (mib, extra), wait),
        _ => vmm_stage2(dev, backing, extra),
    }
}

/// Stage 1; with `wait`, the VMM waits for the update (which ends it)
/// instead of leaving its sessions to a child and exiting.
fn vmm_stage1(
    dev: File,
    backing: Backing,
    (mib, extra): (u64, usize),
    wait: bool,
) -> Result<(), DemoError> {
    let len = mib * 1024 * 1024;
    let flags = if backing == Backing::Hugetlb {
        libc::MFD_HUGETLB
    } else {
        0
    };
    let ram = step("allocating guest RAM", memfd("guest-ram", flags, len))?;
    let mut map = step("mapping guest RAM", Mapping::new(ram.as_fd(), len as usize))?;
    let written = run_vcpu(&mut map);
    println!(
        "stage 1: vCPU wrote {written} pages ({} MiB of RAM), paused",
        mib
    );
    let mut progress = Progress::new("checksumming guest RAM");
    let mut sums = Vec::with_capacity(map.pages());
    for i in 0..map.pages() {
        sums.push(hash(map.page(i)));
        progress.update(i + 1, map.pages());
    }
    progress.done();
    // The checksums only serve the check: written before the pause.
    let state = step("writing the checksums", vmm_state(&sums))?;
    let d = dev.as_fd();
    let session = step(
        "creating the session",
        session_ioctl(d, uapi::CREATE_SESSION, session_name(backing)),
    )?;
    // The blackout starts here: a real VMM stops its vCPUs right before it
    // saves its device state and hands guest RAM to LUO.
    let paused_ns = crate::sys::monotonic_ns();
    timeline::mark_at("vCPU paused", paused_ns);
    step(
        "writing VMM state",
        stamp_state(&state, len, paused_ns, sums.len()),
    )?;
    mark("VMM state written");
    let s = session.as_fd();
    step("preserving guest RAM", preserve(s, ram.as_fd(), RAM_TOKEN))?;
    mark("guest RAM preserved");
    step(
        "preserving VMM state",
        preserve(s, state.as_fd(), STATE_TOKEN),
    )?;
    mark("VMM state preserved");
    let mut held = vec![session];
    for i in 0..extra {
        let name = format!("{SESSION}-{i}");
        let extra_session = step(
            "creating an extra session",
            session_ioctl(d, uapi::CREATE_SESSION, &name),
        )?;
        let small = step("creating a small memfd", memfd("extra", 0, 8))?;
        step(
            "writing a small memfd",
            std::os::unix::fs::FileExt::write_all_at(&small, &(i as u64).to_le_bytes(), 0),
        )?;
        step(
            "preserving a small memfd",
            preserve(extra_session.as_fd(), small.as_fd(), 1),
        )?;
        held.push(extra_session);
    }
    println!(
        "stage 1: preserved guest RAM and VMM state in session {:?} (+{extra} sessions); holding them for the update",
        session_name(backing)
    );
    drop(dev);
    if !wait {
        // Held by a detached child, as a VMM waiting for the update would.
        step("holding the sessions", crate::sys::hold_in_child(held))?;
        mark("sessions held");
        return Ok(());
    }
    mark("sessions held");
    // A VMM waits for the update with its sessions and guest RAM mapped;
    // the update ends it.
    let _keep = (held, map);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Fills every page once, then keeps dirtying pages for a second.
fn run_vcpu(map: &mut Mapping) -> u64 {
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let pages = map.pages();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let pages = pages as u64;
            let mut n = 0u64;
            while n < pages || !stop.load(Ordering::Relaxed) {
                let i = (n % pages) as usize;
                fill(map.page_mut(i), i as u64, n / pages);
                n += 1;
                written.store(n, Ordering::Relaxed);
            }
        });
        let mut progress = Progress::new("vCPU filling guest RAM");
        while (written.load(Ordering::Relaxed) as usize) < pages {
            progress.update(
                written.load(Ordering::Relaxed) as usize / 4096 * 4096,
                pages,
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        progress.done();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
    });
    written.into_inner()
}

/// The VMM state memfd: a 32-byte header, zero until [`stamp_state`], then
/// the checksum of every page.
fn vmm_state(sums: &[u64]) -> std::io::Result<File> {
    let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
    let f = memfd("vmm-state", 0, 32 + bytes.len() as u64)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 32)?;
    Ok(f)
}

/// Writes the state's header: what a VMM saves at the pause.
fn stamp_state(f: &File, len: u64, paused_ns: u64, pages: usize) -> std::io::Result<()> {
    let header: Vec<u8> = [STATE_MAGIC, len, paused_ns, pages as u64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::os::unix::fs::FileExt::write_all_at(f, &header, 0)
}

fn vmm_stage2(dev: File, backing: Backing, extra: usize) -> Result<(), DemoError> {
    let d = dev.as_fd();
    let session = step(
        "retrieving the session",
        session_ioctl(d, uapi::RETRIEVE_SESSION, session_name(backing)),
    )?;
    mark("session retrieved");
    let s = session.as_fd();
    let ram = step("retrieving guest RAM", retrieve(s, RAM_TOKEN))?;
    let first_ns = crate::sys::monotonic_ns();
    timeline::mark_at("guest RAM retrieved", first_ns);
    let state = step("retrieving VMM state", retrieve(s, STATE_TOKEN))?;
    let (len, paused_ns, sums) = read_state(&state)?;
    let t = Instant::now();
    for i in 0..extra {
        let name = format!("{SESSION}-{i}");
        let es = step(
            "retrieving an extra session",
            session_ioctl(d, uapi::RETRIEVE_SESSION, &name),
        )?;
        let small = step("retrieving a small memfd", retrieve(es.as_fd(), 1))?;
        let mut v = [0u8; 8];
        step(
            "reading a small memfd",
            std::os::unix::fs::FileExt::read_exact_at(&small, &mut v, 0),
        )?;
        if u64::from_le_bytes(v) != i as u64 {
            return Err(DemoError::Mismatch(format!("session {name} holds {v:?}")));
        }
        step("finishing an extra session", finish(es.as_fd()))?;
    }
    let extra_time = t.elapsed();
    let map = step("mapping guest RAM", Mapping::new(ram.as_fd(), len as usize))?;
    let mut progress = Progress::new("verifying guest RAM");
    for (i, want) in sums.iter().enumerate() {
        let page = map.page(i);
        if page[0] != i as u64 || hash(page) != *want {
            return Err(DemoError::Mismatch(format!(
                "page {i} differs from what stage 1 recorded"
            )));
        }
        progress.update(i + 1, sums.len());
    }
    let verify_time = progress.done();
    step("finishing the session", finish(s))?;
    let blackout = Duration::from_nanos(first_ns.saturating_sub(paused_ns));
    println!(
        "stage 2: retrieved guest RAM; all {} pages ({} MiB) match their stage-1 checksums",
        sums.len(),
        len >> 20
    );
    println!(
        "  blackout (preserve started -> guest RAM retrieved in the new epoch): {:.1} ms",
        blackout.as_secs_f64() * 1e3
    );
    if extra > 0 {
        println!(
            "  {extra} extra sessions retrieved, checked and finished in {:.1} ms",
            extra_time.as_secs_f64() * 1e3
        );
    }
    println!("  verification: {:.1} ms", verify_time.as_secs_f64() * 1e3);
    Ok(())
}

fn finish(session: BorrowedFd<'_>) -> std::io::Result<()> {
    lu::finish(session).map_err(context("finish"))
}

fn read_state(f: &File) -> Result<(u64, u64, Vec<u64>), DemoError> {
    let mut bytes = vec![0u8; step("sizing VMM state", f.metadata())?.len() as usize];
    step(
        "reading VMM state",
        std::os::unix::fs::FileExt::read_exact_at(f, &mut bytes, 0),
    )?;
    let word = |i: usize| {
        bytes
            .get(i * 8..i * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if word(0) != Some(STATE_MAGIC) {
        return Err(DemoError::Mismatch(
            "the VMM state memfd came back corrupted".into(),
        ));
    }
    let (len, paused, n) = (
        word(1).unwrap_or(0),
        word(2).unwrap_or(0),
        word(3).unwrap_or(0) as usize,
    );
    let sums: Option<Vec<u64>> = (0..n).map(|i| word(4 + i)).collect();
    let sums =
        sums.ok_or_else(|| DemoError::Mismatch("the VMM state memfd is truncated".into()))?;
    Ok((len, paused, sums))
}
