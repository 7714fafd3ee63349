//! Evaluation for msmae: classification metrics with scikit-learn's semantics
//! ([`metrics`]), PNG charts with text ([`plot`], also used by the training stages for loss
//! curves), and two stages: [`EvalClassify`] (`eval/classify`: one model's predictions →
//! metrics, report, ROC and confusion charts) and [`EvalCompare`] (`eval/compare`: several
//! results → one comparison table); [`stats`]: mean ± sd and paired 95 % intervals over
//! seeds.

pub mod classify;
pub mod compare;
pub mod metrics;
pub mod plot;
pub mod stats;

pub use classify::{ClassifyConfig, EvalClassify, Metrics};
pub use compare::{CompareConfig, Comparison, EvalCompare};
pub use plot::{PlotError, Series, heatmap_chart, line_chart};

/// Every evaluation stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(EvalClassify).register(EvalCompare);
}
