//! The training loops: a ViT classifier (supervised attention model, MSMAE and full-token
//! fine-tuning) and MAE pre-training with MSMAE masks, plus what they share — device set-up,
//! attention maps of a whole split, evaluation, and checkpoints to resume from.
//!
//! Determinism: batches and masks depend only on (seed, epoch, row) (see [`crate::data`]);
//! the backend's own RNG (drop-path) is re-seeded from (seed, epoch) at every epoch, and
//! parameters are initialised right after seeding. So a run resumed from the checkpoint of
//! epoch `k` continues exactly as the uninterrupted run would have.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};
use serde::{Deserialize, Serialize};

use msmae_core::{SeedPath, StageContext, StageError, derive_seed};
use msmae_data::attention::{AttentionMeta, AttentionRow, read_attention, write_attention, ATTENTION_SCHEMA_VERSION};
use msmae_data::table::Split;
use msmae_mask::MaskPolicy;
use msmae_vit::attention_map::cls_attention_map;
use msmae_vit::patch::index_tensor;
use msmae_vit::{MaskedAutoencoder, VisionTransformer};

use crate::data::{self, Batch, ImageTable, LoaderSpec, MaskSpec, Normalizer};
use crate::model::{LayerDecay, Schedule, adamw, bce_with_logits};

/// The devices a stage computes on.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Plain device (inference).
    pub device: Device,
    /// Autodiff device (training).
    pub train: Device,
}

/// Resolve the stage's backend/device (from the runner's `--backend`/`--device`).
pub fn runtime(ctx: &StageContext<'_>) -> Result<Runtime, StageError> {
    let b = ctx.env.backend.parse().map_err(|e: msmae_backend::BackendError| StageError::other(e.to_string()))?;
    let d = ctx.env.device.parse().map_err(|e: msmae_backend::BackendError| StageError::other(e.to_string()))?;
    let c = msmae_backend::select(b, d).map_err(|e| StageError::other(e.to_string()))?;
    Ok(Runtime { train: c.device.clone().autodiff(), device: c.device })
}

/// Seed the backend's RNG for `purpose` (parameter init, an epoch's drop-path).
pub fn seed_backend(rt: &Runtime, seed: u64, purpose: &str, epoch: u64) {
    rt.train.seed(derive_seed(seed, &[SeedPath::from("backend"), SeedPath::from(purpose), SeedPath::from(epoch)]));
}

/// `[n, C, H, W]` images of a batch.
pub fn images(batch: &mut Batch, table: &ImageTable, device: &Device) -> Tensor<4> {
    let n = batch.len();
    let v = std::mem::take(&mut batch.images);
    Tensor::from_data(TensorData::new(v, [n, table.channels(), table.height(), table.width()]), device)
}

/// CLS-attention maps (METHOD.md §2) of `rows`, by row: the model in eval mode, the
/// stored image without augmentation.
pub fn attention_maps(vit: &VisionTransformer, table: &Arc<ImageTable>, rows: &[usize], norm: &Normalizer, batch_size: usize, rt: &Runtime, ctx: &StageContext<'_>) -> Result<HashMap<usize, Vec<f32>>, StageError> {
    attention_pass(vit, table, rows, norm, LoaderSpec::eval(batch_size), rt, ctx, |_, _, _| Ok(()))
}

