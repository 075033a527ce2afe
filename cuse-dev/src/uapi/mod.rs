//! The LUO uAPI (`include/uapi/linux/liveupdate.h`) and its decoding rules
//! (`luo_core.c`, `luo_session.c`, `copy_struct_from_user`).

use luo_store::{Direction, Errno, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Reads and writes a caller's memory. Any failure is `EFAULT`, as a kernel
/// `copy_{from,to}_user` would report.
pub trait CallerMem {
    /// Reads `buf.len()` bytes at `addr`.
    ///
    /// # Errors
    /// `EFAULT` unless every byte was read.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `addr`.
    ///
    /// # Errors
    /// `EFAULT` unless every byte was written.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<()>;
}

/// `LIVEUPDATE_IOCTL_TYPE`.
pub const IOCTL_TYPE: u32 = 0xBA;

/// `_IO(type, nr)`.
pub const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION`.
pub const CREATE_SESSION: u32 = io(IOCTL_TYPE, 0x00);
/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`.
pub const RETRIEVE_SESSION: u32 = io(IOCTL_TYPE, 0x01);
/// `LIVEUPDATE_SESSION_PRESERVE_FD`.
pub const PRESERVE_FD: u32 = io(IOCTL_TYPE, 0x40);
/// `LIVEUPDATE_SESSION_RETRIEVE_FD`.
pub const RETRIEVE_FD: u32 = io(IOCTL_TYPE, 0x41);
/// `LIVEUPDATE_SESSION_FINISH`.
pub const FINISH: u32 = io(IOCTL_TYPE, 0x42);
/// `LIVEUPDATE_SESSION_GET_NAME`.
pub const GET_NAME: u32 = io(IOCTL_TYPE, 0x43);

/// Whether a command changes the sessions (and so must be saved before it
/// is answered): every one but GET_NAME.
pub fn changes_state(cmd: u32) -> bool {
    [
        CREATE_SESSION,
        RETRIEVE_SESSION,
        PRESERVE_FD,
        RETRIEVE_FD,
        FINISH,
    ]
    .contains(&cmd)
}

const _: () = assert!(CREATE_SESSION == 0xBA00 && RETRIEVE_FD == 0xBA41 && GET_NAME == 0xBA43);

/// The ioctls that return a new fd and so must be trapped by `luo run`.
pub const FD_RETURNING: [u32; 3] = [CREATE_SESSION, RETRIEVE_SESSION, RETRIEVE_FD];

/// The iommufd and VFIO device calls `luo run` traps so that the daemon
/// learns what each iommufd maps; the kernel runs them (see
/// `luo_handlers::vfio::dma`).
pub const DMA_RECORDED: [u32; 7] = {
    use luo_handlers::vfio::uapi as v;
    [
        v::VFIO_DEVICE_BIND_IOMMUFD,
        v::VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        v::IOMMU_IOAS_MAP,
        v::IOMMU_IOAS_MAP_FILE,
        v::IOMMU_IOAS_COPY,
        v::IOMMU_IOAS_UNMAP,
        v::IOMMU_DESTROY,
    ]
};

/// Every ioctl `luo run` traps.
pub const TRAPPED: [u32; 10] = {
    let mut all = [0; 10];
    let mut i = 0;
    while i < 3 {
        all[i] = FD_RETURNING[i];
        i += 1;
    }
    while i < 10 {
        all[i] = DMA_RECORDED[i - 3];
        i += 1;
    }
    all
};

/// `struct liveupdate_ioctl_create_session` / `retrieve_session`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SessionArgs {
    /// Caller's struct size.
    pub size: u32,
    /// Returned session fd.
    pub fd: i32,
    /// NUL-terminated name.
    pub name: [u8; 64],
}

/// `struct liveupdate_session_preserve_fd` / `retrieve_fd`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FdArgs {
    /// Caller's struct size.
    pub size: u32,
    /// fd to preserve, or the retrieved fd.
    pub fd: i32,
    /// The file's token.
    pub token: u64,
}

/// `struct liveupdate_session_finish`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FinishArgs {
    /// Caller's struct size.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct GetNameArgs {
    /// Caller's struct size.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Returned name.
    pub name: [u8; 64],
}

const _: () = assert!(std::mem::size_of::<SessionArgs>() == 72);
const _: () = assert!(std::mem::size_of::<FdArgs>() == 16);
const _: () = assert!(std::mem::size_of::<FinishArgs>() == 8);
const _: () = assert!(std::mem::size_of::<GetNameArgs>() == 72);

