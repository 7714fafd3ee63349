//! The part every file-based source shares: decode and resize a list of images in
//! parallel (row group by row group, so memory stays bounded), apply the bad-file policy,
//! and write the image table, split report, rejects list and preview sheet.

use std::path::PathBuf;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use msmae_core::{ConfigError, OutputDecl, StageContext, StageError};

use crate::decode::{Aspect, DecodeError, Decoded, decode_file, decode_masks};
use crate::report::SplitTally;
use crate::table::{ImageRow, ImageTableWriter, Split, TableMeta};

/// Defaults of the options the file sources share (serde `default = "…"` targets).
pub mod defaults {
    /// Table image side, pixels.
    pub fn size() -> u32 {
        224
    }
    pub fn grey() -> u32 {
        1
    }
    pub fn rgb() -> u32 {
        3
    }
    /// Rows per Parquet row group (and per parallel decode batch).
    pub fn row_group() -> u32 {
        256
    }
    /// Images on the preview sheet.
    pub fn previews() -> u32 {
        16
    }
    /// Bits per pixel sample in the table.
    pub fn bit_depth() -> u32 {
        8
    }
    /// Fraction of training patients carved out for validation.
    pub fn val_fraction() -> f64 {
        0.1
    }
}

/// What to do with a file (or metadata row) that cannot be ingested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop with an error naming the file (and row/column).
    #[default]
    Fail,
    /// Leave it out, record it in `rejects.json`, and say how many.
    Skip,
}

/// One image to ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    pub path: PathBuf,
    /// Path relative to the dataset root (recorded as `source_path`).
    pub source: String,
    pub patient: String,
    pub split: Split,
    /// Class index (single-label sources).
    pub label: Option<i32>,
    /// Multi-hot over the label names (multi-label sources).
    pub labels: Option<Vec<u8>>,
    /// Mask files of a segmentation source, merged into one mask (empty: no mask).
    pub masks: Vec<PathBuf>,
}

impl Item {
    /// A single-label item without masks.
    pub fn new(id: String, path: PathBuf, source: String, patient: String, split: Split, label: Option<i32>) -> Self {
        Self { id, path, source, patient, split, label, labels: None, masks: Vec::new() }
    }
}

/// Something left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reject {
    pub path: String,
    pub reason: String,
}

/// Image conversion and writing options shared by the sources.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOptions {
    pub size: u32,
    pub channels: u32,
    pub aspect: Aspect,
    pub on_error: OnError,
    pub row_group: u32,
    pub previews: u32,
    /// Items carry multi-hot `labels` instead of a `label`.
    pub multi_label: bool,
    /// Items carry mask files (a segmentation source): every row gets a mask.
    pub masks: bool,
    /// 8 or 16 bits per pixel sample in the table.
    pub bit_depth: u32,
    /// Multi-class masks: the mask files hold class indices (these names, 0 = background),
    /// one file per image, resized nearest-neighbour. Empty: binary lesion masks.
    pub mask_classes: Vec<String>,
    /// Keep only a seeded sample of this fraction of every split's patients.
    pub sample: Option<f64>,
}

