//! Training batches streamed from the Parquet image table: a light in-memory index (ids,
//! splits, labels) plus the pixels of a few row groups at a time, augmented on the fly
//! (RandomResizedCrop + flip, docs/method.md §3.4/§5) and masked per sample (§3), prepared on a
//! background thread with rayon while the model steps on the previous batch.
//!
//! Every random draw is keyed by (seed, purpose, epoch, row), so an epoch's batches are a
//! pure function of the table, the seed and the epoch: independent of thread counts,
//! prefetch depth, and of whether the run was resumed from a checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arrow::array::{Array, BinaryArray, Int32Array, ListArray, StringArray, UInt8Array};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use msmae_core::{SeedPath, StageError, seeded_rng};
use msmae_data::table::{Split, TableMeta, read_meta};
use msmae_mask::augment::{self, Augmentation};
use msmae_mask::{MaskPlan, MaskPolicy, sample_rng};

/// One image's entry in the index (no pixels).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    pub id: String,
    pub split: Split,
    pub label: Option<i32>,
    pub labels: Option<Vec<u8>>,
}

/// An opened image table: metadata, the index of every row, and row-group boundaries.
#[derive(Debug)]
pub struct ImageTable {
    pub path: PathBuf,
    pub meta: TableMeta,
    pub rows: Vec<IndexRow>,
    /// First row of each row group, plus the total at the end.
    group_starts: Vec<usize>,
}

fn fmt_err(path: &Path, message: impl Into<String>) -> StageError {
    StageError::data(path, None, message)
}

fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, StageError> {
    let f = File::open(path).map_err(|e| StageError::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| fmt_err(path, e.to_string()))
}

fn projection(
    builder: &ParquetRecordBatchReaderBuilder<File>,
    path: &Path,
    names: &[&str],
) -> Result<ProjectionMask, StageError> {
    let fields = builder.schema().fields();
    let mut idx = Vec::new();
    for n in names {
        let i = fields
            .iter()
            .position(|f| f.name() == n)
            .ok_or_else(|| fmt_err(path, format!("image table has no column `{n}`")))?;
        idx.push(i);
    }
    Ok(ProjectionMask::roots(builder.parquet_schema(), idx))
}

