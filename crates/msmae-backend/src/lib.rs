//! Backend and device selection, done once in the binary.
//!
//! burn 0.22 tensors carry no backend type: the backend is a property of the
//! [`burn::tensor::Device`]. This crate maps the user's `--device` (`cpu`, `cuda`, `cuda:N`,
//! `auto`) and `--backend` (`auto`, `flex`, `tch`) to a device plus the [`ExecEnv`] that goes
//! into the cache key of stages whose numbers depend on it.
//!
//! - `flex`: burn's pure-Rust CPU backend; always compiled, no set-up.
//! - `tch`: libtorch 2.9.0 through burn-tch (CPU, and CUDA with a CUDA libtorch); compiled
//!   with the `tch` feature after `cargo xtask setup`. About 2× flex on a ViT train step
//!   here, so it is the default whenever it is compiled in.

pub mod fused;
pub mod memory;
pub mod precision;

pub use precision::Precision;

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use msmae_core::ExecEnv;

/// burn version compiled in (recorded with every artifact).
pub const BURN_VERSION: &str = "0.22.1";
/// libtorch version burn-tch 0.22 requires.
pub const LIBTORCH_VERSION: &str = "2.9.0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("unknown device `{0}`: use cpu, cuda, cuda:N or auto")]
    UnknownDevice(String),
    #[error("unknown backend `{0}`: use auto, flex or tch")]
    UnknownBackend(String),
    #[error(
        "this msmae was built without libtorch, which `{0}` needs: build it with `cargo xtask setup` (CPU) or `cargo xtask setup --cuda`, then `cargo xtask run …`"
    )]
    NoTorch(String),
    #[error("`{0}`: libtorch reports no CUDA device (a CPU-only libtorch, no GPU, or no driver); use --device cpu")]
    NoCuda(String),
    #[error("the flex backend runs on the CPU only; `{0}` needs --backend tch")]
    FlexCpuOnly(String),
    #[error("unknown precision `{0}`: use f32 or bf16")]
    UnknownPrecision(String),
    #[error("`{0}`: data-parallel replicas must all be CPU or all CUDA devices")]
    MixedDevices(String),
    #[error("`{0}`: `auto` stands alone (it means every CUDA device, else the CPU)")]
    AutoInList(String),
}

/// A requested device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    Cuda(usize),
    /// The first CUDA device if libtorch sees one, else the CPU.
    Auto,
}

impl FromStr for DeviceRequest {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, BackendError> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| BackendError::UnknownDevice(s.to_string())),
        }
    }
}

/// `cpu`, `cuda:N` or `auto`: what [`FromStr`] reads back.
impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceRequest::Auto => f.write_str("auto"),
        }
    }
}

/// `--device`: one device, or the comma-separated devices a training stage replicates its
/// model on (`cuda:0,cuda:1`; `cpu,cpu` runs two replicas on the CPU, the same code path,
/// for tests), or `auto`: every CUDA device libtorch sees, else the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceRequest>);

impl FromStr for DeviceList {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, BackendError> {
        let v = s.split(',').map(str::parse).collect::<Result<Vec<DeviceRequest>, _>>()?;
        if v.len() > 1 && v.contains(&DeviceRequest::Auto) {
            return Err(BackendError::AutoInList(s.to_string()));
        }
        Ok(Self(v))
    }
}

/// What [`FromStr`] reads back.
impl fmt::Display for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&v.join(","))
    }
}

impl From<DeviceRequest> for DeviceList {
    fn from(d: DeviceRequest) -> Self {
        Self(vec![d])
    }
}

/// A requested backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendRequest {
    /// libtorch when compiled in, else flex.
    Auto,
    Flex,
    Tch,
}

impl FromStr for BackendRequest {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, BackendError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "flex" => Ok(Self::Flex),
            "tch" | "libtorch" | "torch" => Ok(Self::Tch),
            _ => Err(BackendError::UnknownBackend(s.to_string())),
        }
    }
}

