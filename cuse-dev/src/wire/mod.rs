//! The FUSE and CUSE wire protocol: the structs of `include/uapi/linux/fuse.h`
//! ([`abi`]), a parser that turns request bytes into an [`fuse::Op`] and the
//! answers and replies the daemon makes ([`fuse`]), and the channel on
//! `/dev/fuse` or `/dev/cuse` that reads the one and writes the other
//! (`dev_fuse`).

pub mod abi;
pub(crate) mod dev_fuse;
pub mod fuse;
pub(crate) mod uring;