impl ImageTable {
    /// Read the metadata and the light columns of every row.
    pub fn open(path: &Path) -> Result<Self, StageError> {
        let meta = read_meta(path).map_err(StageError::from)?;
        let builder = open_builder(path)?;
        let mut group_starts = vec![0usize];
        for g in builder.metadata().row_groups() {
            let last = *group_starts.last().unwrap_or(&0);
            group_starts.push(last + g.num_rows() as usize);
        }
        let mut cols = vec!["id", "split", "label"];
        if meta.multi_label {
            cols.push("labels");
        }
        let mask = projection(&builder, path, &cols)?;
        let reader =
            builder.with_projection(mask).with_batch_size(8192).build().map_err(|e| fmt_err(path, e.to_string()))?;
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| fmt_err(path, e.to_string()))?;
            let col = |n: &str| batch.column_by_name(n).ok_or_else(|| fmt_err(path, format!("missing column `{n}`")));
            let ids = col("id")?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| fmt_err(path, "column `id` is not utf8"))?;
            let splits = col("split")?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| fmt_err(path, "column `split` is not utf8"))?;
            let labels = col("label")?
                .as_any()
                .downcast_ref::<Int32Array>()
                .cloned()
                .ok_or_else(|| fmt_err(path, "column `label` is not int32"))?;
            let multi = if meta.multi_label {
                Some(
                    col("labels")?
                        .as_any()
                        .downcast_ref::<ListArray>()
                        .cloned()
                        .ok_or_else(|| fmt_err(path, "column `labels` is not a list of uint8"))?,
                )
            } else {
                None
            };
            for r in 0..batch.num_rows() {
                let id = ids.value(r).to_string();
                let split = Split::parse(splits.value(r)).ok_or_else(|| {
                    StageError::data(path, Some(format!("row `{id}`")), format!("unknown split `{}`", splits.value(r)))
                })?;
                let multi_hot = multi.as_ref().map(|l| {
                    let v = l.value(r);
                    v.as_any().downcast_ref::<UInt8Array>().map(|a| a.values().to_vec()).unwrap_or_default()
                });
                if let Some(m) = &multi_hot
                    && m.len() != meta.label_names.len()
                {
                    return Err(StageError::data(
                        path,
                        Some(format!("row `{id}`, column `labels`")),
                        format!("{} entries for {} labels", m.len(), meta.label_names.len()),
                    ));
                }
                let label = labels.is_valid(r).then(|| labels.value(r));
                if let Some(l) = label.filter(|l| *l < 0 || *l as usize >= meta.label_names.len()) {
                    return Err(StageError::data(
                        path,
                        Some(format!("row `{id}`, column `label`")),
                        format!("label {l} is outside 0..{}", meta.label_names.len()),
                    ));
                }
                if multi_hot.as_ref().is_some_and(|m| m.iter().any(|v| *v > 1)) {
                    return Err(StageError::data(
                        path,
                        Some(format!("row `{id}`, column `labels`")),
                        "multi-hot values must be 0 or 1",
                    ));
                }
                if id.is_empty() {
                    return Err(StageError::data(path, Some(format!("row {}", rows.len())), "empty image id"));
                }
                rows.push(IndexRow { id, split, label, labels: multi_hot });
            }
        }
        if rows.len() != *group_starts.last().unwrap_or(&0) {
            return Err(fmt_err(path, "row count disagrees with the row-group metadata"));
        }
        // Ids key attention maps and predictions: they must be unique.
        let mut seen = std::collections::HashSet::with_capacity(rows.len());
        for r in &rows {
            if !seen.insert(r.id.as_str()) {
                return Err(StageError::data(path, Some(format!("row `{}`, column `id`", r.id)), "duplicate image id"));
            }
        }
        Ok(Self { path: path.to_path_buf(), meta, rows, group_starts })
    }

    pub fn height(&self) -> usize {
        self.meta.height as usize
    }
    pub fn width(&self) -> usize {
        self.meta.width as usize
    }
    pub fn channels(&self) -> usize {
        self.meta.channels as usize
    }
    pub fn num_classes(&self) -> usize {
        self.meta.label_names.len()
    }

    /// Rows of `split`, in table order.
    pub fn rows_of(&self, split: Split) -> Vec<usize> {
        self.rows.iter().enumerate().filter(|(_, r)| r.split == split).map(|(i, _)| i).collect()
    }

    /// Rows of a split that carry a label (every row for multi-label tables).
    pub fn labelled_rows_of(&self, split: Split) -> Vec<usize> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.split == split && (r.label.is_some() || r.labels.is_some()))
            .map(|(i, _)| i)
            .collect()
    }

    fn group_of(&self, row: usize) -> usize {
        self.group_starts.partition_point(|&s| s <= row) - 1
    }

    /// Pixels (and lesion masks, when asked and present) of every row of group `g`.
    pub fn read_group(&self, g: usize, masks: bool) -> Result<Vec<GroupRow>, StageError> {
        let builder = open_builder(&self.path)?;
        let cols: &[&str] = if masks { &["pixels", "mask"] } else { &["pixels"] };
        let mask = projection(&builder, &self.path, cols)?;
        let reader = builder
            .with_projection(mask)
            .with_row_groups(vec![g])
            .with_batch_size(4096)
            .build()
            .map_err(|e| fmt_err(&self.path, e.to_string()))?;
        let expect = self.height() * self.width() * self.channels() * self.meta.sample_bytes();
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| fmt_err(&self.path, e.to_string()))?;
            let px = batch
                .column_by_name("pixels")
                .and_then(|c| c.as_any().downcast_ref::<BinaryArray>().cloned())
                .ok_or_else(|| fmt_err(&self.path, "column `pixels` is not binary"))?;
            let mk = if masks {
                batch.column_by_name("mask").and_then(|c| c.as_any().downcast_ref::<BinaryArray>().cloned())
            } else {
                None
            };
            for r in 0..batch.num_rows() {
                let row = self.group_starts[g] + out.len();
                let p = px.value(r);
                if p.len() != expect {
                    let id = self.rows.get(row).map(|x| x.id.as_str()).unwrap_or("?");
                    return Err(StageError::data(
                        &self.path,
                        Some(format!("row `{id}`, column `pixels`")),
                        format!("{} bytes, expected {expect}", p.len()),
                    ));
                }
                let m = mk.as_ref().and_then(|m| m.is_valid(r).then(|| m.value(r).to_vec()));
                if let Some(m) = m.as_ref().filter(|m| m.len() != self.height() * self.width()) {
                    let id = self.rows.get(row).map(|x| x.id.as_str()).unwrap_or("?");
                    return Err(StageError::data(
                        &self.path,
                        Some(format!("row `{id}`, column `mask`")),
                        format!("{} bytes, expected {}×{}", m.len(), self.height(), self.width()),
                    ));
                }
                out.push((p.to_vec(), m));
            }
        }
        Ok(out)
    }

    /// Per-channel mean and standard deviation of the pixels (in [0, 1]) of `rows`,
    /// streamed one row group at a time.
    pub fn channel_stats(&self, rows: &[usize]) -> Result<Normalizer, StageError> {
        let c = self.channels();
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        let mut n = 0f64;
        let mut by_group: HashMap<usize, Vec<usize>> = HashMap::new();
        for &r in rows {
            by_group.entry(self.group_of(r)).or_default().push(r);
        }
        let mut groups: Vec<_> = by_group.into_iter().collect();
        groups.sort_by_key(|(g, _)| *g);
        for (g, members) in groups {
            let data = self.read_group(g, false)?;
            let deep = self.meta.bit_depth == 16;
            for r in members {
                let px = &data[r - self.group_starts[g]].0;
                let samples = px.len() / self.meta.sample_bytes();
                for i in 0..samples {
                    let v = if deep {
                        f64::from(u16::from_le_bytes([px[2 * i], px[2 * i + 1]])) / 65535.0
                    } else {
                        f64::from(px[i]) / 255.0
                    };
                    sum[i % c] += v;
                    sq[i % c] += v * v;
                }
                n += (samples / c) as f64;
            }
        }
        if n == 0.0 {
            return Ok(Normalizer { mean: vec![0.5; c], std: vec![0.25; c] });
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let std: Vec<f32> =
            sq.iter().zip(&sum).map(|(q, s)| ((q / n - (s / n).powi(2)).max(1e-8).sqrt().max(1e-3)) as f32).collect();
        Ok(Normalizer { mean, std })
    }
}

