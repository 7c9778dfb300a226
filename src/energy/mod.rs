//! Energy accounting: meters that report cumulative joules (NVML, RAPL, an
//! estimate from a stated power model, a fake for tests), analytic FLOPs,
//! CO2 conversion, and the attribution of each step's energy to the
//! requests in that step.

pub mod attribution;
pub mod carbon;
pub mod flops;
pub mod meter;

pub use attribution::{Attributor, StepShare};
pub use carbon::Carbon;
pub use flops::FlopCounter;
pub use meter::{open_meter, EnergySource, Meter, MeterChoice, MeterError};
