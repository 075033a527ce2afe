//! File handlers and FLBs: the userspace mirror of `struct liveupdate_file_ops`
//! and `struct liveupdate_flb_ops` (`include/linux/liveupdate.h`).
//!
//! A handler owns one file type (shmem memfd, hugetlb memfd, …). LUO calls it at
//! each step of a preserved file's life:
//!
//! ```text
//!  outgoing:  can_preserve → preserve ─┬─ unpreserve            (session closed)
//!                                      └─ freeze ─┬─ unfreeze   (update aborted)
//!                                                 └─ (update)
//!  incoming:  retrieve (on demand) … can_finish → finish
//! ```
//!
//! The kernel passes a `u64 serialized_data` between the steps; here it is an
//! opaque byte vector the handler owns ([`FileState::data`]). What must survive
//! the update itself besides those bytes (the memfd's pages, in the kernel kept by
//! KHO) is carried as an fd ([`FileState::carried`]).

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::errno::Result;

/// Identity used to refuse preserving the same object twice (`EBUSY`); the
/// kernel's `get_id` (the inode for memfds).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct FileId {
    /// `st_dev` of the object.
    pub dev: u64,
    /// `st_ino` of the object.
    pub ino: u64,
}

/// Outcome of the first retrieve of an incoming file (`luo_file->retrieve_status`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RetrieveStatus {
    /// Never asked for.
    NotAttempted,
    /// Retrieved; later retrieves return the same file.
    Retrieved,
    /// Retrieve failed with this errno; later retrieves fail the same way.
    Failed(crate::Errno),
}

/// A preserved file as handed to the handler's callbacks.
#[derive(Debug)]
pub struct FileState<'a> {
    /// The live file: the preserved one before the update, the retrieved one
    /// after it (None while an incoming file has not been retrieved).
    pub file: Option<BorrowedFd<'a>>,
    /// The handler's serialized state (`serialized_data`).
    pub data: &'a [u8],
    /// What carries the object across the update, if anything.
    pub carried: Option<BorrowedFd<'a>>,
    /// Result of the first retrieve (incoming files only).
    pub retrieve_status: RetrieveStatus,
}

/// What a successful `preserve` hands back.
#[derive(Debug)]
pub struct Preserved {
    /// Serialized state, passed back to every later callback.
    pub data: Vec<u8>,
}

/// Callbacks of one preservable file type (`struct liveupdate_file_ops`).
pub trait FileHandler: Send {
    /// Unique compatible string ("memfd-v1").
    fn compatible(&self) -> &'static str;

    /// Whether this handler takes the file (`can_preserve`).
    ///
    /// The file is any fd a caller passed. Deciding must never wait on the
    /// file's filesystem (a FUSE or network file's `fstat` can wait forever
    /// on a server that does not answer): recognise the file by something
    /// answered from the inode or the open file alone before anything else.
    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool;

    /// Identity of the underlying object (`get_id`).
    ///
    /// # Errors
    /// The errno of the failing `fstat`.
    fn get_id(&self, file: BorrowedFd<'_>) -> Result<FileId>;

    /// Starts preserving the file (`preserve`).
    ///
    /// # Errors
    /// The kernel's errno for why the file cannot be preserved.
    fn preserve(&self, file: BorrowedFd<'_>) -> Result<Preserved>;

    /// Stops preserving it: the session was closed before an update.
    fn unpreserve(&self, state: &FileState<'_>);

    /// Last step before the update; may refresh the serialized state.
    ///
    /// # Errors
    /// Any errno aborts the update; files already frozen are unfrozen.
    fn freeze(&self, state: &FileState<'_>, data: &mut Vec<u8>) -> Result<()> {
        let _ = (state, data);
        Ok(())
    }

    /// Undoes `freeze` when the update is aborted.
    fn unfreeze(&self, state: &FileState<'_>) {
        let _ = state;
    }

    /// Rebuilds the file in the new epoch from its state (`retrieve`).
    ///
    /// # Errors
    /// The errno reported to every retrieve of this token from now on.
    fn retrieve(&self, state: &FileState<'_>) -> Result<OwnedFd>;

    /// Whether the file may be finished now (`can_finish`).
    fn can_finish(&self, state: &FileState<'_>) -> bool {
        let _ = state;
        true
    }

    /// Releases everything LUO kept for the file (`finish`).
    fn finish(&self, state: &FileState<'_>);

    /// What the preserved object is, for `luo status` (a device's address,
    /// say); None where the handler has nothing to add.
    fn describe(&self, state: &FileState<'_>) -> Option<String> {
        let _ = state;
        None
    }

    /// FLBs this handler's files depend on, in registration order.
    fn flbs(&self) -> Vec<crate::FlbId> {
        Vec::new()
    }
}

/// Global state shared by all files of one or more handlers
/// (`struct liveupdate_flb_ops`).
pub trait Flb: Send {
    /// Unique compatible string.
    fn compatible(&self) -> &'static str;

    /// Called when the first file using the FLB is preserved; returns its
    /// serialized state.
    ///
    /// # Errors
    /// Fails the preserve of that first file.
    fn preserve(&mut self) -> Result<Vec<u8>>;

    /// Called after the last file using the FLB is unpreserved.
    fn unpreserve(&mut self, data: &[u8]);

    /// Called in the new epoch the first time the FLB's object is asked for.
    ///
    /// # Errors
    /// Reported to that caller and to every later one.
    fn retrieve(&mut self, data: &[u8]) -> Result<()>;

    /// Called after the last file using the FLB is finished.
    fn finish(&mut self, data: &[u8]);

    /// The state as it is now, where it changes after the first preserve
    /// (the kernel's FLB object is live; its serialized form is taken at
    /// the update). None keeps what `preserve` returned.
    fn current(&self) -> Option<Vec<u8>> {
        None
    }

    /// What the state holds, for `luo status`; None where there is nothing
    /// to add.
    fn describe(&self, data: &[u8]) -> Option<String> {
        let _ = data;
        None
    }
}
