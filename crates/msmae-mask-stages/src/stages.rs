//! The `mask/*` stages: turn attention maps into what a training stage needs to draw each
//! step's masks — a [`MaskPolicy`] (`policy.json`) and, for the attention strategies, the
//! per-image sampling weights (`weights.parquet`). Artifact kind `mask-weights`.
//!
//! | kind | input | files |
//! |---|---|---|
//! | `mask/msmae` ([`MsmaeMask`]) | `attention` (`attention-maps`) | `policy.json`, `weights.parquet`, `summary.json` (+ `masks.parquet`, `masks.png` with `export`) |
//! | `mask/attmask` ([`AttmaskMask`]) | `attention` (`attention-maps`) | same |
//! | `mask/random` ([`RandomMask`]) | none | `policy.json` only (random masking needs no weights) |
//!
//! `weights.parquet` is an attention table ([`msmae_data::attention`]) holding the input
//! maps copied through and renormalised so that each row sums to 1 (an all-zero row becomes
//! uniform); its provenance names the source artifact (stage and digest).
//!
//! `export` draws, for the first `images` rows of one split and each listed epoch, the plan
//! a training step would draw without augmentation — RNG
//! `sample_rng(seed, "mask", epoch, row_index)` with `row_index` the 0-based row of the
//! image in the attention table ([`crate::export::MASKS_RNG_KEY`]) — and writes them to
//! `masks.parquet` and `masks.png` (see [`crate::export`]). `summary.json` then also holds
//! per-plan counts and the mean weight of masked, thrown and visible patches: under
//! `mask/msmae` masked patches should carry more weight than visible ones.

use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Stage, StageContext, StageError};
use msmae_data::attention::{ATTENTION_SCHEMA_VERSION, AttentionMeta, AttentionRow, read_attention, write_attention};
use msmae_data::table::Split;

use crate::export::{FigureLine, MASKS_RNG_KEY, MASKS_SCHEMA_VERSION, MaskRecord, MasksMeta, figure, write_masks};
use msmae_mask::{MaskPolicy, counts, sample_rng};

/// Artifact kind of the `mask/*` outputs.
pub const MASK_WEIGHTS_KIND: &str = "mask-weights";
/// Artifact kind the attention slot accepts.
pub const ATTENTION_KIND: &str = "attention-maps";
/// File of the attention input (written by `attention/extract`).
pub const ATTENTION_FILE: &str = "attention.parquet";
/// Largest `export.images`.
pub const MAX_EXPORT_IMAGES: u32 = 256;
/// Most entries in `export.epochs`.
pub const MAX_EXPORT_EPOCHS: usize = 16;

fn d_msmae_mask() -> f64 {
    0.45
}
fn d_throw() -> f64 {
    0.30
}
fn d_mae_mask() -> f64 {
    0.75
}
fn d_export_split() -> Split {
    Split::Test
}
fn d_export_images() -> u32 {
    16
}
fn d_export_epochs() -> Vec<u64> {
    vec![0]
}

/// `export:` block: which plans to write for audits and figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Split whose first `images` rows (in attention-table order) are exported.
    #[serde(default = "d_export_split")]
    pub split: Split,
    /// Number of images (1 to [`MAX_EXPORT_IMAGES`]).
    #[serde(default = "d_export_images")]
    pub images: u32,
    /// Epochs whose plans are drawn (the RNG key includes the epoch).
    #[serde(default = "d_export_epochs")]
    pub epochs: Vec<u64>,
}

/// `with:` of `mask/msmae`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsmaeMaskConfig {
    /// Fraction of patches masked (reconstructed, in the loss).
    #[serde(default = "d_msmae_mask")]
    pub mask_ratio: f64,
    /// Fraction of patches thrown (neither encoded nor decoded).
    #[serde(default = "d_throw")]
    pub throw_ratio: f64,
    #[serde(default)]
    pub export: Option<ExportConfig>,
}

/// `with:` of `mask/attmask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttmaskMaskConfig {
    /// Fraction of patches masked: the highest-weight ones.
    #[serde(default = "d_mae_mask")]
    pub mask_ratio: f64,
    /// Fraction of the masked patches revealed again at random from the top 10 %.
    #[serde(default)]
    pub hints: f64,
    #[serde(default)]
    pub export: Option<ExportConfig>,
}

/// `with:` of `mask/random`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomMaskConfig {
    /// Fraction of patches masked uniformly at random.
    #[serde(default = "d_mae_mask")]
    pub mask_ratio: f64,
}

