//! What crosses processes in a multi-process data-parallel run ([`msmae_dist`]): gradients
//! (and the step's loss sums) summed over the ranks, flattened into one buffer on the
//! training device so a step makes few collective calls; and parameters broadcast from
//! rank 0 when a run starts or resumes.
//!
//! The flat gradient buffer is summed where it lies: on a GPU by NCCL (one call), in host
//! memory by the process group (MPI, in [`BUCKET`]-sized calls, in place in libtorch's
//! buffer), and through a host copy otherwise (burn-flex, or CUDA with
//! `MSMAE_COLLECTIVE=mpi` or without NCCL). [`msmae_dist::GradientTransport`] decides.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

use msmae_backend::memory::{Memory, with_f32_memory};
use msmae_dist::nccl::{Nccl, NcclError};
use msmae_dist::{Collective, GradientTransport};

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

/// Collects a module's float parameter values in module order (host memory).
struct Gather {
    flat: Vec<f32>,
    slots: Vec<Slot>,
    failed: Option<String>,
}

impl ModuleVisitor for Gather {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let len: usize = shape.iter().product();
        let offset = self.flat.len();
        match to_vec(param.val()) {
            Ok(v) if v.len() == len => self.flat.extend_from_slice(&v),
            Ok(v) => {
                self.failed
                    .get_or_insert_with(|| format!("a tensor of {} values where its parameter has {len}", v.len()));
                self.flat.resize(offset + len, 0.0);
            }
            Err(e) => {
                self.failed.get_or_insert_with(|| e.to_string());
                self.flat.resize(offset + len, 0.0);
            }
        }
        self.slots.push(Slot { id: param.id, shape, offset, len });
    }
}

fn gather<M: Module>(model: &M) -> Result<Gather, String> {
    let mut g = Gather { flat: Vec::new(), slots: Vec::new(), failed: None };
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

/// Each float parameter's gradient as a flat tensor on the training device (zeros where this
/// rank has none), in module order.
struct GatherGrads<'a> {
    grads: &'a mut GradientsParams,
    device: &'a Device,
    parts: Vec<Tensor<1>>,
    slots: Vec<Slot>,
    present: Vec<f32>,
    offset: usize,
    failed: Option<String>,
}

impl ModuleVisitor for GatherGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().dims().to_vec();
        let len: usize = shape.iter().product();
        let part = match self.grads.remove::<D>(param.id) {
            Some(g) if g.dims().as_slice() == shape.as_slice() => {
                self.present.push(1.0);
                g.to_device(self.device).reshape([len])
            }
            Some(g) => {
                self.failed.get_or_insert_with(|| {
                    format!("a gradient of shape {:?} for a parameter of shape {shape:?}", g.dims())
                });
                self.present.push(0.0);
                Tensor::zeros([len], self.device)
            }
            // No gradient on this rank (a parameter this step did not use): zeros, so every
            // rank's buffer has the same layout; registered again only if some rank had one.
            None => {
                self.present.push(0.0);
                Tensor::zeros([len], self.device)
            }
        };
        self.parts.push(part);
        self.slots.push(Slot { id: param.id, shape, offset: self.offset, len });
        self.offset += len;
    }
}

/// Registers the summed gradients back: views into the summed buffer.
struct ScatterGrads<'a> {
    grads: GradientsParams,
    flat: &'a Tensor<1>,
    slots: std::vec::IntoIter<Slot>,
    present: std::slice::Iter<'a, f32>,
}

