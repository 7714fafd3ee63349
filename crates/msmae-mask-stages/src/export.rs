//! Exported mask plans, for audits and figures: the masks a training step *would* draw for
//! a few images, written as a Parquet table (`masks.parquet`) and a picture (`masks.png`).
//! Training itself draws its masks on the fly from the seeded RNG (docs/method.md §3.5), so
//! these files are never read back by the pipeline.
//!
//! `masks.parquet`:
//!
//! | column | type | |
//! |---|---|---|
//! | id | utf8 | image id |
//! | row_index | uint64 | 0-based row of the image in the attention table (the RNG key) |
//! | epoch | uint64 | |
//! | states | `list<uint8>` | per patch, row-major: 0 visible, 1 masked, 2 thrown |
//!
//! Footer key `msmae.masks` holds [`MasksMeta`] as JSON.
//!
//! `masks.png`: one line per image: its weight map as a grayscale heat map (white = the
//! row's highest weight, black = 0), then one panel per exported epoch with the patch
//! states coloured [`VISIBLE_RGB`] (green), [`MASKED_RGB`] (red) and [`THROWN_RGB`]
//! (blue); every patch is an `s`×`s` block (nearest-neighbour upscaling), every panel
//! framed in grey.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ListArray, ListBuilder, RecordBatch, StringArray, UInt8Array, UInt8Builder, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use msmae_data::table::TableError;

use msmae_mask::MaskPolicy;

/// Bump when the masks table's columns or their meaning change.
pub const MASKS_SCHEMA_VERSION: u32 = 1;

/// Footer metadata key of `masks.parquet`.
pub const MASKS_META_KEY: &str = "msmae.masks";

/// How each exported plan's RNG is keyed (recorded in the footer and in `summary.json`).
pub const MASKS_RNG_KEY: &str = "msmae_mask::sample_rng(seed, \"mask\", epoch, row_index): row_index = 0-based row of the image in the input attention table; weights = that row renormalised to sum 1, no augmentation (identity crop, no flip)";

/// Colour of visible patches in `masks.png`.
pub const VISIBLE_RGB: [u8; 3] = [60, 180, 75];
/// Colour of masked patches in `masks.png`.
pub const MASKED_RGB: [u8; 3] = [230, 25, 75];
/// Colour of thrown patches in `masks.png`.
pub const THROWN_RGB: [u8; 3] = [0, 130, 200];
/// Colour of the 1-pixel frame around each panel of `masks.png`.
const FRAME_RGB: [u8; 3] = [150, 150, 150];

/// Table-wide facts of `masks.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasksMeta {
    pub schema_version: u32,
    /// Patch grid `[rows, columns]`.
    pub grid: [u32; 2],
    pub policy: MaskPolicy,
    /// Run seed the plans were drawn with.
    pub seed: u64,
    /// [`MASKS_RNG_KEY`].
    pub rng_key: String,
    pub provenance: serde_json::Value,
}

/// One exported plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskRecord {
    pub id: String,
    pub row_index: u64,
    pub epoch: u64,
    /// [`msmae_mask::MaskPlan::states`]: 0 visible, 1 masked, 2 thrown.
    pub states: Vec<u8>,
}

fn format_err(path: &Path, message: impl Into<String>) -> TableError {
    TableError::Format { path: path.into(), message: message.into() }
}

/// Write exported plans; checks that every plan covers the grid with states 0–2.
pub fn write_masks(path: &Path, meta: &MasksMeta, records: &[MaskRecord]) -> Result<u64, TableError> {
    let l = meta.grid[0] as usize * meta.grid[1] as usize;
    for r in records {
        if r.states.len() != l {
            return Err(format_err(
                path,
                format!("row `{}` epoch {}: {} states for a grid of {l} patches", r.id, r.epoch, r.states.len()),
            ));
        }
        if let Some(s) = r.states.iter().find(|s| **s > 2) {
            return Err(format_err(
                path,
                format!("row `{}` epoch {}: state {s} is not 0 (visible), 1 (masked) or 2 (thrown)", r.id, r.epoch),
            ));
        }
    }
    let item = Arc::new(Field::new("item", DataType::UInt8, false));
    let md = HashMap::from([(
        MASKS_META_KEY.to_string(),
        serde_json::to_string(meta).map_err(|e| format_err(path, format!("footer metadata: {e}")))?,
    )]);
    let schema = Arc::new(
        Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("row_index", DataType::UInt64, false),
            Field::new("epoch", DataType::UInt64, false),
            Field::new("states", DataType::List(item.clone()), false),
        ])
        .with_metadata(md),
    );
    let mut states = ListBuilder::new(UInt8Builder::with_capacity(records.len() * l)).with_field(item);
    for r in records {
        states.values().append_slice(&r.states);
        states.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.id.as_str()))),
        Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.row_index))),
        Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.epoch))),
        Arc::new(states.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| format_err(path, e.to_string()))?;
    let file = File::create(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let props = WriterProperties::builder().set_created_by(format!("msmae {}", env!("CARGO_PKG_VERSION"))).build();
    let perr = |e: parquet::errors::ParquetError| format_err(path, e.to_string());
    let mut w = ArrowWriter::try_new(file, schema, Some(props)).map_err(perr)?;
    w.write(&batch).map_err(perr)?;
    w.close().map_err(perr)?;
    Ok(records.len() as u64)
}