impl MsmaeMaskConfig {
    /// The policy this config writes.
    pub fn policy(&self) -> MaskPolicy {
        MaskPolicy::Msmae { mask_ratio: self.mask_ratio, throw_ratio: self.throw_ratio }
    }
}
impl AttmaskMaskConfig {
    /// The policy this config writes.
    pub fn policy(&self) -> MaskPolicy {
        MaskPolicy::Attmask { mask_ratio: self.mask_ratio, hints: self.hints }
    }
}
impl RandomMaskConfig {
    /// The policy this config writes.
    pub fn policy(&self) -> MaskPolicy {
        MaskPolicy::Random { mask_ratio: self.mask_ratio }
    }
}

/// [`MaskPolicy::check`] as a [`ConfigError`] naming the field (the first word of the
/// message when it is a field name).
fn check_policy(policy: &MaskPolicy) -> Result<(), ConfigError> {
    policy.check().map_err(|message| {
        let first = message.split_whitespace().next().unwrap_or_default();
        let path =
            if ["mask_ratio", "throw_ratio", "hints"].contains(&first) { first.to_string() } else { String::new() };
        ConfigError { path, message }
    })
}

fn check_export(export: Option<&ExportConfig>) -> Result<(), ConfigError> {
    let Some(e) = export else { return Ok(()) };
    let err = |path: &str, message: String| Err(ConfigError { path: path.into(), message });
    if !(1..=MAX_EXPORT_IMAGES).contains(&e.images) {
        return err("export.images", format!("must be between 1 and {MAX_EXPORT_IMAGES}, got {}", e.images));
    }
    if e.epochs.is_empty() || e.epochs.len() > MAX_EXPORT_EPOCHS {
        return err("export.epochs", format!("must list 1 to {MAX_EXPORT_EPOCHS} epochs, got {}", e.epochs.len()));
    }
    let mut sorted = e.epochs.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return err("export.epochs", "lists an epoch twice".into());
    }
    Ok(())
}

fn attention_slot() -> InputSlot {
    InputSlot::one(
        "attention",
        ATTENTION_KIND,
        "per-image attention maps (attention.parquet), e.g. from attention/extract",
    )
}

fn weighted_output(export: Option<&ExportConfig>) -> OutputDecl {
    let mut files = vec!["policy.json", "weights.parquet", "summary.json"];
    if export.is_some() {
        files.extend(["masks.parquet", "masks.png"]);
    }
    OutputDecl::new(MASK_WEIGHTS_KIND, &files)
        .figure("masks (visible, masked, thrown patches over the map)", "masks.png")
}

/// Each row divided by its sum (accumulated in f64); an all-zero row becomes uniform.
/// Returns the rows and how many were all zero.
pub fn normalise_rows(rows: Vec<AttentionRow>, patches: usize) -> (Vec<AttentionRow>, usize) {
    let mut zero = 0;
    let rows = rows
        .into_iter()
        .map(|mut r| {
            let sum: f64 = r.weights.iter().map(|&w| f64::from(w)).sum();
            if sum > 0.0 && sum.is_finite() {
                r.weights.iter_mut().for_each(|w| *w = (f64::from(*w) / sum) as f32);
            } else {
                zero += 1;
                r.weights = vec![1.0 / patches as f32; patches];
            }
            r
        })
        .collect();
    (rows, zero)
}

fn write_json(ctx: &StageContext<'_>, rel: &str, value: &impl Serialize) -> Result<(), StageError> {
    let p = ctx.output_path(rel)?;
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StageError::write(&p, e))?;
    std::fs::write(&p, bytes).map_err(|e| StageError::io(&p, e))
}

