//! The client side: the LUO ioctls as a program makes them (`ioctl`),
//! and `luo run`, which starts a program tree under the seccomp filter
//! whose listener goes to the daemon ([`run`]).

pub(crate) mod ioctl;
pub mod run;