/// Declares the `with:` struct of a file-based ingest kind: the kind's own fields as given,
/// then the image-table options every such kind shares — `size`, `channels` (with the
/// kind's default), `aspect`, `on_error`, `row_group`, `sample`, `previews`, `bit_depth` —
/// and [`table`](TableOptions) to read them. The shared fields are written out in each
/// struct rather than flattened from one (serde's `flatten` does not combine with
/// `deny_unknown_fields`), so a misspelt key is still refused with its path, and the
/// config serialises — and keys the cache — exactly as the fields say.
macro_rules! ingest_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, channels: $channels:literal {
            $($fields:tt)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($fields)*
            /// Side of the square table images, in pixels (8–2048).
            #[serde(default = "crate::ingest::defaults::size")]
            pub size: u32,
            /// 1 (grey; colour and RGBA files are converted) or 3 (RGB).
            #[serde(default = $channels)]
            pub channels: u32,
            /// How a non-square image becomes square.
            #[serde(default)]
            pub aspect: crate::decode::Aspect,
            /// A file that cannot be used: `fail` the stage naming it, or `skip` it and list it
            /// in `rejects.json`.
            #[serde(default)]
            pub on_error: crate::ingest::OnError,
            /// Rows per Parquet row group (and per parallel decode batch).
            #[serde(default = "crate::ingest::defaults::row_group")]
            pub row_group: u32,
            /// Keep a seeded sample of this fraction of the patients of every split (`0.05`:
            /// one in twenty), whole patients in their splits: a rehearsal of the whole
            /// pipeline on a small part of the real data. Absent: every image.
            #[serde(default)]
            pub sample: Option<f64>,
            /// Images on the preview sheet.
            #[serde(default = "crate::ingest::defaults::previews")]
            pub previews: u32,
            /// 8, or 16 to keep the depth of DICOM and 16-bit PNG/TIFF sources through to the
            /// training loader's normalisation (twice the storage).
            #[serde(default = "crate::ingest::defaults::bit_depth")]
            pub bit_depth: u32,
        }

        impl $name {
            /// The image-table options of this config.
            pub fn table(&self) -> crate::ingest::TableOptions {
                crate::ingest::TableOptions {
                    size: self.size,
                    channels: self.channels,
                    aspect: self.aspect,
                    on_error: self.on_error,
                    row_group: self.row_group,
                    sample: self.sample,
                    previews: self.previews,
                    bit_depth: self.bit_depth,
                }
            }
        }
    };
}
pub(crate) use ingest_config;

/// The image-table options every file-based ingest kind takes (see `ingest_config!`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TableOptions {
    pub size: u32,
    pub channels: u32,
    pub aspect: Aspect,
    pub on_error: OnError,
    pub row_group: u32,
    pub sample: Option<f64>,
    pub previews: u32,
    pub bit_depth: u32,
}

impl TableOptions {
    /// The checks every file-based source shares, with the source's split fractions.
    pub fn check(&self, split: &crate::table::SplitFractions) -> Result<(), ConfigError> {
        check_sample(self.sample)?;
        let err = |path: &str, message: String| Err(ConfigError { path: path.into(), message });
        if self.bit_depth != 8 && self.bit_depth != 16 {
            return err(
                "bit_depth",
                "must be 8 or 16 (16 keeps the depth of DICOM and 16-bit PNG/TIFF sources)".into(),
            );
        }
        if !(8..=2048).contains(&self.size) {
            return err("size", "must be between 8 and 2048 pixels".into());
        }
        if self.channels != 1 && self.channels != 3 {
            return err("channels", "must be 1 (grey) or 3 (RGB)".into());
        }
        if let Err(m) = split.check() {
            return err("split", m);
        }
        if self.row_group == 0 {
            return err("row_group", "must be positive".into());
        }
        Ok(())
    }

    /// Single-label writing options without masks; a source sets what differs.
    pub fn write_options(&self) -> WriteOptions {
        WriteOptions {
            size: self.size,
            channels: self.channels,
            aspect: self.aspect,
            on_error: self.on_error,
            row_group: self.row_group,
            previews: self.previews,
            multi_label: false,
            masks: false,
            bit_depth: self.bit_depth,
            mask_classes: Vec::new(),
            sample: self.sample,
        }
    }
}

/// The artifact every file-based source produces.
pub fn output_decl() -> OutputDecl {
    OutputDecl::new("image-table", &["images.parquet", "split_report.json", "rejects.json", "previews/*.png"])
        .figure("sample images", "previews/*.png")
}

/// A decoded image, its merged mask (when the source has masks) and its file's SHA-256.
type DecodedItem = (Decoded, Option<Vec<u8>>, String);

