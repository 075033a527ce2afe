//! `luo vfio-check`: QEMU's `edu` PCI device (1234:11e8, a DMA engine with
//! a 4 KiB buffer) driven through its VFIO cdev and an iommufd, DMA into
//! and out of a memfd checked byte for byte (the rig's `vfio` scenario).
//! Stage 0 checks the device and the IOMMU alone; stage 1 is a VMM that sets
//! the device up and preserves guest RAM, the device and the iommufd in a
//! session; stage 2, after a simulated update, retrieves them and DMAs to
//! the same IOVAs with no setup at all.
//!
//! edu quirks this works with: MMIO is 4 or 8 bytes wide; a DMA completes on
//! a 100 ms virtual timer and clears bit 0 of the command register; its DMA
//! mask is 28 bits, so IOVAs stay below 256 MiB; a transfer ending exactly at
//! the end of its buffer aborts QEMU 7.2, so transfers are 4095 bytes.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use luo_handlers::vfio::ioctl::Region;
use std::os::fd::OwnedFd;

use crate::client::ioctl as lu;
use luo_handlers::vfio::uapi::{PCI_BAR0_REGION, PCI_CONFIG_REGION};
use luo_handlers::vfio::{Iommufd, VfioDevice};

/// edu's identification register: `0x010000ed`, the version in the high byte.
const ID: u64 = 0x00;
/// Reads back the bitwise inverse of what was written.
const LIVENESS: u64 = 0x04;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
/// Command bits: start; direction (set: from edu to RAM).
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;
/// edu's buffer, as the device addresses it.
const EDU_BUFFER: u64 = 0x40000;
/// Bytes per transfer (see the module docs).
const CHUNK: usize = 4095;
/// Where guest RAM is mapped for the device.
const RAM_IOVA: u64 = 0x100_0000;
/// An IOVA with nothing mapped (below the 28-bit DMA mask).
const UNMAPPED_IOVA: u64 = 0x800_0000;
/// `PCI_COMMAND` and its bus-master bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// The device and the two regions it is driven through.
struct Edu {
    dev: VfioDevice,
    bar0: Region,
}

impl Edu {
    fn read(&self, reg: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.dev
            .read(self.bar0, reg, &mut b)
            .map_err(|e| format!("read edu register {reg:#x}: {e}"))?;
        Ok(u64::from_le_bytes(b))
    }

    fn read32(&self, reg: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.dev
            .read(self.bar0, reg, &mut b)
            .map_err(|e| format!("read edu register {reg:#x}: {e}"))?;
        Ok(u32::from_le_bytes(b))
    }

    fn write(&self, reg: u64, value: u64) -> Result<(), String> {
        self.dev
            .write(self.bar0, reg, &value.to_le_bytes())
            .map_err(|e| format!("write edu register {reg:#x}: {e}"))
    }

    fn write32(&self, reg: u64, value: u32) -> Result<(), String> {
        self.dev
            .write(self.bar0, reg, &value.to_le_bytes())
            .map_err(|e| format!("write edu register {reg:#x}: {e}"))
    }

    /// Takes the device over: bus mastering on, edu's identification and
    /// liveness registers checked.
    fn enable(dev: VfioDevice) -> Result<Edu, String> {
        let config = dev
            .region(PCI_CONFIG_REGION)
            .map_err(|e| format!("config region: {e}"))?;
        let bar0 = dev
            .region(PCI_BAR0_REGION)
            .map_err(|e| format!("BAR0 region: {e}"))?;
        let mut cmd = [0u8; 2];
        dev.read(config, PCI_COMMAND, &mut cmd)
            .map_err(|e| format!("read PCI_COMMAND: {e}"))?;
        let on = (u16::from_le_bytes(cmd) | PCI_COMMAND_MASTER).to_le_bytes();
        dev.write(config, PCI_COMMAND, &on)
            .map_err(|e| format!("enable bus mastering: {e}"))?;
        let edu = Edu { dev, bar0 };
        let id = edu.read32(ID)?;
        if id & 0xffff != 0x00ed {
            return Err(format!("not an edu device: identification {id:#x}"));
        }
        edu.write32(LIVENESS, 0x1234_5678)?;
        if edu.read32(LIVENESS)? != !0x1234_5678 {
            return Err("edu's liveness register does not invert".into());
        }
        Ok(edu)
    }

