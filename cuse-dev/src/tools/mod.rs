//! Tools built on the library and used by nothing in it: `luo bench`,
//! `luo demo`, `luo oracle`, `luo shim-check` with the kexec rows of the
//! benchmark, and `luo vfio-check`.

pub mod bench;
pub mod breakdown;
pub mod demo;
pub mod fdstore;
pub mod oracle;
pub mod shim_check;
pub mod syscall_cost;
pub mod vfio_check;
