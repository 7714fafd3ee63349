//! Numbers and charts shared by the evaluation stages and the training library: metrics
//! with scikit-learn semantics ([`metrics`]), paired statistics over seeds ([`stats`]) and
//! PNG charts ([`plot`]). A library, no stages: `msmae-train` draws its curves with it
//! without depending on a stage crate.

pub mod metrics;
pub mod plot;
pub mod stats;

pub use plot::{PlotError, Series, heatmap_chart, line_chart, note_chart};