/// The backend actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Flex,
    Tch,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Flex => "flex",
            BackendKind::Tch => "tch",
        })
    }
}

/// Backends compiled into this binary.
/// Seed the backend's random generator and draw under one process-wide lock. burn's
/// generators (flex's, libtorch's) are global to the process, so two threads that seed
/// and then draw (parallel tests, say) would otherwise interleave and each get numbers
/// neither seed determines. Every seeded draw should go through here.
pub fn seeded<T>(device: &Device, seed: u64, draw: impl FnOnce() -> T) -> T {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    draw()
}

pub fn compiled_backends() -> &'static [BackendKind] {
    if cfg!(feature = "tch") { &[BackendKind::Tch, BackendKind::Flex] } else { &[BackendKind::Flex] }
}

/// The threads a backend's tensor operations use on the CPU: libtorch's intra-op pool, or
/// for burn-flex rayon's global pool. Results of CPU training depend on it (the order of
/// float reductions), so it is recorded with every artifact and `msmae audit --threads`
/// sets it.
pub fn compute_threads(kind: BackendKind) -> usize {
    match kind {
        #[cfg(feature = "tch")]
        BackendKind::Tch => usize::try_from(tch::get_num_threads()).unwrap_or(1),
        _ => rayon::current_num_threads(),
    }
}

/// Set the CPU threads of libtorch's intra-op pool (what `compute_threads` reports); the
/// pure-Rust backend's rayon pool is fixed once started, so for it only before first use
/// (`false` when it could not be set).
pub fn set_compute_threads(kind: BackendKind, n: usize) -> bool {
    match kind {
        #[cfg(feature = "tch")]
        BackendKind::Tch => {
            tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
            true
        }
        _ => rayon::ThreadPoolBuilder::new().num_threads(n).build_global().is_ok() || rayon::current_num_threads() == n,
    }
}

/// Number of CUDA devices libtorch sees (0 without the `tch` feature or a CUDA libtorch).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "tch")]
    {
        Device::enumerate(burn::tensor::DeviceType::LibTorch).len()
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}

/// A resolved device and the environment it implies.
#[derive(Debug, Clone)]
pub struct Compute {
    pub backend: BackendKind,
    /// The main device: the one a single-device stage uses, and where a data-parallel
    /// stage averages gradients and steps the optimiser.
    pub device: Device,
    /// Every device a training stage replicates its model on (`device` first); one entry
    /// without data parallelism.
    pub replicas: Vec<Device>,
    pub env: ExecEnv,
}

impl Compute {
    /// The same device computing matmuls and attention in `precision` (recorded in the
    /// cache key with the backend and device kind).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.env.precision = precision.to_string();
        self
    }

    /// Versions of the numeric tools, recorded with every artifact.
    pub fn tools(&self) -> Vec<(String, String)> {
        let mut v = vec![("burn".to_string(), BURN_VERSION.to_string())];
        if self.backend == BackendKind::Tch {
            v.push(("libtorch".to_string(), LIBTORCH_VERSION.to_string()));
        }
        v
    }
}

/// Resolve a backend and device request.
pub fn select(backend: BackendRequest, device: DeviceRequest) -> Result<Compute, BackendError> {
    let has_tch = cfg!(feature = "tch");
    let kind = match backend {
        BackendRequest::Flex => BackendKind::Flex,
        BackendRequest::Tch if !has_tch => return Err(BackendError::NoTorch("--backend tch".into())),
        BackendRequest::Tch => BackendKind::Tch,
        BackendRequest::Auto if has_tch => BackendKind::Tch,
        BackendRequest::Auto => match device {
            DeviceRequest::Cuda(_) => return Err(BackendError::NoTorch(format!("--device {device}"))),
            _ => BackendKind::Flex,
        },
    };
    let device = match (kind, device) {
        (BackendKind::Flex, DeviceRequest::Cuda(_)) => {
            return Err(BackendError::FlexCpuOnly(format!("--device {device}")));
        }
        (BackendKind::Flex, _) => DeviceRequest::Cpu,
        (BackendKind::Tch, DeviceRequest::Auto) => {
            if cuda_device_count() > 0 {
                DeviceRequest::Cuda(0)
            } else {
                DeviceRequest::Cpu
            }
        }
        (BackendKind::Tch, DeviceRequest::Cuda(n)) if n >= cuda_device_count() => {
            return Err(BackendError::NoCuda(device.to_string()));
        }
        (_, d) => d,
    };
    let (name, dkind) = match device {
        DeviceRequest::Cuda(_) => (device.to_string(), "cuda"),
        _ => ("cpu".to_string(), "cpu"),
    };
    let device = make_device(kind, device);
    Ok(Compute {
        backend: kind,
        replicas: vec![device.clone()],
        device,
        env: ExecEnv {
            backend: kind.to_string(),
            device: name,
            device_kind: dkind.into(),
            precision: "f32".into(),
            library: if kind == BackendKind::Tch { format!("libtorch {LIBTORCH_VERSION}") } else { String::new() },
        },
    })
}

