//! FLB registry: first-preserve / last-unpreserve / on-demand retrieve /
//! last-finish reference counting of global state (`kernel/liveupdate/luo_flb.c`).

use crate::errno::{Errno, Result};
use crate::handler::Flb;

/// Index of a registered FLB.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlbId(pub usize);

#[derive(Default, Debug)]
struct Side {
    count: u64,
    data: Vec<u8>,
    /// Incoming only: 0 not attempted, 1 retrieved, <0 failed.
    retrieve_status: i32,
}

struct Slot {
    ops: Box<dyn Flb>,
    outgoing: Side,
    incoming: Side,
}

/// All registered FLBs with their outgoing and incoming counts.
#[derive(Default)]
pub struct FlbRegistry {
    slots: Vec<Slot>,
}

/// Serialized FLB state carried across an update.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlbHandover {
    /// Compatible string of the FLB.
    pub compatible: String,
    /// Number of files depending on it.
    pub count: u64,
    /// Its serialized state.
    pub data: Vec<u8>,
}

/// One registered FLB as `luo status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlbStatus {
    /// Compatible string.
    pub compatible: String,
    /// Outgoing files depending on it.
    pub outgoing: u64,
    /// Incoming files depending on it.
    pub incoming: u64,
    /// Whether its incoming state was retrieved.
    pub retrieved: bool,
    /// What it holds, where it says (its outgoing state, else its incoming).
    pub detail: Option<String>,
}

impl FlbRegistry {
    /// Registers an FLB.
    ///
    /// # Errors
    /// `EEXIST` if one with the same compatible string is registered.
    pub fn register(&mut self, ops: Box<dyn Flb>) -> Result<FlbId> {
        if self
            .slots
            .iter()
            .any(|s| s.ops.compatible() == ops.compatible())
        {
            return Err(Errno::EEXIST);
        }
        self.slots.push(Slot {
            ops,
            outgoing: Side::default(),
            incoming: Side::default(),
        });
        Ok(FlbId(self.slots.len() - 1))
    }

    fn slot(&mut self, id: FlbId) -> Result<&mut Slot> {
        self.slots.get_mut(id.0).ok_or(Errno::ENOENT)
    }

    /// A file of a handler using `ids` is being preserved: take a reference on
    /// each, calling `preserve` on the first. On failure the references already
    /// taken are dropped again.
    ///
    /// # Errors
    /// The first failing FLB `preserve`.
    pub fn file_preserve(&mut self, ids: &[FlbId]) -> Result<()> {
        for (done, &id) in ids.iter().enumerate() {
            if let Err(err) = self.preserve_one(id) {
                self.file_unpreserve(&ids[..done]);
                return Err(err);
            }
        }
        Ok(())
    }

    fn preserve_one(&mut self, id: FlbId) -> Result<()> {
        let slot = self.slot(id)?;
        if slot.outgoing.count == 0 {
            slot.outgoing.data = slot.ops.preserve()?;
        }
        slot.outgoing.count += 1;
        Ok(())
    }

    /// Drops the references of an unpreserved file, in reverse order, calling
    /// `unpreserve` after the last.
    pub fn file_unpreserve(&mut self, ids: &[FlbId]) {
        for &id in ids.iter().rev() {
            let Ok(slot) = self.slot(id) else { continue };
            slot.outgoing.count = slot.outgoing.count.saturating_sub(1);
            if slot.outgoing.count == 0 {
                let data = std::mem::take(&mut slot.outgoing.data);
                slot.ops.unpreserve(&data);
            }
        }
    }

    /// Drops the references of a finished incoming file, calling `finish`
    /// after the last.
    pub fn file_finish(&mut self, ids: &[FlbId]) {
        for &id in ids.iter().rev() {
            let Ok(slot) = self.slot(id) else { continue };
            slot.incoming.count = slot.incoming.count.saturating_sub(1);
            if slot.incoming.count == 0 {
                let data = std::mem::take(&mut slot.incoming.data);
                slot.incoming.retrieve_status = 0;
                slot.ops.finish(&data);
            }
        }
    }

