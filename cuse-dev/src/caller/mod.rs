//! The calling process: its memory (the ioctl struct) and its fds
//! (`process_vm`), calls into it that it could make hang, run with a deadline
//! ([`deadline`]), who owns what and how much more it may hold ([`owners`]),
//! and the seccomp bridge that lets the daemon install an fd in it
//! ([`seccomp`]).

pub mod deadline;
pub mod owners;
mod process_vm;
pub mod seccomp;

pub use process_vm::{comm, pidfd_getfd, pidfd_open, PinnedVm, ProcessVm};