/// Read `masks.parquet` back (audits, tests).
pub fn read_masks(path: &Path) -> Result<(MasksMeta, Vec<MaskRecord>), TableError> {
    let f = File::open(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| format_err(path, format!("not a readable Parquet file: {e}")))?;
    let text =
        b.schema().metadata().get(MASKS_META_KEY).cloned().ok_or_else(|| {
            format_err(path, format!("not an msmae masks table (no `{MASKS_META_KEY}` footer metadata)"))
        })?;
    let meta: MasksMeta = serde_json::from_str(&text)
        .map_err(|e| format_err(path, format!("footer metadata `{MASKS_META_KEY}`: {e}")))?;
    if meta.schema_version != MASKS_SCHEMA_VERSION {
        return Err(format_err(
            path,
            format!(
                "masks table schema version {} is not supported (expected {MASKS_SCHEMA_VERSION})",
                meta.schema_version
            ),
        ));
    }
    let mut out = Vec::new();
    for batch in b.build().map_err(|e| format_err(path, e.to_string()))? {
        let batch = batch.map_err(|e| format_err(path, e.to_string()))?;
        let col = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| format_err(path, format!("missing column `{name}`")))
        };
        let typed = |name: &str| format_err(path, format!("column `{name}` has the wrong type"));
        let (id, ri, ep, st) = (col("id")?, col("row_index")?, col("epoch")?, col("states")?);
        let id = id.as_any().downcast_ref::<StringArray>().ok_or_else(|| typed("id"))?;
        let ri = ri.as_any().downcast_ref::<UInt64Array>().ok_or_else(|| typed("row_index"))?;
        let ep = ep.as_any().downcast_ref::<UInt64Array>().ok_or_else(|| typed("epoch"))?;
        let st = st.as_any().downcast_ref::<ListArray>().ok_or_else(|| typed("states"))?;
        for r in 0..batch.num_rows() {
            let v = st.value(r);
            let v = v.as_any().downcast_ref::<UInt8Array>().ok_or_else(|| typed("states"))?;
            out.push(MaskRecord {
                id: id.value(r).to_string(),
                row_index: ri.value(r),
                epoch: ep.value(r),
                states: v.values().to_vec(),
            });
        }
    }
    Ok((meta, out))
}

/// One line of the figure: an image's weight map and its plans' states (one per epoch).
#[derive(Debug, Clone, Copy)]
pub struct FigureLine<'a> {
    pub weights: &'a [f32],
    pub states: &'a [&'a [u8]],
}

