//! Calls a caller can make hang, run off the daemon's thread with a deadline.
//!
//! Reading a caller's ioctl struct faults its pages in. A caller can put that
//! struct in a mapping of a file whose filesystem never answers (a FUSE server
//! of its own): the access then sleeps uninterruptibly, and on the daemon's
//! one thread that would stall every other caller — for good. So every access
//! to a caller's memory runs on a helper thread and the daemon waits for it
//! at most [`DEADLINE`]. An access that misses the deadline fails (EFAULT, as
//! a `copy_from_user` that cannot fault the page in); its thread is written
//! off and finishes, or not, on its own. Each uid may have at most
//! [`STUCK_PER_UID`] written-off threads: beyond that its accesses fail at
//! once (EAGAIN) without a thread, so nobody can exhaust the daemon's threads.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use luo_store::{Errno, Result};

use crate::caller::CallerMem;

/// How long the daemon waits for one access to a caller's memory.
pub const DEADLINE: Duration = Duration::from_millis(250);
/// Written-off accesses a uid may have before its accesses fail at once.
pub const STUCK_PER_UID: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// One job's outcome, shared by the daemon and the helper thread.
enum Slot<T> {
    Running,
    Done(T),
    Abandoned,
}

/// Runs jobs on a helper thread, waiting for each at most [`DEADLINE`].
#[derive(Default)]
pub struct Runner {
    worker: std::cell::RefCell<Option<mpsc::Sender<Job>>>,
    /// Written-off jobs still running, per uid.
    stuck: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Runner {
    /// A runner; its helper thread starts with the first job.
    pub fn new() -> Runner {
        Runner::default()
    }

    /// Runs `job` for a caller with uid `uid` and returns its result.
    ///
    /// # Errors
    /// The job missed the deadline, or was not run because the uid has too
    /// many stuck jobs (or no thread could be started).
    pub fn run<T: Send + 'static>(
        &self,
        uid: u32,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> std::result::Result<T, Missed> {
        if self.over_limit(uid) {
            return Err(Missed::TooManyStuck);
        }
        let slot = Arc::new((Mutex::new(Slot::Running), Condvar::new()));
        let theirs = slot.clone();
        let stuck = self.stuck.clone();
        let wrapped: Job = Box::new(move || {
            let value = job();
            let (lock, done) = &*theirs;
            let mut s = lock.lock().expect("slot lock");
            match *s {
                Slot::Abandoned => release(&stuck, uid),
                _ => *s = Slot::Done(value),
            }
            done.notify_one();
        });
        self.submit(wrapped).ok_or(Missed::TooManyStuck)?;
        self.wait(&slot, uid).ok_or(Missed::Deadline)
    }

    /// Whether `uid` has [`STUCK_PER_UID`] stuck jobs: its calls should be
    /// refused before they take anything from it.
    pub fn over_limit(&self, uid: u32) -> bool {
        self.stuck_jobs(uid) >= STUCK_PER_UID
    }

    fn stuck_jobs(&self, uid: u32) -> usize {
        let stuck = self.stuck.lock().expect("stuck lock");
        stuck.get(&uid).copied().unwrap_or(0)
    }

    /// Hands a job to the helper thread, starting one if there is none.
    fn submit(&self, job: Job) -> Option<()> {
        let mut worker = self.worker.borrow_mut();
        if worker.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("caller-mem".into())
                .stack_size(64 << 10)
                .spawn(move || rx.into_iter().for_each(|job| job()))
                .ok()?;
            *worker = Some(tx);
        }
        worker.as_ref().and_then(|w| w.send(job).ok())
    }

