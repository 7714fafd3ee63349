//! Evaluation stages of msmae, over the metrics and charts of `msmae-metrics` (re-exported
//! here as [`metrics`], [`plot`] and [`stats`]): two stages, [`EvalClassify`] (`eval/classify`: one model's predictions →
//! metrics, report, ROC and confusion charts) and [`EvalCompare`] (`eval/compare`: several
//! results → one comparison table, with mean ± sd and paired 95 % intervals over seeds).

pub mod classify;
pub mod compare;

pub use classify::{ClassifyConfig, EvalClassify, Metrics};
pub use compare::{CompareConfig, Comparison, EvalCompare};
pub use msmae_metrics::{PlotError, Series, heatmap_chart, line_chart, metrics, plot, stats};

/// Every evaluation stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(EvalClassify).register(EvalCompare);
}
