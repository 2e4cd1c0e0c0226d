//! Medians, quantiles and the summary of runs.

use super::*;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The q-quantile (0..=1) of sorted values, nearest rank.
pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn summarize(runs: &[Figures]) -> BTreeMap<String, Stat> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for f in runs {
        for (k, v) in f {
            all.entry(k.clone()).or_default().push(*v);
        }
    }
    all.into_iter()
        .map(|(k, mut v)| {
            let n = v.len();
            let m = median(&mut v);
            let (min, max) = (v[0], v[n - 1]);
            (
                k,
                Stat {
                    median: m,
                    min,
                    max,
                    n,
                },
            )
        })
        .collect()
}