/// Per-channel pixel normalisation (`(x/255 − mean) / std`), fixed by the training split of
/// the model's first training stage and stored with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Resample the `aug` crop of an H×W×C u8 image to `out_h × out_w` (bilinear, pixel
/// centres aligned, flip applied) and normalise into `out` as C×out_h×out_w.
#[allow(clippy::too_many_arguments)]
pub fn render(
    pixels: &[u8],
    h: usize,
    w: usize,
    c: usize,
    aug: &Augmentation,
    out_h: usize,
    out_w: usize,
    norm: &Normalizer,
    out: &mut [f32],
) {
    render_samples(|i| f32::from(pixels[i]), 255.0, h, w, c, aug, out_h, out_w, norm, out);
}

/// [`render`] for a table of `bit_depth` 8 or 16 (little-endian u16 samples): 16-bit
/// pixels reach the normalisation at full depth.
#[allow(clippy::too_many_arguments)]
pub fn render_depth(
    pixels: &[u8],
    bit_depth: u32,
    h: usize,
    w: usize,
    c: usize,
    aug: &Augmentation,
    out_h: usize,
    out_w: usize,
    norm: &Normalizer,
    out: &mut [f32],
) {
    if bit_depth == 16 {
        render_samples(
            |i| f32::from(u16::from_le_bytes([pixels[2 * i], pixels[2 * i + 1]])),
            65535.0,
            h,
            w,
            c,
            aug,
            out_h,
            out_w,
            norm,
            out,
        );
    } else {
        render(pixels, h, w, c, aug, out_h, out_w, norm, out);
    }
}

