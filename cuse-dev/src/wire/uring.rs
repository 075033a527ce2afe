//! FUSE over io_uring (Linux 6.14+, `fs/fuse/dev_uring.c`): the kernel hands
//! requests to ring entries the daemon registered, one queue per possible
//! CPU, and takes each reply with the command that fetches the next request
//! (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`). FORGET and INTERRUPT still come
//! through `/dev/fuse`.
//!
//! Every entry's buffers live in one memfd the keeper holds, mapped at the
//! same address by every daemon: the kernel keeps the user addresses an
//! entry was registered with, so a daemon that takes over from a killed one
//! can still answer the requests its predecessor had fetched (a commit
//! copies the reply from those addresses). The `commit_id` the kernel writes
//! into an entry with each request says which entries hold one; the daemon
//! clears it once the request is answered.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, IntoBytes};

use super::abi::{InHeader, OutHeader};
use super::fuse::{parse, Request};

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: `in_out[128]`, `op_in[128]`, then
/// `struct fuse_uring_ent_in_out` (flags, commit_id, payload_sz, ...).
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;
const HEADERS_SIZE: usize = 288;
/// Headers get a page of their own so the payload stays page aligned.
const HEADERS_SPAN: usize = 4096;
/// The kernel wants a payload buffer of `max(8 KiB, max_write, max_pages
/// pages)`; the daemon negotiates the default 32 pages.
pub const PAYLOAD_SIZE: usize = 32 * 4096;
/// Entries per queue: requests one CPU's callers can have with the daemon
/// at once before the kernel queues the rest.
pub const DEPTH: u16 = 32;
/// Where every daemon maps the entries' buffers: far from where the kernel
/// puts a program, its heap, libraries and stack.
pub const PREFERRED_BASE: u64 = 0x3f00_0000_0000;

/// Where the entries' buffers are and how many entries there are: saved in
/// the journal so the next daemon maps them at the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Start of the mapping.
    pub base: u64,
    /// Queues (the kernel's possible CPUs).
    pub queues: u16,
    /// Entries per queue.
    pub depth: u16,
}

impl Layout {
    fn slot_span() -> usize {
        HEADERS_SPAN + PAYLOAD_SIZE
    }

    fn len(&self) -> usize {
        self.slots() as usize * Self::slot_span()
    }

    /// Every entry.
    pub fn slots(&self) -> u32 {
        u32::from(self.queues) * u32::from(self.depth)
    }
}

/// The memfd behind the entries, mapped at [`Layout::base`].
struct Area {
    memfd: OwnedFd,
    base: *mut u8,
    len: usize,
}

impl Area {
    /// A new memfd mapped at `PREFERRED_BASE` (or wherever the kernel
    /// chooses if that is taken).
    fn create(queues: u16) -> io::Result<(Area, Layout)> {
        let mut layout = Layout {
            base: PREFERRED_BASE,
            queues,
            depth: DEPTH,
        };
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"luo-fuse-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), layout.len() as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let base = match map(&memfd, layout.base, layout.len(), true) {
            Ok(b) => b,
            Err(_) => map(&memfd, 0, layout.len(), false)?,
        };
        layout.base = base as u64;
        let len = layout.len();
        Ok((Area { memfd, base, len }, layout))
    }

    /// The memfd a killed daemon left with the keeper, at its old address.
    fn adopt(memfd: OwnedFd, layout: &Layout) -> io::Result<Area> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: st is writable for one stat; memfd is a live fd.
        if unsafe { libc::fstat(memfd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded and filled it.
        let size = unsafe { st.assume_init() }.st_size as usize;
        if size != layout.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the ring's buffers are {size} bytes, the journal says {}",
                    layout.len()
                ),
            ));
        }
        let base = map(&memfd, layout.base, layout.len(), true)?;
        let len = layout.len();
        Ok(Area { memfd, base, len })
    }

    fn headers(&self, slot: u32) -> *mut u8 {
        let off = slot as usize * Layout::slot_span();
        assert!(off + Layout::slot_span() <= self.len);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.add(off) }
    }

    fn payload(&self, slot: u32) -> *mut u8 {
        // SAFETY: the payload follows the headers within the slot.
        unsafe { self.headers(slot).add(HEADERS_SPAN) }
    }

    fn read(&self, slot: u32, at: usize, buf: &mut [u8]) {
        assert!(at + buf.len() <= Layout::slot_span());
        // SAFETY: in bounds (asserted); the kernel writes these pages only
        // during this thread's own syscalls, never while it reads them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.headers(slot).add(at), buf.as_mut_ptr(), buf.len())
        }
    }

    fn write(&self, slot: u32, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= Layout::slot_span());
        // SAFETY: as `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.headers(slot).add(at), bytes.len())
        }
    }

    fn commit_id(&self, slot: u32) -> u64 {
        let mut b = [0u8; 8];
        self.read(slot, ENT_COMMIT_ID, &mut b);
        u64::from_ne_bytes(b)
    }

    fn set_commit_id(&self, slot: u32, id: u64) {
        self.write(slot, ENT_COMMIT_ID, &id.to_ne_bytes());
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn map(memfd: &OwnedFd, at: u64, len: usize, fixed: bool) -> io::Result<*mut u8> {
    let flags = libc::MAP_SHARED | if fixed { libc::MAP_FIXED_NOREPLACE } else { 0 };
    // SAFETY: a new shared mapping of our memfd; MAP_FIXED_NOREPLACE never
    // replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            memfd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if fixed && p as u64 != at {
        // A kernel without MAP_FIXED_NOREPLACE took it as a hint.
        // SAFETY: unmaps the mapping just made.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    Ok(p.cast())
}

/// The number of queues the kernel makes: one per possible CPU.
pub fn possible_cpus() -> io::Result<u16> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let last = text
        .trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next())
        .filter_map(|n| n.parse::<u16>().ok())
        .max()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no possible CPUs"))?;
    Ok(last + 1)
}