/// [`attention_maps`] with a look at every image as its map is computed: `visit(batch,
/// index in batch, map)` sees the batch's pixels (and lesion masks if `spec` asks for
/// them), so callers that need both read the table once.
#[allow(clippy::too_many_arguments)]
pub fn attention_pass(
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    spec: LoaderSpec,
    rt: &Runtime,
    ctx: &StageContext<'_>,
    mut visit: impl FnMut(&Batch, usize, &[f32]) -> Result<(), StageError>,
) -> Result<HashMap<usize, Vec<f32>>, StageError> {
    let model = vit.valid();
    let mut out = HashMap::with_capacity(rows.len());
    for batch in data::stream(table.clone(), rows, spec, norm.clone(), ctx.seed, 0) {
        ctx.cancel.check()?;
        let batch = batch?;
        let n = batch.len();
        let x = Tensor::from_data(TensorData::new(batch.images.clone(), [n, table.channels(), table.height(), table.width()]), &rt.device);
        let (_, attn) = model.forward_with_attention(x);
        let maps = cls_attention_map(attn);
        let [_, l] = maps.dims();
        let flat = to_vec(maps)?;
        for (i, r) in batch.rows.iter().enumerate() {
            let map = &flat[i * l..(i + 1) * l];
            visit(&batch, i, map)?;
            out.insert(*r, map.to_vec());
        }
    }
    Ok(out)
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, StageError> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| StageError::other(format!("reading a tensor back: {e:?}")))
}

/// Write maps as an attention table (rows in table order).
pub fn write_maps(path: &Path, table: &ImageTable, maps: &HashMap<usize, Vec<f32>>, grid: [usize; 2], provenance: serde_json::Value) -> Result<u64, StageError> {
    let mut keys: Vec<usize> = maps.keys().copied().collect();
    keys.sort_unstable();
    let rows: Vec<AttentionRow> = keys.iter().map(|r| AttentionRow { id: table.rows[*r].id.clone(), split: table.rows[*r].split, weights: maps[r].clone() }).collect();
    let meta = AttentionMeta { schema_version: ATTENTION_SCHEMA_VERSION, grid: [grid[0] as u32, grid[1] as u32], provenance };
    write_attention(path, &meta, &rows).map_err(|e| StageError::other(e.to_string()))
}

/// Read an attention table and key it by the rows of `table` (matched by image id).
pub fn read_maps(path: &Path, table: &ImageTable, grid: [usize; 2]) -> Result<HashMap<usize, Vec<f32>>, StageError> {
    let (meta, rows) = read_attention(path).map_err(|e| StageError::data(path, None, e.to_string()))?;
    if [meta.grid[0] as usize, meta.grid[1] as usize] != grid {
        return Err(StageError::data(path, None, format!("attention maps on a {:?} grid, but the model's patch grid is {grid:?} (same image size and patch size needed)", meta.grid)));
    }
    let by_id: HashMap<&str, usize> = table.rows.iter().enumerate().map(|(i, r)| (r.id.as_str(), i)).collect();
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        match by_id.get(r.id.as_str()) {
            Some(&i) => {
                out.insert(i, r.weights);
            }
            None => return Err(StageError::data(path, Some(format!("row `{}`", r.id)), format!("image not in the image table {}", table.path.display()))),
        }
    }
    Ok(out)
}

/// A logged value, rounded to 13 significant digits so that it survives a JSON round trip
/// (a resumed run reloads the history of the epochs before the checkpoint) bit for bit.
pub fn logged(x: f64) -> f64 {
    if x.is_finite() { format!("{x:.12e}").parse().unwrap_or(x) } else { x }
}

/// One epoch in `history.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconstruction_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// Macro (single-label) or mean per-label (multi-label) AUC on the val split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_auc: Option<f64>,
    /// Patch tokens (plus CLS) each training sample fed to the encoder.
    pub tokens: usize,
    pub masking: String,
    pub refreshed_maps: bool,
    /// Wall time of the training steps of this epoch (not evaluation), seconds. Excluded
    /// from reproducibility comparisons (timing is not content).
    pub seconds: f64,
}

// ---------------------------------------------------------------------------------------
// Checkpoints to resume from.

/// Materialise a freshly built model's lazy parameter initialisers now, in module order,
/// right after the backend was seeded for initialisation (rather than at the first forward,
/// after an epoch's re-seeding).
pub fn materialise<M: Module>(model: &M) {
    let _ = model.clone().into_record();
}

/// `state.json` in the resume directory: the commit point of a checkpoint. `H` is one
/// epoch of the stage's history (logged values rounded with [`logged`], so that a resumed
/// run writes the same history bit for bit).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeState<H = EpochLog> {
    pub epochs_done: usize,
    pub history: Vec<H>,
    pub best: Option<(f64, usize)>,
    pub has_maps: bool,
}

