//! Memfds the daemon and its tools make: created at a size, and mapped
//! whole (for guest RAM in the demo, for reading a stash back after a kexec,
//! for the shim check's patterns).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

fn errno(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The page size the demo's pages are counted in.
pub const PAGE: usize = 4096;

/// A memfd of `len` bytes (`MFD_CLOEXEC` is always added to `flags`).
///
/// # Errors
/// `memfd_create` or `ftruncate` failures.
pub fn memfd(name: &str, flags: libc::c_uint, len: u64) -> std::io::Result<File> {
    let c = CString::new(name).expect("no NUL");
    // SAFETY: c is a valid C string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(errno("memfd_create"));
    }
    // SAFETY: fresh fd we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len)?;
    Ok(f)
}

/// A sealable memfd of `size` bytes, hugetlb-backed (2 MiB pages) for
/// [`HUGETLB`](crate::shim::HUGETLB), shmem otherwise.
///
/// # Errors
/// What failed, as a sentence.
pub fn memfd_of_kind(name: &str, kind: u32, size: u64) -> Result<OwnedFd, String> {
    let flags = libc::MFD_ALLOW_SEALING
        | if kind == crate::shim::HUGETLB {
            libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
        } else {
            0
        };
    memfd(name, flags, size)
        .map(OwnedFd::from)
        .map_err(|e| format!("a {} MiB memfd: {e}", size >> 20))
}

/// A shared mapping of a whole memfd, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd`, shared and writable.
    ///
    /// # Errors
    /// `mmap` failures.
    pub fn new(fd: RawFd, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an fd we hold.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno("mmap a memfd"));
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Its length in [`PAGE`]s.
    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// Page `i` as u64 words.
    ///
    /// # Safety
    /// No other thread may write page `i` while the slice lives.
    #[expect(
        clippy::mut_from_ref,
        reason = "pages are handed out under the caller's exclusivity contract"
    )]
    pub unsafe fn page(&self, i: usize) -> &mut [u64] {
        // SAFETY: i < pages() keeps the page inside the mapping; the caller
        // guarantees exclusive access to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * PAGE).cast(), PAGE / 8) }
    }

    /// The whole mapping as bytes.
    ///
    /// # Safety
    /// No other thread may use the mapping while the slice lives.
    #[expect(
        clippy::mut_from_ref,
        reason = "the caller vouches for exclusive access"
    )]
    pub unsafe fn bytes(&self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is the mapping; the caller guarantees
        // exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory; access discipline is per page.
unsafe impl Sync for Mapping {}
