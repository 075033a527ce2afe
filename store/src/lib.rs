//! The Live Update Orchestrator object model, in userspace.
//!
//! Linux's LUO (`kernel/liveupdate/`) keeps chosen files alive across a kexec.
//! Userspace groups them in named **sessions**: a session created in this boot
//! is *outgoing*; at the update every outgoing session is *frozen* and becomes,
//! in the next boot, an *incoming* session that a program retrieves by name,
//! takes its files back from by token, and *finishes*. Each file type is served
//! by a **file handler** ([`FileHandler`]); state shared by many files lives in
//! an **FLB** ([`Flb`]), preserved with the first file and finished with the last.
//!
//! This crate mirrors `luo_session.c`, `luo_file.c` and `luo_flb.c` of Linux 7.2:
//! same lists, same checks in the same order, same errno. It holds no policy
//! about how fds reach callers; that is the device's job.
//!
//! Unlike the kernel, each session records its [`Owner`] (a uid and a `luo
//! run` tree), and owners other than root are held to [`Limits`]: a refused
//! CREATE_SESSION fails with `EMFILE`, a refused SESSION_PRESERVE_FD with
//! `ENOSPC`, and [`Store::take_refusal`] says which limit refused.

mod errno;
mod flb;
mod handler;
mod image;
mod limits;
mod name;
mod session;
mod store;

pub use errno::{Errno, Result};
pub use flb::{FlbHandover, FlbId, FlbRegistry, FlbStatus};
pub use handler::{FileHandler, FileId, FileState, Flb, Preserved, RetrieveStatus};
pub use image::{
    decode_image, encode_image, journal_header, journal_record, read_journal, FileImage,
    ImageError, SessionDelta, SessionImage, StoreImage, MAX_RECORD,
};
pub use limits::{Count, Limits, Owner, Refusal, Resource, Scope, Tree};
pub use name::{SessionName, SESSION_NAME_LENGTH};
pub use session::{Direction, LuoFile, Session, SessionId};
pub use store::{Changes, Dirty, FreezeFailure, Lookup, Store};

#[cfg(test)]
mod tests;
