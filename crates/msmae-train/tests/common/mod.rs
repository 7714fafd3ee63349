//! A generated grey image table shared by the loader and fit tests.

use std::path::Path;
use std::sync::Arc;

use msmae_data::table::{ImageRow, ImageTableWriter, SCHEMA_VERSION, Split, TableMeta};
use msmae_train::data::ImageTable;

/// `n` flat `size`×`size` single-channel images in row groups of `row_group`; `image(i)`
/// gives image i's split, label and pixel value.
pub fn flat_table(
    dir: &Path,
    size: usize,
    n: u8,
    row_group: usize,
    label_names: [&str; 2],
    image: impl Fn(u8) -> (Split, i32, u8),
) -> Arc<ImageTable> {
    let meta = TableMeta {
        schema_version: SCHEMA_VERSION,
        label_names: label_names.iter().map(|s| s.to_string()).collect(),
        multi_label: false,
        height: size as u32,
        width: size as u32,
        channels: 1,
        has_masks: false,
        bit_depth: 8,
        mask_classes: Vec::new(),
        provenance: serde_json::Value::Null,
    };
    let p = dir.join("images.parquet");
    let mut w = ImageTableWriter::create(&p, meta, row_group).expect("create");
    for i in 0..n {
        let (split, label, value) = image(i);
        w.push(ImageRow {
            id: format!("img{i:02}"),
            patient_id: format!("p{i}"),
            split,
            label: Some(label),
            labels: None,
            width: size as i32,
            height: size as i32,
            channels: 1,
            pixels: vec![value; size * size],
            mask: None,
            source_path: String::new(),
            source_sha256: String::new(),
        })
        .expect("push");
    }
    w.finish().expect("finish");
    Arc::new(ImageTable::open(&p).expect("open"))
}
