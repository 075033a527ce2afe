//! Live updates.
//!
//! A live update ends one "boot" and starts the next: every outgoing session
//! is frozen, the old boot's workload goes away, and what was outgoing becomes
//! incoming. In the kernel that is `kexec`; here it can also be simulated in
//! place ([`simulate`]), in which case the workload is every process started
//! under `luo run` in the epoch that ends, tracked in a cgroup ([`Workload`]).
//! A real kexec ([`kexec`]) loads the next kernel, lets the daemon stash what
//! must survive ([`shim`], [`handover`]), and jumps; VFIO devices are made
//! again in the next kernel from their record ([`devices`]).

pub mod devices;
pub mod failpoint;
pub mod handover;
pub mod kexec;
pub mod shim;
mod sys;
mod update;
mod workload;

pub use update::{simulate, Report, Updatable, UpdateError};
pub use workload::{cgroup2_mount, Workload, WorkloadError};