    /// [`CHUNK`] bytes DMA'd from IOVA `from` into edu's buffer.
    fn fetch(&self, from: u64) -> Result<(), String> {
        self.dma(from, EDU_BUFFER, false)
    }

    /// edu's buffer DMA'd into guest RAM at offset `at`, and read there.
    fn store_and_read(&self, ram: &std::fs::File, at: u64) -> Result<Vec<u8>, String> {
        self.dma(EDU_BUFFER, RAM_IOVA + at, true)?;
        let mut back = vec![0u8; CHUNK];
        ram.read_exact_at(&mut back, at)
            .map_err(|e| e.to_string())?;
        Ok(back)
    }

    /// Starts a transfer of [`CHUNK`] bytes without waiting for it.
    fn start_dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<(), String> {
        self.write(DMA_SRC, src)?;
        self.write(DMA_DST, dst)?;
        self.write(DMA_COUNT, CHUNK as u64)?;
        let cmd = CMD_START | if to_ram { CMD_TO_RAM } else { 0 };
        self.write(DMA_CMD, cmd)
    }

    /// Whether a transfer is still running.
    fn busy(&self) -> Result<bool, String> {
        Ok(self.read(DMA_CMD)? & CMD_START != 0)
    }

    /// One transfer of [`CHUNK`] bytes, waited for.
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<(), String> {
        self.start_dma(src, dst, to_ram)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.read(DMA_CMD)? & CMD_START != 0 {
            if Instant::now() > deadline {
                return Err("an edu DMA did not finish within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The session a stage-1 VMM leaves its device in.
const SESSION: &str = "vfio-vm";
/// Where in guest RAM stage 1 leaves the time its blackout started.
const PAUSED_AT: u64 = 7 << 20;
/// Where stage 1's last DMA, still running as it leaves, writes.
const IN_FLIGHT_AT: u64 = 6 << 20;
/// The session of the spare device.
const SPARE_SESSION: &str = "vfio-spare";
/// Its tokens.
const RAM_TOKEN: u64 = 1;
const DEVICE_TOKEN: u64 = 2;
const IOMMUFD_TOKEN: u64 = 3;

/// Where the paths are, and which update the stages straddle.
pub struct Paths<'a> {
    /// A real kexec (`luo kexec`), not a simulated update: the device is
    /// reset and made again, and no DMA runs across it.
    pub kexec: bool,
    /// The spare was removed before the next kernel's daemon started: its
    /// retrieve fails (ENODEV) and every other file comes back.
    pub spare_removed: bool,
    /// The device's VFIO cdev.
    pub device: &'a Path,
    /// A second edu's cdev, preserved alone and finished unretrieved.
    pub spare: &'a Path,
    /// The iommufd device.
    pub iommu: &'a Path,
    /// The LUO device.
    pub liveupdate: &'a Path,
}

/// Runs `stage` (0, 1 or 2; see the module docs) with `mib` MiB of guest RAM.
///
/// # Errors
/// What failed, as a sentence.
pub fn run(paths: &Paths<'_>, stage: u32, mib: u64) -> Result<(), String> {
    match stage {
        0 => check_alone(paths.device, paths.iommu, mib),
        1 => preserve(paths, mib),
        _ => retrieve(paths),
    }
}

/// A device bound to a new iommufd and attached to a new IOAS that maps a
/// fresh memfd of `mib` MiB at [`RAM_IOVA`], bus mastering on.
fn set_up(
    device: &Path,
    iommu: &Path,
    mib: u64,
) -> Result<(Edu, Iommufd, u32, std::fs::File), String> {
    let iommufd = Iommufd::open(iommu).map_err(|e| format!("open {}: {e}", iommu.display()))?;
    let dev = VfioDevice::open(device).map_err(|e| format!("open {}: {e}", device.display()))?;
    let devid = dev
        .bind(&iommufd)
        .map_err(|e| format!("VFIO_DEVICE_BIND_IOMMUFD: {e}"))?;
    let ioas = iommufd
        .alloc_ioas()
        .map_err(|e| format!("IOMMU_IOAS_ALLOC: {e}"))?;
    dev.attach(ioas)
        .map_err(|e| format!("VFIO_DEVICE_ATTACH_IOMMUFD_PT: {e}"))?;
    println!("vfio-check: device {devid} bound, attached to IOAS {ioas}");
    let size = mib << 20;
    let ram = luo_handlers::mem::memfd("guest-ram", 0, size).map_err(|e| e.to_string())?;
    iommufd
        .map_file(ioas, ram.as_fd(), 0, size, RAM_IOVA)
        .map_err(|e| format!("IOMMU_IOAS_MAP_FILE: {e}"))?;
    Ok((Edu::enable(dev)?, iommufd, ioas, ram))
}

/// Writes `seed`'s pattern at offset `from` of guest RAM, DMAs it through
/// the device to offset `to`, and compares every byte there.
fn round_trip(edu: &Edu, ram: &std::fs::File, seed: u8, from: u64, to: u64) -> Result<(), String> {
    let out = pattern(seed);
    ram.write_all_at(&out, from).map_err(|e| e.to_string())?;
    edu.fetch(RAM_IOVA + from)?;
    let back = edu.store_and_read(ram, to)?;
    if let Some(i) = (0..CHUNK).find(|i| back[*i] != out[*i]) {
        return Err(format!(
            "DMA through the IOMMU: byte {i} came back {:#x}, not {:#x}",
            back[i], out[i]
        ));
    }
    Ok(())
}

/// The legacy VFIO group of the device behind `device` (`/dev/vfio/N`).
fn group_of(device: &Path) -> Result<std::path::PathBuf, String> {
    let meta = std::fs::metadata(device).map_err(|e| e.to_string())?;
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let link = format!("/sys/dev/char/{major}:{minor}/device/iommu_group");
    let group = std::fs::read_link(&link).map_err(|e| format!("{link}: {e}"))?;
    let n = group.file_name().ok_or("no IOMMU group")?;
    Ok(Path::new("/dev/vfio").join(n))
}

/// PRESERVE_FD of `fd` must fail with `errno`.
fn refused(
    session: &OwnedFd,
    what: &str,
    fd: std::os::fd::BorrowedFd<'_>,
    errno: i32,
) -> Result<(), String> {
    match lu::preserve_fd(session.as_fd(), fd, 100) {
        Err(e) if e.raw_os_error() == Some(errno) => {
            println!("vfio-check: stage 1: preserving {what} is refused: {e}");
            Ok(())
        }
        other => Err(format!("preserving {what}: {other:?}, not errno {errno}")),
    }
}

/// The spare on an iommufd of its own is refused (ENOENT) while that
/// iommufd maps this process's memory (pinned pages no update carries),
/// and while it maps a memfd that is not preserved.
fn refused_dma(session: &OwnedFd, spare: &Path) -> Result<(), String> {
    let iommufd =
        Iommufd::open(Path::new("/dev/iommu")).map_err(|e| format!("open /dev/iommu: {e}"))?;
    let dev = VfioDevice::open(spare).map_err(|e| format!("open {}: {e}", spare.display()))?;
    dev.bind(&iommufd)
        .map_err(|e| format!("bind the spare: {e}"))?;
    let ioas = iommufd
        .alloc_ioas()
        .map_err(|e| format!("IOMMU_IOAS_ALLOC: {e}"))?;
    dev.attach(ioas)
        .map_err(|e| format!("attach the spare: {e}"))?;
    let len = 64 << 10;
    let memory = vec![0x5au8; 2 * len];
    let page = memory.as_ptr().align_offset(4096);
    iommufd
        .map_user(ioas, memory[page..].as_ptr(), len as u64, RAM_IOVA)
        .map_err(|e| format!("IOMMU_IOAS_MAP: {e}"))?;
    refused(
        session,
        "a device whose iommufd maps process memory",
        dev.fd(),
        libc::ENOENT,
    )?;
    iommufd
        .unmap(ioas, RAM_IOVA, len as u64)
        .map_err(|e| format!("IOMMU_IOAS_UNMAP: {e}"))?;
    let other = luo_handlers::mem::memfd("not-preserved", 0, 1 << 20).map_err(|e| e.to_string())?;
    iommufd
        .map_file(ioas, other.as_fd(), 0, 1 << 20, RAM_IOVA)
        .map_err(|e| format!("IOMMU_IOAS_MAP_FILE: {e}"))?;
    refused(
        session,
        "a device whose iommufd maps a memfd that is not preserved",
        dev.fd(),
        libc::ENOENT,
    )
}

/// Stage 1: set up, DMA, then preserve guest RAM, the device and the
/// iommufd and hold the session for the update. Around that, what cannot
/// be handed over is refused: the device's legacy group fd, a device fd
/// bound to no iommufd, the device before the guest RAM it maps, a device
/// whose DMA reaches memory no update carries (ENOENT, as for any file no
/// handler takes), and the same device a second time (EBUSY).
fn preserve(paths: &Paths<'_>, mib: u64) -> Result<(), String> {
    let dev = std::fs::File::options()
        .read(true)
        .write(true)
        .open(paths.liveupdate)
        .map_err(|e| format!("open {}: {e}", paths.liveupdate.display()))?;
    let session =
        lu::create_session(dev.as_fd(), SESSION).map_err(|e| format!("CREATE_SESSION: {e}"))?;
    let group = group_of(paths.device)?;
    let group_fd = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&group)
        .map_err(|e| format!("open {}: {e}", group.display()))?;
    refused(
        &session,
        "the device's VFIO group",
        group_fd.as_fd(),
        libc::ENOENT,
    )?;
    drop(group_fd);
    let (edu, iommufd, ioas, ram) = set_up(paths.device, paths.iommu, mib)?;
    round_trip(&edu, &ram, 11, 0, 1 << 20)?;
    println!("vfio-check: stage 1: {CHUNK} bytes to the device and back");
    map_cost(&iommufd, ioas, &ram, "stage 1, recorded under luo run")?;
    let unbound = VfioDevice::open(paths.device)
        .map_err(|e| format!("open {} again: {e}", paths.device.display()))?;
    refused(
        &session,
        "a device fd bound to no iommufd",
        unbound.fd(),
        libc::ENOENT,
    )?;
    drop(unbound);
    refused(
        &session,
        "the device before the guest RAM it maps",
        edu.dev.fd(),
        libc::ENOENT,
    )?;
    refused_dma(&session, paths.spare)?;
    // The blackout starts here; stage 2 reads when from guest RAM.
    let paused = crate::sys::monotonic_ns();
    ram.write_all_at(&paused.to_le_bytes(), PAUSED_AT)
        .map_err(|e| e.to_string())?;
    for (what, fd, token) in [
        ("guest RAM", ram.as_fd(), RAM_TOKEN),
        ("the device", edu.dev.fd(), DEVICE_TOKEN),
        ("the iommufd", iommufd.fd(), IOMMUFD_TOKEN),
    ] {
        lu::preserve_fd(session.as_fd(), fd, token)
            .map_err(|e| format!("SESSION_PRESERVE_FD of {what}: {e}"))?;
    }
    let preserved = crate::sys::monotonic_ns() - paused;
    refused(&session, "the same device again", edu.dev.fd(), libc::EBUSY)?;
    // The spare: bound to the same iommufd, alone in its session.
    let spare = VfioDevice::open(paths.spare)
        .map_err(|e| format!("open {}: {e}", paths.spare.display()))?;
    spare
        .bind(&iommufd)
        .map_err(|e| format!("bind the spare: {e}"))?;
    let spare_session = lu::create_session(dev.as_fd(), SPARE_SESSION)
        .map_err(|e| format!("CREATE_SESSION of the spare: {e}"))?;
    lu::preserve_fd(spare_session.as_fd(), spare.fd(), DEVICE_TOKEN)
        .map_err(|e| format!("SESSION_PRESERVE_FD of the spare: {e}"))?;
    // A DMA into guest RAM started now finishes after this VMM is gone (edu
    // takes 100 ms): stage 2 finds it landed. No DMA runs across a kexec.
    if !paths.kexec {
        edu.fetch(RAM_IOVA)?;
        edu.start_dma(EDU_BUFFER, RAM_IOVA + IN_FLIGHT_AT, true)?;
        if !edu.busy()? {
            return Err("the last DMA finished before the VMM left".into());
        }
        println!("vfio-check: stage 1: a DMA into guest RAM is in flight as the VMM leaves");
    }
    println!(
        "vfio-check: stage 1: guest RAM, the device and its iommufd preserved in {} us; holding them for the update",
        preserved / 1000
    );
    crate::sys::hold_in_child(vec![session, spare_session]).map_err(|e| format!("fork: {e}"))
}

/// Whether `device` can be opened and bound to a new iommufd: a cdev device
/// is bound by one open file at a time, so not while LUO holds one.
fn bindable(device: &Path) -> bool {
    let fresh = Iommufd::open(Path::new("/dev/iommu"));
    let dev = VfioDevice::open(device);
    matches!((fresh, dev), (Ok(i), Ok(d)) if d.bind(&i).is_ok())
}

/// The spare's session finished without retrieving the device: the device
/// is let go (it can be bound afresh), as the kernel finishes an
/// unretrieved file.
fn finish_unretrieved(dev: &std::fs::File, spare: &Path) -> Result<(), String> {
    let session = lu::retrieve_session(dev.as_fd(), SPARE_SESSION)
        .map_err(|e| format!("RETRIEVE_SESSION of the spare: {e}"))?;
    if bindable(spare) {
        return Err("the spare could be bound while LUO held it".into());
    }
    lu::finish(session.as_fd()).map_err(|e| format!("FINISH of the spare: {e}"))?;
    if !bindable(spare) {
        return Err("the spare was not let go by FINISH".into());
    }
    println!("vfio-check: stage 2: a device never retrieved is let go by FINISH");
    Ok(())
}

/// Stage 2: everything retrieved; the device, never reset and still
/// attached, DMAs to the same IOVAs with no BIND, ATTACH or MAP.
fn retrieve(paths: &Paths<'_>) -> Result<(), String> {
    let (liveupdate, spare) = (paths.liveupdate, paths.spare);
    let dev = std::fs::File::options()
        .read(true)
        .write(true)
        .open(liveupdate)
        .map_err(|e| format!("open {}: {e}", liveupdate.display()))?;
    let session =
        lu::retrieve_session(dev.as_fd(), SESSION).map_err(|e| format!("RETRIEVE_SESSION: {e}"))?;
    let take = |what: &str, token| -> Result<OwnedFd, String> {
        lu::retrieve_fd(session.as_fd(), token)
            .map_err(|e| format!("SESSION_RETRIEVE_FD of {what}: {e}"))
    };
    let start = crate::sys::monotonic_ns();
    let ram = std::fs::File::from(take("guest RAM", RAM_TOKEN)?);
    let device = VfioDevice::from_fd(take("the device", DEVICE_TOKEN)?);
    let _iommufd = Iommufd::from_fd(take("the iommufd", IOMMUFD_TOKEN)?)
        .map_err(|e| format!("the retrieved iommufd: {e}"))?;
    let now = crate::sys::monotonic_ns();
    println!(
        "vfio-check: stage 2: guest RAM, the device and its iommufd retrieved in {} us",
        (now - start) / 1000
    );
    let bar0 = device
        .region(PCI_BAR0_REGION)
        .map_err(|e| format!("BAR0 region: {e}"))?;
    let edu = Edu { dev: device, bar0 };
    let mut before = vec![0u8; CHUNK];
    ram.read_exact_at(&mut before, 1 << 20)
        .map_err(|e| e.to_string())?;
    if before != pattern(11) {
        return Err("guest RAM lost what the device wrote in stage 1".into());
    }
    if paths.kexec {
        println!("vfio-check: stage 2: guest RAM holds what the device wrote before the kexec");
        round_trip(&edu, &ram, 23, 4 << 20, 5 << 20)?;
        println!("vfio-check: stage 2: the device, reset by the kexec and made again by LUO, DMAs {CHUNK} bytes through the same IOVAs with no setup");
    } else {
        after_simulated_update(&edu, &ram, now)?;
    }
    lu::finish(session.as_fd()).map_err(|e| format!("FINISH: {e}"))?;
    if paths.spare_removed {
        spare_lost(&dev)
    } else {
        finish_unretrieved(&dev, spare)
    }
}

/// The spare, gone when the next kernel started: its retrieve fails with
/// ENODEV, every time, and its session still finishes.
fn spare_lost(dev: &std::fs::File) -> Result<(), String> {
    let session = lu::retrieve_session(dev.as_fd(), SPARE_SESSION)
        .map_err(|e| format!("RETRIEVE_SESSION of the spare: {e}"))?;
    for attempt in ["first", "second"] {
        match lu::retrieve_fd(session.as_fd(), DEVICE_TOKEN) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            other => {
                return Err(format!(
                    "{attempt} retrieve of the removed spare: {other:?}, not ENODEV"
                ))
            }
        }
    }
    lu::finish(session.as_fd()).map_err(|e| format!("FINISH of the spare: {e}"))?;
    println!("vfio-check: stage 2: a device gone after the kexec fails only its own retrieve (ENODEV, twice); its session finishes");
    Ok(())
}

/// The device across a simulated update: never reset, and the DMA left
/// running by stage 1 landed; then one more transfer with no setup.
fn after_simulated_update(edu: &Edu, ram: &std::fs::File, now: u64) -> Result<(), String> {
    let mut paused = [0u8; 8];
    ram.read_exact_at(&mut paused, PAUSED_AT)
        .map_err(|e| e.to_string())?;
    let blackout = now.saturating_sub(u64::from_le_bytes(paused));
    println!(
        "vfio-check: stage 2: blackout (preserve started -> device retrieved) {:.1} ms",
        blackout as f64 / 1e6
    );
    // Stage 1's last transfer left its addresses in the DMA registers: a
    // reset would have cleared them.
    let (src, dst) = (edu.read(DMA_SRC)?, edu.read(DMA_DST)?);
    if (src, dst) != (EDU_BUFFER, RAM_IOVA + IN_FLIGHT_AT) {
        return Err(format!(
            "the device was reset: DMA registers {src:#x} -> {dst:#x}"
        ));
    }
    let mut before = vec![0u8; CHUNK];
    ram.read_exact_at(&mut before, IN_FLIGHT_AT)
        .map_err(|e| e.to_string())?;
    if before != pattern(11) {
        return Err("the DMA in flight during the update did not land in guest RAM".into());
    }
    println!("vfio-check: stage 2: the DMA in flight during the blackout landed in guest RAM");
    round_trip(edu, ram, 23, 4 << 20, 5 << 20)?;
    println!("vfio-check: stage 2: the retrieved device, not reset, DMAs {CHUNK} bytes through the same IOVAs with no setup");
    Ok(())
}

/// Stage 0: the device and the IOMMU alone, DMA checked both ways and
/// unmapped IOVAs read nothing.
fn check_alone(device: &Path, iommu: &Path, mib: u64) -> Result<(), String> {
    let (edu, iommufd, ioas, ram) = set_up(device, iommu, mib)?;
    let size = mib << 20;
    // RAM -> edu -> RAM elsewhere: every byte must make the round trip.
    round_trip(&edu, &ram, 7, 0, 1 << 20)?;
    println!("vfio-check: {CHUNK} bytes went to the device and back through IOVA {RAM_IOVA:#x}");
    // An IOVA never mapped: the device reads nothing (zeros).
    edu.fetch(UNMAPPED_IOVA)?;
    nothing(&edu.store_and_read(&ram, 2 << 20)?)?;
    println!("vfio-check: a DMA from unmapped IOVA {UNMAPPED_IOVA:#x} read nothing");
    // The pattern's own IOVA, unmapped: what the device reads there comes
    // from the IOMMU's table, not from guest physical memory.
    iommufd
        .unmap(ioas, RAM_IOVA, size)
        .map_err(|e| format!("IOMMU_IOAS_UNMAP: {e}"))?;
    edu.fetch(RAM_IOVA)?;
    iommufd
        .map_file(ioas, ram.as_fd(), 0, size, RAM_IOVA)
        .map_err(|e| format!("IOMMU_IOAS_MAP_FILE again: {e}"))?;
    nothing(&edu.store_and_read(&ram, 3 << 20)?)?;
    println!("vfio-check: once unmapped, IOVA {RAM_IOVA:#x} gives the device nothing of the memfd");
    map_cost(&iommufd, ioas, &ram, "alone")
}

/// Where [`map_cost`] maps and unmaps.
const SCRATCH_IOVA: u64 = 1 << 30;

/// The median time of `IOMMU_IOAS_MAP_FILE` and of `IOMMU_IOAS_UNMAP` of
/// 2 MiB of `ram`, over 50 of each: under `luo run` both are recorded by the
/// daemon before the kernel runs them.
fn map_cost(iommufd: &Iommufd, ioas: u32, ram: &std::fs::File, label: &str) -> Result<(), String> {
    const N: usize = 50;
    let len = 2 << 20;
    let (mut map, mut unmap) = (Vec::with_capacity(N), Vec::with_capacity(N));
    for _ in 0..N {
        let t = Instant::now();
        iommufd
            .map_file(ioas, ram.as_fd(), 0, len, SCRATCH_IOVA)
            .map_err(|e| format!("IOMMU_IOAS_MAP_FILE: {e}"))?;
        map.push(t.elapsed());
        let t = Instant::now();
        iommufd
            .unmap(ioas, SCRATCH_IOVA, len)
            .map_err(|e| format!("IOMMU_IOAS_UNMAP: {e}"))?;
        unmap.push(t.elapsed());
    }
    map.sort();
    unmap.sort();
    println!(
        "vfio-check: {label}: IOMMU_IOAS_MAP_FILE of 2 MiB p50 {} us, IOMMU_IOAS_UNMAP p50 {} us ({N} each)",
        map[N / 2].as_micros(),
        unmap[N / 2].as_micros()
    );
    Ok(())
}

/// Checks that a DMA read nothing but zeros.
fn nothing(read: &[u8]) -> Result<(), String> {
    if read.iter().any(|b| *b != 0) {
        return Err(
            "a DMA from an unmapped IOVA read something: the IOMMU is not in the path".into(),
        );
    }
    Ok(())
}