/// Which sessions a session ioctl applies to (`enum luo_ioctl_type`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Retrieved incoming sessions only.
    Incoming,
    /// Outgoing sessions only.
    Outgoing,
    /// Any session.
    All,
}

/// The commands of the uAPI, one per row of the tables below; the daemon
/// runs one handler per command (`luo_ioctl_op.execute`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Command {
    /// `LIVEUPDATE_IOCTL_CREATE_SESSION`.
    CreateSession,
    /// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`.
    RetrieveSession,
    /// `LIVEUPDATE_SESSION_PRESERVE_FD`.
    PreserveFd,
    /// `LIVEUPDATE_SESSION_RETRIEVE_FD`.
    RetrieveFd,
    /// `LIVEUPDATE_SESSION_FINISH`.
    Finish,
    /// `LIVEUPDATE_SESSION_GET_NAME`.
    GetName,
}

/// One row of an ioctl table (`struct luo_ioctl_op`).
#[derive(Clone, Copy, Debug)]
pub struct OpDesc {
    /// The command it decodes.
    pub command: Command,
    /// The full command number.
    pub cmd: u32,
    /// `sizeof` the kernel struct.
    pub size: usize,
    /// `offsetofend` of its last mandatory field.
    pub min_size: u32,
    /// Session kind it applies to.
    pub kind: Kind,
}

/// Commands on `/dev/liveupdate` (base 0x00).
pub const DEVICE_OPS: [OpDesc; 2] = [
    OpDesc {
        command: Command::CreateSession,
        cmd: CREATE_SESSION,
        size: 72,
        min_size: 72,
        kind: Kind::All,
    },
    OpDesc {
        command: Command::RetrieveSession,
        cmd: RETRIEVE_SESSION,
        size: 72,
        min_size: 72,
        kind: Kind::All,
    },
];

/// Commands on session fds (base 0x40).
pub const SESSION_OPS: [OpDesc; 4] = [
    OpDesc {
        command: Command::PreserveFd,
        cmd: PRESERVE_FD,
        size: 16,
        min_size: 16,
        kind: Kind::Outgoing,
    },
    OpDesc {
        command: Command::RetrieveFd,
        cmd: RETRIEVE_FD,
        size: 16,
        min_size: 16,
        kind: Kind::Incoming,
    },
    OpDesc {
        command: Command::Finish,
        cmd: FINISH,
        size: 8,
        min_size: 8,
        kind: Kind::Incoming,
    },
    OpDesc {
        command: Command::GetName,
        cmd: GET_NAME,
        size: 72,
        min_size: 72,
        kind: Kind::All,
    },
];

/// A decoded ioctl: which op, the caller's size and the kernel-sized struct.
#[derive(Debug)]
pub struct Decoded {
    /// The op.
    pub op: OpDesc,
    /// `user_size` as read from the caller.
    pub user_size: u32,
    /// The struct, `op.size` bytes, zero-extended.
    pub buf: Vec<u8>,
}

impl Decoded {
    /// The struct as `T`.
    pub fn get<T: FromBytes>(&self) -> T {
        T::read_from_prefix(&self.buf)
            .expect("buffer sized for the op")
            .0
    }

    /// The command decoded.
    pub fn command(&self) -> Command {
        self.op.command
    }

    /// Bytes to copy back to the caller (`luo_ucmd_respond`).
    pub fn respond_len(&self) -> usize {
        (self.user_size as usize).min(self.op.size)
    }
}

/// The session a session ioctl arrived on, for the kind check.
pub type SessionKind = (Direction, bool);

fn kind_ok(kind: Kind, session: SessionKind) -> bool {
    let retrieved = session.0 == Direction::Incoming && session.1;
    match kind {
        Kind::Incoming => retrieved,
        Kind::Outgoing => !retrieved,
        Kind::All => true,
    }
}