/// Shared body of `mask/msmae` and `mask/attmask`.
fn run_weighted(
    kind: &str,
    version: u32,
    policy: &MaskPolicy,
    export: Option<&ExportConfig>,
    config: serde_json::Value,
    ctx: &mut StageContext<'_>,
) -> Result<(), StageError> {
    let input = ctx.input("attention")?.clone();
    let src = input.path(ATTENTION_FILE);
    let (meta, rows) = read_attention(&src)?;
    if rows.is_empty() {
        return Err(StageError::data(&src, None, "the attention table has no rows: nothing to draw masks for"));
    }
    let l = meta.patches();
    let (rows, zero_rows) = normalise_rows(rows, l);
    if zero_rows > 0 {
        tracing::warn!(
            "{}: {zero_rows} of {} attention maps in {} are all zero; they sample uniformly",
            ctx.name,
            rows.len(),
            src.display()
        );
    }
    ctx.cancel.check()?;
    let source =
        serde_json::json!({ "stage": input.stage, "kind": input.kind, "digest": input.digest, "file": ATTENTION_FILE });
    let out_meta = AttentionMeta {
        schema_version: ATTENTION_SCHEMA_VERSION,
        grid: meta.grid,
        provenance: serde_json::json!({
            "stage": kind,
            "version": version,
            "config": config,
            "policy": policy,
            "source": source,
            "source_provenance": meta.provenance,
            "weights": "source maps, each row divided by its sum; all-zero rows uniform",
        }),
    };
    let wp = ctx.output_path("weights.parquet")?;
    write_attention(&wp, &out_meta, &rows)?;
    write_json(ctx, "policy.json", policy)?;

    let (masked, thrown) = match *policy {
        MaskPolicy::Msmae { mask_ratio, throw_ratio } | MaskPolicy::Highest { mask_ratio, throw_ratio } => {
            counts(l, mask_ratio, throw_ratio)
        }
        MaskPolicy::Attmask { mask_ratio, .. } | MaskPolicy::Random { mask_ratio } => counts(l, mask_ratio, 0.0),
    };
    let mut summary = serde_json::json!({
        "stage": kind,
        "policy": policy,
        "grid": meta.grid,
        "patches": l,
        "images": rows.len(),
        "all_zero_maps": zero_rows,
        "source": source,
        "per_plan": { "masked": masked, "thrown": thrown, "visible": l - masked - thrown,
                      "note": "counts of docs/method.md §3.2 (for mask/attmask before hints are revealed)" },
        "export": null,
    });
    if let Some(e) = export {
        summary["export"] = export_plans(policy, e, &meta, &rows, ctx)?;
    }
    write_json(ctx, "summary.json", &summary)
}

/// Draw, write and summarise the exported plans; returns the `export` part of `summary.json`.
fn export_plans(
    policy: &MaskPolicy,
    e: &ExportConfig,
    meta: &AttentionMeta,
    rows: &[AttentionRow],
    ctx: &mut StageContext<'_>,
) -> Result<serde_json::Value, StageError> {
    let l = meta.patches();
    let chosen: Vec<(usize, &AttentionRow)> =
        rows.iter().enumerate().filter(|(_, r)| r.split == e.split).take(e.images as usize).collect();
    if chosen.is_empty() {
        return Err(StageError::config(
            "export.split",
            format!("the attention table has no `{}` rows to export; choose another split", e.split.as_str()),
        ));
    }
    let bar = ctx.progress.bar(Some(chosen.len() as u64), "mask export");
    let mut records = Vec::with_capacity(chosen.len() * e.epochs.len());
    let mut plans = Vec::with_capacity(records.capacity());
    // Sums of the (normalised) weights and patch counts per state: visible, masked, thrown.
    let (mut wsum, mut n) = ([0f64; 3], [0u64; 3]);
    for &(row_index, r) in &chosen {
        ctx.cancel.check()?;
        for &epoch in &e.epochs {
            let mut rng = sample_rng(ctx.seed, "mask", epoch, row_index as u64);
            let plan = policy.select(Some(&r.weights), l, &mut rng);
            let states = plan.states();
            for (&s, &w) in states.iter().zip(&r.weights) {
                wsum[usize::from(s)] += f64::from(w);
                n[usize::from(s)] += 1;
            }
            plans.push(serde_json::json!({ "id": r.id, "row_index": row_index, "epoch": epoch, "masked": plan.masked.len(), "thrown": plan.thrown.len(), "visible": plan.visible.len() }));
            records.push(MaskRecord { id: r.id.clone(), row_index: row_index as u64, epoch, states });
        }
        bar.inc(1);
    }
    let masks_meta = MasksMeta {
        schema_version: MASKS_SCHEMA_VERSION,
        grid: meta.grid,
        policy: policy.clone(),
        seed: ctx.seed,
        rng_key: MASKS_RNG_KEY.into(),
        provenance: serde_json::json!({ "stage": ctx.name, "weights": "weights.parquet" }),
    };
    let mp = ctx.output_path("masks.parquet")?;
    write_masks(&mp, &masks_meta, &records)?;
    let per_image = e.epochs.len();
    let state_refs: Vec<&[u8]> = records.iter().map(|r| r.states.as_slice()).collect();
    let lines: Vec<FigureLine<'_>> = chosen
        .iter()
        .zip(state_refs.chunks(per_image))
        .map(|(&(_, r), states)| FigureLine { weights: &r.weights, states })
        .collect();
    let fp = ctx.output_path("masks.png")?;
    figure(meta.grid, &lines).save(&fp).map_err(|err| StageError::write(&fp, err))?;
    let mean = |i: usize| if n[i] > 0 { serde_json::json!(wsum[i] / n[i] as f64) } else { serde_json::Value::Null };
    let (mv, mm) = (mean(0), mean(1));
    if let (Some(v), Some(m)) = (mv.as_f64(), mm.as_f64()) {
        tracing::info!(
            "{}: mean weight of masked patches {m:.5}, of visible patches {v:.5} (uniform {:.5})",
            ctx.name,
            1.0 / l as f64
        );
    }
    Ok(serde_json::json!({
        "split": e.split,
        "epochs": e.epochs,
        "images": chosen.iter().map(|(_, r)| r.id.as_str()).collect::<Vec<_>>(),
        "rng": MASKS_RNG_KEY,
        "plans": plans,
        "mean_weight": { "masked": mm, "thrown": mean(2), "visible": mv, "uniform": 1.0 / l as f64 },
        "figure": { "file": "masks.png", "heat": "grayscale, white = the map's maximum", "visible": crate::export::VISIBLE_RGB, "masked": crate::export::MASKED_RGB, "thrown": crate::export::THROWN_RGB },
    }))
}