    fn wait<T>(&self, slot: &(Mutex<Slot<T>>, Condvar), uid: u32) -> Option<T> {
        let (lock, done) = slot;
        let guard = lock.lock().expect("slot lock");
        let (mut s, _) = done
            .wait_timeout_while(guard, DEADLINE, |s| matches!(s, Slot::Running))
            .expect("slot lock");
        if let Slot::Done(value) = std::mem::replace(&mut *s, Slot::Abandoned) {
            return Some(value);
        }
        // Still running: its thread is written off (it ends when the job
        // does, and then uncharges the uid); the next job gets a new one.
        *self
            .stuck
            .lock()
            .expect("stuck lock")
            .entry(uid)
            .or_default() += 1;
        self.worker.borrow_mut().take();
        None
    }
}

fn release(stuck: &Mutex<HashMap<u32, usize>>, uid: u32) {
    let mut stuck = stuck.lock().expect("stuck lock");
    if let Some(n) = stuck.get_mut(&uid) {
        *n -= 1;
        if *n == 0 {
            stuck.remove(&uid);
        }
    }
}

/// Why a job gave no result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missed {
    /// It was still running at the deadline.
    Deadline,
    /// It was not run: its uid has [`STUCK_PER_UID`] stuck jobs.
    TooManyStuck,
}

/// A caller's memory, every access run through a [`Runner`].
pub struct Guarded {
    /// The memory.
    pub mem: Arc<dyn CallerMem + Send + Sync>,
    /// Whose it is, for the stuck-job limit.
    pub uid: u32,
    /// Where the accesses run.
    pub runner: std::rc::Rc<Runner>,
}

impl Guarded {
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&dyn CallerMem) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mem = self.mem.clone();
        let uid = self.uid;
        match self.runner.run(uid, move || job(&*mem)) {
            Ok(result) => result,
            Err(Missed::Deadline) => {
                crate::log::warn(format_args!(
                    "an access to the memory of a caller with uid {uid} took over {} ms; \
                     the call fails with EFAULT",
                    DEADLINE.as_millis()
                ));
                Err(Errno::EFAULT)
            }
            Err(Missed::TooManyStuck) => {
                crate::log::warn(format_args!(
                    "uid {uid} has {STUCK_PER_UID} accesses to its memory that never \
                     finished; its calls fail with EAGAIN until they do"
                ));
                Err(Errno::EAGAIN)
            }
        }
    }
}

impl CallerMem for Guarded {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        let got = self.run(move |m| {
            let mut v = vec![0u8; len];
            m.read(addr, &mut v).map(|()| v)
        })?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        let bytes = buf.to_vec();
        self.run(move |m| m.write(addr, &bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_finishes_in_time_returns_its_value() {
        let r = Runner::new();
        assert_eq!(r.run(7, || 41 + 1), Ok(42));
        assert_eq!(r.run(7, || "again"), Ok("again"));
    }

    #[test]
    fn a_stuck_job_is_written_off_and_the_next_one_still_runs() {
        let r = Runner::new();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let t = std::time::Instant::now();
        assert_eq!(
            r.run(5, move || release_rx.recv().is_ok()),
            Err(Missed::Deadline)
        );
        assert!(t.elapsed() >= DEADLINE);
        assert_eq!(r.stuck_jobs(5), 1);
        // A new thread serves the next job at once.
        assert_eq!(r.run(5, || 1), Ok(1));
        // When the stuck job ends, its uid is charged no more.
        release_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r.stuck_jobs(5) != 0 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_uid_with_too_many_stuck_jobs_is_refused_at_once_others_are_not() {
        let r = Runner::new();
        let (_keep, rx) = mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..STUCK_PER_UID {
            let rx = rx.clone();
            let job = move || rx.lock().unwrap().recv().is_ok();
            assert_eq!(r.run(9, job), Err(Missed::Deadline));
        }
        let t = std::time::Instant::now();
        assert_eq!(r.run(9, || 1), Err(Missed::TooManyStuck));
        assert!(t.elapsed() < DEADLINE, "refused without waiting");
        assert_eq!(r.run(10, || 2), Ok(2), "another uid is served");
    }
}