#[allow(clippy::too_many_arguments)]
fn render_samples(
    sample: impl Fn(usize) -> f32,
    max: f32,
    h: usize,
    w: usize,
    c: usize,
    aug: &Augmentation,
    out_h: usize,
    out_w: usize,
    norm: &Normalizer,
    out: &mut [f32],
) {
    let (sy, sx) = (aug.crop.height / out_h as f64, aug.crop.width / out_w as f64);
    let scale: Vec<f32> = norm.std.iter().map(|s| 1.0 / (max * s)).collect();
    let shift: Vec<f32> = norm.mean.iter().zip(&norm.std).map(|(m, s)| m / s).collect();
    // The horizontal taps of every output column, once per image instead of once per row.
    let cols: Vec<(usize, usize, f32)> = (0..out_w)
        .map(|x| {
            let xs = if aug.flip { out_w - 1 - x } else { x };
            let fx = (aug.crop.left + (xs as f64 + 0.5) * sx - 0.5)
                .clamp(aug.crop.left, aug.crop.left + aug.crop.width - 1.0)
                .clamp(0.0, (w - 1) as f64);
            let x0 = fx.floor() as usize;
            ((x0 * c), ((x0 + 1).min(w - 1) * c), (fx - x0 as f64) as f32)
        })
        .collect();
    for y in 0..out_h {
        // Sample inside the crop (crop, then resize — as torchvision's resized_crop).
        let fy = (aug.crop.top + (y as f64 + 0.5) * sy - 0.5)
            .clamp(aug.crop.top, aug.crop.top + aug.crop.height - 1.0)
            .clamp(0.0, (h - 1) as f64);
        let y0 = fy.floor() as usize;
        let (r0, r1) = (y0 * w * c, (y0 + 1).min(h - 1) * w * c);
        let ty = (fy - y0 as f64) as f32;
        for ch in 0..c {
            let row = &mut out[(ch * out_h + y) * out_w..(ch * out_h + y + 1) * out_w];
            let (a, b) = (scale[ch], shift[ch]);
            // Output planes are written row by row, contiguously; the arithmetic (and so
            // every value) is that of the per-pixel form: horizontal, then vertical.
            for (o, &(x0, x1, tx)) in row.iter_mut().zip(&cols) {
                let top = sample(r0 + x0 + ch) * (1.0 - tx) + sample(r0 + x1 + ch) * tx;
                let bot = sample(r1 + x0 + ch) * (1.0 - tx) + sample(r1 + x1 + ch) * tx;
                let v = top * (1.0 - ty) + bot * ty;
                *o = v * a - b;
            }
        }
    }
}

/// The `aug` crop of an H×W 0/1 lesion mask at `out_h × out_w`, nearest neighbour (so the
/// mask stays binary and aligned with [`render`]'s image).
pub fn render_mask(mask: &[u8], h: usize, w: usize, aug: &Augmentation, out_h: usize, out_w: usize) -> Vec<u8> {
    let (sy, sx) = (aug.crop.height / out_h as f64, aug.crop.width / out_w as f64);
    let mut out = vec![0u8; out_h * out_w];
    for y in 0..out_h {
        let fy = (aug.crop.top + (y as f64 + 0.5) * sy)
            .floor()
            .clamp(aug.crop.top, aug.crop.top + aug.crop.height - 1.0)
            .clamp(0.0, (h - 1) as f64) as usize;
        for x in 0..out_w {
            let xs = if aug.flip { out_w - 1 - x } else { x };
            let fx = (aug.crop.left + (xs as f64 + 0.5) * sx)
                .floor()
                .clamp(aug.crop.left, aug.crop.left + aug.crop.width - 1.0)
                .clamp(0.0, (w - 1) as f64) as usize;
            out[y * out_w + x] = mask[fy * w + fx];
        }
    }
    out
}

/// One row of a row group: pixels, and the lesion mask when asked for and present.
pub type GroupRow = (Vec<u8>, Option<Vec<u8>>);

/// What preparing a sample gives besides its image (rendered in place into the batch):
/// its mask plan and its rendered lesion mask.
type PreparedSample = (Option<MaskPlan>, Option<Vec<u8>>);

/// How each sample's mask plan is drawn.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    pub policy: MaskPolicy,
    /// Weight maps (grid row-major, un-augmented image) by table row; required by the
    /// attention strategies.
    pub weights: Option<Arc<HashMap<usize, Vec<f32>>>>,
    pub grid: [usize; 2],
}

/// What one epoch's stream does.
#[derive(Debug, Clone)]
pub struct LoaderSpec {
    pub batch_size: usize,
    pub shuffle: bool,
    /// RandomResizedCrop scale range and flips; `None`: the image as stored.
    pub augment: Option<(f64, f64)>,
    pub drop_last: bool,
    pub masks: Option<MaskSpec>,
    /// Also deliver lesion masks (figures, coverage).
    pub lesion_masks: bool,
    /// Row groups whose rows are shuffled together; 0: as many as fit in
    /// [`SHUFFLE_BUDGET`] bytes of pixels (a full shuffle for all but large tables — ingested
    /// tables are often sorted by class, so small windows would give one-class batches).
    pub shuffle_groups: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// `(rank, ranks)`: stream only part `rank` of every batch (multi-process data
    /// parallelism); batches are formed from the whole epoch first, so each rank's part is
    /// the same whatever the rank count, and per-sample draws are keyed by row.
    pub shard: (usize, usize),
}

