//! The one training loop of msmae. Classifier training (supervised attention model, MSMAE
//! and full-token fine-tuning), MAE pre-training and segmentation all run through [`fit`];
//! what differs between them is a [`TrainStep`]: what an epoch streams (masks, lesion
//! masks), the forward pass and its loss, and what validation measures.
//!
//! `fit` owns everything around the step: resuming from the last checkpoint, per-epoch
//! seeding of the backend's RNG (drop-path), the learning-rate schedule evaluated per step,
//! cancellation, the divergence check, the optimiser step, best-model selection and early
//! stopping, the history, progress, and checkpoints.

use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use msmae_core::{SeedPath, StageContext, StageError, derive_seed};

use crate::data::{self, Batch, ImageTable, LoaderSpec, Normalizer};
use crate::maps::MapState;
use crate::model::Schedule;
use crate::resume::{Restored, Resume, ResumeState};
use crate::runtime::{Runtime, seed_backend};

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
    /// Of which in collectives across processes (multi-process runs); not content either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

/// What one epoch streams, decided by the step at its start.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub spec: LoaderSpec,
    /// How tokens are selected this epoch (`history.json`'s `masking`).
    pub masking: String,
    /// Tokens (patches plus CLS) each sample feeds the encoder.
    pub tokens: usize,
    /// Whether the attention maps were recomputed for this epoch.
    pub refreshed_maps: bool,
}

/// The losses of one training step.
#[derive(Debug)]
pub struct StepLoss {
    /// What is differentiated.
    pub loss: Tensor<1>,
    /// The MAE reconstruction term, logged beside the total.
    pub reconstruction: Option<Tensor<1>>,
}

/// What validation measured after an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Validation {
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub auc: Option<f64>,
    /// Higher is better: picks the best model and drives early stopping (`None`: no
    /// selection, the last model is the result).
    pub score: Option<f64>,
}

/// One kind of training, plugged into [`fit`].
pub trait TrainStep {
    type Model: Module;

    /// Called once before the first epoch that runs (after a resume, with the restored
    /// model): set up what depends on the model's parameters.
    fn start(&mut self, _model: &Self::Model) {}

    /// What epoch `epoch` streams; may refresh attention maps from `model` first.
    fn epoch_plan(
        &mut self,
        epoch: usize,
        model: &Self::Model,
        ctx: &StageContext<'_>,
    ) -> Result<EpochPlan, StageError>;

    /// Forward pass and loss of one batch on `device` (an autodiff device: the training
    /// device, or a data-parallel replica's, where `model` lives). The loss must be a mean
    /// over the batch's samples with equal weight per sample: [`fit`] splits global batches
    /// across replicas and weights each shard's gradient by its share of the samples, which
    /// is then exactly the gradient of the global batch's loss.
    fn step(&mut self, model: &Self::Model, batch: &mut Batch, device: &Device) -> Result<StepLoss, StageError>;

    /// The per-parameter learning rates at base rate `lr` (layer-wise decay).
    fn learning_rates(&self, lr: f64) -> ModuleLearningRate {
        lr.into()
    }

    /// Validation after an epoch (default: none).
    fn validate(&mut self, _model: &Self::Model, _ctx: &StageContext<'_>) -> Result<Validation, StageError> {
        Ok(Validation::default())
    }

    /// The attention maps this step masks with, checkpointed with the model.
    fn maps(&mut self) -> Option<&mut MapState> {
        None
    }
}

/// The images a run trains on.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub table: Arc<ImageTable>,
    /// Table rows of the training split (those usable by this kind of training).
    pub rows: Vec<usize>,
    pub norm: Normalizer,
}

/// How long and how a run trains.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub schedule: Schedule,
    pub checkpoint_every: usize,
    /// Stop when the validation score has not improved for this many epochs.
    pub patience: Option<usize>,
    /// Micro-batches per device and global batch (gradient accumulation; 1: none).
    pub accum_steps: usize,
}

/// What [`fit`] returns.
#[derive(Debug)]
pub struct Fitted<M> {
    /// The model with the best validation score (the last one without a score).
    pub model: M,
    /// The last epoch's model, where validation picked an earlier one as `model`.
    pub last: Option<M>,
    pub history: Vec<EpochLog>,
    pub best_epoch: Option<usize>,
}

