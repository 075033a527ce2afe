//! seccomp user notification: the filter `luo run` installs and the
//! supervisor side the daemon uses to answer trapped ioctls with new fds.
//!
//! The filter traps only `ioctl(fd, cmd, arg)` where `cmd` is one of the three
//! fd-returning LUO commands or one of the seven iommufd and VFIO calls that
//! change what a device's DMA reaches (the kernel runs those once recorded);
//! every other syscall runs untouched. The daemon
//! answers a trapped call itself when `fd` is its device or one of its session
//! fds, and lets the kernel run it (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`) when it
//! is anything else (another device that happens to use the same numbers).

use std::cell::Cell;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use luo_store::{Errno, Result};

use crate::uapi::TRAPPED;

const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_uint = 1 << 3;
const SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV: libc::c_uint = 1 << 5;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
/// `SECCOMP_USER_NOTIF_FLAG_CONTINUE`.
pub const FLAG_CONTINUE: u32 = 1;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// `struct seccomp_data`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SeccompData {
    /// Syscall number.
    pub nr: i32,
    /// `AUDIT_ARCH_*`.
    pub arch: u32,
    /// Instruction pointer.
    pub instruction_pointer: u64,
    /// Arguments.
    pub args: [u64; 6],
}

/// `struct seccomp_notif`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Notif {
    /// Cookie for the response.
    pub id: u64,
    /// Thread id of the caller, in the listener's pid namespace.
    pub pid: u32,
    /// Unused.
    pub flags: u32,
    /// The syscall.
    pub data: SeccompData,
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct NotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct NotifAddfd {
    id: u64,
    flags: u32,
    srcfd: u32,
    newfd: u32,
    newfd_flags: u32,
}

const _: () = assert!(std::mem::size_of::<Notif>() == 80);
const _: () = assert!(std::mem::size_of::<NotifResp>() == 24);
const _: () = assert!(std::mem::size_of::<NotifAddfd>() == 24);

