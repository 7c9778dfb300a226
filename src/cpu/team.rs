//! The compute team of the fused CPU step: the calling thread plus
//! `threads − 1` helper threads that wait for work by spinning (then,
//! after a bounded while, by parking). A parallel loop hands out its items
//! through one atomic counter and ends when every item is done, so a
//! fork-join costs a few cache-line transfers (≈ 1 µs) instead of a
//! work-stealing pool's wake-up. A decode step runs about 50 of them a
//! token (llama.cpp's threads meet the same way, at barriers).
//!
//! A loop never waits for a helper that has not taken an item: when
//! another process holds a helper's core, the caller takes the items it
//! would have run and goes on (a barrier of all threads, as llama.cpp's,
//! waits for the descheduled one). Spinning is bounded (`SPIN`): a
//! helper that has seen no work for that long yields its core, then parks,
//! so an idle server or a competing process is not starved. A loop started
//! while the team is busy (another thread's step, or a loop inside a loop)
//! runs on its caller alone.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper spins for the next loop before it yields, then parks.
const SPIN: Duration = Duration::from_micros(300);
/// How long a helper keeps yielding its core before it parks.
const YIELD: Duration = Duration::from_millis(2);

/// The team size chosen at start-up (0 = not chosen: the cores available).
static SIZE: AtomicUsize = AtomicUsize::new(0);
static TEAM: OnceLock<Team> = OnceLock::new();

/// Sets the team's size (caller included) before its first use; later
/// calls have no effect once the team exists.
pub fn set_size(threads: usize) {
    SIZE.store(threads.max(1), Ordering::Relaxed);
}

/// Threads a parallel loop runs on (the caller included).
pub fn size() -> usize {
    team().helpers.len() + 1
}

/// Runs `body(i)` for every `i < items`, on the team when it is free and
/// there is more than one item, else on the calling thread; returns when
/// all are done. Items are handed out in order, one at a time, to whichever
/// thread asks first.
pub fn for_each(items: usize, body: impl Fn(usize) + Sync) {
    team().for_each(items, &body);
}

fn team() -> &'static Team {
    TEAM.get_or_init(|| {
        let n = match SIZE.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Team::start(n)
    })
}

/// A loop body with its lifetime erased: valid from the loop's
/// publication until all of its items are done.
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per loop: helpers wake up and look for items when it changes.
    epoch: AtomicU64,
    /// The current loop's items (high 32 bits) and the next one to hand out
    /// (low 32 bits): one word, so a claim is valid for the loop it was
    /// made in even if the claiming helper slept through several loops.
    work: AtomicU64,
    /// Items of the current loop finished.
    done: AtomicUsize,
    /// The current loop's body (written by the caller before it publishes
    /// the loop's `work`).
    job: UnsafeCell<Option<Job>>,
    /// An item panicked in the current loop.
    panicked: AtomicBool,
    /// Per helper: parked (or about to be), so the caller must unpark it.
    asleep: Vec<AtomicBool>,
    /// The team is being dropped: helpers return at the next epoch.
    quit: AtomicBool,
}

// SAFETY: `job` is written only by the thread holding `Team::busy`, when no
// item is claimed and not done (before it publishes the loop's `work`, and
// after the previous loop's items are all done); a helper reads it only
// between claiming an item and counting it done, so the body it points to
// is alive, and `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Team {
    shared: Arc<Shared>,
    /// The helper threads (their `Thread` handles unpark them).
    helpers: Vec<JoinHandle<()>>,
    /// Held by the thread whose loop the team is running.
    busy: AtomicBool,
}

