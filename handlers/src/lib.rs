//! LUO file handlers.
//!
//! One module per preservable file type, each implementing
//! [`luo_store::FileHandler`], the mirror of the kernel's
//! `struct liveupdate_file_ops`. [`register_all`] installs the default set in
//! the order the kernel would try them.

mod mapping;
pub mod mem;
pub mod memfd;
mod sys;
pub mod vfio;

use std::sync::Arc;

use luo_store::{Result, Store};

pub use memfd::{Backing, MemfdHandler, MemfdState, SizeLock};
pub use vfio::VfioHandler;

/// Registers every built-in handler: shmem memfds, then hugetlb memfds.
///
/// # Errors
/// `EEXIST` if one is already registered.
pub fn register_all(store: &mut Store) -> Result<()> {
    store.register_handler(Box::new(MemfdHandler::new(Backing::Shmem)))?;
    store.register_handler(Box::new(MemfdHandler::new(Backing::Hugetlb)))?;
    register_devices(store, vfio::DmaTable::default())
}

/// [`register_all`], with preserved shmem files' sizes fixed by `lock` and
/// devices' DMA recorded in `dma`.
///
/// # Errors
/// `EEXIST` if one is already registered.
pub fn register_all_with(
    store: &mut Store,
    lock: Arc<dyn SizeLock>,
    dma: vfio::DmaTable,
) -> Result<()> {
    store.register_handler(Box::new(MemfdHandler::with_size_lock(Backing::Shmem, lock)))?;
    store.register_handler(Box::new(MemfdHandler::new(Backing::Hugetlb)))?;
    register_devices(store, dma)
}

/// VFIO device cdevs and iommufds, after the memfds (so a journal written
/// before they existed names the same handlers), and the iommufd FLB.
fn register_devices(store: &mut Store, dma: vfio::DmaTable) -> Result<()> {
    let flb = store
        .flbs
        .register(Box::new(vfio::IommufdFlb::new(dma.clone())))?;
    store.register_handler(Box::new(VfioHandler::device(dma.clone(), flb)))?;
    store.register_handler(Box::new(VfioHandler::iommufd(dma, flb)))?;
    Ok(())
}

#[cfg(test)]
mod tests;