/// The checkpoints a training stage resumes from after a kill: model, optimiser, best model
/// and masking maps per checkpoint, committed by an atomically replaced `state.json`, in
/// the store's resume directory for the stage's cache key (none: checkpoints are off).
#[derive(Debug)]
pub struct Resume {
    dir: Option<PathBuf>,
}

impl Resume {
    /// The resume directory of the running stage.
    pub fn of(ctx: &StageContext<'_>) -> Self {
        Resume { dir: ctx.resume_dir().map(Path::to_path_buf) }
    }

    fn file(&self, name: &str, epoch: usize) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{name}-e{epoch}.bpk")))
    }

    /// Whether to checkpoint after `done` of `epochs` epochs: every `every` epochs (0 acts
    /// as 1) and after the last.
    pub fn due(done: usize, every: usize, epochs: usize) -> bool {
        done % every.max(1) == 0 || done == epochs
    }

    /// The last committed checkpoint, if any (an unreadable one is ignored with a warning:
    /// the stage starts over).
    pub fn load_state<H: serde::de::DeserializeOwned>(&self) -> Option<ResumeState<H>> {
        let p = self.dir.as_ref()?.join("state.json");
        let bytes = std::fs::read(&p).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("ignoring unreadable checkpoint state {}: {e}", p.display());
                None
            }
        }
    }

    /// Restore what a checkpoint holds: the model, the optimiser (`optim` builds it for the
    /// loaded model, then its state is loaded), the best model if recorded, and the maps in
    /// use (`maps`: the table and patch grid they index).
    #[allow(clippy::type_complexity)]
    pub fn restore<M: Module, H>(&self, st: &ResumeState<H>, model: M, optim: impl FnOnce(&M) -> ModuleOptimizer, maps: Option<(&ImageTable, [usize; 2])>) -> Result<(M, ModuleOptimizer, Option<M>, Option<Arc<HashMap<usize, Vec<f32>>>>), StageError> {
        let load = |name: &str| self.file(name, st.epochs_done).unwrap_or_default();
        let bad = |p: PathBuf, e: String| StageError::data(&p, None, format!("cannot resume from the checkpoint after epoch {} ({e}); `--force` starts over", st.epochs_done));
        let model = model.try_load_file(load("model")).map_err(|e| bad(load("model"), e.to_string()))?;
        let optim = optim(&model).load(load("optim")).map_err(|e| bad(load("optim"), e.to_string()))?;
        let best = match st.best {
            Some(_) => Some(model.clone().try_load_file(load("best")).map_err(|e| bad(load("best"), e.to_string()))?),
            None => None,
        };
        let maps = match (&self.dir, st.has_maps, maps) {
            (Some(d), true, Some((table, grid))) => Some(Arc::new(read_maps(&d.join(format!("maps-e{}.parquet", st.epochs_done)), table, grid)?)),
            _ => None,
        };
        Ok((model, optim, best, maps))
    }

    /// Save model, optimiser, best model and maps for `epochs_done`, then (atomically) the
    /// state that points at them, then drop older files.
    pub fn save<M: Module, H: Serialize>(&self, st: &ResumeState<H>, model: &M, optim: &ModuleOptimizer, best: Option<&M>, maps: Option<(&HashMap<usize, Vec<f32>>, &ImageTable, [usize; 2])>) -> Result<(), StageError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let e = st.epochs_done;
        let err = |p: &Path, m: String| StageError::other(format!("writing checkpoint {}: {m}", p.display()));
        let mp = self.file("model", e).unwrap_or_default();
        model.clone().save_file(&mp).map_err(|x| err(&mp, x.to_string()))?;
        let op = self.file("optim", e).unwrap_or_default();
        optim.save(&op).map_err(|x| err(&op, x.to_string()))?;
        if let Some(b) = best {
            let bp = self.file("best", e).unwrap_or_default();
            b.clone().save_file(&bp).map_err(|x| err(&bp, x.to_string()))?;
        }
        if let Some((m, table, grid)) = maps {
            write_maps(&dir.join(format!("maps-e{e}.parquet")), table, m, grid, serde_json::Value::Null)?;
        }
        // Durable before the state points at them (power loss, not just a kill).
        for p in [Some(mp.clone()), Some(op.clone()), best.map(|_| self.file("best", e).unwrap_or_default()), maps.map(|_| dir.join(format!("maps-e{e}.parquet")))].into_iter().flatten() {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(|x| StageError::io(&p, x))?;
        }
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).map_err(|x| err(&tmp, x.to_string()))?).map_err(|x| StageError::io(&tmp, x))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|x| StageError::io(&tmp, x))?;
        std::fs::rename(&tmp, dir.join("state.json")).map_err(|x| StageError::io(dir, x))?;
        std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|x| StageError::io(dir, x))?;
        // Older checkpoints are no longer referenced.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let keep = name == "state.json" || name.ends_with(&format!("-e{e}.bpk")) || name == format!("maps-e{e}.parquet");
                if !keep {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        tracing::debug!("checkpoint after epoch {e} in {}", dir.display());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Classifier training (supervised attention model, fine-tuning).

/// The validation score that picks the best model (and drives early stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectOn {
    /// Accuracy for single-label data, mean per-label AUC for multi-label data (the
    /// ChestX-ray14 convention).
    #[default]
    Auto,
    /// Validation accuracy (single-label only).
    Accuracy,
    /// Validation loss (lower is better).
    Loss,
    /// Macro one-vs-rest AUC (single-label) or mean per-label AUC (multi-label).
    Auc,
}

