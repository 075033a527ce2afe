//! A shared, writable mapping of a whole memfd (`mmap`/`munmap`), read and
//! written through borrows of it (other processes that map the same file
//! see the same pages): guest RAM in the demo, a stash read back after a kexec,
//! the shim check's patterns.

use std::os::fd::{AsRawFd, BorrowedFd};

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
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an fd we hold.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
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
    /// # Panics
    /// If `i` is not below [`Mapping::pages`].
    pub fn page(&self, i: usize) -> &[u64] {
        assert!(i < self.pages(), "page {i} of {}", self.pages());
        // SAFETY: page i lies inside the mapping, which lives as long as
        // self; u64 has no invalid values and the mapping is page-aligned.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * PAGE).cast(), PAGE / 8) }
    }

    /// Page `i` as u64 words, to write.
    ///
    /// # Panics
    /// If `i` is not below [`Mapping::pages`].
    pub fn page_mut(&mut self, i: usize) -> &mut [u64] {
        assert!(i < self.pages(), "page {i} of {}", self.pages());
        // SAFETY: as in `page`; `&mut self` makes the slice the only view
        // of it in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * PAGE).cast(), PAGE / 8) }
    }

    /// The whole mapping as bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is the mapping, alive as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The whole mapping as bytes, to write.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes the slice the only view
        // of it in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory owned by the value; writing
// needs `&mut Mapping`, so shared references only read.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}