/// `mask/msmae`: MSMAE/AMT masking and throwing by multinomial sampling over the
/// attention maps (docs/method.md §3).
#[derive(Debug, Default, Clone, Copy)]
pub struct MsmaeMask;

impl Stage for MsmaeMask {
    type Config = MsmaeMaskConfig;
    const KIND: &'static str = "mask/msmae";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "attention maps → MSMAE mask/throw policy and per-image sampling weights";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &MsmaeMaskConfig) -> Result<(), ConfigError> {
        check_policy(&c.policy())?;
        check_export(c.export.as_ref())
    }
    fn inputs(&self, _: &MsmaeMaskConfig) -> Vec<InputSlot> {
        vec![attention_slot()]
    }
    fn output(&self, c: &MsmaeMaskConfig) -> OutputDecl {
        weighted_output(c.export.as_ref())
    }
    fn run(&self, c: &MsmaeMaskConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let config = serde_json::to_value(c).unwrap_or(serde_json::Value::Null);
        run_weighted(Self::KIND, Self::VERSION, &c.policy(), c.export.as_ref(), config, ctx)
    }
}

/// `mask/attmask`: AttMask-style deterministic top-k masking of the attention maps, with
/// optional hints.
#[derive(Debug, Default, Clone, Copy)]
pub struct AttmaskMask;

impl Stage for AttmaskMask {
    type Config = AttmaskMaskConfig;
    const KIND: &'static str = "mask/attmask";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "attention maps → AttMask top-k mask policy and per-image weights";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &AttmaskMaskConfig) -> Result<(), ConfigError> {
        check_policy(&c.policy())?;
        check_export(c.export.as_ref())
    }
    fn inputs(&self, _: &AttmaskMaskConfig) -> Vec<InputSlot> {
        vec![attention_slot()]
    }
    fn output(&self, c: &AttmaskMaskConfig) -> OutputDecl {
        weighted_output(c.export.as_ref())
    }
    fn run(&self, c: &AttmaskMaskConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let config = serde_json::to_value(c).unwrap_or(serde_json::Value::Null);
        run_weighted(Self::KIND, Self::VERSION, &c.policy(), c.export.as_ref(), config, ctx)
    }
}

/// `mask/random`: MAE's uniform random masking. Needs no attention maps and writes only
/// `policy.json`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomMask;

impl Stage for RandomMask {
    type Config = RandomMaskConfig;
    const KIND: &'static str = "mask/random";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "MAE uniform random mask policy (no weights)";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &RandomMaskConfig) -> Result<(), ConfigError> {
        check_policy(&c.policy())
    }
    fn inputs(&self, _: &RandomMaskConfig) -> Vec<InputSlot> {
        Vec::new()
    }
    fn output(&self, _: &RandomMaskConfig) -> OutputDecl {
        OutputDecl::new(MASK_WEIGHTS_KIND, &["policy.json"])
    }
    fn run(&self, c: &RandomMaskConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        write_json(ctx, "policy.json", &c.policy())
    }
}