/// The mutable state of a run: what a checkpoint saves and a resume restores.
struct RunState<M> {
    model: M,
    optim: ModuleOptimizer,
    history: Vec<EpochLog>,
    best: Option<(f64, usize)>,
    best_model: Option<M>,
    start: usize,
}

/// Train `model` on `data` with `step` for `opts.epochs` epochs, continuing from the last
/// checkpoint of a killed run. `optimizer` builds the optimiser for a model.
pub fn fit<S: TrainStep>(
    ctx: &StageContext<'_>,
    rt: &Runtime,
    data: &TrainData,
    step: &mut S,
    model: S::Model,
    optimizer: impl Fn(&S::Model) -> ModuleOptimizer,
    opts: &FitOptions,
) -> Result<Fitted<S::Model>, StageError> {
    if data.rows.len() < opts.batch_size {
        return Err(StageError::data(
            &data.table.path,
            None,
            format!("{} training images, fewer than one batch of {}", data.rows.len(), opts.batch_size),
        ));
    }
    let comm = ctx.group();
    check_shards(opts.batch_size, rt.replicas.len() * comm.size())?;
    check_accumulation(opts.batch_size, rt.replicas.len() * comm.size(), opts.accum_steps)?;
    let resume = Resume::of(ctx);
    let mut run = restore(ctx, &resume, step, model, &optimizer, opts)?;
    if !comm.is_solo() {
        run = join_ranks(ctx, comm, run)?;
    }
    step.start(&run.model);
    let mut watch = Watch::open(ctx, comm.rank() == 0);
    let bar = ctx.progress.bar(Some((opts.epochs - run.start) as u64), &format!("{}: epochs", ctx.name));
    for epoch in run.start..opts.epochs {
        ctx.cancel.check()?;
        let plan = step.epoch_plan(epoch, &run.model, ctx)?;
        seed_backend(rt, ctx.seed, "epoch", epoch as u64);
        let t = Instant::now();
        let (model, sums) = train_epoch(
            ctx,
            rt,
            comm,
            data,
            step,
            run.model,
            &mut run.optim,
            plan.spec.clone(),
            epoch,
            opts,
            &mut watch,
        )?;
        run.model = model;
        let seconds = t.elapsed().as_secs_f64();
        let val = step.validate(&run.model, ctx)?;
        if let Some(s) = val.score.map(logged)
            && run.best.is_none_or(|(b, _)| s > b)
        {
            run.best = Some((s, epoch));
            run.best_model = Some(run.model.clone());
        }
        let log = sums.log(epoch, &plan, &val, seconds);
        tracing::info!("`{}` epoch {}/{}: {}", ctx.name, epoch + 1, opts.epochs, describe(&log));
        if comm.rank() == 0 {
            record_timing(ctx, &log, &sums, rt.replicas.len() * comm.size());
        }
        watch.epoch(&log);
        run.history.push(log);
        bar.inc(1);
        let stop = match (opts.patience, run.best) {
            (Some(p), Some((_, be))) => epoch >= be + p,
            _ => false,
        };
        let done = epoch + 1;
        // Rank 0 alone writes checkpoints (the ranks hold the same state).
        if (Resume::due(done, opts.checkpoint_every, opts.epochs) || stop) && comm.rank() == 0 {
            checkpoint(&resume, step, &run, if stop { opts.epochs } else { done })?;
        }
        if stop {
            tracing::info!(
                "`{}`: early stop after epoch {done} (best epoch {})",
                ctx.name,
                run.best.map(|b| b.1 + 1).unwrap_or(0)
            );
            break;
        }
    }
    let best_epoch = run.best.map(|b| b.1);
    let last_epoch = run.history.len().checked_sub(1);
    Ok(match run.best_model {
        Some(best) if best_epoch != last_epoch => {
            Fitted { model: best, last: Some(run.model), history: run.history, best_epoch }
        }
        Some(best) => Fitted { model: best, last: None, history: run.history, best_epoch },
        None => Fitted { model: run.model, last: None, history: run.history, best_epoch },
    })
}

