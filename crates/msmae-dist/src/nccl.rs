//! NCCL all-reduce and broadcast on CUDA memory, for gradients that live on a GPU.
//!
//! The communicator is bootstrapped over the process group ([`Collective`], MPI in a
//! multi-process launch): rank 0 draws NCCL's unique id and broadcasts its bytes, then every
//! rank joins with `ncclCommInitRank` on its own device. Calls go on CUDA's legacy default
//! stream, the stream libtorch queues its kernels on, after a context synchronise (so the
//! gradients are complete whatever stream produced them) and before another (so the sums
//! are in memory when the call returns).
//!
//! NCCL and the CUDA driver are loaded at run time (libloading), not linked: a build runs
//! on machines without them and says what is missing when NCCL is asked for. The names
//! tried are `libnccl.so.2` (what NVIDIA's runtime packages and PyTorch's CUDA wheels ship;
//! a process that loaded libtorch_cuda already has it) and `libnccl.so` (the -dev
//! package's link), or the path in `MSMAE_NCCL_LIBRARY`. cudarc's NCCL binding was the
//! first choice, but its loader looks for neither `libnccl.so.2` nor a path (so it misses
//! PyTorch's NCCL) and panics instead of returning an error; the entry points used here
//! (nine of NCCL's, all present since 2.4, and seven of the driver's) are declared below
//! from `nccl.h` and `cuda.h`.
//!
//! Each call is watched as PyTorch's NCCL watchdog does: NCCL's asynchronous error is
//! polled while the call runs, and a call still running after `MSMAE_NCCL_TIMEOUT` seconds
//! (default 1800) aborts the communicator and fails this rank's stage, which ends the job.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libloading::Library;

use crate::Collective;