    /// Retrieves an incoming FLB's object on demand
    /// (`liveupdate_flb_get_incoming`): `retrieve` runs once; its result is
    /// remembered.
    ///
    /// # Errors
    /// `ENODATA` if no file of the previous epoch used it; else the
    /// remembered `retrieve` failure.
    pub fn get_incoming(&mut self, id: FlbId) -> Result<()> {
        let slot = self.slot(id)?;
        if slot.incoming.count == 0 {
            return Err(Errno::ENODATA);
        }
        match slot.incoming.retrieve_status {
            1 => Ok(()),
            e if e < 0 => Err(Errno(-e)),
            _ => match slot.ops.retrieve(&slot.incoming.data) {
                Ok(()) => {
                    slot.incoming.retrieve_status = 1;
                    Ok(())
                }
                Err(err) => {
                    slot.incoming.retrieve_status = -err.0;
                    Err(err)
                }
            },
        }
    }

    /// Outgoing reference count (for status and tests).
    pub fn outgoing_count(&self, id: FlbId) -> u64 {
        self.slots.get(id.0).map_or(0, |s| s.outgoing.count)
    }

    /// Incoming reference count (for status and tests).
    pub fn incoming_count(&self, id: FlbId) -> u64 {
        self.slots.get(id.0).map_or(0, |s| s.incoming.count)
    }

    /// Every registered FLB, in registration order.
    pub fn list(&self) -> Vec<FlbStatus> {
        self.slots
            .iter()
            .map(|s| {
                let out = s.outgoing.count > 0;
                let data = if out {
                    s.ops.current().unwrap_or_else(|| s.outgoing.data.clone())
                } else {
                    s.incoming.data.clone()
                };
                FlbStatus {
                    compatible: s.ops.compatible().to_owned(),
                    outgoing: s.outgoing.count,
                    incoming: s.incoming.count,
                    retrieved: s.incoming.retrieve_status == 1,
                    detail: (out || s.incoming.count > 0)
                        .then(|| s.ops.describe(&data))
                        .flatten(),
                }
            })
            .collect()
    }

    /// Serializes every FLB that outgoing files use, as it is now.
    pub fn handover(&self) -> Vec<FlbHandover> {
        self.slots
            .iter()
            .filter(|s| s.outgoing.count > 0)
            .map(|s| FlbHandover {
                compatible: s.ops.compatible().to_owned(),
                count: s.outgoing.count,
                data: s.ops.current().unwrap_or_else(|| s.outgoing.data.clone()),
            })
            .collect()
    }

    /// Serializes every FLB that incoming files use (for a daemon restart).
    pub fn incoming_handover(&self) -> Vec<FlbHandover> {
        self.slots
            .iter()
            .filter(|s| s.incoming.count > 0)
            .map(|s| FlbHandover {
                compatible: s.ops.compatible().to_owned(),
                count: s.incoming.count,
                data: s.incoming.data.clone(),
            })
            .collect()
    }

    /// Loads outgoing FLB state after a daemon restart.
    ///
    /// # Errors
    /// `ENOENT` if an FLB in the handover is not registered.
    pub fn load_outgoing(&mut self, handover: &[FlbHandover]) -> Result<()> {
        for h in handover {
            let slot = self
                .slots
                .iter_mut()
                .find(|s| s.ops.compatible() == h.compatible)
                .ok_or(Errno::ENOENT)?;
            slot.outgoing = Side {
                count: h.count,
                data: h.data.clone(),
                retrieve_status: 0,
            };
        }
        Ok(())
    }

    /// Starts a new epoch: the outgoing state becomes the incoming state.
    /// Incoming FLBs of the epoch before that are dropped, as a kexec does.
    pub fn flip(&mut self) {
        for slot in &mut self.slots {
            if slot.outgoing.count > 0 {
                if let Some(now) = slot.ops.current() {
                    slot.outgoing.data = now;
                }
            }
            slot.incoming = std::mem::take(&mut slot.outgoing);
            slot.incoming.retrieve_status = 0;
        }
    }

    /// Loads incoming FLB state from a handover (daemon restart, real kexec).
    ///
    /// # Errors
    /// `ENOENT` if an FLB in the handover is not registered.
    pub fn load_incoming(&mut self, handover: &[FlbHandover]) -> Result<()> {
        for h in handover {
            let slot = self
                .slots
                .iter_mut()
                .find(|s| s.ops.compatible() == h.compatible)
                .ok_or(Errno::ENOENT)?;
            slot.incoming = Side {
                count: h.count,
                data: h.data.clone(),
                retrieve_status: 0,
            };
        }
        Ok(())
    }
}
