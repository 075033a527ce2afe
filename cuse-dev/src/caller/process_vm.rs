//! Access to the calling process: its memory (the ioctl struct) and its fds.
//!
//! Callers reach the daemon two ways. Through FUSE, the request carries the
//! caller's thread id; the thread stays blocked in the ioctl, unkillable, until
//! the daemon replies, so that id cannot be reused while the request is served.
//! Through a seccomp notification, the thread may be killed at any time; every
//! access is followed by `SECCOMP_IOCTL_NOTIF_ID_VALID` (see `seccomp.rs`).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use luo_store::{Errno, Result};

use crate::uapi::CallerMem;

/// A process's memory through `process_vm_readv`/`process_vm_writev`; these
/// honour page protections as `copy_to_user` does.
#[derive(Clone, Copy, Debug)]
pub struct ProcessVm {
    /// Thread id (in the daemon's pid namespace).
    pub tid: i32,
}

type VmCall = unsafe extern "C" fn(
    libc::pid_t,
    *const libc::iovec,
    libc::c_ulong,
    *const libc::iovec,
    libc::c_ulong,
    libc::c_ulong,
) -> isize;

impl ProcessVm {
    /// Moves `len` bytes between `local` and the caller's `addr` with
    /// `process_vm_readv` or `process_vm_writev`; short transfers are EFAULT.
    fn transfer(&self, call: VmCall, local: *mut u8, addr: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: local.cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as usize as *mut _,
            iov_len: len,
        };
        // SAFETY: the local iovec covers a buffer of `len` bytes borrowed by
        // the caller of `transfer` (mutably for reads); the remote one is only
        // interpreted in the other process.
        let n = unsafe { call(self.tid, &local, 1, &remote, 1, 0) };
        whole(n, len)
    }
}

impl CallerMem for ProcessVm {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.transfer(libc::process_vm_readv, buf.as_mut_ptr(), addr, buf.len())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        // process_vm_writev only reads the local buffer.
        self.transfer(
            libc::process_vm_writev,
            buf.as_ptr() as *mut u8,
            addr,
            buf.len(),
        )
    }
}

/// The memory of a trapped caller, pinned: `/proc/TID/mem` and
/// `/proc/TID/maps` opened once, each naming the address space `tid` had at
/// the time of its open. A seccomp caller may be killed at any moment and its
/// tid reused; opened first and followed by `SECCOMP_IOCTL_NOTIF_ID_VALID`
/// (the caller still waits, so the tid was still its own), they can only
/// reach the caller, however long the call takes: a reused tid is never
/// written. Every access first checks the page protections of the range
/// (`PROCMAP_QUERY`), as `copy_{from,to}_user` honours them and a write
/// through `/proc/TID/mem` would not.
#[derive(Debug)]
pub struct PinnedVm {
    mem: OwnedFd,
    maps: OwnedFd,
}

/// `struct procmap_query` (`include/uapi/linux/fs.h`, Linux 6.11).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);
/// `PROCMAP_QUERY`: `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xC000_0000 | (104 << 16) | (0x66 << 8) | 17;
const VMA_READABLE: u64 = 1;
const VMA_WRITABLE: u64 = 2;

impl PinnedVm {
    /// Opens the memory of thread `tid`. Check that the call is still
    /// waiting *after* this returns: only then is it the caller's.
    ///
    /// # Errors
    /// `ESRCH` if the thread is gone.
    pub fn open(tid: i32) -> Result<PinnedVm> {
        let open = |what: &str, flags: libc::c_int| {
            let path =
                std::ffi::CString::new(format!("/proc/{tid}/{what}")).expect("no NUL in a number");
            // SAFETY: path is a valid NUL-terminated string.
            let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(Errno::ESRCH);
            }
            // SAFETY: open returned a fresh fd that we own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Ok(PinnedVm {
            mem: open("mem", libc::O_RDWR)?,
            maps: open("maps", libc::O_RDONLY)?,
        })
    }

    /// EFAULT unless every byte of `[addr, addr+len)` lies in mappings with
    /// the protection `need`.
    fn check(&self, mut addr: u64, len: usize, need: u64) -> Result<()> {
        let end = addr.checked_add(len as u64).ok_or(Errno::EFAULT)?;
        while addr < end {
            let mut q = ProcmapQuery {
                size: 104,
                query_addr: addr,
                ..Default::default()
            };
            // SAFETY: q is a valid procmap_query of the size it states; the
            // kernel writes only within it (no name or build-id buffers).
            let r = unsafe { libc::ioctl(self.maps.as_raw_fd(), PROCMAP_QUERY, &mut q) };
            if r != 0 || q.vma_flags & need != need || q.vma_start > addr {
                return Err(Errno::EFAULT);
            }
            addr = q.vma_end;
        }
        Ok(())
    }
}

impl CallerMem for PinnedVm {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len(), VMA_READABLE)?;
        // SAFETY: reads at most buf.len() bytes into buf; /proc/PID/mem
        // takes the address as an unsigned offset.
        let n = unsafe {
            libc::pread64(
                self.mem.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                addr as i64,
            )
        };
        whole(n, buf.len())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.check(addr, buf.len(), VMA_WRITABLE)?;
        // SAFETY: writes buf.len() bytes from buf; see `read`.
        let n = unsafe {
            libc::pwrite64(
                self.mem.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                addr as i64,
            )
        };
        whole(n, buf.len())
    }
}

/// A transfer of `len` bytes that moved `n`: anything short is EFAULT, as a
/// `copy_{from,to}_user` that stopped part-way.
fn whole(n: isize, len: usize) -> Result<()> {
    if n == len as isize {
        Ok(())
    } else {
        Err(Errno::EFAULT)
    }
}