impl Team {
    fn start(threads: usize) -> Self {
        let n = threads.saturating_sub(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            work: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            asleep: (0..n).map(|_| AtomicBool::new(false)).collect(),
            quit: AtomicBool::new(false),
        });
        let mut helpers = Vec::with_capacity(n);
        for i in 0..n {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("greencode-team-{}", i + 1))
                .spawn(move || helper(&shared, i));
            match spawned {
                Ok(handle) => helpers.push(handle),
                // A team smaller than asked computes the same results (a
                // loop waits for its items, not for particular helpers).
                Err(_) => break,
            }
        }
        Self {
            shared,
            helpers,
            busy: AtomicBool::new(false),
        }
    }

    /// [`for_each`] on this team.
    fn for_each(&self, items: usize, body: &(dyn Fn(usize) + Sync)) {
        let fits = u32::try_from(items).is_ok();
        if items <= 1 || !fits || self.helpers.is_empty() || self.busy.swap(true, Ordering::Acquire) {
            (0..items).for_each(body);
            return;
        }
        let result = self.run(items, body);
        self.busy.store(false, Ordering::Release);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    /// Publishes the next epoch and wakes the helpers that parked.
    fn publish(&self) {
        let s = &*self.shared;
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (flag, helper) in s.asleep.iter().zip(&self.helpers) {
            if flag.swap(false, Ordering::SeqCst) {
                helper.thread().unpark();
            }
        }
    }

    /// One loop on the caller and every helper; the caller holds `busy`
    /// and `items` fits in 32 bits.
    fn run(&self, items: usize, body: &(dyn Fn(usize) + Sync)) -> std::thread::Result<()> {
        let s = &*self.shared;
        // SAFETY: see `Shared`; the erased lifetime ends before we return,
        // because we wait below until every item is done.
        unsafe {
            let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(body);
            *s.job.get() = Some(job);
        }
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.work.store((items as u64) << 32, Ordering::Release);
        self.publish();
        run_items(s);
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != items {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                // A helper lost its core in the middle of an item: let it
                // have ours.
                std::thread::yield_now();
            }
        }
        if s.panicked.load(Ordering::Relaxed) {
            return Err(Box::new("an item of a compute-team loop panicked"));
        }
        Ok(())
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        self.publish();
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Claims and runs items of the current loop until none is left.
fn run_items(s: &Shared) {
    loop {
        // A claim past the end changes nothing that matters: the next
        // loop's `work` overwrites the word.
        let claimed = s.work.fetch_add(1, Ordering::Acquire);
        let (items, i) = (claimed >> 32, claimed & u64::from(u32::MAX));
        if i >= items {
            return;
        }
        // SAFETY: see `Shared`: the loop we claimed in published its body
        // first and cannot end before we count the item done.
        let body = unsafe { &*(*s.job.get()).expect("a published loop has a body") };
        if catch_unwind(AssertUnwindSafe(|| body(i as usize))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

/// A helper's life: wait for a new epoch, run what is left of its loop.
fn helper(s: &Shared, index: usize) {
    // The epoch the team started at: a loop published before this thread
    // first ran is still seen as new.
    let mut seen = 0;
    loop {
        seen = wait_for_work(s, index, seen);
        if s.quit.load(Ordering::SeqCst) {
            return;
        }
        run_items(s);
    }
}

/// Waits until the epoch moves past `seen` (spin, then yield, then park)
/// and returns the new epoch.
fn wait_for_work(s: &Shared, index: usize, seen: u64) -> u64 {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = s.epoch.load(Ordering::Acquire);
        if now != seen {
            return now;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let waited = started.elapsed();
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < SPIN + YIELD {
            std::thread::yield_now();
        } else {
            // Announce the nap, then look once more: a caller that bumped
            // the epoch before seeing the flag is caught by this check, one
            // that bumped it after will unpark us (an unpark before the park
            // is not lost).
            s.asleep[index].store(true, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen {
                std::thread::park();
            }
            s.asleep[index].store(false, Ordering::Relaxed);
            return s.epoch.load(Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_exactly_once_in_many_loops() {
        for items in [0usize, 1, 2, 3, 17, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                for_each(items, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{items} items");
            }
        }
    }

    #[test]
    fn a_loop_inside_a_loop_and_loops_from_many_threads_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 8 * 3);
    }

    #[test]
    fn a_loop_published_before_the_helpers_first_run_is_not_missed() {
        // A fresh team runs its first loop at once, often before its
        // helpers have been scheduled; a missed epoch would hang here.
        for _ in 0..200 {
            let team = Team::start(3);
            let done = AtomicUsize::new(0);
            team.for_each(16, &|_| {
                done.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(done.load(Ordering::Relaxed), 16);
        }
    }

    #[test]
    fn helpers_wake_from_their_nap() {
        for_each(4, |_| {});
        // Past the spin and yield windows, helpers are parked.
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(20));
        let done = AtomicUsize::new(0);
        for_each(64, |_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn a_panicking_item_reaches_the_caller_and_the_team_keeps_working() {
        let caught = catch_unwind(|| {
            for_each(64, |i| {
                if i == 40 {
                    panic!("item 40");
                }
            })
        });
        assert!(caught.is_err());
        let done = AtomicUsize::new(0);
        for_each(64, |_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }
}