/// Resolve a device list: the first device is the main one; `auto` alone is every CUDA
/// device when libtorch sees any (else the CPU, one replica). All replicas share the
/// backend and the device kind (what enters the cache key); `env.device` lists them.
pub fn select_all(backend: BackendRequest, devices: &DeviceList) -> Result<Compute, BackendError> {
    let requests: Vec<DeviceRequest> = match devices.0.as_slice() {
        [DeviceRequest::Auto]
            if cfg!(feature = "tch") && backend != BackendRequest::Flex && cuda_device_count() > 0 =>
        {
            (0..cuda_device_count()).map(DeviceRequest::Cuda).collect()
        }
        [] => vec![DeviceRequest::Auto],
        v => v.to_vec(),
    };
    let mut all = requests.iter().map(|&d| select(backend, d)).collect::<Result<Vec<Compute>, _>>()?;
    if all.iter().any(|c| c.env.device_kind != all[0].env.device_kind) {
        return Err(BackendError::MixedDevices(devices.to_string()));
    }
    let names: Vec<String> = all.iter().map(|c| c.env.device.clone()).collect();
    let replicas: Vec<Device> = all.iter().map(|c| c.device.clone()).collect();
    let mut first = all.swap_remove(0);
    first.env.device = names.join(",");
    first.replicas = replicas;
    Ok(first)
}