/// Decode one item: the image (resized), its merged mask when the source has masks, and
/// the SHA-256 of the image file. `Err` names the file at fault (image or mask).
fn decode_item(it: &Item, o: &WriteOptions) -> Result<DecodedItem, (PathBuf, DecodeError)> {
    let (img, bytes) =
        decode_file(&it.path, o.size, o.channels, o.aspect, o.bit_depth).map_err(|e| (it.path.clone(), e))?;
    let sha = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    drop(bytes);
    let mask = match (o.masks, o.mask_classes.len()) {
        (false, _) => None,
        (true, 0) => Some(decode_masks(&it.masks, img.source_width, img.source_height, o.size, o.aspect)?),
        (true, k) => {
            Some(crate::decode::decode_class_mask(&it.masks, img.source_width, img.source_height, o.size, o.aspect, k)?)
        }
    };
    Ok((img, mask, sha))
}

/// `sample:` is a fraction in (0, 1].
pub fn check_sample(sample: Option<f64>) -> Result<(), ConfigError> {
    match sample {
        Some(f) if !(f > 0.0 && f <= 1.0) => Err(ConfigError {
            path: "sample".into(),
            message: format!("{f}: give a fraction of the patients in (0, 1], e.g. 0.05"),
        }),
        _ => Ok(()),
    }
}

/// The items of a seeded sample of `fraction` of every split's patients (at least one per
/// split that has any): whole patients, so the sample stays patient-disjoint, and each keeps
/// its split. Patients are ranked by a hash of (seed, patient), so a larger fraction keeps
/// every patient a smaller one kept.
pub fn sample_patients(items: &[Item], fraction: f64, seed: u64) -> Vec<Item> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut by_split: BTreeMap<Split, BTreeSet<&str>> = BTreeMap::new();
    for it in items {
        by_split.entry(it.split).or_default().insert(it.patient.as_str());
    }
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for patients in by_split.values() {
        let mut ranked: Vec<(u64, &str)> =
            patients.iter().map(|p| (msmae_core::derive_seed(seed, &["sample".into(), (*p).into()]), *p)).collect();
        ranked.sort();
        let n = ((patients.len() as f64 * fraction).ceil() as usize).clamp(1, patients.len());
        keep.extend(ranked.into_iter().take(n).map(|(_, p)| p));
    }
    items.iter().filter(|it| keep.contains(it.patient.as_str())).cloned().collect()
}

/// Decode `items` and write `images.parquet`, `split_report.json`, `rejects.json` and
/// `previews/sheet.png` into the stage's output.
pub fn write_image_table(
    ctx: &mut StageContext<'_>,
    provenance: serde_json::Value,
    label_names: &[String],
    items: &[Item],
    o: WriteOptions,
    rejects: Vec<Reject>,
) -> Result<(), StageError> {
    let sampled;
    let items = match o.sample {
        Some(f) if f < 1.0 => {
            sampled = sample_patients(items, f, ctx.seed);
            tracing::info!(
                "`{}`: a sample of {:.1} % of every split's patients: {} of {} images",
                ctx.name,
                100.0 * f,
                sampled.len(),
                items.len()
            );
            &sampled[..]
        }
        _ => items,
    };
    let meta = TableMeta {
        schema_version: crate::table::SCHEMA_VERSION,
        label_names: label_names.to_vec(),
        multi_label: o.multi_label,
        height: o.size,
        width: o.size,
        channels: o.channels,
        has_masks: o.masks,
        bit_depth: o.bit_depth,
        mask_classes: o.mask_classes.clone(),
        provenance,
    };
    let mut written = Written { tally: SplitTally::new(label_names), previews: Vec::new(), rejects, rows: 0 };
    write_rows(ctx, meta, items, &o, &mut written)?;
    if written.rows == 0 {
        return Err(StageError::other(format!(
            "no image could be ingested ({} listed, {} rejected)",
            items.len(),
            written.rejects.len()
        )));
    }
    write_reports(ctx, label_names, written, &o)
}

/// What writing the rows leaves for the reports.
struct Written {
    tally: SplitTally,
    previews: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    rejects: Vec<Reject>,
    rows: u64,
}

