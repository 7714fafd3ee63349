//! Attention maps inside training: CLS-attention maps (docs/method.md §2) of a whole split from
//! the model being trained (MSMAE's map refresh), and maps as Parquet attention tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;

use msmae_core::{StageContext, StageError};
use msmae_data::attention::{ATTENTION_SCHEMA_VERSION, AttentionMeta, AttentionRow, read_attention, write_attention};
use msmae_vit::VisionTransformer;
use msmae_vit::attention_map::{MapMethod, MapReading, patch_maps};

use crate::data::{self, Batch, ImageTable, LoaderSpec, Normalizer};
use crate::runtime::{Runtime, to_vec};

/// Weight maps (grid row-major) by table row.
pub type Maps = HashMap<usize, Vec<f32>>;

/// The maps a training step masks with, and what they index: checkpointed with the model
/// so that a resumed run masks exactly as the uninterrupted one did.
#[derive(Debug, Clone)]
pub struct MapState {
    pub table: Arc<ImageTable>,
    pub grid: [usize; 2],
    /// The maps in use (`None` before the first extraction).
    pub current: Option<Arc<Maps>>,
}

/// Patch-weight maps of `rows` read as `reading` says (the paper's: [`MapMethod::Cls`], the
/// CLS-attention map of docs/method.md §2, unsmoothed), by row: the model in eval mode, the
/// stored image without augmentation, the smoothing (if any) applied last. In a
/// data-parallel stage of a multi-process run (`ctx.group()`), each rank computes its share
/// of the rows and the raw maps are gathered on every rank (an all-reduce of zero-padded
/// maps, exact since x + 0 = x).
#[allow(clippy::too_many_arguments)]
pub fn attention_maps(
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    batch_size: usize,
    reading: MapReading,
    rt: &Runtime,
    ctx: &StageContext<'_>,
) -> Result<Maps, StageError> {
    let raw = raw_maps(vit, table, rows, norm, batch_size, reading.method, rt, ctx)?;
    if reading.smooth.is_none() {
        return Ok(raw);
    }
    let stride = vit.patch_embed.proj.stride;
    let grid = [table.height() / stride[0], table.width() / stride[1]];
    Ok(raw.into_iter().map(|(r, m)| (r, reading.finish(m, grid))).collect())
}

#[allow(clippy::too_many_arguments)]
fn raw_maps(
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    batch_size: usize,
    method: MapMethod,
    rt: &Runtime,
    ctx: &StageContext<'_>,
) -> Result<Maps, StageError> {
    let g = ctx.group();
    if g.is_solo() {
        return attention_pass(vit, table, rows, norm, LoaderSpec::eval(batch_size), method, rt, ctx, |_, _, _| Ok(()));
    }
    let mine = msmae_dist::share(rows.len(), g.size(), g.rank());
    let local = attention_pass(
        vit,
        table,
        &rows[mine.clone()],
        norm,
        LoaderSpec::eval(batch_size),
        method,
        rt,
        ctx,
        |_, _, _| Ok(()),
    )?;
    let l = vit.pos_embed.dims()[1] - 1; // patches (the position table also holds the CLS slot)
    let mut flat = vec![0f32; rows.len() * l];
    for (k, r) in rows.iter().enumerate().skip(mine.start).take(mine.len()) {
        let m = local.get(r).ok_or_else(|| StageError::other(format!("no attention map for table row {r}")))?;
        if m.len() != l {
            return Err(StageError::other(format!("an attention map of {} patches where the grid has {l}", m.len())));
        }
        flat[k * l..(k + 1) * l].copy_from_slice(m);
    }
    crate::dist::all_reduce(g, &mut flat);
    Ok(rows.iter().enumerate().map(|(k, r)| (*r, flat[k * l..(k + 1) * l].to_vec())).collect())
}

