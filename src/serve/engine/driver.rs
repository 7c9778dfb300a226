//! The engine thread's loop over the models it serves. One step runs at a
//! time, whichever model it belongs to, on the whole compute team: models
//! side by side take turns (each model with work runs one step per round)
//! instead of splitting the cores, so no step is slowed by another's
//! threads, and the meter's readings fall into one model's step or into
//! idle time, never into two at once.

use std::cell::RefCell;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use super::scheduler::Engine;
use super::{Accounting, EngineModel, Job};
use crate::metrics::Metrics;

/// How often an idle engine reads the meter (idle energy, power gauge).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Every model's engine, and the process's energy accounting.
pub(super) struct Driver<'a, M> {
    engines: Vec<Engine<'a, M>>,
    acc: &'a RefCell<Accounting>,
    /// Series of the whole process: idle energy, power, GPU memory.
    process: &'a Metrics,
    last_tick: Instant,
}

impl<'a, M: EngineModel> Driver<'a, M> {
    /// Drives `engines` (index = the model's index in submitted jobs).
    pub(super) fn new(engines: Vec<Engine<'a, M>>, acc: &'a RefCell<Accounting>, process: &'a Metrics) -> Self {
        Self {
            engines,
            acc,
            process,
            last_tick: Instant::now(),
        }
    }

    /// Runs until every handle is dropped: takes arriving jobs, and while
    /// any model has work, gives each such model one turn per round.
    pub(super) fn run(&mut self, rx: &std_mpsc::Receiver<(usize, Job)>) {
        loop {
            if self.engines.iter().all(Engine::is_idle) {
                match rx.recv_timeout(IDLE_TICK) {
                    Ok((model, job)) => self.engines[model].push(job),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.record_idle();
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Energy up to now was idle; from here it belongs to steps.
                self.record_idle();
            }
            while let Ok((model, job)) = rx.try_recv() {
                self.engines[model].push(job);
            }
            for engine in self.engines.iter_mut().filter(|e| !e.is_idle()) {
                engine.turn();
            }
        }
    }

    /// Books the energy since the last reading (nothing ran meanwhile) as
    /// idle and updates the process's gauges.
    fn record_idle(&mut self) {
        let mut acc = self.acc.borrow_mut();
        let joules = acc.attributor.idle();
        let secs = self.last_tick.elapsed().as_secs_f64();
        self.last_tick = Instant::now();
        let source = acc.attributor.meter().source().as_str();
        let label = [self.process.model()];
        self.process.add_energy(source, joules, true, acc.carbon.grams(joules));
        if secs > 0.0 {
            self.process.power_watts.with_label_values(&label).set(joules / secs);
        }
        if let Some(mem) = acc.attributor.meter().gpu_memory_bytes() {
            self.process.gpu_memory.with_label_values(&label).set(mem as f64);
        }
    }
}
