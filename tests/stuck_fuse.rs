//! A FUSE filesystem that stops answering: the attacker's tool against a
//! daemon that would wait on it. It serves one regular file `f` (4 KiB,
//! attributes never cached) until that file is opened, then reads every
//! request and answers none. Dropping it aborts the connection, which fails
//! every request still waiting (and so frees whoever waited).

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use luo_cuse_dev::wire::abi::*;
use zerocopy::{FromBytes, IntoBytes};

pub struct StuckFs {
    pub mnt: PathBuf,
    stop: Arc<AtomicBool>,
    /// Requests received after it stopped answering.
    pub ignored: Arc<AtomicUsize>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl StuckFs {
    /// Mounts it at `mnt` (created).
    pub fn mount(mnt: &Path) -> StuckFs {
        std::fs::create_dir_all(mnt).unwrap();
        // SAFETY: the path is a valid C string.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open /dev/fuse");
        // SAFETY: open returned a fresh fd that we own.
        let dev = unsafe { OwnedFd::from_raw_fd(fd) };
        let opts = format!("fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other\0");
        let target = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: all pointers are valid C strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                c"stuck".as_ptr(),
                target.as_ptr(),
                c"fuse.stuck".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount FUSE: {}", std::io::Error::last_os_error());
        let stop = Arc::new(AtomicBool::new(false));
        let ignored = Arc::new(AtomicUsize::new(0));
        let (s, i) = (stop.clone(), ignored.clone());
        let server = std::thread::spawn(move || serve(dev, &s, &i));
        StuckFs {
            mnt: mnt.to_owned(),
            stop,
            ignored,
            server: Some(server),
        }
    }

    /// The file that hangs whoever touches it once it is open.
    pub fn file(&self) -> String {
        self.mnt.join("f").to_str().unwrap().to_owned()
    }
}

impl Drop for StuckFs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let target = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: target is a valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn serve(dev: OwnedFd, stop: &AtomicBool, ignored: &AtomicUsize) {
    let mut buf = vec![0u8; 1 << 20];
    let mut stuck = false;
    while !stop.load(Ordering::Relaxed) {
        let mut p = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: reads into a live buffer of its own length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV) {
                return;
            }
            continue;
        }
        let Ok((h, body)) = InHeader::read_from_prefix(&buf[..n as usize]) else {
            continue;
        };
        if stuck {
            ignored.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stuck = answer(&dev, &h, body);
    }
    // Dropping the fd aborts the connection: every waiting request fails.
    std::thread::sleep(Duration::from_millis(10));
}

/// Answers one request; true once the file is open (answer nothing more).
fn answer(dev: &OwnedFd, h: &InHeader, body: &[u8]) -> bool {
    match h.opcode {
        opcode::INIT => {
            let init = InitIn::read_from_prefix(body).unwrap().0;
            let out = InitOut {
                major: 7,
                minor: init.minor.min(31),
                max_readahead: init.max_readahead,
                max_background: 16,
                congestion_threshold: 12,
                max_write: 4096,
                time_gran: 1,
                ..Default::default()
            };
            reply(dev, h.unique, 0, out.as_bytes());
        }
        opcode::LOOKUP if body.starts_with(b"f\0") => {
            let out = EntryOut {
                nodeid: 2,
                entry_valid: 3600,
                attr: attr(2),
                ..Default::default()
            };
            reply(dev, h.unique, 0, out.as_bytes());
        }
        opcode::GETATTR => {
            let out = AttrOut {
                attr_valid: if h.nodeid == 1 { 3600 } else { 0 },
                attr: attr(h.nodeid),
                ..Default::default()
            };
            reply(dev, h.unique, 0, out.as_bytes());
        }
        opcode::OPEN => {
            let out = OpenOut {
                fh: 1,
                open_flags: 0,
                backing_id: 0,
            };
            reply(dev, h.unique, 0, out.as_bytes());
            return true;
        }
        opcode::FORGET | opcode::BATCH_FORGET => {}
        _ => reply(dev, h.unique, -libc::ENOSYS, &[]),
    }
    false
}

fn attr(ino: u64) -> Attr {
    let (mode, size) = match ino {
        1 => (libc::S_IFDIR | 0o755, 0),
        _ => (libc::S_IFREG | 0o644, 4096),
    };
    Attr {
        ino,
        mode,
        size,
        nlink: 1,
        blksize: 4096,
        ..Default::default()
    }
}

fn reply(dev: &OwnedFd, unique: u64, error: i32, body: &[u8]) {
    let h = OutHeader {
        len: (16 + body.len()) as u32,
        error,
        unique,
    };
    let mut msg = h.as_bytes().to_vec();
    msg.extend_from_slice(body);
    // SAFETY: writes a live buffer.
    unsafe { libc::write(dev.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
}