/// A FUSE connection's io_uring: its entries and the requests they hold.
pub struct Ring {
    uring: IoUring<squeue::Entry128, cqueue::Entry>,
    fuse: i32,
    area: Area,
    layout: Layout,
    /// Entries whose request arrived and is not parsed yet.
    arrived: VecDeque<u32>,
    /// Commits queued since the last submit: (entry, request answered).
    committing: Vec<(u32, u64)>,
    /// Entries with a command the kernel has not completed.
    busy: Vec<bool>,
}

impl Ring {
    /// A ring for the FUSE connection `fuse` with fresh buffers.
    ///
    /// # Errors
    /// The io_uring or the buffers could not be made.
    pub fn create(fuse: BorrowedFd<'_>) -> io::Result<Ring> {
        let (area, layout) = Area::create(possible_cpus()?)?;
        Ring::with(fuse, area, layout)
    }

    /// A ring on buffers a previous daemon registered (see the module).
    ///
    /// # Errors
    /// The memfd is not what `layout` says, its address is taken, or the
    /// io_uring could not be made.
    pub fn adopt(fuse: BorrowedFd<'_>, memfd: OwnedFd, layout: Layout) -> io::Result<Ring> {
        let area = Area::adopt(memfd, &layout)?;
        Ring::with(fuse, area, layout)
    }

    fn with(fuse: BorrowedFd<'_>, area: Area, layout: Layout) -> io::Result<Ring> {
        let entries = (layout.slots() * 2).next_power_of_two();
        let uring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(entries)
            .build(entries)?;
        Ok(Ring {
            uring,
            fuse: fuse.as_raw_fd(),
            area,
            layout,
            arrived: VecDeque::new(),
            committing: Vec::new(),
            busy: vec![false; layout.slots() as usize],
        })
    }