impl LoaderSpec {
    /// In table order, no augmentation, no masks (evaluation, attention maps).
    pub fn eval(batch_size: usize) -> Self {
        Self {
            batch_size,
            shuffle: false,
            augment: None,
            drop_last: false,
            masks: None,
            lesion_masks: false,
            shuffle_groups: 1,
            prefetch: 2,
            shard: (0, 1),
        }
    }

    /// Shuffled, full batches only (training), augmented with RandomResizedCrop of `scale`
    /// and flips (`None`: the images as stored).
    pub fn train(batch_size: usize, scale: impl Into<Option<(f64, f64)>>) -> Self {
        Self {
            batch_size,
            shuffle: true,
            augment: scale.into(),
            drop_last: true,
            masks: None,
            lesion_masks: false,
            shuffle_groups: 0,
            prefetch: 2,
            shard: (0, 1),
        }
    }
}

/// A prepared batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Table rows of the samples.
    pub rows: Vec<usize>,
    /// `[n, C, H, W]`, normalised.
    pub images: Vec<f32>,
    /// Class indices (single-label tables; −1 where unlabelled).
    pub labels: Vec<i64>,
    /// Multi-hot targets `[n, classes]` (multi-label tables).
    pub targets: Vec<f32>,
    /// One plan per sample when the spec asks for masks.
    pub plans: Vec<MaskPlan>,
    /// Lesion masks (H×W, 0/1) when asked; `None` where the row has none.
    pub lesions: Vec<Option<Vec<u8>>>,
    /// Samples of the global batch this one is a part of (its own length unless the
    /// loader streams one rank's part).
    pub global: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The batch cut into `parts` consecutive shards of equal size (the first ones one
    /// sample larger when `parts` does not divide it; an empty shard where there are fewer
    /// samples than parts): what each data-parallel replica computes on.
    pub fn split(self, parts: usize) -> Vec<Batch> {
        let n = self.len();
        let parts = parts.max(1);
        let per = |v: usize| v.checked_div(n).unwrap_or(0);
        let (img, tgt) = (per(self.images.len()), per(self.targets.len()));
        let (mut images, mut targets) = (self.images.into_iter(), self.targets.into_iter());
        let (mut plans, mut lesions) = (self.plans.into_iter(), self.lesions.into_iter());
        let (mut rows, mut labels) = (self.rows.into_iter(), self.labels.into_iter());
        let global = self.global;
        (0..parts)
            .map(|i| {
                let m = msmae_dist::share(n, parts, i).len();
                Batch {
                    global,
                    rows: rows.by_ref().take(m).collect(),
                    images: images.by_ref().take(m * img).collect(),
                    labels: labels.by_ref().take(m).collect(),
                    targets: targets.by_ref().take(m * tgt).collect(),
                    plans: plans.by_ref().take(m).collect(),
                    lesions: lesions.by_ref().take(m).collect(),
                }
            })
            .collect()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// An epoch's batches, produced on a background thread.
#[derive(Debug)]
pub struct BatchStream {
    rx: Option<Receiver<Result<Batch, StageError>>>,
    stats: Arc<Mutex<LoaderStats>>,
    handle: Option<JoinHandle<()>>,
    pub num_batches: usize,
    received: usize,
    failed: bool,
}

impl Iterator for BatchStream {
    type Item = Result<Batch, StageError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(b) => {
                self.received += 1;
                Some(b)
            }
            Err(_) if self.received < self.num_batches => {
                // The producer ended early: it panicked (or could not start). Never let
                // that pass for the end of the epoch.
                self.failed = true;
                let why = match self.handle.take().map(JoinHandle::join) {
                    Some(Err(p)) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into()),
                    Some(Ok(())) => "it stopped without an error".into(),
                    None => "the loader thread could not be started".into(),
                };
                Some(Err(StageError::other(format!(
                    "the data loader failed after {} of {} batches: {why}",
                    self.received, self.num_batches
                ))))
            }
            Err(_) => None,
        }
    }
}