/// `NCCL_UNIQUE_ID_BYTES`.
const UNIQUE_ID_BYTES: usize = 128;
/// `ncclFloat32` (`ncclDataType_t`).
const NCCL_FLOAT32: c_int = 7;
/// `ncclSum` (`ncclRedOp_t`).
const NCCL_SUM: c_int = 0;
/// Names tried for NCCL when `MSMAE_NCCL_LIBRARY` is not set.
pub const NCCL_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];
/// Names tried for the CUDA driver.
const CUDA_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];
/// The variable naming NCCL's shared library when it is not on the loader's path.
pub const NCCL_LIBRARY_VAR: &str = "MSMAE_NCCL_LIBRARY";
/// The variable bounding how long one NCCL call may take (seconds).
pub const NCCL_TIMEOUT_VAR: &str = "MSMAE_NCCL_TIMEOUT";
/// Default bound on one NCCL call: generous, since a call also waits for the slowest rank
/// (rank 0 writing a checkpoint, a slow validation pass).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// `CUDA_ERROR_NOT_READY`: work still queued on the stream.
const CUDA_NOT_READY: c_int = 600;
/// `ncclInProgress`: a non-blocking operation still running (not an error).
const NCCL_IN_PROGRESS: c_int = 7;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type Stream = *mut c_void;
type Context = *mut c_void;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NcclError {
    #[error("{what} could not be loaded (tried {}): {why}{hint}", tried.join(", "))]
    Load { what: &'static str, tried: Vec<String>, why: String, hint: &'static str },
    #[error("{what} has no `{symbol}` ({source_path}): {why}")]
    Symbol { what: &'static str, symbol: &'static str, source_path: String, why: String },
    #[error("CUDA driver call {call} failed on device {device}: {message} (CUresult {code})")]
    Cuda { call: &'static str, device: usize, code: i32, message: String },
    #[error("NCCL call {call} failed on rank {rank} (device {device}): {message} (ncclResult_t {code})")]
    Nccl { call: &'static str, rank: usize, device: usize, code: i32, message: String },
    #[error(
        "NCCL call {call} did not finish within {seconds} s on rank {rank} (device {device}): another rank hung or the network failed; the communicator was aborted ({var} sets the limit)",
        var = NCCL_TIMEOUT_VAR
    )]
    Timeout { call: &'static str, rank: usize, device: usize, seconds: String },
    #[error("{NCCL_TIMEOUT_VAR}=`{0}` is not a positive number of seconds")]
    BadTimeout(String),
    #[error("NCCL is not available on rank(s) {}: {first}", ranks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    Unavailable { ranks: Vec<usize>, first: String },
}

const NCCL_HINT: &str = "; NCCL ships with the NVIDIA driver stack's runtime packages (libnccl2) and with PyTorch's CUDA wheels (nvidia-nccl-cu*); set MSMAE_NCCL_LIBRARY to libnccl.so.2's path if it is not on the loader's path";
const CUDA_HINT: &str = "; NCCL needs an NVIDIA driver";

type NcclGetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type NcclGetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type NcclCommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type NcclAllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type NcclBroadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type NcclCommDestroy = unsafe extern "C" fn(Comm) -> c_int;
type NcclGetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type NcclCommGetAsyncError = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type NcclCommAbort = unsafe extern "C" fn(Comm) -> c_int;

struct NcclApi {
    /// Never unloaded: `ncclGetUniqueId` starts a bootstrap thread inside the library that
    /// outlives the call (it waits for the ranks to connect), so unloading would pull its
    /// code from under it.
    _lib: std::mem::ManuallyDrop<Library>,
    path: String,
    get_version: NcclGetVersion,
    get_unique_id: NcclGetUniqueId,
    comm_init_rank: NcclCommInitRank,
    all_reduce: NcclAllReduce,
    broadcast: NcclBroadcast,
    comm_destroy: NcclCommDestroy,
    get_error_string: NcclGetErrorString,
    comm_get_async_error: NcclCommGetAsyncError,
    comm_abort: NcclCommAbort,
}

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuPrimaryCtxRetain = unsafe extern "C" fn(*mut Context, c_int) -> c_int;
type CuCtxSetCurrent = unsafe extern "C" fn(Context) -> c_int;
type CuCtxSynchronize = unsafe extern "C" fn() -> c_int;
type CuStreamQuery = unsafe extern "C" fn(Stream) -> c_int;
type CuGetErrorString = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

struct CudaApi {
    _lib: Library,
    path: String,
    init: CuInit,
    device_get: CuDeviceGet,
    primary_ctx_retain: CuPrimaryCtxRetain,
    ctx_set_current: CuCtxSetCurrent,
    ctx_synchronize: CuCtxSynchronize,
    stream_query: CuStreamQuery,
    get_error_string: CuGetErrorString,
}

/// The first of `names` the dynamic loader opens, and its path (or name).
fn open(what: &'static str, names: &[String], hint: &'static str) -> Result<(Library, String), NcclError> {
    let mut why = String::from("no name to try");
    for name in names {
        // SAFETY: loading runs the library's initialisers; NCCL's and libcuda's only set up
        // their own state.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, name.clone())),
            Err(e) => why = with_source(&e),
        }
    }
    Err(NcclError::Load { what, tried: names.to_vec(), why, hint })
}