    /// Where the buffers are, for the journal.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The memfd behind the buffers, for the keeper.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.area.memfd.as_fd()
    }

    /// The io_uring fd: readable when a request arrived.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the ring's fd lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.uring.as_raw_fd()) }
    }

    /// Registers every entry that holds no request; returns those that hold
    /// one (a killed daemon fetched it and did not answer): they are served
    /// again by [`Ring::next_request`], like requests the kernel resends.
    ///
    /// # Errors
    /// The kernel refused the commands (it then goes on with `/dev/fuse`).
    pub fn start(&mut self) -> io::Result<usize> {
        // Replies sent again (`commit`) go first: their entries are busy.
        self.flush()?;
        let mut held = 0;
        for slot in 0..self.layout.slots() {
            if self.busy[slot as usize] {
                continue;
            }
            if self.area.commit_id(slot) != 0 {
                self.arrived.push_back(slot);
                held += 1;
            } else {
                self.push_register(slot)?;
            }
        }
        self.uring.submit()?;
        Ok(held)
    }

    fn qid(&self, slot: u32) -> u16 {
        (slot / u32::from(self.layout.depth)) as u16
    }

    /// Queues a command for entry `slot`; `iovecs` (REGISTER's buffers)
    /// become the SQE's two-iovec array.
    fn push(
        &mut self,
        slot: u32,
        cmd_op: u32,
        commit_id: u64,
        iovecs: Option<u64>,
    ) -> io::Result<()> {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid(slot).to_ne_bytes());
        let mut sqe = opcode::UringCmd80::new(types::Fd(self.fuse), cmd_op)
            .cmd(cmd)
            .addr(iovecs)
            .build()
            .user_data(u64::from(slot));
        if iovecs.is_some() {
            sqe = with_len(sqe, 2);
        }
        self.busy[slot as usize] = true;
        loop {
            // SAFETY: the buffers the command names live in the area, which
            // outlives the ring (fields drop in order: uring first).
            if unsafe { self.uring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.uring.submit()?;
        }
    }

    /// Registers entry `slot`'s buffers. The kernel reads the iovecs when
    /// the command is issued, during submit; they live in the slot's header
    /// page, past the kernel's struct (commits name no buffers).
    fn push_register(&mut self, slot: u32) -> io::Result<()> {
        self.area.set_commit_id(slot, 0);
        let iov = [
            libc::iovec {
                iov_base: self.area.headers(slot).cast(),
                iov_len: HEADERS_SIZE,
            },
            libc::iovec {
                iov_base: self.area.payload(slot).cast(),
                iov_len: PAYLOAD_SIZE,
            },
        ];
        let iov_at = HEADERS_SPAN - std::mem::size_of_val(&iov);
        // SAFETY: iovec is plain data; viewed as bytes to copy it.
        let iov_bytes = unsafe {
            std::slice::from_raw_parts(iov.as_ptr().cast::<u8>(), std::mem::size_of_val(&iov))
        };
        self.area.write(slot, iov_at, iov_bytes);
        // SAFETY: in bounds of the slot's header page.
        let iov_ptr = unsafe { self.area.headers(slot).add(iov_at) } as u64;
        self.push(slot, CMD_REGISTER, 0, Some(iov_ptr))
    }

    /// Whether a request arrived (read without entering the kernel).
    pub fn pending(&mut self) -> bool {
        !self.arrived.is_empty() || !self.uring.completion().is_empty()
    }

    /// The next request an entry holds; `Ok(None)` when none arrived.
    ///
    /// # Errors
    /// The connection went away (`ENOTCONN`, `ECONNABORTED`).
    pub fn next_request(&mut self) -> io::Result<Option<(u32, Request)>> {
        if self.arrived.is_empty() {
            self.reap()?;
        }
        while let Some(slot) = self.arrived.pop_front() {
            match self.request_in(slot) {
                Ok(req) => return Ok(Some((slot, req))),
                Err(e) => {
                    crate::log::warn(format_args!("dropping a malformed ring request: {e}"));
                    // Answered with EIO so the entry comes back.
                    let unique = self.area.commit_id(slot);
                    let h = OutHeader {
                        len: 16,
                        error: -libc::EIO,
                        unique,
                    };
                    self.commit(slot, h.as_bytes())?;
                }
            }
        }
        Ok(None)
    }

    fn request_in(&self, slot: u32) -> io::Result<Request> {
        let mut h = [0u8; 40];
        self.area.read(slot, IN_OUT, &mut h);
        let header = InHeader::read_from_bytes(&h).expect("40 bytes");
        let mut sz = [0u8; 4];
        self.area.read(slot, ENT_PAYLOAD_SZ, &mut sz);
        let payload = (u32::from_ne_bytes(sz) as usize).min(PAYLOAD_SIZE);
        let args = (header.len as usize)
            .saturating_sub(40 + payload)
            .min(OP_IN_SIZE);
        let mut bytes = vec![0u8; 40 + args + payload];
        bytes[..40].copy_from_slice(&h);
        self.area.read(slot, OP_IN, &mut bytes[40..40 + args]);
        self.area.read(slot, HEADERS_SPAN, &mut bytes[40 + args..]);
        parse(&bytes)
    }

    /// Takes the completions: requests that arrived, and commands the
    /// kernel refused.
    /// The kernel copies a request into an entry in this thread's task
    /// work, which runs as any syscall returns (`epoll_wait` is cut short
    /// for it), so the completion queue is read without entering the kernel.
    fn reap(&mut self) -> io::Result<()> {
        let mut gone = None;
        let mut lost = Vec::new();
        for cqe in self.uring.completion() {
            let slot = cqe.user_data() as u32;
            if let Some(b) = self.busy.get_mut(slot as usize) {
                *b = false;
            }
            match cqe.result() {
                0 => self.arrived.push_back(slot),
                e if e == -libc::ENOTCONN || e == -libc::ECONNABORTED || e == -libc::ECANCELED => {
                    gone = Some(-e)
                }
                e => {
                    // A commit for a request already answered (a killed
                    // daemon's), or an entry the kernel dropped.
                    crate::log::debug(format_args!(
                        "ring entry {slot}: {}; registering it again",
                        io::Error::from_raw_os_error(-e)
                    ));
                    lost.push(slot);
                }
            }
        }
        if !lost.is_empty() {
            for slot in lost {
                self.push_register(slot)?;
            }
            self.uring.submit()?;
        }
        match gone {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    /// Queues the reply `msg` (header and body, as written to `/dev/fuse`)
    /// to the request entry `slot` holds, with the fetch of its next one;
    /// sent by [`Ring::flush`]. A reply to a request the entry no longer
    /// holds (sent again after a restart) is dropped.
    ///
    /// # Errors
    /// The submission queue could not be flushed.
    pub fn commit(&mut self, slot: u32, msg: &[u8]) -> io::Result<()> {
        let Some(out) = msg
            .get(..16)
            .and_then(|h| OutHeader::read_from_bytes(h).ok())
        else {
            return Ok(());
        };
        if slot >= self.layout.slots() || self.area.commit_id(slot) != out.unique {
            return Ok(());
        }
        let body = &msg[16..];
        if body.len() > PAYLOAD_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "reply too large",
            ));
        }
        self.area.write(slot, IN_OUT, out.as_bytes());
        self.area.write(slot, HEADERS_SPAN, body);
        self.area
            .write(slot, ENT_PAYLOAD_SZ, &(body.len() as u32).to_ne_bytes());
        self.push(slot, CMD_COMMIT_AND_FETCH, out.unique, None)?;
        self.committing.push((slot, out.unique));
        Ok(())
    }

    /// Sends every queued command; an entry whose request is answered is
    /// marked free unless the kernel already put the next one in it.
    ///
    /// # Errors
    /// `io_uring_enter` failed; the commands stay queued.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uring.submit()?;
        for (slot, unique) in std::mem::take(&mut self.committing) {
            if self.area.commit_id(slot) == unique {
                self.area.set_commit_id(slot, 0);
            }
        }
        Ok(())
    }
}

