//! The processes of one training job and what they exchange: rank, world size, the rank within
//! a machine, sums over all ranks and broadcasts from rank 0. Over MPI when the binary is built
//! with the `mpi` feature and started by an MPI launcher (`mpirun`, `srun --mpi=pmix`); otherwise
//! one process whose collectives do nothing, so the trainer has one code path for both.

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Values per all-reduce call: large enough that the per-call latency is negligible, small
/// enough that the scratch copy a sum needs stays at 32 MB whatever the model's size.
#[cfg(feature = "mpi")]
const ALL_REDUCE_CHUNK: usize = 8 << 20;

/// Bytes per broadcast call: MPI counts in 32-bit integers, and a checkpoint can pass 2 GiB.
#[cfg(feature = "mpi")]
const BROADCAST_CHUNK: usize = 1 << 30;

/// Environment variables one of the usual launchers sets in every process it starts (Open MPI,
/// PMIx under Slurm and others, MPICH's Hydra). Without one of them the job is one process and
/// MPI is not initialised at all, so a plain `dino train` never needs an MPI runtime.
const LAUNCHER_VARIABLES: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"];

/// The processes of this job, as seen from one of them.
pub struct Dist {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Mpi>,
}

#[cfg(feature = "mpi")]
struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    /// Finalises MPI when dropped, so it lives as long as the job.
    _universe: mpi::environment::Universe,
}

impl Dist {
    /// One process on its own.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The job this process belongs to: MPI's world when an MPI launcher started it, one process
    /// otherwise. A process started by a launcher from a binary built without the `mpi` feature
    /// is refused, since it would silently train alone beside its copies.
    pub fn from_launcher() -> Result<Self> {
        let launched = LAUNCHER_VARIABLES.iter().find(|v| std::env::var_os(v).is_some());
        let Some(variable) = launched else { return Ok(Self::single()) };
        Self::connect(variable)
    }

    /// Without MPI, a launcher that says the job has one process (`srun` in a Slurm allocation
    /// sets these for any program) is no obstacle; any other is.
    #[cfg(not(feature = "mpi"))]
    fn connect(variable: &str) -> Result<Self> {
        let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"].iter().find_map(|v| std::env::var(v).ok());
        if size.as_deref() == Some("1") {
            return Ok(Self::single());
        }
        anyhow::bail!("started by an MPI launcher ({variable} is set) but this binary was built without MPI; rebuild with `--features mpi`")
    }

