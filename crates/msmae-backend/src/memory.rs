//! The raw memory of a float tensor, for collectives that sum gradients in place (MPI on
//! host memory, NCCL on CUDA memory) instead of copying them out and back.

use burn::tensor::Tensor;

/// Where a tensor's `f32`s are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Host(*mut f32),
    Cuda { ptr: *mut f32, device: usize },
}

/// Runs `f` on `t`'s values as one contiguous `f32` buffer of `t`'s length, which `f` may
/// read and write; returns the tensor holding them afterwards and `f`'s result. A buffer
/// shared with another tensor, not contiguous or not `f32` is copied first, so `f` never
/// writes into another tensor's values. `None` (and `t` unchanged) where the backend gives
/// no raw memory: burn-flex, or a build without libtorch.
pub fn with_f32_memory<R>(t: Tensor<1>, f: impl FnOnce(Memory, usize) -> R) -> (Tensor<1>, Option<R>) {
    #[cfg(feature = "tch")]
    {
        torch::with_memory(t, f)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = f;
        (t, None)
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn 0.22 marks burn-tch deprecated; it is this project's libtorch route
mod torch {
    use burn::backend::libtorch::TchTensor;
    use burn::backend::{BackendTensor, DispatchTensor, DispatchTensorKind};
    use tch::{Device as TDevice, Kind};

    use super::*;

    pub(super) fn with_memory<R>(t: Tensor<1>, f: impl FnOnce(Memory, usize) -> R) -> (Tensor<1>, Option<R>) {
        // A tensor of an autodiff device (the training device) is unwrapped to its libtorch
        // tensor and wrapped again afterwards (untracked: these are gradient buffers).
        let tracked = t.is_autodiff();
        let rewrap = move |t: Tensor<1>| if tracked { t.autodiff() } else { t };
        let DispatchTensor { kind, autodiff } = t.inner().into_dispatch();
        let prim = match kind {
            DispatchTensorKind::LibTorch(BackendTensor::Float(prim)) => prim,
            kind => return (rewrap(Tensor::from_dispatch(DispatchTensor { kind, autodiff })), None),
        };
        let owned = if prim.can_mut() && prim.tensor.is_contiguous() && prim.tensor.kind() == Kind::Float {
            prim
        } else {
            TchTensor::new(prim.tensor.to_kind(Kind::Float).contiguous().copy())
        };
        let ptr = owned.tensor.data_ptr() as *mut f32;
        let len = owned.tensor.numel();
        let memory = match owned.tensor.device() {
            TDevice::Cpu => Some(Memory::Host(ptr)),
            TDevice::Cuda(i) => Some(Memory::Cuda { ptr, device: i }),
            _ => None,
        };
        let out = memory.map(|m| f(m, len));
        (
            rewrap(Tensor::from_dispatch(DispatchTensor {
                kind: DispatchTensorKind::LibTorch(BackendTensor::Float(owned)),
                autodiff,
            })),
            out,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn libtorch_tensors_are_written_in_place_and_others_are_left_alone() {
        for &kind in crate::compiled_backends() {
            let request = match kind {
                crate::BackendKind::Tch => crate::BackendRequest::Tch,
                crate::BackendKind::Flex => crate::BackendRequest::Flex,
            };
            let compute = crate::select(request, crate::DeviceRequest::Cpu);
            let Ok(compute) = compute else { continue };
            // on the plain device and on its autodiff device (where gradients are summed)
            for device in [compute.device.clone(), compute.device.clone().autodiff()] {
                let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [3]), &device);
                let keep = t.clone(); // shares the storage: must not see the write
                let (out, seen) = with_f32_memory(t, |m, len| {
                    let Memory::Host(p) = m else { return Vec::new() };
                    #[allow(unsafe_code)]
                    // SAFETY: a host buffer of `len` f32s that nothing else uses during the call
                    let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
                    s.iter_mut().for_each(|v| *v *= 10.0);
                    s.to_vec()
                });
                let out_autodiff = out.is_autodiff();
                let back = out.into_data().try_to_vec::<f32>().unwrap_or_default();
                let kept = keep.into_data().try_to_vec::<f32>().unwrap_or_default();
                assert_eq!(kept, vec![1.0, 2.0, 3.0], "{:?}", compute.backend);
                match compute.backend {
                    crate::BackendKind::Tch => {
                        assert_eq!(seen, Some(vec![10.0, 20.0, 30.0]));
                        assert_eq!(back, vec![10.0, 20.0, 30.0]);
                    }
                    crate::BackendKind::Flex => {
                        assert_eq!(seen, None);
                        assert_eq!(back, vec![1.0, 2.0, 3.0]);
                    }
                }
                assert_eq!(out_autodiff, device.is_autodiff(), "the tensor comes back on its device kind");
                // A buffer nothing else holds (what `cat` makes of the gradients) is not
                // copied: the second call sees the memory the first one wrote.
                let parts = vec![Tensor::<1>::zeros([1000], &device), Tensor::<1>::ones([24], &device)];
                let ptr = |m: Memory, _| match m {
                    Memory::Host(p) | Memory::Cuda { ptr: p, .. } => p as usize,
                };
                let (flat, first) = with_f32_memory(Tensor::cat(parts, 0), ptr);
                let (_, second) = with_f32_memory(flat, ptr);
                if compute.backend == crate::BackendKind::Tch {
                    assert!(first.is_some() && first == second, "{first:?} then {second:?} on {device:?}");
                }
            }
        }
    }
}
