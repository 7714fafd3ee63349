//! Compute precision, autocast-style.
//!
//! - `f32`: everything in float32 (the default; on CUDA libtorch may use TF32 tensor cores
//!   for float32 matmuls only if the user enables it in libtorch, which msmae does not).
//! - `bf16`: the matmuls (every linear layer, the patch projection, the attention scores
//!   and the attention-weighted sum) take bfloat16 inputs and return bfloat16, which is cast
//!   back to float32 at once. Everything else stays float32: the master weights and the
//!   optimiser state, LayerNorm, softmax (the composed attention upcasts the scores),
//!   GELU, residual sums, losses and every reduction. The casts are autodiff nodes, so
//!   gradients reach the float32 weights as float32. This is what
//!   `torch.autocast(dtype=torch.bfloat16)` does to a timm ViT, except that autocast keeps
//!   the outputs of matmuls in bfloat16 until the next float32 op (the GELU and the
//!   residual adds here see float32).
//!
//! The precision in force is per thread: a stage sets it when it resolves its runtime
//! (from the runner's `--precision`), so parallel stages and tests do not see each other's.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use burn::tensor::{FloatDType, Tensor};

use crate::BackendError;

/// The precision of matmuls and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl FromStr for Precision {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, BackendError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(BackendError::UnknownPrecision(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision in force on this thread.
pub fn current() -> Precision {
    CURRENT.with(Cell::get)
}

/// Set this thread's precision; returns the previous one.
pub fn set(p: Precision) -> Precision {
    CURRENT.with(|c| c.replace(p))
}

/// Run `f` under precision `p` on this thread, restoring the previous one afterwards (also
/// when `f` panics).
pub fn with<T>(p: Precision, f: impl FnOnce() -> T) -> T {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            set(self.0);
        }
    }
    let _restore = Restore(set(p));
    f()
}

/// A matmul operand in the compute precision.
pub(crate) fn lower<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    match current() {
        Precision::F32 => t,
        Precision::Bf16 => t.cast(FloatDType::BF16),
    }
}

/// A matmul result back in float32 (a no-op under f32).
pub(crate) fn raise<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    match current() {
        Precision::F32 => t,
        Precision::Bf16 => t.cast(FloatDType::F32),
    }
}