    #[cfg(feature = "mpi")]
    fn connect(variable: &str) -> Result<Self> {
        use mpi::topology::Communicator;
        // Only the main thread calls MPI; the compute threads never do.
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .with_context(|| format!("{variable} is set but MPI could not be initialised"))?;
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let dist = Self {
            rank: world.rank() as usize,
            world_size: world.size() as usize,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
            mpi: Some(Mpi { world, _universe: universe }),
        };
        Ok(dist)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// This process's index among the job's processes on the same machine (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// How many of the job's processes share this machine (how its cores are divided).
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// This process's share of the machine's cores (at least one).
    pub fn cores(&self) -> usize {
        let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
        (machine / self.local_size).max(1)
    }

    /// Rank 0 alone writes checkpoints, logs and plots and talks on the terminal.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Replaces every value of `values` by its sum over all ranks (the same on every rank).
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let mut scratch = Vec::with_capacity(values.len().min(ALL_REDUCE_CHUNK));
            for chunk in values.chunks_mut(ALL_REDUCE_CHUNK) {
                scratch.clear();
                scratch.extend_from_slice(chunk);
                mpi.world.all_reduce_into(&scratch[..], chunk, SystemOperation::sum());
            }
        }
        let _ = values;
    }

    /// Replaces every value of `values` by its sum over all ranks, in double precision (counts,
    /// metrics).
    pub fn sum_f64(&self, values: &mut [f64]) {
        self.group().sum_f64(values);
    }

    /// The job's processes as a small copyable handle, for sums inside a computation.
    pub fn group(&self) -> Group {
        Group { ranks: self.world_size }
    }

    /// Overwrites `bytes` on every rank with rank 0's (all ranks pass buffers of one length).
    pub fn broadcast_bytes(&self, bytes: &mut [u8]) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            for chunk in bytes.chunks_mut(BROADCAST_CHUNK) {
                mpi.world.process_at_rank(0).broadcast_into(chunk);
            }
        }
        let _ = bytes;
    }

    /// Rank 0's `value` on every rank (JSON on the wire; for small values such as flags, plans
    /// and checksums).
    pub fn broadcast<T: Serialize + DeserializeOwned>(&self, value: T) -> Result<T> {
        if self.world_size == 1 {
            return Ok(value);
        }
        let mut bytes = if self.is_main() { serde_json::to_vec(&value)? } else { Vec::new() };
        self.broadcast_buffer(&mut bytes);
        serde_json::from_slice(&bytes).context("a value broadcast from rank 0 could not be read")
    }

    /// Rank 0's `bytes` on every rank, whatever their length on the others.
    pub fn broadcast_buffer(&self, bytes: &mut Vec<u8>) {
        if self.world_size == 1 {
            return;
        }
        let mut len = (bytes.len() as u64).to_le_bytes();
        self.broadcast_bytes(&mut len);
        bytes.resize(u64::from_le_bytes(len) as usize, 0);
        self.broadcast_bytes(bytes);
    }

    /// The ranks whose `value` differs from rank 0's (empty when all agree).
    pub fn ranks_differing_from_main(&self, value: u64) -> Result<Vec<usize>> {
        let main_value = self.broadcast(value)?;
        let mut differs = vec![0.0; self.world_size];
        differs[self.rank] = f64::from(u8::from(main_value != value));
        self.sum_f64(&mut differs);
        Ok(differs.iter().enumerate().filter(|(_, d)| **d > 0.0).map(|(rank, _)| rank).collect())
    }

    /// Ends every process of the job at once (after this rank printed why). One process simply
    /// exits with `code`.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            use mpi::topology::Communicator;
            mpi.world.abort(code);
        }
        std::process::exit(code)
    }
}

/// The job's processes as seen from inside a computation: SyncBatchNorm sums its per-channel
/// statistics, and their gradients, over the batches of every rank with it. Unlike [`Dist`] it
/// is `Copy`, `Send` and `'static`, so a backward step recorded in burn's graph can keep one.
/// Its sums run on the thread that calls them, which in training is the main thread (MPI is
/// initialised for that thread alone to call it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    ranks: usize,
}

impl Group {
    /// One process: every sum is the value itself.
    pub fn single() -> Self {
        Self { ranks: 1 }
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Replaces every value of `values` by its sum over all ranks, in double precision. Every
    /// rank must call it in the same order, with buffers of one length.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if self.ranks > 1 {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            // A group of several ranks only comes from a `Dist` connected over MPI, whose
            // universe lives as long as the job.
            let world = mpi::topology::SimpleCommunicator::world();
            let scratch = values.to_vec();
            world.all_reduce_into(&scratch[..], values, SystemOperation::sum());
        }
        let _ = values;
    }
}

/// Makes a panic on any thread of any rank end the whole job instead of leaving the others
/// waiting in a collective forever: the process aborts (no MPI call, which another thread
/// may not make), and the launcher ends the other ranks as it does when one dies. Installed
/// once the job is known to span several processes.
pub fn abort_job_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_collectives_leave_values_alone() {
        let dist = Dist::single();
        let mut values = vec![1.5f32, -2.0];
        dist.sum_f32(&mut values);
        assert_eq!(values, [1.5, -2.0]);
        let mut counts = vec![3.0f64];
        dist.sum_f64(&mut counts);
        assert_eq!(counts, [3.0]);
        assert_eq!(dist.broadcast(vec![7u32, 9]).unwrap(), [7, 9]);
        assert!(dist.ranks_differing_from_main(42).unwrap().is_empty());
        assert!((dist.rank(), dist.world_size(), dist.local_rank(), dist.local_size(), dist.is_main()) == (0, 1, 0, 1, true));
    }
}
