//! Dataset ingestion for msmae: sources → one Parquet image table (see [`table`]) with
//! patient-level splits and a split report. Stages: [`synthetic::Synthetic`]
//! (`ingest/synthetic`).

pub mod report;
pub mod synthetic;
pub mod table;

pub use synthetic::Synthetic;
pub use table::{ImageRow, ImageTableWriter, Split, TableMeta};