/// A fresh run, or the state of the last checkpoint.
fn restore<S: TrainStep>(
    ctx: &StageContext<'_>,
    resume: &Resume,
    step: &mut S,
    model: S::Model,
    optimizer: &impl Fn(&S::Model) -> ModuleOptimizer,
    opts: &FitOptions,
) -> Result<RunState<S::Model>, StageError> {
    let Some(st) = resume.load_state() else {
        let optim = optimizer(&model);
        return Ok(RunState { model, optim, history: Vec::new(), best: None, best_model: None, start: 0 });
    };
    let layout = step.maps().map(|m| (m.table.clone(), m.grid));
    let Restored { model, optim, best, maps } =
        resume.restore(&st, model, optimizer, layout.as_ref().map(|(t, g)| (t.as_ref(), *g)))?;
    if let (Some(ms), Some(m)) = (step.maps(), maps) {
        ms.current = Some(m);
    }
    tracing::info!("`{}`: resuming after epoch {} of {}", ctx.name, st.epochs_done, opts.epochs);
    Ok(RunState {
        model,
        optim,
        history: st.history,
        best: st.best,
        best_model: best,
        start: st.epochs_done.min(opts.epochs),
    })
}

/// The ranks of a multi-process run start from the same place: rank 0's epoch (a rank
/// that resumed elsewhere cannot continue its optimiser state: the store must be shared) and
/// rank 0's parameters.
fn join_ranks<M: Module>(
    ctx: &StageContext<'_>,
    comm: &dyn msmae_dist::Collective,
    mut run: RunState<M>,
) -> Result<RunState<M>, StageError> {
    let mut start = (run.start as u64).to_le_bytes().to_vec();
    comm.broadcast_bytes(&mut start, 0);
    let leader = u64::from_le_bytes(start.try_into().unwrap_or_default()) as usize;
    if leader != run.start {
        return Err(StageError::other(format!(
            "`{}`: rank {} of {} would start at epoch {} but rank 0 at epoch {leader}: every rank must see rank 0's checkpoints (put the store on a filesystem all nodes share)",
            ctx.name,
            comm.rank(),
            comm.size(),
            run.start
        )));
    }
    run.model = crate::dist::broadcast_parameters(comm, run.model)
        .map_err(|message| StageError::Collective { operation: "broadcasting the parameters from rank 0", message })?;
    tracing::debug!("`{}`: rank {} of {} joined at epoch {}", ctx.name, comm.rank(), comm.size(), run.start);
    Ok(run)
}

/// With `MSMAE_TIMINGS=FILE`, one JSON line per epoch (stage, images, seconds, time in
/// collectives) appended to FILE: what `cargo xtask bench dp` reads. Timing is not content,
/// so it stays out of the artifact.
fn record_timing(ctx: &StageContext<'_>, log: &EpochLog, sums: &EpochSums, devices: usize) {
    let Some(path) = std::env::var_os("MSMAE_TIMINGS") else { return };
    let line = serde_json::json!({
        "stage": ctx.name, "epoch": log.epoch, "images": sums.seen, "steps": sums.steps, "devices": devices,
        "seconds": log.seconds, "comm_seconds": log.comm_seconds.unwrap_or(0.0),
    });
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        writeln!(f, "{line}")
    };
    if let Err(e) = write() {
        tracing::warn!("MSMAE_TIMINGS {}: {e}", std::path::Path::new(&path).display());
    }
}

fn checkpoint<S: TrainStep>(
    resume: &Resume,
    step: &mut S,
    run: &RunState<S::Model>,
    epochs_done: usize,
) -> Result<(), StageError> {
    let maps = step.maps().and_then(|m| m.current.clone().map(|c| (c, m.table.clone(), m.grid)));
    let st = ResumeState { epochs_done, history: run.history.clone(), best: run.best, has_maps: maps.is_some() };
    resume.save(
        &st,
        &run.model,
        &run.optim,
        run.best_model.as_ref(),
        maps.as_ref().map(|(m, t, g)| (m.as_ref(), t.as_ref(), *g)),
    )
}

/// Loss sums over an epoch's samples.
#[derive(Debug, Default)]
struct EpochSums {
    loss: f64,
    reconstruction: Option<f64>,
    /// Samples of the global batches (over every rank).
    seen: usize,
    steps: usize,
    lr: f64,
    comm: Option<f64>,
}