/// Options of a classifier run (the stages map their configs onto this).
#[derive(Debug, Clone)]
pub struct ClassifierOpts {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub layer_decay: f64,
    pub label_smoothing: f64,
    pub augment: Option<(f64, f64)>,
    /// MSMAE fine-tuning: keep only the visible tokens of an attention-guided plan, maps
    /// recomputed from the model itself every `refresh_every` epochs from epoch 0.
    pub msmae: Option<(MaskPolicy, usize)>,
    /// Stop when validation has not improved for this many epochs.
    pub patience: Option<usize>,
    /// The validation score that picks the best epoch.
    pub select_on: SelectOn,
    pub checkpoint_every: usize,
}

/// What a classifier run returns.
#[derive(Debug)]
pub struct ClassifierResult {
    /// The model with the best validation score (the last one without validation data).
    pub model: VisionTransformer,
    pub history: Vec<EpochLog>,
    pub best_epoch: Option<usize>,
}

fn cls_loss(logits: Tensor<2>, batch: &Batch, table: &ImageTable, smoothing: f64, device: &Device) -> Tensor<1> {
    if table.meta.multi_label {
        let n = batch.len();
        let t = Tensor::<2>::from_data(TensorData::new(batch.targets.clone(), [n, table.num_classes()]), device);
        bce_with_logits(logits, t)
    } else {
        let y = Tensor::<1, Int>::from_data(TensorData::new(batch.labels.clone(), [batch.len()]), device);
        let mut cfg = CrossEntropyLossConfig::new();
        if smoothing > 0.0 {
            cfg = cfg.with_smoothing(Some(smoothing as f32));
        }
        cfg.init(device).forward(logits, y)
    }
}

