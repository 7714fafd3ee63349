//! The one training loop, with a toy step (a linear classifier on 8×8 images): it learns,
//! picks the best validation epoch and stops early, resumes after an interruption to the
//! uninterrupted run's parameters bit for bit, and stops on a non-finite loss naming the
//! epoch and step while keeping the last checkpoint.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

use msmae_backend::{BackendRequest, DeviceRequest, select};
use msmae_core::{CancelToken, ExecEnv, NoProgress, OutputDecl, StageContext, StageError};
use msmae_data::table::Split;
use msmae_train::data::{Batch, ImageTable, LoaderSpec, Normalizer};
use msmae_train::fit::{EpochPlan, FitOptions, StepLoss, TrainData, TrainStep, Validation, fit};
use msmae_train::model::{Schedule, adamw};
use msmae_train::runtime::{Runtime, images};
use msmae_vit::loss::{ClassTargets, classification_loss};

const SIZE: usize = 8;

/// 64 images: label 1 images are bright, label 0 dark (learnable by a linear model).
fn table(dir: &Path) -> Arc<ImageTable> {
    common::flat_table(dir, SIZE, 64, 16, ["dark", "bright"], |i| {
        let label = i32::from(i % 2);
        (if i < 48 { Split::Train } else { Split::Val }, label, if label == 1 { 150 + i } else { 20 + i })
    })
}

#[derive(Module, Debug)]
struct Toy {
    fc: Linear,
}

/// A step with scripted validation scores and an optional poisoned step.
struct ToyStep {
    table: Arc<ImageTable>,
    scores: Vec<f64>,
    /// Return a NaN loss at this (epoch, step).
    poison: Option<(usize, usize)>,
    /// Cancel the run at the start of this epoch.
    cancel_at: Option<(usize, CancelToken)>,
    epoch: usize,
    batch_in_epoch: usize,
    /// The weights seen by `validate`, per epoch.
    snapshots: Vec<Vec<f32>>,
}

impl TrainStep for ToyStep {
    type Model = Toy;

    fn epoch_plan(&mut self, epoch: usize, _model: &Toy, _ctx: &StageContext<'_>) -> Result<EpochPlan, StageError> {
        if let Some((e, token)) = &self.cancel_at
            && *e == epoch
        {
            token.cancel();
        }
        self.epoch = epoch;
        self.batch_in_epoch = 0;
        Ok(EpochPlan {
            spec: LoaderSpec::train(8, (0.5, 1.0)),
            masking: "none".into(),
            tokens: 1,
            refreshed_maps: false,
        })
    }

    fn step(&mut self, model: &Toy, batch: &mut Batch, device: &Device) -> Result<StepLoss, StageError> {
        let n = batch.len();
        let x = images(batch, &self.table, device).reshape([n, SIZE * SIZE]);
        let y = Tensor::<1, Int>::from_data(TensorData::new(batch.labels.clone(), [n]), device);
        let mut loss = classification_loss(model.fc.forward(x), ClassTargets::Classes(y), 0.0);
        if self.poison == Some((self.epoch, self.batch_in_epoch)) {
            loss = loss * f32::NAN;
        }
        self.batch_in_epoch += 1;
        Ok(StepLoss { loss, reconstruction: None })
    }

    fn validate(&mut self, model: &Toy, _ctx: &StageContext<'_>) -> Result<Validation, StageError> {
        self.snapshots.push(weights(model));
        Ok(Validation { score: self.scores.get(self.epoch).copied(), ..Validation::default() })
    }
}

fn weights(m: &Toy) -> Vec<f32> {
    m.fc.weight.val().into_data().try_into_vec::<f32>().expect("f32")
}