impl EpochSums {
    fn log(&self, epoch: usize, plan: &EpochPlan, val: &Validation, seconds: f64) -> EpochLog {
        let n = self.seen.max(1) as f64;
        EpochLog {
            epoch,
            lr: logged(self.lr),
            train_loss: logged(self.loss / n),
            reconstruction_loss: self.reconstruction.map(|r| logged(r / n)),
            val_loss: val.loss.map(logged),
            val_accuracy: val.accuracy.map(logged),
            val_auc: val.auc.map(logged),
            tokens: plan.tokens,
            masking: plan.masking.clone(),
            refreshed_maps: plan.refreshed_maps,
            seconds,
            comm_seconds: self.comm,
        }
    }
}

/// `batch_size` is the global batch: every data-parallel replica takes an equal share of it,
/// and a batch that does not split is refused rather than silently changed.
pub fn check_shards(batch_size: usize, replicas: usize) -> Result<(), StageError> {
    if replicas > 1 && !batch_size.is_multiple_of(replicas) {
        return Err(StageError::config(
            "batch_size",
            format!(
                "the global batch of {batch_size} does not split evenly over {replicas} devices; use a multiple of {replicas} (the batch is never changed silently)"
            ),
        ));
    }
    Ok(())
}

/// Gradient accumulation splits each device's share of the global batch again, into
/// `accum_steps` equal micro-batches.
pub fn check_accumulation(batch_size: usize, devices: usize, accum_steps: usize) -> Result<(), StageError> {
    let parts = devices.max(1) * accum_steps.max(1);
    if accum_steps > 1 && !batch_size.is_multiple_of(parts) {
        return Err(StageError::config(
            "accum_steps",
            format!(
                "the global batch of {batch_size} does not split into {accum_steps} micro-batches on each of {} devices; use a batch that is a multiple of {parts}",
                devices.max(1)
            ),
        ));
    }
    Ok(())
}

/// The per-sample keys of stochastic depth for `rows` in `epoch` ([`msmae_vit::stochastic`]).
fn sample_keys(seed: u64, epoch: usize, rows: &[usize]) -> Vec<u64> {
    rows.iter()
        .map(|&r| {
            derive_seed(seed, &[SeedPath::from("drop-path"), SeedPath::from(epoch as u64), SeedPath::from(r as u64)])
        })
        .collect()
}

/// Where a step is (what its per-sample draws are keyed by) and in how many micro-batches
/// each device computes it.
#[derive(Debug, Clone, Copy)]
struct StepAt {
    seed: u64,
    epoch: usize,
    accum_steps: usize,
}

/// Forward, loss and backward of one global batch over the replicas; the gradients of the
/// global batch's loss on the main device, and the loss values (sample-weighted means).
fn gradients<S: TrainStep>(
    rt: &Runtime,
    comm: &dyn msmae_dist::Collective,
    step: &mut S,
    model: &S::Model,
    batch: Batch,
    at: StepAt,
) -> Result<(GradientsParams, f64, Option<f64>, Option<f64>), StageError> {
    let (g, lv, rv) = local_gradients(rt, step, model, batch, at)?;
    // One process sums nothing, unless told to go through NCCL anyway (`MSMAE_COLLECTIVE=nccl`:
    // how a one-GPU machine checks the NCCL path).
    let forced = msmae_dist::GradientTransport::current() == Ok(msmae_dist::GradientTransport::Nccl);
    if comm.is_solo() && !forced {
        return Ok((g, lv, rv, None));
    }
    // Every rank's gradients are weighted by its share of the global batch: their sum over
    // the ranks is the global batch's gradient.
    let mut extra = [lv as f32, rv.unwrap_or(0.0) as f32, f32::from(u8::from(rv.is_some()))];
    let (g, spent) = crate::dist::sum_gradients(comm, model, g, &mut extra, &rt.train)
        .map_err(|message| StageError::Collective { operation: "summing gradients over the ranks", message })?;
    let rv = (extra[2] > 0.0).then_some(f64::from(extra[1]));
    Ok((g, f64::from(extra[0]), rv, Some(spent.as_secs_f64())))
}

