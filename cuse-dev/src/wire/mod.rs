//! The FUSE and CUSE wire protocol: the structs of `include/uapi/linux/fuse.h`
//! ([`abi`]), and a channel on `/dev/fuse` or `/dev/cuse` with a parser that
//! turns request bytes into an [`fuse::Op`] and replies into bytes
//! ([`fuse`]).

pub mod abi;
pub mod fuse;