/// Scores (softmax or sigmoid) and mean loss of `rows`, all tokens, eval mode.
pub fn predict(vit: &VisionTransformer, table: &Arc<ImageTable>, rows: &[usize], norm: &Normalizer, batch_size: usize, rt: &Runtime, ctx: &StageContext<'_>) -> Result<(Vec<Vec<f32>>, f64), StageError> {
    let model = vit.valid();
    let mut scores = Vec::with_capacity(rows.len());
    let (mut loss_sum, mut n) = (0f64, 0usize);
    for batch in data::stream(table.clone(), rows, LoaderSpec::eval(batch_size), norm.clone(), ctx.seed, 0) {
        ctx.cancel.check()?;
        let mut batch = batch?;
        let x = images(&mut batch, table, &rt.device);
        let logits = model.forward(x);
        let [b, k] = logits.dims();
        // Unlabelled images (a test set without labels) get scores but no loss.
        if table.meta.multi_label || batch.labels.iter().all(|l| *l >= 0) {
            let loss = cls_loss(logits.clone(), &batch, table, 0.0, &rt.device);
            loss_sum += f64::from(loss.into_scalar::<f32>()) * b as f64;
            n += b;
        }
        let p = if table.meta.multi_label { sigmoid(logits) } else { softmax(logits, 1) };
        let flat = to_vec(p)?;
        scores.extend(flat.chunks(k).map(<[f32]>::to_vec));
    }
    if scores.len() != rows.len() {
        return Err(StageError::other(format!("predicted {} of {} images", scores.len(), rows.len())));
    }
    Ok((scores, if n > 0 { loss_sum / n as f64 } else { f64::NAN }))
}

fn accuracy(scores: &[Vec<f32>], rows: &[usize], table: &ImageTable) -> Option<f64> {
    if table.meta.multi_label || rows.is_empty() {
        return None;
    }
    let hits = scores
        .iter()
        .zip(rows)
        .filter(|(s, r)| {
            let arg = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as i32);
            arg == table.rows[**r].label
        })
        .count();
    Some(hits as f64 / rows.len() as f64)
}

/// Macro one-vs-rest AUC (single-label) or mean per-label AUC (multi-label) of `scores`.
fn auc(scores: &[Vec<f32>], rows: &[usize], table: &ImageTable) -> Option<f64> {
    let probs: Vec<Vec<f64>> = scores.iter().map(|s| s.iter().map(|&v| f64::from(v)).collect()).collect();
    let k = table.num_classes();
    if table.meta.multi_label {
        let truth: Vec<Vec<u8>> = rows.iter().map(|&r| table.rows[r].labels.clone().unwrap_or_else(|| vec![0; k])).collect();
        msmae_eval::metrics::multilabel_auc(&truth, &probs, k).mean_auc
    } else {
        let truth: Vec<usize> = rows.iter().map(|&r| table.rows[r].label.unwrap_or(0).max(0) as usize).collect();
        msmae_eval::metrics::ovr_auc(&truth, &probs, k).macro_auc
    }
}

