//! Where a training stage computes: the backend/device from the runner's `--backend` /
//! `--device`, the seeding of the backend's RNG, and moving batches to and tensors from it.

use burn::module::Module;
use burn::prelude::*;

use msmae_backend::Precision;
use msmae_core::{SeedPath, StageContext, StageError, derive_seed};

use crate::data::{Batch, ImageTable};

/// The devices a stage computes on.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Plain device (inference).
    pub device: Device,
    /// Autodiff device (training): the main replica, where gradients are averaged and
    /// the optimiser steps.
    pub train: Device,
    /// Autodiff devices of every data-parallel replica, `train` first (one without data
    /// parallelism): each takes an equal share of every global batch.
    pub replicas: Vec<Device>,
    /// Plain devices of the replicas (inference split across them).
    pub inference: Vec<Device>,
}

impl Runtime {
    /// One device, no data parallelism.
    pub fn single(device: Device) -> Self {
        Self {
            train: device.clone().autodiff(),
            replicas: vec![device.clone().autodiff()],
            inference: vec![device.clone()],
            device,
        }
    }
}

/// Resolve the stage's backend/device (from the runner's `--backend`/`--device`), and set
/// this thread's compute precision (`--precision`) for the stage's model code.
pub fn runtime(ctx: &StageContext<'_>) -> Result<Runtime, StageError> {
    let device_error = |e: msmae_backend::BackendError| StageError::Device {
        backend: ctx.env.backend.clone(),
        device: ctx.env.device.clone(),
        source: Box::new(e),
    };
    let b = ctx.env.backend.parse().map_err(device_error)?;
    let d: msmae_backend::DeviceList = ctx.env.device.parse().map_err(device_error)?;
    let p: Precision = ctx.env.precision.parse().map_err(device_error)?;
    let c = msmae_backend::select_all(b, &d).map_err(device_error)?;
    msmae_backend::precision::set(p);
    let replicas = c.replicas.iter().map(|d| d.clone().autodiff()).collect();
    Ok(Runtime { train: c.device.clone().autodiff(), device: c.device, replicas, inference: c.replicas })
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

/// A tensor's values on the host.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, StageError> {
    t.into_data().try_into_vec_as::<f32>().map_err(|e| StageError::other(format!("reading a tensor back: {e:?}")))
}

/// Materialise a freshly built model's lazy parameter initialisers now, in module order,
/// right after the backend was seeded for initialisation (rather than at the first forward,
/// after an epoch's re-seeding).
pub fn materialise<M: Module>(model: &M) {
    let _ = model.clone().into_record();
}