/// Decodes an ioctl exactly as `luo_ioctl` / `luo_session_ioctl` do:
/// nr out of range → EINVAL; unreadable size → EFAULT; cmd encoded otherwise
/// → ENOTTY; wrong session kind → EINVAL; size below the last field → EINVAL;
/// non-zero bytes past the struct → E2BIG; unreadable struct → EFAULT.
///
/// `session` is `None` for the device and the session's kind otherwise.
///
/// # Errors
/// The errno above.
pub fn decode(
    cmd: u32,
    arg: u64,
    mem: &dyn CallerMem,
    session: Option<SessionKind>,
) -> Result<Decoded> {
    let (table, base): (&[OpDesc], u32) = match session {
        None => (&DEVICE_OPS, 0x00),
        Some(_) => (&SESSION_OPS, 0x40),
    };
    let nr = cmd & 0xff;
    let index = nr.wrapping_sub(base) as usize;
    if nr < base || index >= table.len() {
        return Err(Errno::EINVAL);
    }
    let op = table[index];
    // One read of the kernel-sized struct serves the usual call; only if
    // that faults (a struct that ends at an unreadable page) is it read as
    // the kernel reads it, the size first. Every op's struct is wholly
    // mandatory (`min_size == size`), so what was read is what the kernel
    // would read whenever the call gets that far.
    let mut whole = vec![0u8; op.size];
    let prefetched = mem.read(arg, &mut whole).is_ok();
    let mut size = [0u8; 4];
    if prefetched {
        size.copy_from_slice(&whole[..4]);
    } else {
        mem.read(arg, &mut size)?;
    }
    let user_size = u32::from_ne_bytes(size);
    if op.cmd != cmd {
        return Err(Errno::ENOTTY);
    }
    if let Some(s) = session {
        if !kind_ok(op.kind, s) {
            return Err(Errno::EINVAL);
        }
    }
    if user_size < op.min_size {
        return Err(Errno::EINVAL);
    }
    let buf = if prefetched && op.min_size as usize == op.size {
        check_tail(mem, arg, op.size, user_size as usize)?;
        whole
    } else {
        copy_struct_from_user(mem, arg, op.size, user_size as usize)?
    };
    Ok(Decoded { op, user_size, buf })
}

/// The largest struct size a caller may declare. The kernel checks a tail of
/// any length (up to 4 GiB) for zeroes; that costs the caller only its own
/// time there, but here it would hold up the daemon for every other caller.
/// Larger structs are refused with E2BIG, as `openat2`, `sched_setattr` and
/// `perf_event_open` refuse theirs past a page.
pub const MAX_STRUCT: usize = 64 << 10;

/// `copy_struct_from_user`: a tail past `ksize` must be zero (E2BIG), a short
/// struct is zero-extended; a struct over [`MAX_STRUCT`] is E2BIG.
fn copy_struct_from_user(
    mem: &dyn CallerMem,
    addr: u64,
    ksize: usize,
    usize_: usize,
) -> Result<Vec<u8>> {
    check_tail(mem, addr, ksize, usize_)?;
    let size = ksize.min(usize_);
    let mut buf = vec![0u8; ksize];
    mem.read(addr, &mut buf[..size])?;
    Ok(buf)
}

/// The part of `copy_struct_from_user` past the kernel's struct: a struct
/// over [`MAX_STRUCT`] is E2BIG, a tail past `ksize` must be zero.
fn check_tail(mem: &dyn CallerMem, addr: u64, ksize: usize, usize_: usize) -> Result<()> {
    if usize_ > MAX_STRUCT {
        return Err(Errno::E2BIG);
    }
    if usize_ > ksize {
        check_zeroed(mem, addr.wrapping_add(ksize as u64), usize_ - ksize)?;
    }
    Ok(())
}