/// What a stream's loader has done so far: row-group reads and the most groups it held at
/// once (its memory is about that many groups of pixels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoaderStats {
    pub group_reads: usize,
    pub peak_groups_held: usize,
    /// The most groups the loader may hold.
    pub capacity: usize,
}

impl BatchStream {
    /// The loader's reads and peak held groups so far.
    pub fn stats(&self) -> LoaderStats {
        *self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        // Closing the receiver makes the producer's next send fail, so it stops.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Pixel bytes the shuffle window may hold (see [`LoaderSpec::shuffle_groups`]).
pub const SHUFFLE_BUDGET: usize = 1 << 30;

/// Row groups shuffled together, and the most the loader holds in memory at once:
/// `shuffle_groups`, or as many groups as fit in [`SHUFFLE_BUDGET`] when it is 0.
fn window_groups(table: &ImageTable, spec: &LoaderSpec) -> usize {
    if spec.shuffle_groups > 0 {
        return spec.shuffle_groups;
    }
    let largest = table.group_starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(1).max(1);
    let bytes = largest * table.height() * table.width() * table.channels() * table.meta.sample_bytes();
    (SHUFFLE_BUDGET / bytes.max(1)).max(2)
}

/// The order in which an epoch visits `rows`: row groups in a seeded random order, rows
/// shuffled within windows of `shuffle_groups` groups (so only that many groups are held
/// in memory); table order when not shuffling.
pub fn epoch_order(table: &ImageTable, rows: &[usize], spec: &LoaderSpec, seed: u64, epoch: u64) -> Vec<usize> {
    if !spec.shuffle {
        return rows.to_vec();
    }
    let mut rng = seeded_rng(seed, &[SeedPath::from("shuffle"), SeedPath::from(epoch)]);
    let mut by_group: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &r in rows {
        by_group.entry(table.group_of(r)).or_default().push(r);
    }
    let mut groups: Vec<Vec<usize>> = by_group.into_values().collect();
    groups.shuffle(&mut rng);
    let window = window_groups(table, spec);
    let mut order = Vec::with_capacity(rows.len());
    for window in groups.chunks(window) {
        let mut w: Vec<usize> = window.iter().flatten().copied().collect();
        w.shuffle(&mut rng);
        order.extend(w);
    }
    order
}

/// Start streaming one epoch of `rows`.
pub fn stream(
    table: Arc<ImageTable>,
    rows: &[usize],
    spec: LoaderSpec,
    norm: Normalizer,
    seed: u64,
    epoch: u64,
) -> BatchStream {
    let order = epoch_order(&table, rows, &spec, seed, epoch);
    let bs = spec.batch_size.max(1);
    let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
    if spec.drop_last && batches.last().is_some_and(|b| b.len() < bs) && batches.len() > 1 {
        batches.pop();
    }
    let (rank, ranks) = spec.shard;
    let batches: Vec<(Vec<usize>, usize)> =
        batches.into_iter().map(|b| (b[msmae_dist::share(b.len(), ranks, rank)].to_vec(), b.len())).collect();
    let num_batches = batches.len();
    let (tx, rx) = sync_channel(spec.prefetch.max(1));
    let stats = Arc::new(Mutex::new(LoaderStats::default()));
    let shared = stats.clone();
    let handle = std::thread::Builder::new()
        .name("msmae-loader".into())
        .spawn(move || produce(&table, batches, &spec, &norm, seed, epoch, tx, &shared))
        .ok();
    BatchStream { rx: Some(rx), stats, handle, num_batches, received: 0, failed: false }
}

type GroupData = Arc<Vec<GroupRow>>;

#[allow(clippy::too_many_arguments)]
fn produce(
    table: &ImageTable,
    batches: Vec<(Vec<usize>, usize)>,
    spec: &LoaderSpec,
    norm: &Normalizer,
    seed: u64,
    epoch: u64,
    tx: SyncSender<Result<Batch, StageError>>,
    stats: &Mutex<LoaderStats>,
) {
    let mut cache = GroupCache::new(&batches, table, window_groups(table, spec));
    stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner).capacity = cache.capacity;
    for (rows, global) in batches {
        let mut samples = Vec::with_capacity(rows.len());
        for &r in &rows {
            let g = table.group_of(r);
            match cache.take(table, g, spec.lesion_masks, stats) {
                Ok(data) => samples.push((r, data, r - table.group_starts[g])),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        let batch = prepare(table, samples, spec, norm, seed, epoch).map(|b| Batch { global, ..b });
        if tx.send(batch).is_err() {
            return; // consumer gone
        }
    }
}

/// The row groups an epoch's loader holds: each group is read when first needed and
/// dropped after its last use; when `capacity` groups are held and another is needed, the
/// one needed again furthest in the future is dropped (and read again when it is), so memory
/// stays bounded whatever order the rows come in — evaluation of the val rows and then the
/// test rows, for one, visits every group twice.
struct GroupCache {
    held: HashMap<usize, GroupData>,
    /// Positions (in the epoch's sample order) at which each group is still needed.
    uses: HashMap<usize, std::collections::VecDeque<usize>>,
    capacity: usize,
}

impl GroupCache {
    fn new(batches: &[(Vec<usize>, usize)], table: &ImageTable, capacity: usize) -> Self {
        let mut uses: HashMap<usize, std::collections::VecDeque<usize>> = HashMap::new();
        for (pos, &r) in batches.iter().flat_map(|(b, _)| b).enumerate() {
            uses.entry(table.group_of(r)).or_default().push_back(pos);
        }
        Self { held: HashMap::new(), uses, capacity: capacity.max(1) }
    }

    /// Group `g`'s rows for its next use.
    fn take(
        &mut self,
        table: &ImageTable,
        g: usize,
        masks: bool,
        stats: &Mutex<LoaderStats>,
    ) -> Result<GroupData, StageError> {
        let data = match self.held.get(&g) {
            Some(d) => d.clone(),
            None => {
                if self.held.len() >= self.capacity {
                    let furthest = self
                        .held
                        .keys()
                        .copied()
                        .max_by_key(|h| self.uses.get(h).and_then(|u| u.front().copied()).unwrap_or(usize::MAX));
                    if let Some(h) = furthest {
                        self.held.remove(&h);
                    }
                }
                let d = Arc::new(table.read_group(g, masks)?);
                self.held.insert(g, d.clone());
                let mut st = stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                st.group_reads += 1;
                st.peak_groups_held = st.peak_groups_held.max(self.held.len());
                st.capacity = self.capacity;
                d
            }
        };
        let left = self.uses.get_mut(&g).map(|u| {
            u.pop_front();
            u.len()
        });
        if left.unwrap_or(0) == 0 {
            self.held.remove(&g);
        }
        Ok(data)
    }
}

fn prepare(
    table: &ImageTable,
    samples: Vec<(usize, GroupData, usize)>,
    spec: &LoaderSpec,
    norm: &Normalizer,
    seed: u64,
    epoch: u64,
) -> Result<Batch, StageError> {
    let (h, w, c) = (table.height(), table.width(), table.channels());
    let per = c * h * w;
    let k = table.num_classes();
    // Each image is rendered straight into its slot of the batch (no per-image buffer).
    let mut images = vec![0f32; samples.len() * per];
    let prepared: Vec<PreparedSample> = images
        .par_chunks_mut(per.max(1))
        .zip(samples.par_iter())
        .map(|(img, (row, data, off))| {
            let px = &data[*off].0;
            let aug = match spec.augment {
                Some(scale) => augment::sample(&mut sample_rng(seed, "augment", epoch, *row as u64), h, w, scale),
                None => Augmentation::identity(h, w),
            };
            render_depth(px, table.meta.bit_depth, h, w, c, &aug, h, w, norm, img);
            let plan = match &spec.masks {
                Some(m) => {
                    let [gh, gw] = m.grid;
                    let mut rng = sample_rng(seed, "mask", epoch, *row as u64);
                    if m.policy.needs_weights() {
                        let map = m.weights.as_ref().and_then(|ws| ws.get(row)).ok_or_else(|| {
                            StageError::data(
                                &table.path,
                                Some(format!("row `{}`", table.rows[*row].id)),
                                "no attention weights for this image (the mask weights come from another table?)",
                            )
                        })?;
                        let moved = augment::transform_weights(map, gh, gw, h, w, &aug, gh, gw);
                        Some(m.policy.select(Some(&moved), gh * gw, &mut rng))
                    } else {
                        Some(m.policy.select(None, gh * gw, &mut rng))
                    }
                }
                None => None,
            };
            // Lesion masks go through the same crop and flip as the image.
            let lesion =
                if spec.lesion_masks { data[*off].1.as_ref().map(|m| render_mask(m, h, w, &aug, h, w)) } else { None };
            Ok((plan, lesion))
        })
        .collect::<Vec<Result<_, StageError>>>()
        .into_iter()
        // The first failing row in batch order, whichever thread found it first.
        .collect::<Result<_, StageError>>()?;
    let mut plans = Vec::new();
    let mut lesions = Vec::new();
    for (plan, lesion) in prepared {
        plans.extend(plan);
        if spec.lesion_masks {
            lesions.push(lesion);
        }
    }
    let rows: Vec<usize> = samples.iter().map(|s| s.0).collect();
    let labels = rows.iter().map(|&r| table.rows[r].label.map_or(-1, i64::from)).collect();
    let targets = if table.meta.multi_label {
        rows.iter()
            .flat_map(|&r| table.rows[r].labels.clone().unwrap_or_else(|| vec![0; k]).into_iter().map(f32::from))
            .collect()
    } else {
        Vec::new()
    };
    let global = rows.len();
    Ok(Batch { rows, images, labels, targets, plans, lesions, global })
}

#[cfg(test)]
mod tests {
    use super::*;
    use msmae_mask::augment::CropBox;

    #[test]
    fn sixteen_bit_pixels_render_like_their_eight_bit_equivalent() {
        let (h, w) = (6, 5);
        let px8: Vec<u8> = (0..h * w).map(|i| (i * 37 % 256) as u8).collect();
        let px16: Vec<u8> = px8.iter().flat_map(|&v| (u16::from(v) * 257).to_le_bytes()).collect();
        let norm = Normalizer { mean: vec![0.3], std: vec![0.2] };
        let aug = Augmentation { crop: augment::CropBox { top: 0.5, left: 1.0, height: 4.0, width: 3.5 }, flip: true };
        let (mut a, mut b) = (vec![0f32; 4 * 4], vec![0f32; 4 * 4]);
        render(&px8, h, w, 1, &aug, 4, 4, &norm, &mut a);
        render_depth(&px16, 16, h, w, 1, &aug, 4, 4, &norm, &mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} {b:?}");
        // and the extra depth is used: 16-bit steps between two 8-bit levels are kept
        let fine: Vec<u8> = [1000u16, 1001].iter().cycle().take(h * w).flat_map(|v| v.to_le_bytes()).collect();
        let mut c = vec![0f32; h * w];
        render_depth(&fine, 16, h, w, 1, &Augmentation::identity(h, w), h, w, &norm, &mut c);
        assert!((c[1] - c[0]).abs() > 1e-5 && (c[1] - c[0] - 1.0 / 65535.0 / 0.2).abs() < 1e-6);
    }

    #[test]
    fn identity_render_reproduces_pixels_and_flip_mirrors() {
        let (h, w, c) = (4, 5, 2);
        let px: Vec<u8> = (0..h * w * c).map(|i| (i * 7 % 256) as u8).collect();
        let norm = Normalizer { mean: vec![0.0; c], std: vec![1.0; c] };
        let mut out = vec![0f32; h * w * c];
        render(&px, h, w, c, &Augmentation::identity(h, w), h, w, &norm, &mut out);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let want = f32::from(px[(y * w + x) * c + ch]) / 255.0;
                    assert!((out[(ch * h + y) * w + x] - want).abs() < 1e-6);
                }
            }
        }
        let flip = Augmentation { crop: CropBox::full(h, w), flip: true };
        let mut f = vec![0f32; h * w * c];
        render(&px, h, w, c, &flip, h, w, &norm, &mut f);
        assert_eq!(f[w], out[w + (w - 1)]);
    }

    #[test]
    fn crop_render_takes_the_crop_region() {
        // A 8×8 image whose left half is 0 and right half 255: a crop of the right half
        // renders all-255.
        let (h, w) = (8, 8);
        let px: Vec<u8> = (0..h * w).map(|i| if i % w >= 4 { 255 } else { 0 }).collect();
        let norm = Normalizer { mean: vec![0.0], std: vec![1.0] };
        let aug = Augmentation { crop: CropBox { top: 0.0, left: 4.0, height: 8.0, width: 4.0 }, flip: false };
        let mut out = vec![0f32; h * w];
        render(&px, h, w, 1, &aug, h, w, &norm, &mut out);
        assert!(out.iter().all(|v| (*v - 1.0).abs() < 1e-6), "{out:?}");
    }
}