/// Train a classifier on the train split, selecting on the val split.
pub fn train_classifier(ctx: &StageContext<'_>, rt: &Runtime, table: &Arc<ImageTable>, norm: &Normalizer, mut model: VisionTransformer, opts: &ClassifierOpts) -> Result<ClassifierResult, StageError> {
    let train_rows = table.labelled_rows_of(Split::Train);
    let val_rows = table.labelled_rows_of(Split::Val);
    if train_rows.len() < opts.batch_size {
        return Err(StageError::data(&table.path, None, format!("{} labelled training images, fewer than one batch of {}", train_rows.len(), opts.batch_size)));
    }
    let grid = [table.height() / model.patch_embed.proj.stride[0], table.width() / model.patch_embed.proj.stride[1]];
    let resume = Resume::of(ctx);
    let mut optim = adamw(&model, 0.999, opts.weight_decay);
    let mut history = Vec::new();
    let mut best: Option<(f64, usize)> = None;
    let mut best_model: Option<VisionTransformer> = None;
    let mut maps: Option<Arc<HashMap<usize, Vec<f32>>>> = None;
    let mut start = 0;
    if let Some(st) = resume.load_state() {
        let (m, o, b, mp) = resume.restore(&st, model, |m| adamw(m, 0.999, opts.weight_decay), Some((table.as_ref(), grid)))?;
        (model, optim, best_model) = (m, o, b);
        maps = mp.or(maps);
        tracing::info!("`{}`: resuming after epoch {} of {}", ctx.name, st.epochs_done, opts.epochs);
        start = st.epochs_done;
        history = st.history;
        best = st.best;
    }
    let decay = LayerDecay::new(&model, opts.layer_decay);
    let sched = Schedule { lr: opts.lr, min_lr: opts.min_lr, warmup_epochs: opts.warmup_epochs, epochs: opts.epochs as f64 };
    let l = grid[0] * grid[1];
    let bar = ctx.progress.bar(Some((opts.epochs - start) as u64), &format!("{}: epochs", ctx.name));
    for epoch in start..opts.epochs {
        ctx.cancel.check()?;
        let mut spec = LoaderSpec::train(opts.batch_size, opts.augment.unwrap_or((1.0, 1.0)));
        if opts.augment.is_none() {
            spec.augment = None;
        }
        let mut refreshed = false;
        let (masking, tokens) = match &opts.msmae {
            Some((policy, refresh)) => {
                if maps.is_none() || (*refresh > 0 && epoch % refresh == 0) {
                    maps = Some(Arc::new(attention_maps(&model, table, &train_rows, norm, opts.batch_size.max(64), rt, ctx)?));
                    refreshed = true;
                }
                spec.masks = Some(MaskSpec { policy: policy.clone(), weights: maps.clone(), grid });
                (format!("{policy:?}"), policy.visible_count(l) + 1)
            }
            None => ("none".to_string(), l + 1),
        };
        seed_backend(rt, ctx.seed, "epoch", epoch as u64);
        let stream = data::stream(table.clone(), &train_rows, spec, norm.clone(), ctx.seed, epoch as u64);
        let nb = stream.num_batches.max(1);
        let t = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        let mut lr = 0.0;
        for (i, batch) in stream.enumerate() {
            ctx.cancel.check()?;
            let mut batch = batch?;
            lr = sched.at(epoch as f64 + i as f64 / nb as f64);
            let x = images(&mut batch, table, &rt.train);
            let logits = match &opts.msmae {
                Some(_) => {
                    let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
                    model.forward_visible(x, index_tensor(&vis, &rt.train))
                }
                None => model.forward(x),
            };
            let loss = cls_loss(logits, &batch, table, opts.label_smoothing, &rt.train);
            let lv = f64::from(loss.clone().into_scalar::<f32>());
            if !lv.is_finite() {
                return Err(StageError::other(format!("training diverged at epoch {epoch}, step {i}: loss {lv} (lower the learning rate)")));
            }
            loss_sum += lv * batch.len() as f64;
            seen += batch.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(decay.rates(lr), model, grads);
        }
        let seconds = t.elapsed().as_secs_f64();
        let (val_loss, val_acc, val_auc) = if val_rows.is_empty() {
            (None, None, None)
        } else {
            let (s, vl) = predict(&model, table, &val_rows, norm, opts.batch_size.max(64), rt, ctx)?;
            (Some(vl), accuracy(&s, &val_rows, table), auc(&s, &val_rows, table))
        };
        // Higher is better; a score the split cannot give (AUC with one class present)
        // falls back to minus the loss.
        let chosen = match (opts.select_on, table.meta.multi_label) {
            (SelectOn::Auto, false) | (SelectOn::Accuracy, _) => val_acc,
            (SelectOn::Auto, true) | (SelectOn::Auc, _) => val_auc,
            (SelectOn::Loss, _) => None,
        };
        let score = chosen.or(val_loss.filter(|v| v.is_finite()).map(|v| -v));
        if let Some(s) = score {
            let s = logged(s);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, epoch));
                best_model = Some(model.clone());
            }
        }
        history.push(EpochLog { epoch, lr: logged(lr), train_loss: logged(loss_sum / seen.max(1) as f64), reconstruction_loss: None, val_loss: val_loss.map(logged), val_accuracy: val_acc.map(logged), val_auc: val_auc.map(logged), tokens, masking, refreshed_maps: refreshed, seconds });
        tracing::info!(
            "`{}` epoch {}/{}: loss {:.4}{}{} ({seconds:.1} s)",
            ctx.name,
            epoch + 1,
            opts.epochs,
            loss_sum / seen.max(1) as f64,
            val_loss.map(|v| format!(", val loss {v:.4}")).unwrap_or_default(),
            val_acc.map(|v| format!(", val acc {:.3}", v)).unwrap_or_default()
        );
        bar.inc(1);
        let stop = match (opts.patience, best) {
            (Some(p), Some((_, be))) => epoch >= be + p,
            _ => false,
        };
        let done = epoch + 1;
        if Resume::due(done, opts.checkpoint_every, opts.epochs) || stop {
            let st = ResumeState { epochs_done: if stop { opts.epochs } else { done }, history: history.clone(), best, has_maps: maps.is_some() };
            resume.save(&st, &model, &optim, best_model.as_ref(), maps.as_deref().map(|m| (m, table.as_ref(), grid)))?;
        }
        if stop {
            tracing::info!("`{}`: early stop after epoch {done} (best epoch {})", ctx.name, best.map(|b| b.1 + 1).unwrap_or(0));
            break;
        }
    }
    let best_epoch = best.map(|b| b.1);
    Ok(ClassifierResult { model: best_model.unwrap_or(model), history, best_epoch })
}

