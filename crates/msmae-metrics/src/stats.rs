//! Statistics over repeated runs (seeds): mean ± sample standard deviation, and the paired
//! difference of two methods run on the same seeds with its 95 % Student-t interval (the
//! seeds are the pairs: each seed draws the data, initialisations and masks both methods
//! share, so pairing removes that variance from the comparison).

/// Mean and sample standard deviation (n − 1); sd is 0 for one value, NaN for none.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, sd)
}

/// The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 %).
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        31..=60 => 2.042 - (df - 30) as f64 * (2.042 - 2.000) / 30.0,
        _ => 1.96,
    }
}

/// A paired comparison `a − b` over the same seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    pub n: usize,
    pub mean: f64,
    pub sd: f64,
    /// The 95 % interval of the mean difference (NaN with fewer than 2 pairs).
    pub lo: f64,
    pub hi: f64,
}

impl Paired {
    /// Whether the interval excludes 0.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// `a[i] − b[i]` over the pairs where both are finite.
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).filter(|x| x.is_finite()).collect();
    let (mean, sd) = mean_sd(&d);
    let half = if d.len() > 1 { t975(d.len() - 1) * sd / (d.len() as f64).sqrt() } else { f64::NAN };
    Paired { n: d.len(), mean, sd, lo: mean - half, hi: mean + half }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_intervals_follow_student_t() {
        // d = 1..5: mean 3, sd √2.5, se √0.5, t(4) = 2.776 → 3 ± 1.963
        let p = paired(&[2.0, 4.0, 6.0, 8.0, 10.0], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((p.n, p.mean), (5, 3.0));
        assert!((p.sd - 2.5f64.sqrt()).abs() < 1e-12);
        assert!(
            (p.lo - (3.0 - 2.776 * 0.5f64.sqrt())).abs() < 1e-9 && (p.hi - (3.0 + 2.776 * 0.5f64.sqrt())).abs() < 1e-9
        );
        assert!(p.excludes_zero());
        // Pairing: a constant offset under large between-seed spread is still detected.
        let a = [0.9, 0.5, 0.7, 0.3, 0.6];
        let b: Vec<f64> = a.iter().map(|x| x - 0.05).collect();
        let p = paired(&a, &b);
        assert!(p.excludes_zero() && (p.mean - 0.05).abs() < 1e-12 && p.sd < 1e-12);
        // Non-finite pairs are left out; one pair has no interval.
        let p = paired(&[1.0, f64::NAN], &[0.0, 1.0]);
        assert_eq!(p.n, 1);
        assert!(p.lo.is_nan() && !p.excludes_zero());
    }

    #[test]
    fn t_quantiles_match_the_table_and_approach_the_normal() {
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(4), 2.776);
        assert_eq!(t975(30), 2.042);
        assert!(t975(45) < 2.042 && t975(45) > 2.0);
        assert_eq!(t975(1000), 1.96);
        assert!(t975(0).is_nan());
    }
}
