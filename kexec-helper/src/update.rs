//! The simulated update: the sequence a kexec would run, in place.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::workload::{Workload, WorkloadError};

/// What an update acts on: the daemon's sessions.
pub trait Updatable {
    /// Serves requests that are waiting on the daemon, so that processes
    /// blocked in one can be frozen or can exit.
    fn serve(&mut self);

    /// Freezes every outgoing session; on failure nothing is left frozen.
    ///
    /// # Errors
    /// Which file refused, as a sentence.
    fn freeze_sessions(&mut self) -> Result<(), String>;

    /// Makes the frozen outgoing sessions incoming; returns the new epoch.
    fn flip(&mut self) -> u64;
}

/// Why an update failed.
#[derive(Debug, Error)]
pub enum UpdateError {
    /// The old workload could not be frozen; nothing changed.
    #[error("update aborted, nothing changed: the old workload could not be stopped")]
    Freeze(#[source] WorkloadError),
    /// A session refused to freeze; nothing changed.
    #[error("update aborted, nothing changed: {0}")]
    Sessions(String),
    /// The epoch flipped but the old workload could not be ended.
    #[error("updated to epoch {epoch}, but the old workload could not be ended")]
    End {
        /// The new epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: WorkloadError,
    },
}

/// What an update did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// The epoch now running.
    pub epoch: u64,
    /// Processes of the old epoch that were ended.
    pub ended: usize,
    /// From freezing the workload to the new epoch being ready.
    pub took: Duration,
}

/// Runs a simulated update: freeze the old workload, freeze the sessions,
/// flip the epoch, end the old workload. Without a workload tracker the
/// processes are left running.
///
/// # Errors
/// See [`UpdateError`]; every error before the flip leaves everything as it
/// was.
pub fn simulate(
    target: &mut dyn Updatable,
    workload: Option<&mut Workload>,
) -> Result<Report, UpdateError> {
    let start = Instant::now();
    let Some(workload) = workload else {
        target.freeze_sessions().map_err(UpdateError::Sessions)?;
        let epoch = target.flip();
        return Ok(Report {
            epoch,
            ended: 0,
            took: start.elapsed(),
        });
    };
    if let Err(e) = workload.freeze(&mut || target.serve()) {
        workload.thaw();
        return Err(UpdateError::Freeze(e));
    }
    if let Err(e) = target.freeze_sessions() {
        workload.thaw();
        return Err(UpdateError::Sessions(e));
    }
    let ended = workload.pids().len();
    let epoch = target.flip();
    workload
        .end(epoch, &mut || target.serve())
        .map_err(|source| UpdateError::End { epoch, source })?;
    Ok(Report {
        epoch,
        ended,
        took: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        log: Vec<&'static str>,
        refuse: bool,
        epoch: u64,
    }

    impl Updatable for Fake {
        fn serve(&mut self) {}
        fn freeze_sessions(&mut self) -> Result<(), String> {
            self.log.push("freeze");
            if self.refuse {
                Err("token 0x1 refused".into())
            } else {
                Ok(())
            }
        }
        fn flip(&mut self) -> u64 {
            self.log.push("flip");
            self.epoch += 1;
            self.epoch
        }
    }

    #[test]
    fn refused_freeze_changes_nothing() {
        let mut f = Fake {
            refuse: true,
            ..Fake::default()
        };
        let err = simulate(&mut f, None).unwrap_err();
        assert_eq!(f.log, ["freeze"]);
        assert_eq!(
            err.to_string(),
            "update aborted, nothing changed: token 0x1 refused"
        );
    }

    #[test]
    fn successful_update_flips_once() {
        let mut f = Fake::default();
        let r = simulate(&mut f, None).unwrap();
        assert_eq!((r.epoch, f.log.as_slice()), (1, &["freeze", "flip"][..]));
    }
}