/// This process's part: its shard of the global batch over its replicas, each replica's
/// share computed in `accum_steps` micro-batches one after the other, each micro-batch's
/// loss weighted by its share of the global batch: the summed gradients are the global
/// batch's, however the batch is split (per-sample randomness is keyed by row).
fn local_gradients<S: TrainStep>(
    rt: &Runtime,
    step: &mut S,
    model: &S::Model,
    batch: Batch,
    at: StepAt,
) -> Result<(GradientsParams, f64, Option<f64>), StageError> {
    let StepAt { seed, epoch, accum_steps } = at;
    let n = batch.global.max(batch.len());
    let accum = accum_steps.max(1);
    if rt.replicas.len() <= 1 && n == batch.len() && accum == 1 {
        let mut batch = batch;
        let keys = sample_keys(seed, epoch, &batch.rows);
        let out = msmae_vit::stochastic::with_sample_keys(keys, || step.step(model, &mut batch, &rt.train))?;
        let lv = f64::from(out.loss.clone().into_scalar::<f32>());
        let rv = out.reconstruction.map(|r| f64::from(r.into_scalar::<f32>()));
        return Ok((GradientsParams::from_grads(out.loss.backward(), model), lv, rv));
    }
    // Data parallel and accumulated: each micro-batch computes its mean loss; scaled by its
    // share of the samples before backward, the micro-batches' gradients sum to the global
    // batch's. Micro-batch k goes to replica k mod replicas: replica r computes its share of
    // the batch in `accum` steps, and its activations are freed after each backward.
    let mut acc = GradientsAccumulator::<S::Model>::new();
    let (mut lv, mut rv) = (0.0, None);
    let devices = rt.replicas.len().max(1);
    let shards = batch.split(devices * accum);
    for (k, shard) in shards.into_iter().enumerate() {
        let device = &rt.replicas[k % devices];
        // (a shard can be empty only when a batch has fewer samples than devices)
        if shard.is_empty() {
            continue;
        }
        let mut shard = shard;
        let w = shard.len() as f64 / n as f64;
        let replica = if device == &rt.train { model.clone() } else { model.clone().fork(device) };
        let keys = sample_keys(seed, epoch, &shard.rows);
        let out = msmae_vit::stochastic::with_sample_keys(keys, || step.step(&replica, &mut shard, device))?;
        lv += w * f64::from(out.loss.clone().into_scalar::<f32>());
        if let Some(r) = out.reconstruction {
            *rv.get_or_insert(0.0) += w * f64::from(r.into_scalar::<f32>());
        }
        let grads = GradientsParams::from_grads((out.loss * w).backward(), &replica);
        acc.accumulate(model, if device == &rt.train { grads } else { grads.to_device(&rt.train, &replica) });
    }
    Ok((acc.grads(), lv, rv))
}

/// The training steps of one epoch. The model moves through the optimiser (no second
/// reference to its parameters, so the fused AdamW updates them in place).
#[allow(clippy::too_many_arguments)]
fn train_epoch<S: TrainStep>(
    ctx: &StageContext<'_>,
    rt: &Runtime,
    comm: &dyn msmae_dist::Collective,
    data: &TrainData,
    step: &mut S,
    mut model: S::Model,
    optim: &mut ModuleOptimizer,
    spec: LoaderSpec,
    epoch: usize,
    opts: &FitOptions,
    watch: &mut Watch,
) -> Result<(S::Model, EpochSums), StageError> {
    let mut spec = spec;
    spec.shard = (comm.rank(), comm.size());
    let stream = data::stream(data.table.clone(), &data.rows, spec, data.norm.clone(), ctx.seed, epoch as u64);
    let nb = stream.num_batches.max(1);
    let bar = ctx.progress.bar(Some(nb as u64), &format!("{}: epoch {}/{}", ctx.name, epoch + 1, opts.epochs));
    let mut sums = EpochSums::default();
    let started = Instant::now();
    for (i, batch) in stream.enumerate() {
        ctx.cancel.check()?;
        let batch = batch?;
        let n = batch.global.max(batch.len());
        sums.lr = opts.schedule.at(epoch as f64 + i as f64 / nb as f64);
        let at = StepAt { seed: ctx.seed, epoch, accum_steps: opts.accum_steps };
        let (grads, lv, rv, spent) = gradients(rt, comm, step, &model, batch, at)?;
        if let Some(t) = spent {
            *sums.comm.get_or_insert(0.0) += t;
        }
        sums.steps += 1;
        if !lv.is_finite() {
            return Err(StageError::Diverged { epoch, step: i, loss: lv });
        }
        sums.loss += lv * n as f64;
        if let Some(r) = rv {
            *sums.reconstruction.get_or_insert(0.0) += r * n as f64;
        }
        sums.seen += n;
        model = optim.step(step.learning_rates(sums.lr), model, grads);
        let images_per_second = sums.seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(&format!("loss {lv:.4}, lr {:.3e}, {images_per_second:.1} images/s", sums.lr));
        bar.inc(1);
        watch.step((epoch * nb + i) as i64, lv, sums.lr);
    }
    Ok((model, sums))
}

