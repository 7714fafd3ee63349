//! The MPI process group (rsmpi over the system's MPI). The workspace denies `unsafe`; this
//! module allows it for the three places below, each with its safety argument: sharing the
//! world communicator across threads, and `MPI_Abort` (rsmpi's `abort` needs a communicator
//! value, which the failing thread may not be able to lock).
#![allow(unsafe_code)]

use std::sync::Mutex;

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use crate::{Collective, DistError};

/// The universe lives until [`finalize`] (from [`crate::Guard`]'s drop).
static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

pub(crate) fn finalize() {
    let u = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(u); // MPI_Finalize
}

/// `MPI_COMM_WORLD` behind a lock: MPI is initialised with `MPI_THREAD_SERIALIZED` (any
/// thread may call, one at a time), and the lock makes the calls one at a time.
pub(crate) struct MpiGroup {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the communicator is a handle to MPI_COMM_WORLD, valid in every thread of the
// process. MPI was initialised at MPI_THREAD_SERIALIZED or above (checked in `init`), which
// allows calls from any thread as long as no two overlap, and every call goes through the
// mutex.
unsafe impl Send for MpiGroup {}
unsafe impl Sync for MpiGroup {}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiGroup {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl MpiGroup {
    pub(crate) fn init() -> Result<Self, DistError> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| DistError::Init("MPI was already initialised".into()))?;
        if !matches!(level, Threading::Serialized | Threading::Multiple) {
            return Err(DistError::Init(format!(
                "the MPI library offers thread level {level:?}, below the serialized level msmae needs"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
        Ok(Self { world: Mutex::new(world), rank, size })
    }

    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        f(&w)
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let send = buf.to_vec();
        self.with(|w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) {
        self.with(|w| w.process_at_rank(root as i32).broadcast_into(buf));
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) {
        self.with(|w| {
            let root = w.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            root.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            root.broadcast_into(&mut buf[..]);
        });
    }
    fn barrier(&self) {
        self.with(|w| w.barrier());
    }
    fn abort(&self, code: i32) -> ! {
        // Not through the lock: the failing thread may be another than the one holding it.
        // SAFETY: MPI is initialised (this group exists) and MPI_COMM_WORLD is valid for the
        // life of the process; MPI_Abort ends every rank and does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
        std::process::abort()
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}