/// Decode the items and write them to `images.parquet`, one row group at a time: row group
/// k+1 decodes on the pool while this thread compresses and writes row group k, so two row
/// groups are in flight at most. A file that cannot be decoded fails the stage or becomes a
/// reject, as `on_error` says.
fn write_rows(
    ctx: &mut StageContext<'_>,
    meta: TableMeta,
    items: &[Item],
    o: &WriteOptions,
    out: &mut Written,
) -> Result<(), StageError> {
    let table = ctx.output_path("images.parquet")?;
    let mut writer = ImageTableWriter::create(&table, meta, o.row_group as usize)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1))
        .build()
        .map_err(|e| StageError::other(e.to_string()))?;
    let bar = ctx.progress.bar(Some(items.len() as u64), &ctx.name);
    let chunks: Vec<&[Item]> = items.chunks(o.row_group.max(1) as usize).collect();
    let decode = |chunk: &[Item]| pool.install(|| chunk.par_iter().map(|it| decode_item(it, o)).collect::<Vec<_>>());
    let mut next = chunks.first().map(|c| decode(c));
    for (k, chunk) in chunks.iter().enumerate() {
        ctx.cancel.check()?;
        let decoded = next.take().unwrap_or_default();
        let following = chunks.get(k + 1).copied();
        let (ahead, written) = std::thread::scope(|s| {
            let handle = following.map(|c| s.spawn(move || decode(c)));
            let written = chunk.iter().zip(decoded).try_for_each(|(it, d)| write_row(&mut writer, it, d, o, out));
            (handle.map(|h| h.join()), written)
        });
        written?;
        next = match ahead {
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return Err(StageError::other("an image decoder thread panicked")),
            None => None,
        };
        bar.inc(chunk.len() as u64);
    }
    out.rows = writer.finish()?;
    Ok(())
}

/// One decoded item into the table (and the tally and previews), or into the rejects.
fn write_row(
    writer: &mut ImageTableWriter,
    it: &Item,
    decoded: Result<DecodedItem, (PathBuf, DecodeError)>,
    o: &WriteOptions,
    out: &mut Written,
) -> Result<(), StageError> {
    let (img, mask, sha) = match decoded {
        Ok(x) => x,
        Err((path, e)) if o.on_error == OnError::Skip => {
            let reason = if path == it.path { e.to_string() } else { format!("mask {}: {e}", path.display()) };
            out.rejects.push(Reject { path: it.source.clone(), reason });
            return Ok(());
        }
        Err((path, e)) => {
            return Err(StageError::data(
                &path,
                None,
                format!("{e} (set `on_error: skip` to leave such files out and list them in rejects.json)"),
            ));
        }
    };
    out.tally.add(&it.patient, it.split, it.label, it.labels.as_deref()).map_err(StageError::other)?;
    if (out.previews.len() as u32) < o.previews {
        let eight =
            if o.bit_depth == 16 { img.pixels.chunks_exact(2).map(|b| b[1]).collect() } else { img.pixels.clone() };
        out.previews.push((eight, mask.clone()));
    }
    writer.push(ImageRow {
        id: it.id.clone(),
        patient_id: it.patient.clone(),
        split: it.split,
        label: it.label,
        labels: it.labels.clone(),
        width: img.source_width as i32,
        height: img.source_height as i32,
        channels: o.channels as i32,
        pixels: img.pixels,
        mask,
        source_path: it.source.clone(),
        source_sha256: sha,
    })?;
    Ok(())
}

