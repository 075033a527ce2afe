//! A shared, writable mapping of a whole memfd (`mmap`/`munmap`), handed
//! out page by page: guest RAM in the demo, a stash read back after a kexec,
//! the shim check's patterns.

use std::os::fd::RawFd;

/// The page size pages are counted in.
pub const PAGE: usize = 4096;

fn errno(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
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