// ---------------------------------------------------------------------------------------
// MAE pre-training.

/// Options of a pre-training run.
#[derive(Debug, Clone)]
pub struct PretrainOpts {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub augment: Option<(f64, f64)>,
    /// Ratio of MAE random masking (the warm-up phase, or throughout without weights).
    pub mask_ratio: f64,
    /// Attention-guided masking after `warmup_mask_epochs`, starting from these maps.
    pub guided: Option<(MaskPolicy, HashMap<usize, Vec<f32>>)>,
    pub warmup_mask_epochs: usize,
    /// Recompute the maps from the model being trained every this many epochs (0: never).
    pub refresh_every: usize,
    pub cls_weight: f64,
    pub checkpoint_every: usize,
}

/// Result of pre-training.
#[derive(Debug)]
pub struct PretrainResult {
    pub model: MaskedAutoencoder,
    pub history: Vec<EpochLog>,
    /// The maps in use at the end (after the last refresh), if guided.
    pub maps: Option<HashMap<usize, Vec<f32>>>,
}

/// Pre-train an MAE on the train split (labels only for the `cls_weight` term).
pub fn pretrain(ctx: &StageContext<'_>, rt: &Runtime, table: &Arc<ImageTable>, norm: &Normalizer, mut model: MaskedAutoencoder, opts: &PretrainOpts) -> Result<PretrainResult, StageError> {
    let train_rows = if opts.cls_weight > 0.0 { table.labelled_rows_of(Split::Train) } else { table.rows_of(Split::Train) };
    if train_rows.len() < opts.batch_size {
        return Err(StageError::data(&table.path, None, format!("{} training images, fewer than one batch of {}", train_rows.len(), opts.batch_size)));
    }
    let p = model.patch_size;
    let grid = [table.height() / p, table.width() / p];
    let l = grid[0] * grid[1];
    let resume = Resume::of(ctx);
    let mut optim = adamw(&model, 0.95, opts.weight_decay);
    let mut history = Vec::new();
    let mut maps: Option<Arc<HashMap<usize, Vec<f32>>>> = opts.guided.as_ref().map(|(_, m)| Arc::new(m.clone()));
    let mut start = 0;
    if let Some(st) = resume.load_state() {
        let (m, o, _, mp) = resume.restore(&st, model, |m| adamw(m, 0.95, opts.weight_decay), Some((table.as_ref(), grid)))?;
        (model, optim) = (m, o);
        maps = mp.or(maps);
        tracing::info!("`{}`: resuming after epoch {} of {}", ctx.name, st.epochs_done, opts.epochs);
        start = st.epochs_done;
        history = st.history;
    }
    let sched = Schedule { lr: opts.lr, min_lr: opts.min_lr, warmup_epochs: opts.warmup_epochs, epochs: opts.epochs as f64 };
    let random = MaskPolicy::Random { mask_ratio: opts.mask_ratio };
    let bar = ctx.progress.bar(Some((opts.epochs - start) as u64), &format!("{}: epochs", ctx.name));
    for epoch in start..opts.epochs {
        ctx.cancel.check()?;
        let mut refreshed = false;
        let policy = match &opts.guided {
            Some((policy, _)) if epoch >= opts.warmup_mask_epochs => {
                let since = epoch - opts.warmup_mask_epochs;
                if opts.refresh_every > 0 && since > 0 && since % opts.refresh_every == 0 {
                    maps = Some(Arc::new(attention_maps(&model.encoder, table, &train_rows, norm, opts.batch_size.max(64), rt, ctx)?));
                    refreshed = true;
                }
                policy.clone()
            }
            _ => random.clone(),
        };
        let mut spec = LoaderSpec::train(opts.batch_size, opts.augment.unwrap_or((1.0, 1.0)));
        if opts.augment.is_none() {
            spec.augment = None;
        }
        spec.masks = Some(MaskSpec { policy: policy.clone(), weights: if policy.needs_weights() { maps.clone() } else { None }, grid });
        seed_backend(rt, ctx.seed, "epoch", epoch as u64);
        let stream = data::stream(table.clone(), &train_rows, spec, norm.clone(), ctx.seed, epoch as u64);
        let nb = stream.num_batches.max(1);
        let t = Instant::now();
        let (mut loss_sum, mut rec_sum, mut seen) = (0f64, 0f64, 0usize);
        let mut lr = 0.0;
        for (i, batch) in stream.enumerate() {
            ctx.cancel.check()?;
            let mut batch = batch?;
            lr = sched.at(epoch as f64 + i as f64 / nb as f64);
            let x = images(&mut batch, table, &rt.train);
            let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
            let msk: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.masked.clone()).collect();
            let out = model.forward(x, index_tensor(&vis, &rt.train), index_tensor(&msk, &rt.train), None);
            let rec = out.reconstruction_loss;
            let loss = match (&out.logits, opts.cls_weight > 0.0) {
                (Some(lg), true) => rec.clone() + cls_loss(lg.clone(), &batch, table, 0.0, &rt.train) * opts.cls_weight,
                _ => rec.clone(),
            };
            let lv = f64::from(loss.clone().into_scalar::<f32>());
            if !lv.is_finite() {
                return Err(StageError::other(format!("pre-training diverged at epoch {epoch}, step {i}: loss {lv} (lower the learning rate)")));
            }
            loss_sum += lv * batch.len() as f64;
            rec_sum += f64::from(rec.into_scalar::<f32>()) * batch.len() as f64;
            seen += batch.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
        }
        let seconds = t.elapsed().as_secs_f64();
        let n = seen.max(1) as f64;
        history.push(EpochLog {
            epoch,
            lr: logged(lr),
            train_loss: logged(loss_sum / n),
            reconstruction_loss: Some(logged(rec_sum / n)),
            val_loss: None,
            val_accuracy: None,
            val_auc: None,
            tokens: policy.visible_count(l) + 1,
            masking: format!("{policy:?}"),
            refreshed_maps: refreshed,
            seconds,
        });
        tracing::info!("`{}` epoch {}/{}: loss {:.4} (reconstruction {:.4}), {:?} ({seconds:.1} s)", ctx.name, epoch + 1, opts.epochs, loss_sum / n, rec_sum / n, policy);
        bar.inc(1);
        let done = epoch + 1;
        if Resume::due(done, opts.checkpoint_every, opts.epochs) {
            let st = ResumeState { epochs_done: done, history: history.clone(), best: None, has_maps: maps.is_some() };
            resume.save::<MaskedAutoencoder, _>(&st, &model, &optim, None, maps.as_deref().map(|m| (m, table.as_ref(), grid)))?;
        }
    }
    Ok(PretrainResult { model, history, maps: maps.map(|m| (*m).clone()) })
}