/// `fit` re-seeds the process-wide generator every epoch (drop-path draws from it), so two
/// tests fitting at once would draw each other's numbers while initialising: one at a time.
static FITTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Run {
    dir: tempfile::TempDir,
    table: Arc<ImageTable>,
    rt: Runtime,
}

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let table = table(dir.path());
        let device = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device;
        Run { dir, table, rt: Runtime::single(device) }
    }

    fn step(&self, scores: Vec<f64>) -> ToyStep {
        ToyStep {
            table: self.table.clone(),
            scores,
            poison: None,
            cancel_at: None,
            epoch: 0,
            batch_in_epoch: 0,
            snapshots: Vec::new(),
        }
    }

    /// Train from a seeded initialisation with checkpoints in `resume/` every epoch.
    fn fit(
        &self,
        step: &mut ToyStep,
        epochs: usize,
        patience: Option<usize>,
        cancel: CancelToken,
    ) -> Result<msmae_train::fit::Fitted<Toy>, StageError> {
        let out = self.dir.path().join("out");
        let resume = self.dir.path().join("resume");
        std::fs::create_dir_all(&out).expect("out");
        std::fs::create_dir_all(&resume).expect("resume");
        let ctx = StageContext::new(
            "toy".into(),
            5,
            ExecEnv::cpu_flex(),
            2,
            cancel,
            &NoProgress,
            out.clone(),
            out,
            OutputDecl::new("toy", &["*"]),
            BTreeMap::new(),
        )
        .with_resume_dir(resume);
        let _one_at_a_time = FITTING.lock().unwrap_or_else(|e| e.into_inner());
        // Parameters are initialised lazily: materialise them right after seeding.
        let model = msmae_backend::seeded(&self.rt.train, 3, || {
            let m = Toy { fc: LinearConfig::new(SIZE * SIZE, 2).init(&self.rt.train) };
            msmae_train::runtime::materialise(&m);
            m
        });
        let data = TrainData {
            table: self.table.clone(),
            rows: self.table.rows_of(Split::Train),
            norm: Normalizer { mean: vec![0.5], std: vec![0.25] },
        };
        let opts = FitOptions {
            epochs,
            batch_size: 8,
            schedule: Schedule { lr: 0.05, min_lr: 0.0, warmup_epochs: 0.0, epochs: epochs as f64 },
            checkpoint_every: 1,
            patience,
            accum_steps: 1,
        };
        fit(&ctx, &self.rt, &data, step, model, |m| adamw(m, 0.999, 0.0), &opts)
    }
}

#[test]
fn fit_learns_keeps_the_best_epoch_and_stops_early() {
    let r = Run::new();
    let mut step = r.step(vec![0.5, 0.9, 0.7, 0.6, 0.95, 0.99]);
    let res = r.fit(&mut step, 6, Some(2), CancelToken::new()).expect("fit");
    assert_eq!(res.best_epoch, Some(1), "epoch 1 scored best before patience ran out");
    assert_eq!(res.history.len(), 4, "no improvement for 2 epochs after epoch 1: stop after epoch 3");
    assert_eq!(weights(&res.model), step.snapshots[1], "the best epoch's model is returned, not the last");
    assert_ne!(step.snapshots[1], step.snapshots[3]);
    let first = res.history[0].train_loss;
    let last = res.history[3].train_loss;
    assert!(last < first * 0.8, "the loss falls: {first} → {last}");
    assert!(res.history.iter().all(|h| h.lr > 0.0 && h.tokens == 1 && h.masking == "none"));
}

#[test]
fn an_interrupted_fit_resumes_to_the_uninterrupted_result() {
    let whole = {
        let r = Run::new();
        let res = r.fit(&mut r.step(Vec::new()), 5, None, CancelToken::new()).expect("fit");
        (weights(&res.model), res.history)
    };
    let r = Run::new();
    let token = CancelToken::new();
    let mut step = r.step(Vec::new());
    step.cancel_at = Some((3, token.clone()));
    let err = r.fit(&mut step, 5, None, token).expect_err("cancelled");
    assert!(matches!(err, StageError::Cancelled), "{err}");
    let mut again = r.step(Vec::new());
    let res = r.fit(&mut again, 5, None, CancelToken::new()).expect("resumed");
    assert_eq!(again.snapshots.len(), 2, "only epochs 3 and 4 ran again");
    assert_eq!(weights(&res.model), whole.0, "bit-identical to the uninterrupted run");
    let strip = |h: &[msmae_train::fit::EpochLog]| {
        h.iter().map(|e| (e.epoch, e.train_loss.to_bits(), e.lr.to_bits())).collect::<Vec<_>>()
    };
    assert_eq!(strip(&res.history), strip(&whole.1));
}

#[test]
fn a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint() {
    let r = Run::new();
    let mut step = r.step(Vec::new());
    step.poison = Some((2, 3));
    let err = r.fit(&mut step, 4, None, CancelToken::new()).expect_err("diverged");
    match &err {
        StageError::Diverged { epoch, step, loss } => assert!(*epoch == 2 && *step == 3 && loss.is_nan(), "{err}"),
        other => panic!("expected Diverged, got {other}"),
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.dir.path().join("resume/state.json")).expect("state.json kept"))
            .expect("json");
    assert_eq!(state["epochs_done"], 2, "the checkpoint after epoch 2 is kept");
}