/// Sets `len` (the iovec count) in a 128-byte SQE: the crate's `UringCmd80`
/// has no setter for it, and FUSE wants 2.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const LEN_AT: usize = 24;
    // SAFETY: Entry128 is repr(C) over `struct io_uring_sqe` (64 bytes)
    // and 64 bytes of command, all plain integers: any 128 bytes are a
    // valid value, and `len` is the u32 at byte 24 of the SQE.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(sqe);
        raw[LEN_AT..LEN_AT + 4].copy_from_slice(&len.to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sqe_names_two_iovecs_and_keeps_the_command() {
        let mut cmd = [0u8; 80];
        cmd[8] = 0xab;
        let sqe = opcode::UringCmd80::new(types::Fd(7), CMD_COMMIT_AND_FETCH)
            .cmd(cmd)
            .addr(Some(0x1000))
            .build()
            .user_data(5);
        let sqe = with_len(sqe, 2);
        // SAFETY: as `with_len`.
        let raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        // IORING_OP_URING_CMD
        assert_eq!(raw[0], 46);
        assert_eq!(u32::from_ne_bytes(raw[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(raw[8..12].try_into().unwrap()),
            CMD_COMMIT_AND_FETCH
        );
        assert_eq!(u64::from_ne_bytes(raw[16..24].try_into().unwrap()), 0x1000);
        assert_eq!(u32::from_ne_bytes(raw[24..28].try_into().unwrap()), 2);
        assert_eq!(u64::from_ne_bytes(raw[32..40].try_into().unwrap()), 5);
        assert_eq!(raw[48 + 8], 0xab);
    }

    #[test]
    fn possible_cpus_counts_the_kernels_list() {
        assert!(possible_cpus().unwrap() >= 1);
    }
}