const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// A pidfd for a thread (`pidfd_open(tid, PIDFD_THREAD)`).
///
/// # Errors
/// `ESRCH` if the thread is gone.
pub fn pidfd_open(tid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of another process's fd (`pidfd_getfd`), close-on-exec.
///
/// # Errors
/// `EBADF` if the target has no such fd; `ESRCH` if it is gone.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: pidfd_getfd takes no pointers.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// The command name of a thread, for log lines.
pub fn comm(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn reads_and_writes_own_memory_and_faults_on_bad_addresses() {
        let me = ProcessVm {
            tid: std::process::id() as i32,
        };
        let mut src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        me.read(src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(dst, [1, 2, 3, 4]);
        me.write(src.as_mut_ptr() as u64, &[9, 9]).unwrap();
        assert_eq!(std::hint::black_box(src)[..2], [9, 9]);
        assert_eq!(me.read(8, &mut dst), Err(Errno::EFAULT));
        assert_eq!(me.write(8, &dst), Err(Errno::EFAULT));
    }

    #[test]
    fn pinned_memory_honours_page_protections() {
        let me = PinnedVm::open(std::process::id() as i32).unwrap();
        let mut src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        me.read(src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(dst, [1, 2, 3, 4]);
        me.write(src.as_mut_ptr() as u64, &[9, 9]).unwrap();
        assert_eq!(std::hint::black_box(src)[..2], [9, 9]);
        assert_eq!(me.read(8, &mut dst), Err(Errno::EFAULT));
        // A read-only page: readable, never written (the kernel's
        // copy_to_user faults; a plain /proc/PID/mem write would not).
        // SAFETY: a fresh anonymous mapping of our own.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let addr = page as u64;
        me.read(addr, &mut dst).unwrap();
        assert_eq!(me.write(addr, &[1]), Err(Errno::EFAULT));
        // SAFETY: reading our own mapped page.
        assert_eq!(unsafe { *(page as *const u8) }, 0);
        // PROT_NONE: not even readable.
        // SAFETY: changing the protection of our own mapping.
        assert_eq!(unsafe { libc::mprotect(page, 8192, libc::PROT_NONE) }, 0);
        assert_eq!(me.read(addr, &mut dst), Err(Errno::EFAULT));
        // A range that runs off the end of a mapping.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::mprotect(page, 4096, libc::PROT_READ) }, 0);
        assert_eq!(me.read(addr + 4094, &mut dst), Err(Errno::EFAULT));
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(page, 8192) };
    }

    /// A child that waits for a byte on `cmd` (a pipe) and then sends back
    /// the 8 bytes at `addr` on `out`; returns its pid. It ends with the
    /// test process too: it holds no write end of `cmd`.
    fn reporter([cmd, cmd_w]: [i32; 2], out: i32, addr: *const u8) -> i32 {
        // SAFETY: the child only closes, reads and writes pipes and exits.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::close(cmd_w);
                let mut b = [0u8; 1];
                libc::read(cmd, b.as_mut_ptr().cast(), 1);
                libc::write(out, addr.cast(), 8);
                libc::_exit(0);
            }
            pid
        }
    }

    fn pipe() -> [i32; 2] {
        let mut p = [0; 2];
        // SAFETY: p has room for two fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        p
    }

    /// What the child at the other end of (`cmd`, `out`) has at its buffer.
    fn report(cmd: i32, out: i32, pid: i32) -> [u8; 8] {
        let mut got = [0u8; 8];
        // SAFETY: plain pipe I/O into live buffers; reaping our own child.
        unsafe {
            libc::write(cmd, b"x".as_ptr().cast(), 1);
            assert_eq!(libc::read(out, got.as_mut_ptr().cast(), 8), 8);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        got
    }

    #[test]
    fn pinned_memory_never_reaches_a_process_that_reused_the_tid() {
        assert_eq!(
            unsafe_geteuid(),
            0,
            "needs root to choose the next pid: run as root"
        );
        let buf: &'static mut [u8; 8] = Box::leak(Box::new(*b"original"));
        let addr = buf.as_ptr() as u64;
        for _ in 0..20 {
            let (c1, [o1r, o1w]) = (pipe(), pipe());
            let first = reporter(c1, o1w, buf.as_ptr());
            let pinned = PinnedVm::open(first).unwrap();
            // The caller dies; its pid is handed out again.
            assert_eq!(report(c1[1], o1r, first), *b"original");
            std::fs::write("/proc/sys/kernel/ns_last_pid", (first - 1).to_string()).unwrap();
            let (c2, [o2r, o2w]) = (pipe(), pipe());
            let second = reporter(c2, o2w, buf.as_ptr());
            if second != first {
                // Another process took the pid first; try again.
                report(c2[1], o2r, second);
                continue;
            }
            assert_eq!(pinned.write(addr, b"stranger"), Err(Errno::EFAULT));
            assert_eq!(report(c2[1], o2r, second), *b"original");
            return;
        }
        panic!("could not get a pid reused in 20 tries");
    }

    fn unsafe_geteuid() -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn getfd_copies_an_fd_and_rejects_bad_ones() {
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(pidfd_getfd(pidfd.as_fd(), f.as_raw_fd()).is_ok());
        assert_eq!(
            pidfd_getfd(pidfd.as_fd(), 100_000).unwrap_err(),
            Errno::EBADF
        );
        assert_eq!(pidfd_getfd(pidfd.as_fd(), -1).unwrap_err(), Errno::EBADF);
    }
}