/// `split_report.json`, `rejects.json` and the preview sheet; the split report and the
/// first reject go to the log too.
fn write_reports(
    ctx: &mut StageContext<'_>,
    label_names: &[String],
    written: Written,
    o: &WriteOptions,
) -> Result<(), StageError> {
    let Written { mut tally, previews, rejects, .. } = written;
    tally.rejected = rejects.len() as u64;
    let report = tally.report();
    let write = |rel: &str, bytes: Vec<u8>| -> Result<(), StageError> {
        let p = ctx.output_path(rel)?;
        std::fs::write(&p, bytes).map_err(|e| StageError::io(&p, e))
    };
    write("split_report.json", serde_json::to_vec_pretty(&report).unwrap_or_default())?;
    write("rejects.json", serde_json::to_vec_pretty(&rejects).unwrap_or_default())?;
    if let Some(first) = rejects.first() {
        tracing::warn!(
            "{}: {} rejected (listed in rejects.json), first: {} — {}",
            ctx.name,
            rejects.len(),
            first.path,
            first.reason
        );
    }
    tracing::info!("{}: split report\n{}", ctx.name, report.table(label_names));
    if !previews.is_empty() {
        let pp = ctx.output_path("previews/sheet.png")?;
        let imgs: Vec<(&[u8], Option<&[u8]>)> = previews.iter().map(|(p, m)| (p.as_slice(), m.as_deref())).collect();
        crate::preview::sheet(&imgs, o.size, o.size, o.channels).save(&pp).map_err(|e| StageError::write(&pp, e))?;
    }
    Ok(())
}

/// Applies the bad-input policy to one problem at a time: with `fail` the first problem is
/// the stage's error (naming the file and what to change), with `skip` it becomes a reject.
#[derive(Debug)]
pub struct Triage {
    pub on_error: OnError,
    pub rejects: Vec<Reject>,
}

impl Triage {
    pub fn new(on_error: OnError) -> Self {
        Self { on_error, rejects: Vec::new() }
    }

    /// `file` is where the problem is (a metadata file or an image), `what` how the rejects
    /// list names the entry (relative path or `file:line`), `location` the row/column.
    pub fn problem(
        &mut self,
        file: &std::path::Path,
        location: Option<String>,
        what: String,
        message: String,
    ) -> Result<(), StageError> {
        match self.on_error {
            OnError::Skip => {
                let reason = match location {
                    Some(l) => format!("{l}: {message}"),
                    None => message,
                };
                self.rejects.push(Reject { path: what, reason });
                Ok(())
            }
            OnError::Fail => Err(StageError::data(
                file,
                location,
                format!("{message} (set `on_error: skip` to leave such entries out and list them in rejects.json)"),
            )),
        }
    }
}

/// Every file with one of `extensions` (lower case, no dot) directly in `dirs`, by
/// `key(file name)`; the same key in two places is an error naming both files.
pub fn index_files(
    dirs: &[PathBuf],
    extensions: &[&str],
    key: impl Fn(&str) -> String,
) -> Result<std::collections::BTreeMap<String, PathBuf>, StageError> {
    let mut files = std::collections::BTreeMap::new();
    for d in dirs {
        for e in std::fs::read_dir(d).map_err(|e| StageError::io(d, e))? {
            let p = e.map_err(|e| StageError::io(d, e))?.path();
            let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if !p.is_file() || !extensions.contains(&ext.as_str()) {
                continue;
            }
            let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(prev) = files.insert(key(&name), p.clone()) {
                return Err(StageError::data(
                    &p,
                    None,
                    format!("`{name}` also exists as {}: one image, two files", prev.display()),
                ));
            }
        }
    }
    Ok(files)
}

/// Lines of a list file (one name per line): trimmed, blank lines and a BOM dropped; with
/// the 1-based line number of each.
pub fn read_list(path: &std::path::Path) -> Result<Vec<(usize, String)>, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    Ok(text
        .trim_start_matches('\u{feff}')
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect())
}