/// Where training reports as it goes, beside the history: TensorBoard event files in the
/// run-log directory (rank 0 only), per epoch, and per step when MSMAE_TENSORBOARD_STEPS
/// is set. A run-log that cannot be written is a warning, never a failed stage: logs are
/// not results.
#[derive(Debug, Default)]
struct Watch {
    events: Option<crate::tensorboard::EventWriter>,
    steps: bool,
}

impl Watch {
    fn open(ctx: &StageContext<'_>, leader: bool) -> Self {
        let Some(dir) = ctx.run_log().filter(|_| leader) else { return Self::default() };
        let steps = std::env::var("MSMAE_TENSORBOARD_STEPS").is_ok_and(|v| !v.is_empty() && v != "0");
        match crate::tensorboard::EventWriter::create(dir) {
            Ok(w) => {
                tracing::info!("`{}`: TensorBoard scalars in {}", ctx.name, dir.display());
                Self { events: Some(w), steps }
            }
            Err(e) => {
                tracing::warn!("`{}`: cannot write TensorBoard events into {}: {e}", ctx.name, dir.display());
                Self::default()
            }
        }
    }

    fn write(&mut self, step: i64, values: &[(&str, f64)]) {
        if let Some(w) = &mut self.events
            && let Err(e) = w.scalars(step, values)
        {
            tracing::warn!("TensorBoard events {}: {e}; no more are written this run", w.path().display());
            self.events = None;
        }
    }

    fn step(&mut self, global_step: i64, loss: f64, lr: f64) {
        if self.steps {
            self.write(global_step, &[("step/loss", loss), ("step/lr", lr)]);
        }
    }

    /// An epoch's scalars at step `epoch + 1` (epochs counted from 1, as in the log lines).
    fn epoch(&mut self, h: &EpochLog) {
        let mut v: Vec<(&str, f64)> =
            vec![("loss/train", h.train_loss), ("lr", h.lr), ("time/epoch_seconds", h.seconds)];
        let optional = [
            ("loss/reconstruction", h.reconstruction_loss),
            ("loss/val", h.val_loss),
            ("val/accuracy", h.val_accuracy),
            ("val/auc", h.val_auc),
        ];
        v.extend(optional.into_iter().filter_map(|(k, x)| x.map(|x| (k, x))));
        self.write(h.epoch as i64 + 1, &v);
    }
}

/// One log line for an epoch.
fn describe(h: &EpochLog) -> String {
    let mut s = format!("loss {:.4}", h.train_loss);
    if let Some(r) = h.reconstruction_loss {
        s += &format!(" (reconstruction {r:.4})");
    }
    if let Some(v) = h.val_loss {
        s += &format!(", val loss {v:.4}");
    }
    if let Some(v) = h.val_accuracy {
        s += &format!(", val acc {v:.3}");
    }
    match h.comm_seconds {
        Some(c) => format!("{s}, {} ({:.1} s, {c:.2} s in collectives)", h.masking, h.seconds),
        None => format!("{s}, {} ({:.1} s)", h.masking, h.seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_values_survive_json_bit_for_bit() {
        for x in [0.1234567890123456f64, 1e-9 / 3.0, 2.0 / 3.0, f64::NAN] {
            let v = logged(x);
            let back: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap_or_default()).unwrap_or(f64::NAN);
            assert!(back.to_bits() == v.to_bits() || (x.is_nan() && v.is_nan()), "{x} → {v} → {back}");
        }
    }
}