/// libloading's message and the loader's own (`dlopen failed: libnccl.so.2: cannot open
/// shared object file: No such file or directory`).
fn with_source(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// A function pointer out of `lib`. The pointer stays valid while `lib` is loaded: the API
/// structs keep their library for as long as they (and the pointers) live.
fn symbol<T: Copy>(lib: &Library, what: &'static str, path: &str, name: &'static str) -> Result<T, NcclError> {
    // SAFETY: `T` is the C signature of `name` as declared in nccl.h / cuda.h (the type
    // aliases above); the library outlives the copy (see the API structs).
    unsafe { lib.get::<T>(name).map(|s| *s) }.map_err(|e| NcclError::Symbol {
        what,
        symbol: name,
        source_path: path.to_string(),
        why: with_source(&e),
    })
}

/// The names to try for NCCL: `MSMAE_NCCL_LIBRARY`'s path alone when it is set.
pub fn nccl_candidates(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    match var(NCCL_LIBRARY_VAR).filter(|v| !v.trim().is_empty()) {
        Some(path) => vec![path],
        None => NCCL_NAMES.iter().map(|s| s.to_string()).collect(),
    }
}

impl NcclApi {
    fn load(names: &[String]) -> Result<Self, NcclError> {
        let (lib, path) = open("NCCL", names, NCCL_HINT)?;
        Ok(Self {
            get_version: symbol(&lib, "NCCL", &path, "ncclGetVersion")?,
            get_unique_id: symbol(&lib, "NCCL", &path, "ncclGetUniqueId")?,
            comm_init_rank: symbol(&lib, "NCCL", &path, "ncclCommInitRank")?,
            all_reduce: symbol(&lib, "NCCL", &path, "ncclAllReduce")?,
            broadcast: symbol(&lib, "NCCL", &path, "ncclBroadcast")?,
            comm_destroy: symbol(&lib, "NCCL", &path, "ncclCommDestroy")?,
            get_error_string: symbol(&lib, "NCCL", &path, "ncclGetErrorString")?,
            comm_get_async_error: symbol(&lib, "NCCL", &path, "ncclCommGetAsyncError")?,
            comm_abort: symbol(&lib, "NCCL", &path, "ncclCommAbort")?,
            path,
            _lib: std::mem::ManuallyDrop::new(lib),
        })
    }

    fn message(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() { "unknown error".into() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
    }

    /// A fresh unique id (the bootstrap address rank 0 listens on), as bytes; needs no GPU.
    fn unique_id(&self) -> Result<Vec<u8>, c_int> {
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: `id` is a valid out pointer of the declared size.
        let rc = unsafe { (self.get_unique_id)(&mut id) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// `major.minor.patch` (NCCL encodes 2.x versions as `major*10000 + minor*100 + patch`
    /// since 2.9, `major*1000 + minor*100 + patch` before).
    fn version(&self) -> Result<String, c_int> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer.
        let rc = unsafe { (self.get_version)(&mut v) };
        if rc != 0 {
            return Err(rc);
        }
        Ok(decode_version(v))
    }
}

/// NCCL's integer version as `major.minor.patch`.
pub fn decode_version(v: i32) -> String {
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    }
}

impl CudaApi {
    fn load() -> Result<Self, NcclError> {
        let names: Vec<String> = CUDA_NAMES.iter().map(|s| s.to_string()).collect();
        const WHAT: &str = "the CUDA driver";
        let (lib, path) = open(WHAT, &names, CUDA_HINT)?;
        Ok(Self {
            init: symbol(&lib, WHAT, &path, "cuInit")?,
            device_get: symbol(&lib, WHAT, &path, "cuDeviceGet")?,
            primary_ctx_retain: symbol(&lib, WHAT, &path, "cuDevicePrimaryCtxRetain")?,
            ctx_set_current: symbol(&lib, WHAT, &path, "cuCtxSetCurrent")?,
            ctx_synchronize: symbol(&lib, WHAT, &path, "cuCtxSynchronize")?,
            stream_query: symbol(&lib, WHAT, &path, "cuStreamQuery")?,
            get_error_string: symbol(&lib, WHAT, &path, "cuGetErrorString")?,
            path,
            _lib: lib,
        })
    }

    fn check(&self, call: &'static str, device: usize, rc: c_int) -> Result<(), NcclError> {
        if rc == 0 {
            return Ok(());
        }
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: `p` is a valid out pointer; the string is static in the driver.
        let message = if unsafe { (self.get_error_string)(rc, &mut p) } == 0 && !p.is_null() {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            "unknown error".into()
        };
        Err(NcclError::Cuda { call, device, code: rc, message })
    }
}

/// Both libraries, loaded once per process (the first failure is kept and returned again).
fn apis() -> Result<&'static (NcclApi, CudaApi), NcclError> {
    static APIS: OnceLock<Result<(NcclApi, CudaApi), NcclError>> = OnceLock::new();
    APIS.get_or_init(|| {
        let nccl = NcclApi::load(&nccl_candidates(|k| std::env::var(k).ok()))?;
        Ok((nccl, CudaApi::load()?))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The version of the NCCL this process would use, and where it was loaded from: a check
/// that needs no GPU (`ncclGetVersion` touches no device).
pub fn library_version(names: &[String]) -> Result<(String, String), NcclError> {
    let api = NcclApi::load(names)?;
    let v = api.version().map_err(|code| NcclError::Nccl {
        call: "ncclGetVersion",
        rank: 0,
        device: 0,
        code,
        message: api.message(code),
    })?;
    Ok((v, api.path.clone()))
}

/// Whether the CUDA driver loads and initialises (`cuInit`), and from where: what NCCL
/// needs besides itself.
pub fn driver_status() -> Result<String, NcclError> {
    let api = CudaApi::load()?;
    // SAFETY: cuInit takes flags 0 and may be called more than once.
    api.check("cuInit", 0, unsafe { (api.init)(0) })?;
    let path = api.path.clone();
    // the initialised driver stays loaded (it is the process's CUDA driver from now on)
    std::mem::forget(api);
    Ok(path)
}

/// One NCCL communicator over every rank of a process group, each rank on one CUDA device.
pub struct Nccl {
    comm: Comm,
    ctx: Context,
    rank: usize,
    size: usize,
    device: usize,
    version: String,
    api: &'static (NcclApi, CudaApi),
    /// NCCL communicators are not thread-safe: one call at a time.
    lock: Mutex<()>,
    /// The longest one call may take before the communicator is aborted.
    timeout: Duration,
    /// Set once the communicator was aborted (it must then not be destroyed, nor used).
    aborted: AtomicBool,
}

// SAFETY: the communicator and context handles are plain pointers owned by NCCL and the
// driver, valid from any thread; every use goes through `lock` (one call at a time) and sets
// the context current on the calling thread first.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Nccl {{ rank: {}, size: {}, device: cuda:{}, version: {} }}",
            self.rank, self.size, self.device, self.version
        )
    }
}

impl Nccl {
    /// Joins every rank of `group` into one communicator, this rank on CUDA device `device`.
    /// Collective: every rank calls it at the same point. Ranks first agree that each could
    /// load NCCL and the driver, so one rank without them fails every rank with its name
    /// instead of leaving the others waiting.
    pub fn init(group: &dyn Collective, device: usize) -> Result<Self, NcclError> {
        // Everything a rank can fail at on its own comes before the vote: loading, the
        // device's context, the version. After it, only rank 0's id draw (announced to all)
        // and ncclCommInitRank (a rank that fails there fails its stage, which aborts the job).
        let mine = apis().and_then(|api| {
            let timeout = timeout_from(|k| std::env::var(k).ok())?;
            let ctx = current_context(&api.1, device)?;
            let version = api.0.version().map_err(|code| NcclError::Nccl {
                call: "ncclGetVersion",
                rank: group.rank(),
                device,
                code,
                message: api.0.message(code),
            })?;
            Ok((api, ctx, version, timeout))
        });
        let mut ok = vec![0.0f32; group.size()];
        if let Some(slot) = ok.get_mut(group.rank()) {
            *slot = if mine.is_ok() { 1.0 } else { 0.0 };
        }
        group.all_reduce_sum(&mut ok);
        let missing: Vec<usize> = ok.iter().enumerate().filter(|(_, v)| **v < 0.5).map(|(r, _)| r).collect();
        let (api, ctx, version, timeout) = match mine {
            Ok(m) if missing.is_empty() => m,
            Ok(_) => return Err(NcclError::Unavailable { ranks: missing, first: "see that rank's log".into() }),
            Err(e) => return Err(NcclError::Unavailable { ranks: missing, first: e.to_string() }),
        };
        let nccl = &api.0;
        let nccl_err =
            |call, code| NcclError::Nccl { call, rank: group.rank(), device, code, message: nccl.message(code) };
        let mut bytes = vec![0u8; UNIQUE_ID_BYTES];
        let mut drawn = 1.0f32;
        if group.rank() == 0 {
            match nccl.unique_id() {
                Ok(b) => bytes = b,
                Err(code) => {
                    tracing::error!("{}", nccl_err("ncclGetUniqueId", code));
                    drawn = 0.0;
                }
            }
        }
        // rank 0 says whether it drew an id before the others wait for one
        let mut flag = [drawn];
        group.broadcast(&mut flag, 0);
        if flag[0] < 0.5 {
            return Err(NcclError::Nccl {
                call: "ncclGetUniqueId",
                rank: 0,
                device,
                code: -1,
                message: "rank 0 could not draw NCCL's unique id (see its log)".into(),
            });
        }
        group.broadcast_bytes(&mut bytes, 0);
        if bytes.len() != UNIQUE_ID_BYTES {
            return Err(NcclError::Nccl {
                call: "ncclGetUniqueId",
                rank: group.rank(),
                device,
                code: -1,
                message: format!("{} bytes of unique id from rank 0", bytes.len()),
            });
        }
        let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (c, b) in id.internal.iter_mut().zip(&bytes) {
            *c = *b as c_char;
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; the id came from rank 0's ncclGetUniqueId;
        // this thread's current context is `device`'s primary context, which NCCL binds.
        let rc = unsafe { (nccl.comm_init_rank)(&mut comm, group.size() as c_int, id, group.rank() as c_int) };
        if rc != 0 {
            return Err(nccl_err("ncclCommInitRank", rc));
        }
        tracing::debug!("NCCL {version} ({}) rank {} of {} on cuda:{device}", nccl.path, group.rank(), group.size());
        Ok(Self {
            comm,
            ctx,
            rank: group.rank(),
            size: group.size(),
            device,
            version,
            api,
            lock: Mutex::new(()),
            timeout,
            aborted: AtomicBool::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn device(&self) -> usize {
        self.device
    }
    /// NCCL's version (`2.27.7`).
    pub fn version(&self) -> &str {
        &self.version
    }

    fn call(&self, what: &'static str, f: impl FnOnce(&NcclApi) -> c_int) -> Result<(), NcclError> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let (nccl, cuda) = (&self.api.0, &self.api.1);
        let failed = |code| NcclError::Nccl {
            call: what,
            rank: self.rank,
            device: self.device,
            code,
            message: nccl.message(code),
        };
        if self.aborted.load(Ordering::SeqCst) {
            return Err(NcclError::Nccl {
                call: what,
                rank: self.rank,
                device: self.device,
                code: -1,
                message: "the communicator was aborted by an earlier failure".into(),
            });
        }
        // SAFETY: `ctx` is the device's retained primary context.
        cuda.check("cuCtxSetCurrent", self.device, unsafe { (cuda.ctx_set_current)(self.ctx) })?;
        // the inputs are complete, whichever stream wrote them
        cuda.check("cuCtxSynchronize", self.device, unsafe { (cuda.ctx_synchronize)() })?;
        let rc = f(nccl);
        if rc != 0 {
            return Err(failed(rc));
        }
        // Wait for the call on the stream while watching NCCL's asynchronous errors and the
        // clock (what PyTorch's NCCL watchdog does): a peer that hangs without exiting would
        // otherwise hold this rank forever. Spin briefly (a step's all-reduce takes
        // milliseconds), then poll every 100 µs.
        let started = Instant::now();
        let null: Stream = std::ptr::null_mut();
        for polls in 0u64.. {
            // SAFETY: the legacy default stream of the current context.
            let done = match unsafe { (cuda.stream_query)(null) } {
                0 => true,
                CUDA_NOT_READY => false,
                other => return cuda.check("cuStreamQuery", self.device, other),
            };
            // Checked once more after the stream drained: a kernel NCCL stopped early
            // finishes too, with its error set and the buffer not summed.
            let mut async_rc: c_int = 0;
            // SAFETY: a live communicator and a valid out pointer.
            let rc = unsafe { (nccl.comm_get_async_error)(self.comm, &mut async_rc) };
            if rc == 0 && async_rc != 0 && async_rc != NCCL_IN_PROGRESS {
                self.abort();
                return Err(failed(async_rc));
            }
            if done {
                return Ok(());
            }
            if started.elapsed() > self.timeout {
                self.abort();
                return Err(NcclError::Timeout {
                    call: what,
                    rank: self.rank,
                    device: self.device,
                    seconds: self.timeout.as_secs_f64().to_string(),
                });
            }
            if polls < 10_000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(())
    }

    /// Ends every outstanding operation of the communicator (after an asynchronous error or a
    /// timeout); it is unusable afterwards.
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: a communicator from ncclCommInitRank, aborted once (then never destroyed).
            let _ = unsafe { (self.api.0.comm_abort)(self.comm) };
        }
    }

    /// Element-wise sum over the ranks, in place.
    ///
    /// # Safety
    /// `ptr` must point to `len` `f32`s in the memory of CUDA device [`Self::device`], valid
    /// for reads and writes, and nothing else may use them until this returns.
    pub unsafe fn all_reduce_sum(&self, ptr: *mut f32, len: usize) -> Result<(), NcclError> {
        let null: Stream = std::ptr::null_mut();
        // SAFETY: as the caller promises; the legacy default stream (null) is ordered after
        // the synchronise in `call`.
        self.call("ncclAllReduce", |n| unsafe {
            (n.all_reduce)(ptr as *const c_void, ptr as *mut c_void, len, NCCL_FLOAT32, NCCL_SUM, self.comm, null)
        })
    }

    /// `root`'s values on every rank, in place.
    ///
    /// # Safety
    /// As [`Self::all_reduce_sum`].
    pub unsafe fn broadcast(&self, ptr: *mut f32, len: usize, root: usize) -> Result<(), NcclError> {
        let null: Stream = std::ptr::null_mut();
        // SAFETY: as the caller promises.
        self.call("ncclBroadcast", |n| unsafe {
            (n.broadcast)(ptr as *const c_void, ptr as *mut c_void, len, NCCL_FLOAT32, root as c_int, self.comm, null)
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::SeqCst) {
            // SAFETY: `comm` came from ncclCommInitRank and is destroyed once (an aborted one
            // was freed by ncclCommAbort).
            let _ = unsafe { (self.api.0.comm_destroy)(self.comm) };
        }
    }
}

/// The bound on one NCCL call, from `MSMAE_NCCL_TIMEOUT` (seconds) as `var` reads it.
pub fn timeout_from(var: impl Fn(&str) -> Option<String>) -> Result<Duration, NcclError> {
    match var(NCCL_TIMEOUT_VAR).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
        None => Ok(DEFAULT_TIMEOUT),
        Some(v) => match v.parse::<f64>() {
            Ok(s) if s > 0.0 => Duration::try_from_secs_f64(s).map_err(|_| NcclError::BadTimeout(v)),
            _ => Err(NcclError::BadTimeout(v)),
        },
    }
}

/// Makes `device`'s primary context (the one libtorch's runtime uses) current on this thread.
fn current_context(cuda: &CudaApi, device: usize) -> Result<Context, NcclError> {
    let mut dev: c_int = 0;
    let mut ctx: Context = std::ptr::null_mut();
    // SAFETY: out pointers are valid; cuInit may be called more than once.
    unsafe {
        cuda.check("cuInit", device, (cuda.init)(0))?;
        cuda.check("cuDeviceGet", device, (cuda.device_get)(&mut dev, device as c_int))?;
        cuda.check("cuDevicePrimaryCtxRetain", device, (cuda.primary_ctx_retain)(&mut ctx, dev))?;
        cuda.check("cuCtxSetCurrent", device, (cuda.ctx_set_current)(ctx))?;
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Solo;

    #[test]
    fn versions_decode_in_both_of_nccls_encodings() {
        assert_eq!(decode_version(22707), "2.27.7");
        assert_eq!(decode_version(2708), "2.7.8");
    }

    #[test]
    fn the_call_timeout_comes_from_its_variable() {
        let one = |v: &'static str| move |k: &str| (k == NCCL_TIMEOUT_VAR).then(|| v.to_string());
        assert_eq!(timeout_from(|_| None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(timeout_from(one("90")), Ok(Duration::from_secs(90)));
        assert_eq!(timeout_from(one(" 0.5 ")), Ok(Duration::from_millis(500)));
        for bad in ["0", "-3", "ten", "inf", "NaN", "1e30"] {
            let e = timeout_from(one(bad)).expect_err(bad);
            assert_eq!(e.to_string(), format!("MSMAE_NCCL_TIMEOUT=`{bad}` is not a positive number of seconds"));
        }
    }

    #[test]
    fn the_library_variable_replaces_the_default_names() {
        assert_eq!(nccl_candidates(|_| None), vec!["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
        let set = |k: &str| (k == NCCL_LIBRARY_VAR).then(|| "/opt/nccl/lib/libnccl.so.2".to_string());
        assert_eq!(nccl_candidates(set), vec!["/opt/nccl/lib/libnccl.so.2".to_string()]);
    }

    #[test]
    fn a_missing_library_is_an_error_naming_what_was_tried() {
        let e = library_version(&["/nonexistent/libnccl.so.2".to_string()]).expect_err("no such file");
        let text = e.to_string();
        assert!(text.contains("NCCL could not be loaded (tried /nonexistent/libnccl.so.2)"), "{text}");
        assert!(text.contains("MSMAE_NCCL_LIBRARY"), "{text}");
        // a library that is not NCCL: named with the missing entry point
        let libc = ["libc.so.6".to_string()];
        let e = library_version(&libc).expect_err("libc is not NCCL");
        assert!(matches!(&e, NcclError::Symbol { symbol: "ncclGetVersion", .. }), "{e}");
    }

    /// The NCCL of PyTorch's CUDA wheel (in the test venv, `MSMAE_PYTHON`): every entry point
    /// resolves, the version is the one torch reports, and rank 0's unique id is drawn (no GPU
    /// is needed for either); the error strings come from NCCL itself.
    #[test]
    fn pytorchs_nccl_loads_with_every_entry_point_and_draws_a_unique_id() {
        let py = std::env::var_os("MSMAE_PYTHON").unwrap_or_else(|| {
            panic!("MSMAE_PYTHON is not set: run the suite with `cargo xtask test` (its venv has PyTorch's NCCL)")
        });
        let script = "import os, torch, nvidia.nccl as n\nprint(os.path.join(list(n.__path__)[0], 'lib', 'libnccl.so.2'))\nprint('.'.join(map(str, torch.cuda.nccl.version())))";
        let out = std::process::Command::new(py).args(["-c", script]).output().expect("run the reference Python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let (path, torch_version) =
            (lines.next().unwrap_or_default().to_string(), lines.next().unwrap_or_default().to_string());
        let (version, from) = library_version(std::slice::from_ref(&path)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((version.as_str(), from.as_str()), (torch_version.as_str(), path.as_str()));
        let api = NcclApi::load(&[path]).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (api.unique_id(), api.unique_id());
        let (Ok(a), Ok(b)) = (a, b) else { panic!("ncclGetUniqueId failed") };
        assert_eq!(a.len(), UNIQUE_ID_BYTES);
        assert!(a.iter().any(|&x| x != 0) && a != b, "two draws give two non-zero ids");
        assert_eq!(api.message(0), "no error");
        assert!(api.message(4).contains("invalid argument"), "{}", api.message(4));
        eprintln!("NCCL {version} from {from}: every entry point resolves, unique ids drawn");
    }

    #[test]
    fn without_nccl_or_a_driver_init_fails_naming_the_rank_instead_of_waiting() {
        // This machine has neither a GPU driver nor (unless MSMAE_NCCL_LIBRARY points at one)
        // NCCL: joining must fail, on rank 0 of a solo group, with the loader's reason.
        if apis().is_ok() {
            return; // a GPU machine: exercised by scripts/gpu-check.sh instead
        }
        let e = Nccl::init(&Solo, 0).expect_err("no NCCL here");
        assert!(matches!(&e, NcclError::Unavailable { ranks, .. } if ranks == &[0]), "{e}");
        assert!(e.to_string().contains("could not be loaded"), "{e}");
    }
}
