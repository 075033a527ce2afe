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

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

use luo_store::{Errno, Result};

use crate::uapi::CallerMem;

/// How long the daemon waits for one access to a caller's memory.
pub const DEADLINE: Duration = Duration::from_millis(250);
/// Written-off accesses a uid may have before its accesses fail at once.
pub const STUCK_PER_UID: usize = 4;
/// How long the helper keeps looking for the next job before it sleeps, and
/// the daemon for a job's end before it sleeps: an ioctl makes two or three
/// accesses a few microseconds apart, and waking a sleeping thread costs far
/// more than that on a virtual machine (an inter-processor interrupt).
const SPIN: Duration = Duration::from_micros(200);

type Job = Box<dyn FnOnce() + Send>;

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

/// One job's outcome, shared by the daemon and the helper thread.
struct Slot<T> {
    state: AtomicU8,
    value: Mutex<Option<T>>,
    /// The daemon's thread, woken when the job ends.
    waiter: Thread,
}

/// The helper thread's mailbox.
struct Worker {
    job: Mutex<Option<Job>>,
    has_job: AtomicBool,
    /// Written off: end after the job at hand.
    retired: AtomicBool,
    thread: Thread,
}

/// Runs jobs on a helper thread, waiting for each at most [`DEADLINE`].
#[derive(Default)]
pub struct Runner {
    worker: RefCell<Option<Arc<Worker>>>,
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
        let slot = Arc::new(Slot {
            state: AtomicU8::new(RUNNING),
            value: Mutex::new(None),
            waiter: std::thread::current(),
        });
        let theirs = slot.clone();
        let stuck = self.stuck.clone();
        let wrapped: Job = Box::new(move || {
            let value = job();
            *theirs.value.lock().expect("slot lock") = Some(value);
            let ended =
                theirs
                    .state
                    .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire);
            match ended {
                Ok(_) => theirs.waiter.unpark(),
                Err(_) => release(&stuck, uid),
            }
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
            *worker = Some(spawn_worker()?);
        }
        let w = worker.as_ref()?;
        *w.job.lock().expect("job lock") = Some(job);
        w.has_job.store(true, Ordering::Release);
        w.thread.unpark();
        Some(())
    }

    fn wait<T>(&self, slot: &Slot<T>, uid: u32) -> Option<T> {
        let start = Instant::now();
        loop {
            if slot.state.load(Ordering::Acquire) == DONE {
                return slot.value.lock().expect("slot lock").take();
            }
            let waited = start.elapsed();
            if waited >= DEADLINE {
                break;
            }
            if waited < SPIN {
                spin();
            } else {
                std::thread::park_timeout(DEADLINE - waited);
            }
        }
        // Still running: its thread is written off (it ends when the job
        // does, and then uncharges the uid); the next job gets a new one.
        if let Some(w) = self.worker.borrow_mut().take() {
            w.retired.store(true, Ordering::Release);
            w.thread.unpark();
        }
        *self
            .stuck
            .lock()
            .expect("stuck lock")
            .entry(uid)
            .or_default() += 1;
        let abandoned =
            slot.state
                .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
        if abandoned.is_err() {
            // It ended just now after all.
            release(&self.stuck, uid);
            return slot.value.lock().expect("slot lock").take();
        }
        None
    }
}

/// One turn of a busy wait that lets anything else runnable go first now
/// and then.
fn spin() {
    for _ in 0..64 {
        std::hint::spin_loop();
    }
    std::thread::yield_now();
}

fn spawn_worker() -> Option<Arc<Worker>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("caller-mem".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let worker = Arc::new(Worker {
                job: Mutex::new(None),
                has_job: AtomicBool::new(false),
                retired: AtomicBool::new(false),
                thread: std::thread::current(),
            });
            if tx.send(worker.clone()).is_ok() {
                serve(&worker);
            }
        })
        .ok()?;
    rx.recv().ok()
}

/// The helper thread: runs each job handed over, spinning a little for the
/// next before it sleeps; ends once written off.
fn serve(w: &Worker) {
    let mut idle_since = Instant::now();
    while !w.retired.load(Ordering::Acquire) {
        if w.has_job.swap(false, Ordering::AcqRel) {
            let job = w.job.lock().expect("job lock").take();
            if let Some(job) = job {
                job();
            }
            idle_since = Instant::now();
        } else if idle_since.elapsed() < SPIN {
            spin();
        } else {
            std::thread::park();
        }
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

/// A caller's memory, every access run through a [`Runner`]. Once one access
/// misses the deadline, the others of the same call fail at once: the access
/// left waiting most likely holds the caller's address-space lock.
pub struct Guarded {
    mem: Arc<dyn CallerMem + Send + Sync>,
    uid: u32,
    runner: std::rc::Rc<Runner>,
    missed: std::cell::Cell<bool>,
}

impl Guarded {
    /// The memory `mem` of a caller with uid `uid`, reached through `runner`.
    pub fn new(
        mem: Arc<dyn CallerMem + Send + Sync>,
        uid: u32,
        runner: &std::rc::Rc<Runner>,
    ) -> Guarded {
        Guarded {
            mem,
            uid,
            runner: runner.clone(),
            missed: std::cell::Cell::new(false),
        }
    }

    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&dyn CallerMem) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if self.missed.get() {
            return Err(Errno::EFAULT);
        }
        let mem = self.mem.clone();
        let uid = self.uid;
        match self.runner.run(uid, move || job(&*mem)) {
            Ok(result) => result,
            Err(Missed::Deadline) => {
                self.missed.set(true);
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
    use std::sync::mpsc;

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

    /// Memory whose first read never ends (until the test lets it go).
    struct Hangs(Mutex<mpsc::Receiver<()>>);

    impl CallerMem for Hangs {
        fn read(&self, _addr: u64, _buf: &mut [u8]) -> Result<()> {
            let _ = self.0.lock().unwrap().recv();
            Ok(())
        }
        fn write(&self, _addr: u64, _buf: &[u8]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn after_one_access_misses_the_deadline_the_rest_of_the_call_fails_at_once() {
        let runner = std::rc::Rc::new(Runner::new());
        let (release, rx) = mpsc::channel();
        let mem = Guarded::new(Arc::new(Hangs(Mutex::new(rx))), 3, &runner);
        let mut buf = [0u8; 4];
        assert_eq!(mem.read(0x1000, &mut buf), Err(Errno::EFAULT));
        let t = std::time::Instant::now();
        assert_eq!(mem.write(0x1000, &buf), Err(Errno::EFAULT));
        assert!(t.elapsed() < DEADLINE, "failed without waiting again");
        assert_eq!(runner.stuck_jobs(3), 1, "one thread written off, not two");
        release.send(()).unwrap();
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