impl ModuleVisitor for ScatterGrads<'_> {
    fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<D>>) {
        let (Some(s), Some(&p)) = (self.slots.next(), self.present.next()) else { return };
        if p > 0.0 {
            let shape: [usize; D] = std::array::from_fn(|i| s.shape[i]);
            self.grads.register::<D>(s.id, self.flat.clone().slice(s.offset..s.offset + s.len).reshape(shape));
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
    let transport = GradientTransport::current().map_err(|e| e.to_string())?;
    let mut g = GatherGrads {
        grads: &mut grads,
        device,
        parts: Vec::new(),
        slots: Vec::new(),
        present: Vec::new(),
        offset: 0,
        failed: None,
    };
    model.visit(&mut g);
    if let Some(e) = g.failed.take() {
        return Err(e);
    }
    let (mut parts, slots, present, grad_len) = (g.parts, g.slots, g.present, g.offset);
    let n = present.len();
    let tail: Vec<f32> = present.into_iter().chain(extra.iter().copied()).collect();
    let tail_len = tail.len();
    parts.push(Tensor::from_data(TensorData::new(tail, [tail_len]), device));
    let flat = Tensor::cat(parts, 0);
    let t = Instant::now();
    let flat = reduce_flat(comm, transport, flat)?;
    let spent = t.elapsed();
    let tail = to_vec(flat.clone().slice(grad_len..grad_len + tail_len)).map_err(|e| e.to_string())?;
    extra.copy_from_slice(&tail[n..]);
    let mut s = ScatterGrads {
        grads: GradientsParams::new(),
        flat: &flat,
        slots: slots.into_iter(),
        present: tail[..n].iter(),
    };
    model.visit(&mut s);
    Ok((s.grads, spent))
}

/// `flat` summed over the ranks, where it lies (see the module's notes).
fn reduce_flat(comm: &dyn Collective, transport: GradientTransport, flat: Tensor<1>) -> Result<Tensor<1>, String> {
    let device = flat.device();
    let (flat, done) = with_f32_memory(flat, |memory, len| -> Result<bool, String> {
        agree(comm, if matches!(memory, Memory::Host(_)) { Lies::Host } else { Lies::Cuda })?;
        match memory {
            Memory::Host(_) if transport == GradientTransport::Nccl => {
                Err(nccl_needs_cuda("this stage trains on the CPU"))
            }
            Memory::Host(ptr) => {
                #[allow(unsafe_code)]
                // SAFETY: `with_f32_memory` hands out a contiguous host buffer of `len` f32s
                // that no other tensor shares, alive until the closure returns.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                all_reduce(comm, buf);
                Ok(true)
            }
            Memory::Cuda { ptr, device } => match nccl(comm, transport, device)? {
                Some(nccl) => {
                    #[allow(unsafe_code)]
                    // SAFETY: as above, in the memory of CUDA device `device`, which is the
                    // communicator's (one per device).
                    unsafe { nccl.all_reduce_sum(ptr, len) }.map_err(|e| e.to_string())?;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    });
    match done {
        Some(Ok(true)) => return Ok(flat),
        Some(Err(e)) => return Err(e),
        Some(Ok(false)) => {}
        None => {
            agree(comm, Lies::Opaque)?;
            if transport == GradientTransport::Nccl {
                return Err(nccl_needs_cuda("this backend gives no device memory (NCCL needs libtorch on CUDA)"));
            }
        }
    }
    let mut host = to_vec(flat).map_err(|e| e.to_string())?;
    all_reduce(comm, &mut host);
    let len = host.len();
    Ok(Tensor::from_data(TensorData::new(host, [len]), &device))
}

/// Where a rank's gradient buffer lies: every rank must take the same path through
/// [`reduce_flat`], or their collectives would not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lies {
    Host = 0,
    Cuda = 1,
    /// A backend without raw memory (burn-flex).
    Opaque = 2,
}

/// Checks once per process (at the first sum, which every rank reaches at the same step)
/// that all ranks' buffers lie in the same kind of memory.
fn agree(comm: &dyn Collective, lies: Lies) -> Result<(), String> {
    static AGREED: Mutex<Option<Lies>> = Mutex::new(None);
    let mut agreed = AGREED.lock().unwrap_or_else(|e| e.into_inner());
    if *agreed == Some(lies) {
        return Ok(());
    }
    let mut counts = [0.0f32; 3];
    counts[lies as usize] = 1.0;
    comm.all_reduce_sum(&mut counts);
    if counts[lies as usize].round() as usize != comm.size() {
        return Err(format!(
            "the ranks train on different kinds of device (gradients in host memory on {}, CUDA memory on {}, backend memory on {} of {} ranks): give every rank the same --device and --backend",
            counts[0],
            counts[1],
            counts[2],
            comm.size()
        ));
    }
    *agreed = Some(lies);
    Ok(())
}

fn nccl_needs_cuda(why: &str) -> String {
    format!(
        "{}=nccl sums gradients in CUDA memory, but {why}: train with `--device cuda`, or set {} to auto or mpi",
        GradientTransport::VAR,
        GradientTransport::VAR
    )
}

/// This process's NCCL communicator for CUDA device `device` (made on first use, by every
/// rank at the same step), or `None` when gradients go through the host: `mpi`, or `auto`
/// where some rank cannot load NCCL (all ranks agree, so they all fall back together).
fn nccl(comm: &dyn Collective, transport: GradientTransport, device: usize) -> Result<Option<Arc<Nccl>>, String> {
    type Slot = Option<(usize, Option<Arc<Nccl>>)>;
    static COMM: Mutex<Slot> = Mutex::new(None);
    if transport == GradientTransport::Mpi {
        return Ok(None);
    }
    let mut slot = COMM.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((d, made)) = slot.as_ref()
        && *d == device
    {
        return Ok(made.clone());
    }
    let made = match Nccl::init(comm, device) {
        Ok(n) => {
            tracing::info!(
                "gradients summed by NCCL {} over {} rank(s), this one on cuda:{device}",
                n.version(),
                n.size()
            );
            Some(Arc::new(n))
        }
        Err(e @ NcclError::Unavailable { .. }) if transport == GradientTransport::Auto => {
            tracing::warn!("gradients go through host memory (MPI): {e}");
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    *slot = Some((device, made.clone()));
    Ok(made)
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
    let g = gather(&model)?;
    let (mut flat, slots) = (g.flat, g.slots);
    for chunk in flat.chunks_mut(BUCKET) {
        comm.broadcast(chunk, 0);
    }
    if comm.rank() == 0 {
        return Ok(model);
    }
    Ok(model.map(&mut Assign { flat: &flat, slots: slots.into_iter() }))
}
