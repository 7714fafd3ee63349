//! What crosses processes in a multi-process data-parallel run ([`msmae_dist`]): gradients
//! (and the step's loss sums) summed over the ranks, flattened into a few large buffers so a
//! step makes few collective calls; and parameters broadcast from rank 0 when a run starts
//! or resumes.

use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

use msmae_dist::Collective;

use crate::runtime::to_vec;

/// Floats per collective call: 4 Mi (16 MiB), so ViT-B/16's 86 M gradients take 21 calls.
pub const BUCKET: usize = 4 << 20;

/// One float parameter's place in the flat buffer.
struct Slot {
    id: ParamId,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// Collects a module's float parameters (or their gradients) in module order.
struct Gather<'a> {
    grads: Option<&'a mut GradientsParams>,
    flat: Vec<f32>,
    slots: Vec<Slot>,
    present: Vec<f32>,
    failed: Option<String>,
}

impl ModuleVisitor for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let len: usize = shape.iter().product();
        let offset = self.flat.len();
        let value = match self.grads.as_deref_mut() {
            Some(g) => g.remove::<D>(param.id),
            None => Some(param.val()),
        };
        match value.map(to_vec) {
            Some(Ok(v)) if v.len() == len => {
                self.flat.extend_from_slice(&v);
                self.present.push(1.0);
            }
            Some(Ok(v)) => {
                self.failed.get_or_insert_with(|| format!("a tensor of {} values where its parameter has {len}", v.len()));
                self.flat.resize(offset + len, 0.0);
                self.present.push(0.0);
            }
            Some(Err(e)) => {
                self.failed.get_or_insert_with(|| e.to_string());
                self.flat.resize(offset + len, 0.0);
                self.present.push(0.0);
            }
            // No gradient on this rank (a parameter this step did not use): zeros, so every
            // rank's buffer has the same layout; registered again only if some rank had one.
            None => {
                self.flat.resize(offset + len, 0.0);
                self.present.push(0.0);
            }
        }
        self.slots.push(Slot { id: param.id, shape, offset, len });
    }
}

fn gather<'a, M: Module>(model: &M, grads: Option<&'a mut GradientsParams>) -> Result<Gather<'a>, String> {
    let mut g = Gather { grads, flat: Vec::new(), slots: Vec::new(), present: Vec::new(), failed: None };
    model.visit(&mut g);
    match g.failed.take() {
        Some(e) => Err(e),
        None => Ok(g),
    }
}

/// In-place sum over the ranks, in [`BUCKET`]-sized calls.
pub fn all_reduce(comm: &dyn Collective, buf: &mut [f32]) {
    for chunk in buf.chunks_mut(BUCKET) {
        comm.all_reduce_sum(chunk);
    }
}

/// Registers the summed gradients back, on `device`.
struct Scatter<'a> {
    grads: GradientsParams,
    flat: &'a [f32],
    slots: std::vec::IntoIter<Slot>,
    present: std::vec::IntoIter<f32>,
    device: &'a Device,
}

impl ModuleVisitor for Scatter<'_> {
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<D>>) {
        let (Some(s), Some(p)) = (self.slots.next(), self.present.next()) else { return };
        if p > 0.0 {
            let data = TensorData::new(self.flat[s.offset..s.offset + s.len].to_vec(), s.shape);
            self.grads.register::<D>(s.id, Tensor::<D>::from_data(data, self.device));
        }
    }
}

/// The sum over the ranks of each rank's `grads` (already weighted by its share of the global
/// batch, so the sum is the global batch's gradient) and of `extra` (the step's weighted loss
/// values), on `device`. Also returns the time spent in collectives.
pub fn sum_gradients<M: Module>(
    comm: &dyn Collective,
    model: &M,
    mut grads: GradientsParams,
    extra: &mut [f32],
    device: &Device,
) -> Result<(GradientsParams, Duration), String> {
    let g = gather(model, Some(&mut grads))?;
    let (mut flat, slots, present) = (g.flat, g.slots, g.present);
    let grad_len = flat.len();
    flat.extend_from_slice(&present);
    flat.extend_from_slice(extra);
    let t = Instant::now();
    all_reduce(comm, &mut flat);
    let spent = t.elapsed();
    let n = present.len();
    let summed_present = flat[grad_len..grad_len + n].to_vec();
    extra.copy_from_slice(&flat[grad_len + n..]);
    let mut s = Scatter { grads: GradientsParams::new(), flat: &flat[..grad_len], slots: slots.into_iter(), present: summed_present.into_iter(), device };
    model.visit(&mut s);
    Ok((s.grads, spent))
}

/// Sets every float parameter to the flat buffer's values.
struct Assign<'a> {
    flat: &'a [f32],
    slots: std::vec::IntoIter<Slot>,
}

impl ModuleMapper for Assign<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(s) = self.slots.next() else { return param };
        let values = self.flat[s.offset..s.offset + s.len].to_vec();
        param.map(|t| {
            let require_grad = t.is_require_grad();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, s.shape), &t.device());
            if require_grad { fresh.require_grad() } else { fresh }
        })
    }
}

/// Rank 0's parameters on every rank (at the start of a run and after a resume: the ranks
/// must step from identical weights).
pub fn broadcast_parameters<M: Module>(comm: &dyn Collective, model: M) -> Result<M, String> {
    let g = gather(&model, None)?;
    let (mut flat, slots) = (g.flat, g.slots);
    for chunk in flat.chunks_mut(BUCKET) {
        comm.broadcast(chunk, 0);
    }
    if comm.rank() == 0 {
        return Ok(model);
    }
    Ok(model.map(&mut Assign { flat: &flat, slots: slots.into_iter() }))
}