const fn iowr(ty: u32, nr: u32, size: usize) -> u64 {
    ((3u64) << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const fn iow(ty: u32, nr: u32, size: usize) -> u64 {
    ((1u64) << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const NOTIF_RECV: u64 = iowr(b'!' as u32, 0, 80);
const NOTIF_SEND: u64 = iowr(b'!' as u32, 1, 24);
const NOTIF_ID_VALID: u64 = iow(b'!' as u32, 2, 8);
const NOTIF_ADDFD: u64 = iow(b'!' as u32, 3, 24);
const _: () = assert!(NOTIF_RECV == 0xc050_2100 && NOTIF_SEND == 0xc018_2101);
const _: () = assert!(NOTIF_ID_VALID == 0x4008_2102 && NOTIF_ADDFD == 0x4018_2103);

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The syscalls trapped whatever their arguments: asking which filesystem
/// a file is on, which for a session fd must be the anon-inode filesystem.
pub const TRAPPED_SYSCALLS: [libc::c_long; 2] = [libc::SYS_fstatfs, libc::SYS_statfs];

/// The BPF program: trap `fstatfs` and `statfs`, and `ioctl` with an
/// fd-returning LUO command or an iommufd/VFIO call the DMA record needs;
/// allow the rest.
pub fn filter_program() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let n = TRAPPED.len() as u8;
    let s = TRAPPED_SYSCALLS.len() as u8;
    let mut prog = vec![
        stmt(LD_W_ABS, 4), // arch
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // nr
    ];
    for (i, nr) in TRAPPED_SYSCALLS.iter().enumerate() {
        // To the USER_NOTIF return at the end: over the rest of these, the
        // ioctl test, its ALLOW, the load, the commands and their ALLOW.
        prog.push(jump(JEQ_K, *nr as u32, (s - 1 - i as u8) + 3 + n + 1, 0));
    }
    prog.extend([
        jump(JEQ_K, libc::SYS_ioctl as u32, 1, 0),
        stmt(RET_K, SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 24), // low word of args[1] (ioctl cmd is an unsigned int)
    ]);
    for (i, cmd) in TRAPPED.iter().enumerate() {
        // On a match jump to the USER_NOTIF return after the ALLOW.
        prog.push(jump(JEQ_K, *cmd, n - i as u8, 0));
    }
    prog.push(stmt(RET_K, SECCOMP_RET_ALLOW));
    prog.push(stmt(RET_K, SECCOMP_RET_USER_NOTIF));
    prog
}

/// Installs the filter on the calling thread (and every later child) and
/// returns the listener fd. Callers without `CAP_SYS_ADMIN` must have set
/// `PR_SET_NO_NEW_PRIVS` first.
///
/// # Errors
/// The errno of `seccomp(2)`.
pub fn install_filter() -> Result<OwnedFd> {
    let prog = filter_program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    let flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
    // SAFETY: fprog points at `prog`, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &fprog) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: seccomp returned a fresh listener fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: *mut T) -> Result<i32> {
    // SAFETY: `arg` points at a live value of the type the request expects.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// The supervisor end of a filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// The highest notification id received. The kernel numbers a filter's
    /// notifications consecutively, so a call received by a daemon that was
    /// killed before saving it has a higher id than any saved one.
    last_id: Cell<Option<u64>>,
}

impl Listener {
    /// Wraps a listener fd received from `luo run`, or saved by an earlier
    /// daemon along with the last id it received.
    pub fn new(fd: OwnedFd, last_id: Option<u64>) -> Listener {
        Listener {
            fd,
            last_id: Cell::new(last_id),
        }
    }

    /// The highest notification id received so far, if any.
    pub fn last_id(&self) -> Option<u64> {
        self.last_id.get()
    }

    /// The fd, for polling.
    pub fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Receives one pending notification.
    ///
    /// # Errors
    /// `ENOENT` if the caller went away before we got it.
    pub fn recv(&self) -> Result<Notif> {
        let mut n = Notif::default();
        ioctl(self.fd(), NOTIF_RECV, &mut n)?;
        self.last_id
            .set(Some(self.last_id().map_or(n.id, |last| last.max(n.id))));
        Ok(n)
    }

    /// Whether the notification still stands (the caller is still waiting).
    pub fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        ioctl(self.fd(), NOTIF_ID_VALID, &mut id).is_ok()
    }

    /// Installs `file` in the caller, close-on-exec; returns its number there.
    ///
    /// # Errors
    /// `ENOENT` if the caller is gone, `EMFILE` if its table is full.
    pub fn add_fd(&self, id: u64, file: BorrowedFd<'_>) -> Result<i32> {
        let mut a = NotifAddfd {
            id,
            flags: 0,
            srcfd: file.as_raw_fd() as u32,
            newfd: 0,
            newfd_flags: libc::O_CLOEXEC as u32,
        };
        ioctl(self.fd(), NOTIF_ADDFD, &mut a)
    }

    /// Completes the call with a return value of 0 or an errno.
    pub fn respond(&self, id: u64, result: Result<()>) {
        let error = result.err().map_or(0, |e| -e.0);
        self.send(NotifResp {
            id,
            val: 0,
            error,
            flags: 0,
        });
    }

    /// Lets the kernel run the call as if it had not been trapped.
    pub fn continue_syscall(&self, id: u64) {
        self.send(NotifResp {
            id,
            val: 0,
            error: 0,
            flags: FLAG_CONTINUE,
        });
    }

    fn send(&self, mut resp: NotifResp) {
        // ENOENT: the caller is gone; nothing to answer.
        if let Err(e) = ioctl(self.fd(), NOTIF_SEND, &mut resp) {
            crate::log::debug(format_args!(
                "seccomp response {} not delivered: {e}",
                resp.id
            ));
        }
    }
}

/// Makes one trapped call that the daemon answers with `EBADF`, so that it
/// learns where this filter's notification ids start before any call of the
/// program (see `seccomp::Listener::last_id`). The call is made by a child:
/// should the daemon be killed between receiving it and saving it, the child
/// is killed and another one tries, so the program never starts with its
/// first call unknown to the daemon. Runs between fork and exec, in
/// `luo run`.
pub fn first_call() {
    const CREATE_SESSION: libc::c_ulong = 0xBA00;
    for _ in 0..10 {
        // SAFETY: single-threaded; the child only makes one ioctl and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: fd -1 never names a file; the call is trapped and answered.
            unsafe {
                libc::ioctl(-1, CREATE_SESSION, 0);
                libc::_exit(0);
            }
        }
        if pid < 0 {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        // The answer takes tens of microseconds: look again soon, then less
        // often (a 2 ms sleep from the start cost every `luo run` 2 ms).
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            // SAFETY: pid is our child.
            if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == pid {
                return;
            }
            if std::time::Instant::now() > deadline {
                // SAFETY: pid is our child, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_traps_exactly_the_recorded_calls_and_the_statfs_calls() {
        let prog = filter_program();
        // Walk the program for a given (arch, nr, cmd) like the kernel would.
        let run = |arch: u32, nr: u32, cmd: u32| -> u32 {
            let mut acc = 0u32;
            let mut pc = 0usize;
            loop {
                let ins = prog[pc];
                match ins.code {
                    c if c == (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16 => {
                        acc = match ins.k {
                            0 => nr,
                            4 => arch,
                            24 => cmd,
                            _ => panic!(),
                        };
                        pc += 1;
                    }
                    c if c == (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16 => {
                        pc += 1 + if acc == ins.k {
                            ins.jt as usize
                        } else {
                            ins.jf as usize
                        };
                    }
                    _ => return ins.k,
                }
            }
        };
        let ioctl = libc::SYS_ioctl as u32;
        for cmd in TRAPPED {
            assert_eq!(run(AUDIT_ARCH, ioctl, cmd), SECCOMP_RET_USER_NOTIF);
        }
        for cmd in [
            crate::uapi::PRESERVE_FD,
            crate::uapi::GET_NAME,
            crate::uapi::FINISH,
            0x5401,
            luo_handlers::vfio::uapi::IOMMU_IOAS_ALLOC,
            luo_handlers::vfio::uapi::VFIO_DEVICE_GET_INFO,
        ] {
            assert_eq!(run(AUDIT_ARCH, ioctl, cmd), SECCOMP_RET_ALLOW);
        }
        assert_eq!(
            run(
                AUDIT_ARCH,
                libc::SYS_read as u32,
                crate::uapi::CREATE_SESSION
            ),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(0x4000_0003, ioctl, crate::uapi::CREATE_SESSION),
            SECCOMP_RET_ALLOW
        );
        for nr in TRAPPED_SYSCALLS {
            assert_eq!(run(AUDIT_ARCH, nr as u32, 0), SECCOMP_RET_USER_NOTIF);
        }
        for nr in [libc::SYS_readlink, libc::SYS_readlinkat, libc::SYS_fstat] {
            assert_eq!(run(AUDIT_ARCH, nr as u32, 0), SECCOMP_RET_ALLOW);
        }
    }
}
