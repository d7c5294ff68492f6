//! Request arrival times: a Poisson process at `rate` requests/s (exponential gaps), or,
//! with `burstiness` ≠ 1, gamma-distributed gaps of the same mean (shape = burstiness: below
//! 1 burstier, above 1 more regular), as vLLM's benchmark draws them. Seeded: the same seed
//! gives the same schedule.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// Offsets in seconds from the start at which `n` requests are sent. `rate` = None or
/// infinite sends them all at once.
pub fn schedule(n: usize, rate: Option<f64>, burstiness: f64, seed: u64) -> Result<Vec<f64>, String> {
    let Some(rate) = rate.filter(|r| r.is_finite()) else { return Ok(vec![0.0; n]) };
    if rate <= 0.0 {
        return Err(format!("--request-rate {rate}: must be above 0 (or inf)"));
    }
    if !(burstiness.is_finite() && burstiness > 0.0) {
        return Err(format!("--burstiness {burstiness}: must be above 0"));
    }
    // Gamma(shape k, scale θ) has mean kθ: θ = 1 / (rate k) keeps the mean gap 1 / rate.
    let gap = Gamma::new(burstiness, 1.0 / (rate * burstiness)).map_err(|e| e.to_string())?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    Ok((0..n)
        .map(|_| {
            t += gap.sample(&mut rng);
            t
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and coefficient of variation of the gaps.
    fn gap_stats(times: &[f64]) -> (f64, f64) {
        let gaps: Vec<f64> = std::iter::once(times[0]).chain(times.windows(2).map(|w| w[1] - w[0])).collect();
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_gaps_have_mean_one_over_rate_and_unit_coefficient_of_variation() {
        let t = schedule(20_000, Some(4.0), 1.0, 7).unwrap();
        let (mean, cv) = gap_stats(&t);
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.03, "CV {cv}");
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn gamma_gaps_keep_the_mean_and_scale_the_variation_by_one_over_sqrt_burstiness() {
        for k in [0.25, 4.0] {
            let (mean, cv) = gap_stats(&schedule(20_000, Some(2.0), k, 3).unwrap());
            assert!((mean - 0.5).abs() < 0.02, "burstiness {k}: mean gap {mean}");
            let want = 1.0 / f64::sqrt(k);
            assert!((cv - want).abs() < 0.05 * want, "burstiness {k}: CV {cv}, want {want}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_bad_rates_are_refused() {
        assert_eq!(schedule(10, Some(3.0), 1.0, 1).unwrap(), schedule(10, Some(3.0), 1.0, 1).unwrap());
        assert_ne!(schedule(10, Some(3.0), 1.0, 1).unwrap(), schedule(10, Some(3.0), 1.0, 2).unwrap());
        assert_eq!(schedule(3, None, 1.0, 1).unwrap(), [0.0; 3]);
        assert_eq!(schedule(3, Some(f64::INFINITY), 1.0, 1).unwrap(), [0.0; 3]);
        assert!(schedule(3, Some(0.0), 1.0, 1).unwrap_err().contains("--request-rate"));
        assert!(schedule(3, Some(1.0), 0.0, 1).unwrap_err().contains("--burstiness"));
    }
}
