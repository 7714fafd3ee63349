//! The collectives of a data-parallel run, as the stage context holds them: the interface
//! every process group implements (MPI and NCCL in `msmae-dist`) and [`Solo`], one process.

use std::fmt;

/// The collectives of a data-parallel run. Every rank makes the same calls in the same
/// order, with buffers of the same length.
pub trait Collective: Send + Sync + fmt::Debug {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// `root`'s values, in place on every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize);
    /// `root`'s bytes (any length: the others' buffers are resized), on every rank.
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize);
    fn barrier(&self);
    /// End every rank of the job with `code` (after this rank failed alone, while the others
    /// may be waiting in a collective).
    fn abort(&self, code: i32) -> !;
    /// `mpi` or `solo`.
    fn name(&self) -> &'static str;
    fn is_solo(&self) -> bool {
        self.size() == 1
    }
}

/// One process: rank 0 of 1; every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn broadcast(&self, _: &mut [f32], _: usize) {}
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "solo"
    }
}