/// `check_zeroed_user`: E2BIG at the first non-zero byte, EFAULT at the
/// first unreadable one, whichever comes first. The tail is read in one
/// access; only if that faults is it walked a page at a time to tell which.
fn check_zeroed(mem: &dyn CallerMem, addr: u64, len: usize) -> Result<()> {
    let mut tail = vec![0u8; len];
    if mem.read(addr, &mut tail).is_ok() {
        return match tail.iter().any(|&b| b != 0) {
            true => Err(Errno::E2BIG),
            false => Ok(()),
        };
    }
    let (mut addr, mut len) = (addr, len);
    while len > 0 {
        let in_page = 4096 - (addr % 4096) as usize;
        let n = len.min(in_page);
        let chunk = &mut tail[..n];
        mem.read(addr, chunk)?;
        if chunk.iter().any(|&b| b != 0) {
            return Err(Errno::E2BIG);
        }
        addr = addr.wrapping_add(n as u64);
        len -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Caller memory as a byte array at address 0x1000; anything else faults.
    struct Fake(RefCell<Vec<u8>>);

    impl CallerMem for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
            let mem = self.0.borrow();
            let start = addr.checked_sub(0x1000).ok_or(Errno::EFAULT)? as usize;
            let src = mem.get(start..start + buf.len()).ok_or(Errno::EFAULT)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
            let mut mem = self.0.borrow_mut();
            let start = addr.checked_sub(0x1000).ok_or(Errno::EFAULT)? as usize;
            mem.get_mut(start..start + buf.len())
                .ok_or(Errno::EFAULT)?
                .copy_from_slice(buf);
            Ok(())
        }
    }

    fn mem_with(size: u32, len: usize) -> Fake {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(&size.to_ne_bytes());
        Fake(RefCell::new(v))
    }

    const OUT: Option<SessionKind> = Some((Direction::Outgoing, false));
    const INC: Option<SessionKind> = Some((Direction::Incoming, true));

    #[test]
    fn nr_out_of_range_is_einval_before_reading() {
        let m = Fake(RefCell::new(vec![]));
        assert_eq!(
            decode(io(0xBA, 2), 0x1000, &m, None).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            decode(io(0xBA, 0x3f), 0x1000, &m, OUT).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            decode(io(0xBA, 0x44), 0x1000, &m, OUT).unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn unreadable_size_is_efault() {
        let m = Fake(RefCell::new(vec![]));
        assert_eq!(
            decode(CREATE_SESSION, 0x10, &m, None).unwrap_err(),
            Errno::EFAULT
        );
    }

    #[test]
    fn other_encoding_of_a_known_nr_is_enotty() {
        let m = mem_with(72, 72);
        let iowr = 0xc000_0000 | (72 << 16) | CREATE_SESSION;
        assert_eq!(decode(iowr, 0x1000, &m, None).unwrap_err(), Errno::ENOTTY);
        assert_eq!(
            decode(io(0xBB, 0x00), 0x1000, &m, None).unwrap_err(),
            Errno::ENOTTY
        );
    }

    #[test]
    fn wrong_session_kind_is_einval_before_the_size_check() {
        let m = mem_with(0, 16);
        assert_eq!(
            decode(RETRIEVE_FD, 0x1000, &m, OUT).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(decode(FINISH, 0x1000, &m, OUT).unwrap_err(), Errno::EINVAL);
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &m, INC).unwrap_err(),
            Errno::EINVAL
        );
        let unretrieved = Some((Direction::Incoming, false));
        assert_eq!(
            decode(FINISH, 0x1000, &mem_with(8, 8), unretrieved).unwrap_err(),
            Errno::EINVAL
        );
        assert!(decode(GET_NAME, 0x1000, &mem_with(72, 72), INC).is_ok());
    }

    #[test]
    fn size_rules() {
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &mem_with(15, 16), OUT).unwrap_err(),
            Errno::EINVAL
        );
        // Larger with a zero tail: fine, and only 16 bytes go back.
        let d = decode(PRESERVE_FD, 0x1000, &mem_with(4096, 4096), OUT).unwrap();
        assert_eq!((d.buf.len(), d.respond_len()), (16, 16));
        // Larger with a non-zero tail: E2BIG.
        let m = mem_with(24, 24);
        m.0.borrow_mut()[20] = 1;
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &m, OUT).unwrap_err(),
            Errno::E2BIG
        );
        // Larger than a caller may declare: E2BIG without reading the tail.
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &mem_with(u32::MAX, 16), OUT).unwrap_err(),
            Errno::E2BIG
        );
        let d = decode(
            PRESERVE_FD,
            0x1000,
            &mem_with(MAX_STRUCT as u32, MAX_STRUCT),
            OUT,
        );
        assert_eq!(d.unwrap().respond_len(), 16);
        // A non-zero byte before an unreadable page: E2BIG, as the kernel
        // finds it first.
        let m = mem_with(3 * 4096, 2 * 4096);
        m.0.borrow_mut()[5000] = 1;
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &m, OUT).unwrap_err(),
            Errno::E2BIG
        );
        // Larger than the readable memory: EFAULT.
        assert_eq!(
            decode(PRESERVE_FD, 0x1000, &mem_with(64, 32), OUT).unwrap_err(),
            Errno::EFAULT
        );
        // Exact size but struct unreadable past the size word.
        assert_eq!(
            decode(CREATE_SESSION, 0x1000, &mem_with(72, 8), None).unwrap_err(),
            Errno::EFAULT
        );
    }

    #[test]
    fn decodes_fields() {
        let m = mem_with(16, 16);
        m.0.borrow_mut()[4..8].copy_from_slice(&5i32.to_ne_bytes());
        m.0.borrow_mut()[8..16].copy_from_slice(&0xabcdu64.to_ne_bytes());
        let a: FdArgs = decode(PRESERVE_FD, 0x1000, &m, OUT).unwrap().get();
        assert_eq!((a.fd, a.token), (5, 0xabcd));
    }
}