#[allow(deprecated)] // burn 0.22 marks the libtorch constructors deprecated; they are its only API.
fn make_device(kind: BackendKind, device: DeviceRequest) -> Device {
    match (kind, device) {
        #[cfg(feature = "tch")]
        (BackendKind::Tch, DeviceRequest::Cuda(n)) => Device::libtorch_cuda(n),
        #[cfg(feature = "tch")]
        (BackendKind::Tch, _) => Device::libtorch(),
        _ => Device::flex(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Tensor;
    #[cfg(feature = "tch")]
    use burn::tensor::{Distribution, Tolerance, activation};

    #[test]
    fn parses_requests_and_rejects_nonsense() {
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("CUDA:1".parse(), Ok(DeviceRequest::Cuda(1)));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        for d in [DeviceRequest::Cpu, DeviceRequest::Cuda(3), DeviceRequest::Auto] {
            assert_eq!(d.to_string().parse(), Ok(d), "Display reads back");
        }
        assert_eq!("tpu".parse::<DeviceRequest>(), Err(BackendError::UnknownDevice("tpu".into())));
        assert_eq!("cuda:x".parse::<DeviceRequest>(), Err(BackendError::UnknownDevice("cuda:x".into())));
        assert_eq!("libtorch".parse(), Ok(BackendRequest::Tch));
        assert!("jax".parse::<BackendRequest>().is_err());
    }

    #[test]
    fn flex_is_cpu_only_and_env_names_what_changes_numbers() {
        let c = select(BackendRequest::Flex, DeviceRequest::Auto).expect("flex cpu");
        assert_eq!(c.env, ExecEnv::cpu_flex());
        assert_eq!(
            select(BackendRequest::Flex, DeviceRequest::Cuda(0)).err(),
            Some(BackendError::FlexCpuOnly("--device cuda:0".into()))
        );
        let auto = select(BackendRequest::Auto, DeviceRequest::Cpu).expect("auto cpu");
        assert_eq!(auto.backend, if cfg!(feature = "tch") { BackendKind::Tch } else { BackendKind::Flex });
        assert_eq!(auto.env.device_kind, "cpu");
    }

    #[test]
    fn device_lists_parse_resolve_and_refuse_mixtures() {
        let l: DeviceList = "cuda:0, cuda:1".parse().expect("list");
        assert_eq!(l, DeviceList(vec![DeviceRequest::Cuda(0), DeviceRequest::Cuda(1)]));
        assert_eq!(l.to_string().parse(), Ok(l), "Display reads back");
        assert_eq!("auto,cpu".parse::<DeviceList>(), Err(BackendError::AutoInList("auto,cpu".into())));
        assert_eq!("cpu,tpu".parse::<DeviceList>(), Err(BackendError::UnknownDevice("tpu".into())));
        let two = select_all(BackendRequest::Flex, &"cpu,cpu".parse().expect("cpu,cpu")).expect("two CPU replicas");
        assert_eq!(two.replicas.len(), 2);
        assert_eq!((two.env.device.as_str(), two.env.device_kind.as_str()), ("cpu,cpu", "cpu"));
        let one = select_all(BackendRequest::Flex, &"auto".parse().expect("auto")).expect("auto");
        assert_eq!((one.replicas.len(), one.env.device.as_str()), (1, "cpu"));
        assert!(matches!(
            select_all(BackendRequest::Flex, &"cpu,cuda:0".parse().expect("mixed")),
            Err(BackendError::FlexCpuOnly(_))
        ));
    }

    #[test]
    fn flex_device_computes() {
        let c = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex");
        let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &c.device);
        let y: Vec<f32> = x.clone().matmul(x).into_data().try_into_vec::<f32>().expect("f32");
        assert_eq!(y, [7.0, 10.0, 15.0, 22.0]);
    }

    #[cfg(not(feature = "tch"))]
    #[test]
    fn asking_for_torch_without_it_says_how_to_get_it() {
        let e = select(BackendRequest::Tch, DeviceRequest::Cpu).err().expect("no tch");
        assert!(e.to_string().contains("cargo xtask setup"), "{e}");
        assert!(select(BackendRequest::Auto, DeviceRequest::Cuda(0)).is_err());
    }

    /// flex and libtorch agree on the ops a ViT uses, forward and backward.
    #[cfg(feature = "tch")]
    #[test]
    fn flex_and_libtorch_agree_forward_and_backward() {
        let f = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device;
        let t = select(BackendRequest::Tch, DeviceRequest::Cpu).expect("tch").device;
        let (x, w) = seeded(&f, 3, || {
            (
                Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &f),
                Tensor::<2>::random([16, 16], Distribution::Normal(0.0, 0.25), &f),
            )
        });
        let run = |dev: &Device| {
            let dev = dev.clone().autodiff();
            let x = Tensor::<3>::from_data(x.to_data(), &dev);
            let w = Tensor::<2>::from_data(w.to_data(), &dev).require_grad();
            let q = x.clone().matmul(w.clone().unsqueeze::<3>());
            let attn = activation::softmax(q.clone().matmul(x.clone().swap_dims(1, 2)) / 4.0, 2);
            let out = activation::gelu(attn.matmul(x));
            let loss = (out.clone() * out.clone()).mean();
            let grads = loss.backward();
            let gw = w.grad(&grads).expect("w has a gradient");
            (out.without_autodiff().into_data(), gw.into_data())
        };
        let (of, gf) = run(&f);
        let (ot, gt) = run(&t);
        of.assert_approx_eq::<f32>(&ot, Tolerance::absolute(1e-5));
        gf.assert_approx_eq::<f32>(&gt, Tolerance::absolute(1e-5));
    }
}
