//! Dataset ingestion for msmae: sources → one Parquet image table (see [`table`]) with
//! patient-level splits, a split report and a preview sheet. Stages:
//! [`synthetic::Synthetic`] (`ingest/synthetic`), [`imagefolder::ImageFolder`]
//! (`ingest/imagefolder`), [`ham10000::Ham10000`] (`ingest/ham10000`), [`chestxray14::ChestXray14`]
//! (`ingest/chestxray14`), [`messidor2::Messidor2`] (`ingest/messidor2`),
//! [`manifest::Manifest`] (`ingest/manifest`).

pub mod attention;
pub mod chestxray14;
pub mod decode;
pub mod dicom;
pub mod fixtures;
pub mod ham10000;
pub mod imagefolder;
pub mod ingest;
pub mod manifest;
pub mod messidor2;
pub mod meta;
pub mod predictions;
pub mod preview;
pub mod report;
pub mod synthetic;
pub mod table;

pub use attention::{ATTENTION_SCHEMA_VERSION, AttentionMeta, AttentionRow, read_attention, write_attention};
pub use chestxray14::ChestXray14;
pub use ham10000::Ham10000;
pub use imagefolder::ImageFolder;
pub use manifest::Manifest;
pub use messidor2::Messidor2;
pub use predictions::{PREDICTIONS_SCHEMA_VERSION, PredictionMeta, PredictionRow, read_predictions, write_predictions};
pub use synthetic::Synthetic;
pub use table::{ImageRow, ImageTableWriter, Split, TableMeta};

/// Every ingestion stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(Synthetic)
        .register(ImageFolder)
        .register(Ham10000)
        .register(ChestXray14)
        .register(Messidor2)
        .register(Manifest);
}