/// Patch-weight maps of `rows` by `method` (the MSMAE loops use [`MapMethod::Cls`], the
/// paper's), with a look at every image as its map is computed: `visit(batch, index in
/// batch, map)` sees the batch's pixels (and lesion masks if `spec` asks for them), so
/// callers that need both read the table once.
#[allow(clippy::too_many_arguments)]
pub fn attention_pass(
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    spec: LoaderSpec,
    method: MapMethod,
    rt: &Runtime,
    ctx: &StageContext<'_>,
    mut visit: impl FnMut(&Batch, usize, &[f32]) -> Result<(), StageError>,
) -> Result<Maps, StageError> {
    // Split across the data-parallel devices: consecutive batches go to the replicas in
    // turn, and a round is read back only after every replica has its batch queued, so
    // asynchronous devices (CUDA) compute their batches at the same time. Gradient maps
    // need a backward: the replicas are then on the autodiff devices, stochastic depth off.
    let replicas: Vec<(Device, VisionTransformer)> = if method == MapMethod::Gradient {
        let mut model = vit.clone();
        for b in &mut model.blocks {
            b.drop_path = 0.0;
        }
        let devices = if rt.replicas.is_empty() { vec![rt.train.clone()] } else { rt.replicas.clone() };
        devices.into_iter().map(|d| (d.clone(), model.clone().fork(&d))).collect()
    } else {
        let model = vit.valid();
        let r: Vec<(Device, VisionTransformer)> = rt
            .inference
            .iter()
            .map(|d| (d.clone(), if d == &rt.device { model.clone() } else { model.clone().fork(d) }))
            .collect();
        if r.is_empty() { vec![(rt.device.clone(), model)] } else { r }
    };
    let bar = ctx.progress.bar(Some(rows.len() as u64), &format!("{}: attention maps", ctx.name));
    let mut out = HashMap::with_capacity(rows.len());
    let mut round: Vec<(Batch, Tensor<2>)> = Vec::with_capacity(replicas.len());
    let mut read_back = |round: &mut Vec<(Batch, Tensor<2>)>| -> Result<(), StageError> {
        for (batch, maps) in round.drain(..) {
            let [_, l] = maps.dims();
            let flat = to_vec(maps)?;
            for (i, r) in batch.rows.iter().enumerate() {
                let map = &flat[i * l..(i + 1) * l];
                visit(&batch, i, map)?;
                out.insert(*r, map.to_vec());
            }
            bar.inc(batch.rows.len() as u64);
        }
        Ok(())
    };
    for (k, batch) in data::stream(table.clone(), rows, spec, norm.clone(), ctx.seed, 0).enumerate() {
        ctx.cancel.check()?;
        let batch = batch?;
        let n = batch.len();
        let (device, replica) = &replicas[k % replicas.len()];
        let x = Tensor::from_data(
            TensorData::new(batch.images.clone(), [n, table.channels(), table.height(), table.width()]),
            device,
        );
        let maps =
            patch_maps(replica, x, method).map_err(|e| StageError::other(format!("{} maps: {e}", method.as_str())))?;
        round.push((batch, maps));
        if round.len() == replicas.len() {
            read_back(&mut round)?;
        }
    }
    read_back(&mut round)?;
    Ok(out)
}

/// Write maps as an attention table (rows in table order).
pub fn write_maps(
    path: &Path,
    table: &ImageTable,
    maps: &Maps,
    grid: [usize; 2],
    provenance: serde_json::Value,
) -> Result<u64, StageError> {
    let mut keys: Vec<usize> = maps.keys().copied().collect();
    keys.sort_unstable();
    let rows: Vec<AttentionRow> = keys
        .iter()
        .map(|r| AttentionRow { id: table.rows[*r].id.clone(), split: table.rows[*r].split, weights: maps[r].clone() })
        .collect();
    let meta =
        AttentionMeta { schema_version: ATTENTION_SCHEMA_VERSION, grid: [grid[0] as u32, grid[1] as u32], provenance };
    write_attention(path, &meta, &rows).map_err(StageError::from)
}

/// Read an attention table and key it by the rows of `table` (matched by image id).
pub fn read_maps(path: &Path, table: &ImageTable, grid: [usize; 2]) -> Result<Maps, StageError> {
    let (meta, rows) = read_attention(path).map_err(StageError::from)?;
    if [meta.grid[0] as usize, meta.grid[1] as usize] != grid {
        return Err(StageError::data(
            path,
            None,
            format!(
                "attention maps on a {:?} grid, but the model's patch grid is {grid:?} (same image size and patch size needed)",
                meta.grid
            ),
        ));
    }
    let by_id: HashMap<&str, usize> = table.rows.iter().enumerate().map(|(i, r)| (r.id.as_str(), i)).collect();
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        match by_id.get(r.id.as_str()) {
            Some(&i) => {
                out.insert(i, r.weights);
            }
            None => {
                return Err(StageError::data(
                    path,
                    Some(format!("row `{}`", r.id)),
                    format!("image not in the image table {}", table.path.display()),
                ));
            }
        }
    }
    Ok(out)
}
