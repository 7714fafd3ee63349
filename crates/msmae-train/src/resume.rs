//! Checkpoints a training run resumes from after a kill.
//!
//! Determinism: batches and masks depend only on (seed, epoch, row) (see [`crate::data`]);
//! the backend's own RNG (drop-path) is re-seeded from (seed, epoch) at every epoch, and
//! parameters are initialised right after seeding. So a run resumed from the checkpoint of
//! epoch `k` continues exactly as the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use msmae_core::{StageContext, StageError};

use crate::data::ImageTable;
use crate::fit::EpochLog;
use crate::maps::{Maps, read_maps, write_maps};

/// `state.json` in the resume directory: the commit point of a checkpoint. Its history's
/// values are rounded with [`crate::fit::logged`], so that a resumed run writes the same
/// history bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeState {
    pub epochs_done: usize,
    pub history: Vec<EpochLog>,
    pub best: Option<(f64, usize)>,
    pub has_maps: bool,
}

/// What [`Resume::restore`] brings back.
pub struct Restored<M> {
    pub model: M,
    pub optim: ModuleOptimizer,
    /// The best model so far, where the run selects one.
    pub best: Option<M>,
    /// The maps in use at the checkpoint.
    pub maps: Option<Arc<Maps>>,
}

impl<M: std::fmt::Debug> std::fmt::Debug for Restored<M> {
    // burn's `ModuleOptimizer` has no `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("model", &self.model)
            .field("best", &self.best)
            .field("maps", &self.maps.as_ref().map(|m| m.len()))
            .finish_non_exhaustive()
    }
}

/// The checkpoints a training stage resumes from after a kill: model, optimiser, best model
/// and masking maps per checkpoint, committed by an atomically replaced `state.json`, in
/// the store's resume directory for the stage's cache key (none: checkpoints are off).
#[derive(Debug)]
pub struct Resume {
    dir: Option<PathBuf>,
}

impl Resume {
    /// The resume directory of the running stage.
    pub fn of(ctx: &StageContext<'_>) -> Self {
        Resume { dir: ctx.resume_dir().map(Path::to_path_buf) }
    }

    fn file(&self, name: &str, epoch: usize) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{name}-e{epoch}.bpk")))
    }

    /// Whether to checkpoint after `done` of `epochs` epochs: every `every` epochs (0 acts
    /// as 1) and after the last.
    pub fn due(done: usize, every: usize, epochs: usize) -> bool {
        done.is_multiple_of(every.max(1)) || done == epochs
    }

    /// The last committed checkpoint, if any (an unreadable one is ignored with a warning:
    /// the stage starts over).
    pub fn load_state(&self) -> Option<ResumeState> {
        let p = self.dir.as_ref()?.join("state.json");
        let bytes = std::fs::read(&p).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("ignoring unreadable checkpoint state {}: {e}", p.display());
                None
            }
        }
    }

    /// Restore what a checkpoint holds: the model, the optimiser (`optim` builds it for the
    /// loaded model, then its state is loaded), the best model if recorded, and the maps in
    /// use (`maps`: the table and patch grid they index).
    pub fn restore<M: Module>(
        &self,
        st: &ResumeState,
        model: M,
        optim: impl FnOnce(&M) -> ModuleOptimizer,
        maps: Option<(&ImageTable, [usize; 2])>,
    ) -> Result<Restored<M>, StageError> {
        let epoch = st.epochs_done;
        let load = |name: &str| self.file(name, epoch).unwrap_or_default();
        let bad = |path: PathBuf, e: &dyn std::fmt::Display| StageError::Resume { path, epoch, message: e.to_string() };
        let model = model.try_load_file(load("model")).map_err(|e| bad(load("model"), &e))?;
        let optim = optim(&model).load(load("optim")).map_err(|e| bad(load("optim"), &e))?;
        let best = match st.best {
            Some(_) => Some(model.clone().try_load_file(load("best")).map_err(|e| bad(load("best"), &e))?),
            None => None,
        };
        let maps = match (&self.dir, st.has_maps, maps) {
            (Some(d), true, Some((table, grid))) => {
                Some(Arc::new(read_maps(&d.join(format!("maps-e{epoch}.parquet")), table, grid)?))
            }
            _ => None,
        };
        Ok(Restored { model, optim, best, maps })
    }

    /// Save model, optimiser, best model and maps for `epochs_done`, then (atomically) the
    /// state that points at them, then drop older files.
    pub fn save<M: Module>(
        &self,
        st: &ResumeState,
        model: &M,
        optim: &ModuleOptimizer,
        best: Option<&M>,
        maps: Option<(&Maps, &ImageTable, [usize; 2])>,
    ) -> Result<(), StageError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let e = st.epochs_done;
        let err = |p: &Path, m: String| StageError::WriteCheckpoint { path: p.to_path_buf(), message: m };
        let mp = self.file("model", e).unwrap_or_default();
        model.clone().save_file(&mp).map_err(|x| err(&mp, x.to_string()))?;
        let op = self.file("optim", e).unwrap_or_default();
        optim.save(&op).map_err(|x| err(&op, x.to_string()))?;
        if let Some(b) = best {
            let bp = self.file("best", e).unwrap_or_default();
            b.clone().save_file(&bp).map_err(|x| err(&bp, x.to_string()))?;
        }
        if let Some((m, table, grid)) = maps {
            write_maps(&dir.join(format!("maps-e{e}.parquet")), table, m, grid, serde_json::Value::Null)?;
        }
        // Durable before the state points at them (power loss, not just a kill).
        for p in [
            Some(mp.clone()),
            Some(op.clone()),
            best.map(|_| self.file("best", e).unwrap_or_default()),
            maps.map(|_| dir.join(format!("maps-e{e}.parquet"))),
        ]
        .into_iter()
        .flatten()
        {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(|x| StageError::io(&p, x))?;
        }
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(st).map_err(|x| err(&tmp, x.to_string()))?)
            .map_err(|x| StageError::io(&tmp, x))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|x| StageError::io(&tmp, x))?;
        std::fs::rename(&tmp, dir.join("state.json")).map_err(|x| StageError::io(dir, x))?;
        std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|x| StageError::io(dir, x))?;
        // Older checkpoints are no longer referenced.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let keep = name == "state.json"
                    || name.ends_with(&format!("-e{e}.bpk"))
                    || name == format!("maps-e{e}.parquet");
                if !keep {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        tracing::debug!("checkpoint after epoch {e} in {}", dir.display());
        Ok(())
    }
}
