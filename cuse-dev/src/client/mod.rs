//! The client side: `luo run`, which starts a program tree under the seccomp
//! filter whose listener goes to the daemon.

pub mod run;
