//! CO2 from energy: grams = kWh × grid intensity (gCO2e/kWh) × PUE.

/// The carbon model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Carbon {
    /// Grid carbon intensity, gCO2e per kWh (CodeCarbon's world average: 475).
    pub grid_intensity: f64,
    /// Power usage effectiveness of the data centre (≥ 1).
    pub pue: f64,
}

impl Default for Carbon {
    fn default() -> Self {
        Self {
            grid_intensity: 475.0,
            pue: 1.0,
        }
    }
}

impl Carbon {
    /// Checks the values a user gave.
    pub fn new(grid_intensity: f64, pue: f64) -> Result<Self, String> {
        if !(grid_intensity.is_finite() && grid_intensity >= 0.0) {
            return Err(format!(
                "--grid-intensity must be a number ≥ 0 (gCO2e/kWh), got {grid_intensity}"
            ));
        }
        if !(pue.is_finite() && pue >= 1.0) {
            return Err(format!("--pue must be a number ≥ 1.0, got {pue}"));
        }
        Ok(Self { grid_intensity, pue })
    }

    /// Grams of CO2e for `joules`.
    pub fn grams(&self, joules: f64) -> f64 {
        joules / 3.6e6 * self.grid_intensity * self.pue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_kwh_at_the_world_average_is_475_grams() {
        assert!((Carbon::default().grams(3.6e6) - 475.0).abs() < 1e-9);
        let c = Carbon::new(100.0, 1.5).unwrap();
        assert!((c.grams(7.2e6) - 300.0).abs() < 1e-9);
        assert!((c.grams(36.0) - 0.0015).abs() < 1e-12);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Carbon::new(-1.0, 1.0).unwrap_err().contains("--grid-intensity"));
        assert!(Carbon::new(475.0, 0.5).unwrap_err().contains("--pue"));
        assert!(Carbon::new(f64::NAN, 1.0).is_err());
    }
}
