//! `luo vfio-check`: QEMU's `edu` PCI device (1234:11e8, a DMA engine with
//! a 4 KiB buffer) driven through its VFIO cdev and an iommufd, DMA into
//! and out of a memfd checked byte for byte (the rig's `vfio` scenario).
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

    /// One transfer of [`CHUNK`] bytes, waited for.
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<(), String> {
        self.write(DMA_SRC, src)?;
        self.write(DMA_DST, dst)?;
        self.write(DMA_COUNT, CHUNK as u64)?;
        let cmd = CMD_START | if to_ram { CMD_TO_RAM } else { 0 };
        self.write(DMA_CMD, cmd)?;
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

/// Binds `device` to a new iommufd, maps a memfd of `mib` MiB at IOVA
/// 16 MiB, and checks DMA both ways byte for byte, and that an unmapped IOVA
/// gives the device nothing of guest RAM.
///
/// # Errors
/// What failed, as a sentence.
pub fn run(device: &Path, iommu: &Path, mib: u64) -> Result<(), String> {
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
    let map = |what: &str| {
        iommufd
            .map_file(ioas, ram.as_fd(), 0, size, RAM_IOVA)
            .map_err(|e| format!("IOMMU_IOAS_MAP_FILE{what}: {e}"))
    };
    map("")?;
    let edu = Edu::enable(dev)?;
    // RAM -> edu -> RAM elsewhere: every byte must make the round trip.
    let out = pattern(7);
    ram.write_all_at(&out, 0).map_err(|e| e.to_string())?;
    edu.fetch(RAM_IOVA)?;
    let back = edu.store_and_read(&ram, 1 << 20)?;
    if let Some(i) = (0..CHUNK).find(|i| back[*i] != out[*i]) {
        return Err(format!(
            "DMA through the IOMMU: byte {i} came back {:#x}, not {:#x}",
            back[i], out[i]
        ));
    }
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
    map(" again")?;
    nothing(&edu.store_and_read(&ram, 3 << 20)?)?;
    println!("vfio-check: once unmapped, IOVA {RAM_IOVA:#x} gives the device nothing of the memfd");
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
