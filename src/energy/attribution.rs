//! Splitting measured energy between requests. The engine reads the meter
//! at step boundaries; a step's energy goes to the sequences in it in
//! proportion to their FLOPs in that step, and energy between steps is
//! idle. Every joule the meter reports lands in exactly one place, so the
//! requests' joules plus idle joules equal the meter's total.

use super::meter::{Meter, MeterError};

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepShare {
    /// FLOPs the sequence used in the step.
    pub flops: u64,
}

/// Reads a meter and hands out its deltas.
pub struct Attributor {
    meter: Box<dyn Meter>,
    last: f64,
    idle_total: f64,
    assigned_total: f64,
}

impl Attributor {
    /// Takes the meter's current reading as the starting point.
    pub fn new(mut meter: Box<dyn Meter>) -> Result<Self, MeterError> {
        let last = meter.joules()?;
        Ok(Self {
            meter,
            last,
            idle_total: 0.0,
            assigned_total: 0.0,
        })
    }

    /// The meter.
    pub fn meter(&mut self) -> &mut dyn Meter {
        self.meter.as_mut()
    }

    fn delta(&mut self) -> f64 {
        // A failed read leaves the energy for the next read (nothing is lost).
        match self.meter.joules() {
            Ok(now) => {
                let d = (now - self.last).max(0.0);
                self.last = now;
                d
            }
            Err(e) => {
                eprintln!("greencode: energy meter read failed: {e}");
                0.0
            }
        }
    }

    /// Energy since the last read counts as idle; returns it.
    pub fn idle(&mut self) -> f64 {
        let d = self.delta();
        self.idle_total += d;
        d
    }

    /// Energy since the last read belongs to the step just run; returns each
    /// sequence's joules in proportion to its FLOPs (evenly if none has any).
    pub fn step(&mut self, shares: &[StepShare]) -> Vec<f64> {
        let d = self.delta();
        if shares.is_empty() {
            self.idle_total += d;
            return Vec::new();
        }
        self.assigned_total += d;
        let total: u64 = shares.iter().map(|s| s.flops).sum();
        if total == 0 {
            return vec![d / shares.len() as f64; shares.len()];
        }
        shares.iter().map(|s| d * s.flops as f64 / total as f64).collect()
    }

    /// Joules counted as idle so far.
    pub fn idle_total(&self) -> f64 {
        self.idle_total
    }

    /// Joules given to requests so far.
    pub fn assigned_total(&self) -> f64 {
        self.assigned_total
    }
}

#[cfg(test)]
mod tests {
    use super::super::meter::FakeMeter;
    use super::*;

    #[test]
    fn a_scripted_batch_gets_exact_shares_and_energy_is_conserved() {
        let fake = FakeMeter::default();
        *fake.joules.lock().unwrap() = 100.0; // before start: not counted
        let mut a = Attributor::new(Box::new(fake.clone())).unwrap();
        *fake.joules.lock().unwrap() = 103.0;
        assert_eq!(a.idle(), 3.0);
        *fake.joules.lock().unwrap() = 113.0; // a step of 10 J, FLOPs 1:3
        let got = a.step(&[StepShare { flops: 100 }, StepShare { flops: 300 }]);
        assert_eq!(got, vec![2.5, 7.5]);
        *fake.joules.lock().unwrap() = 119.0; // one sequence alone
        assert_eq!(a.step(&[StepShare { flops: 7 }]), vec![6.0]);
        *fake.joules.lock().unwrap() = 121.0;
        assert_eq!(
            a.step(&[StepShare { flops: 0 }, StepShare { flops: 0 }]),
            vec![1.0, 1.0]
        );
        assert_eq!(a.idle_total() + a.assigned_total(), 21.0);
    }
}