/// `path` relative to `root`, with `/` separators (the table's `source_path`).
pub fn relative(path: &std::path::Path, root: &std::path::Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared image-table options read from the top level of `with:` beside the kind's
    /// own, with the kind's `channels` default; the full config serialises flat, as the
    /// cache key has always seen it; a misspelt key is refused with its name.
    #[test]
    fn the_shared_table_options_read_and_serialise_at_the_top_level() {
        use crate::chestxray14::ChestXray14Config;
        use crate::imagefolder::ImageFolderConfig;
        let full = serde_json::json!({
            "root": "data/cxr", "metadata": null, "train_val_list": "a.txt", "test_list": "b.txt",
            "val_fraction": 0.2, "size": 64, "channels": 3, "aspect": "pad", "on_error": "skip",
            "row_group": 32, "sample": 0.05, "previews": 0, "bit_depth": 16,
        });
        let c: ChestXray14Config = serde_json::from_value(full.clone()).expect("every field");
        assert_eq!(serde_json::to_value(&c).expect("json"), full, "round trip, flat");
        let t = c.table();
        assert_eq!(
            (t.size, t.channels, t.aspect, t.on_error, t.row_group, t.sample, t.previews, t.bit_depth),
            (64, 3, Aspect::Pad, OnError::Skip, 32, Some(0.05), 0, 16)
        );
        let o = t.write_options();
        assert_eq!(
            (o.size, o.channels, o.bit_depth, o.sample, o.multi_label, o.masks),
            (64, 3, 16, Some(0.05), false, false)
        );
        // Defaults: grey for ChestX-ray14, RGB for image folders.
        let c: ChestXray14Config = serde_json::from_value(serde_json::json!({ "root": "r" })).expect("defaults");
        assert_eq!((c.size, c.channels, c.row_group, c.previews, c.bit_depth, c.sample), (224, 1, 256, 16, 8, None));
        let f: ImageFolderConfig = serde_json::from_value(serde_json::json!({ "root": "r" })).expect("defaults");
        assert_eq!(f.channels, 3);
        // Unknown keys, shared or not, are refused by name.
        for bad in ["sise", "rowgroup", "colour"] {
            let e = serde_json::from_value::<ChestXray14Config>(serde_json::json!({ "root": "r", bad: 1 }))
                .expect_err("unknown")
                .to_string();
            assert!(e.contains(&format!("unknown field `{bad}`")), "{e}");
        }
        // The shared checks run with the kind's split.
        let bad: ChestXray14Config =
            serde_json::from_value(serde_json::json!({ "root": "r", "bit_depth": 12 })).expect("parses");
        assert_eq!(bad.table().check(&crate::table::SplitFractions::default()).expect_err("12 bits").path, "bit_depth");
    }

    #[test]
    fn a_sample_keeps_whole_patients_in_their_splits_and_grows_monotonically() {
        let items: Vec<Item> = (0..300)
            .map(|i| {
                let split = [Split::Train, Split::Train, Split::Val, Split::Test][i % 4];
                Item::new(
                    format!("img{i}"),
                    PathBuf::from(format!("{i}.png")),
                    format!("{i}.png"),
                    format!("p{}", i / 4 % 75 + 100 * (i % 4)),
                    split,
                    Some(0),
                )
            })
            .collect();
        let patients =
            |v: &[Item]| v.iter().map(|it| (it.patient.clone(), it.split)).collect::<std::collections::BTreeSet<_>>();
        let small = sample_patients(&items, 0.1, 7);
        let large = sample_patients(&items, 0.5, 7);
        assert!(patients(&small).is_subset(&patients(&large)), "a larger sample keeps the smaller one's patients");
        for split in [Split::Train, Split::Val, Split::Test] {
            let (all, kept) =
                (items.iter().filter(|i| i.split == split).count(), small.iter().filter(|i| i.split == split).count());
            assert!(kept > 0 && kept < all, "{split:?}: {kept} of {all}");
        }
        // every image of a kept patient is kept
        for (p, _) in patients(&small) {
            assert_eq!(
                items.iter().filter(|i| i.patient == p).count(),
                small.iter().filter(|i| i.patient == p).count(),
                "{p}"
            );
        }
        assert_ne!(patients(&sample_patients(&items, 0.1, 8)), patients(&small), "the seed picks the sample");
        assert!(
            check_sample(Some(0.0)).is_err() && check_sample(Some(1.5)).is_err() && check_sample(Some(0.05)).is_ok()
        );
    }
}