/// The `masks.png` figure (see the module docs). Each patch is drawn as a block of at
/// least 4 pixels, and panels at least 64 pixels wide, whatever the grid. Entries beyond
/// `grid[0]·grid[1]` are ignored; shorter lines are drawn as far as they go.
pub fn figure(grid: [u32; 2], lines: &[FigureLine<'_>]) -> image::RgbImage {
    let (gh, gw) = (grid[0].max(1), grid[1].max(1));
    let s = 64u32.div_ceil(gh.max(gw)).max(4);
    let (ph, pw, pad) = (gh * s, gw * s, 4u32);
    let panels = lines.iter().map(|l| 1 + l.states.len() as u32).max().unwrap_or(1);
    let mut img = image::RgbImage::from_pixel(
        pad + panels * (pw + pad),
        pad + (lines.len().max(1) as u32) * (ph + pad),
        image::Rgb([255, 255, 255]),
    );
    let block = |img: &mut image::RgbImage, panel: u32, line: u32, patch: u32, rgb: [u8; 3]| {
        let (ox, oy) = (pad + panel * (pw + pad) + (patch % gw) * s, pad + line * (ph + pad) + (patch / gw) * s);
        for y in oy..oy + s {
            for x in ox..ox + s {
                img.put_pixel(x, y, image::Rgb(rgb));
            }
        }
    };
    // A grey frame around each panel, so that a uniform (all-white) heat map stays visible.
    let frame = |img: &mut image::RgbImage, panel: u32, line: u32| {
        let (ox, oy) = (pad + panel * (pw + pad) - 1, pad + line * (ph + pad) - 1);
        for x in ox..ox + pw + 2 {
            img.put_pixel(x, oy, image::Rgb(FRAME_RGB));
            img.put_pixel(x, oy + ph + 1, image::Rgb(FRAME_RGB));
        }
        for y in oy..oy + ph + 2 {
            img.put_pixel(ox, y, image::Rgb(FRAME_RGB));
            img.put_pixel(ox + pw + 1, y, image::Rgb(FRAME_RGB));
        }
    };
    let l = (gh * gw) as usize;
    for (li, line) in lines.iter().enumerate() {
        for panel in 0..1 + line.states.len() as u32 {
            frame(&mut img, panel, li as u32);
        }
        let max = line.weights.iter().copied().filter(|w| w.is_finite()).fold(0.0f32, f32::max);
        for (p, &w) in line.weights.iter().take(l).enumerate() {
            let v = if max > 0.0 && w.is_finite() { (w / max).clamp(0.0, 1.0) * 255.0 } else { 0.0 };
            block(&mut img, 0, li as u32, p as u32, [v.round() as u8; 3]);
        }
        for (e, states) in line.states.iter().enumerate() {
            for (p, &st) in states.iter().take(l).enumerate() {
                let rgb = match st {
                    0 => VISIBLE_RGB,
                    1 => MASKED_RGB,
                    _ => THROWN_RGB,
                };
                block(&mut img, 1 + e as u32, li as u32, p as u32, rgb);
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_round_trip_and_bad_states_are_rejected() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("masks.parquet");
        let meta = MasksMeta {
            schema_version: MASKS_SCHEMA_VERSION,
            grid: [2, 2],
            policy: MaskPolicy::Msmae { mask_ratio: 0.5, throw_ratio: 0.25 },
            seed: 3,
            rng_key: MASKS_RNG_KEY.into(),
            provenance: serde_json::json!({}),
        };
        let recs = vec![
            MaskRecord { id: "a".into(), row_index: 4, epoch: 0, states: vec![1, 2, 0, 1] },
            MaskRecord { id: "a".into(), row_index: 4, epoch: 1, states: vec![0, 1, 1, 2] },
        ];
        write_masks(&p, &meta, &recs).expect("write");
        assert_eq!(read_masks(&p).expect("read"), (meta.clone(), recs.clone()));
        let bad = [MaskRecord { states: vec![1, 3, 0, 0], ..recs[0].clone() }];
        assert!(write_masks(&p, &meta, &bad).expect_err("state 3").to_string().contains("row `a` epoch 0: state 3"));
        let short = [MaskRecord { states: vec![1], ..recs[0].clone() }];
        assert!(write_masks(&p, &meta, &short).expect_err("short").to_string().contains("1 states for a grid of 4"));
    }

    #[test]
    fn figure_draws_heat_and_state_colours() {
        let w = [0.0f32, 1.0, 0.5, 0.25];
        let st: [&[u8]; 1] = [&[0, 1, 2, 0]];
        let img = figure([2, 2], &[FigureLine { weights: &w, states: &st }]);
        let s = 32; // 64 / 2
        assert_eq!(img.dimensions(), (4 + 2 * (2 * s + 4), 4 + 2 * s + 4));
        let at = |panel: u32, patch: u32| {
            img.get_pixel(4 + panel * (2 * s + 4) + (patch % 2) * s + s / 2, 4 + (patch / 2) * s + s / 2).0
        };
        assert_eq!(at(0, 0), [0, 0, 0]);
        assert_eq!(at(0, 1), [255, 255, 255]);
        assert_eq!(at(0, 2), [128, 128, 128]);
        assert_eq!(at(1, 0), VISIBLE_RGB);
        assert_eq!(at(1, 1), MASKED_RGB);
        assert_eq!(at(1, 2), THROWN_RGB);
        assert_eq!(img.get_pixel(3, 3).0, FRAME_RGB);
        assert_eq!(img.get_pixel(1, 1).0, [255, 255, 255]);
    }
}
