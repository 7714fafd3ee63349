//! Support for the end-to-end tests in `tests/tests/`: the test-only stage plugins of the
//! runner tests ([`fixture`]) and the `msmae` binary the pipeline tests run.

pub mod fixture;

use std::path::{Path, PathBuf};

/// The `msmae` binary of this build: beside the test executable's `deps/` folder in the
/// shared target dir (built by `cargo xtask test`, which builds the whole workspace).
///
/// # Panics
/// When the binary is missing, with the command that builds it.
pub fn msmae_bin() -> PathBuf {
    built("msmae")
}

/// An example program of this build (`examples/NAME` in the same profile folder; `cargo
/// test` builds every example of the workspace).
///
/// # Panics
/// As [`msmae_bin`].
pub fn example_bin(name: &str) -> PathBuf {
    built(&format!("examples/{name}"))
}

/// `stage → artifact digest` of a lock file, in its order (read by the runner's own reader).
///
/// # Panics
/// When the lock file is missing or unreadable.
pub fn lock_digests(lock: &Path) -> Vec<(String, String)> {
    assert!(lock.is_file(), "{} does not exist", lock.display());
    let l = msmae_pipeline::LockFile::read(lock, "").unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
    l.stages.iter().map(|s| (s.name.clone(), s.output.digest.clone())).collect()
}

/// The committed directory of `stage`'s artifact in `store`, as `lock` records it.
///
/// # Panics
/// As [`lock_digests`], and when the lock file does not record `stage`.
pub fn artifact_dir(store: &Path, lock: &Path, stage: &str) -> PathBuf {
    let d = lock_digests(lock)
        .into_iter()
        .find(|(s, _)| s == stage)
        .map(|(_, d)| d)
        .unwrap_or_else(|| panic!("`{stage}` in {}", lock.display()));
    store.join("objects").join(&d[..2]).join(&d).join("data")
}

fn built(rel: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("locating the test executable: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("{} has no target profile folder above it", exe.display()));
    let bin = profile_dir.join(format!("{rel}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: run the suite with `cargo xtask test` (it builds the msmae binary and the examples with the tests)",
        bin.display()
    );
    bin
}

/// The model of the tiny study: two blocks of width 32 on 8-pixel patches of 32×32 images.
pub const TINY_MODEL: &str =
    "{ patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2 }";

/// A tiny MSMAE study that exercises every stage kind of the method's DAG (ingest, the
/// supervised attention model, maps, masks, MSMAE and MAE pre-training, both fine-tunings,
/// evaluation, comparison, segmentation, a `repeat:` group of map refreshes) in seconds.
pub fn tiny_study() -> String {
    format!(
        r#"name: tinystudy
seed: 3
stages:
  data: {{ uses: ingest/synthetic, with: {{ images: 160, size: 32, modality: xray, previews: 2, contrast: 0.6, lesion_radius: [0.1, 0.15] }} }}
  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {TINY_MODEL}, epochs: 2, batch_size: 16, warmup_epochs: 1 }} }}
  attn: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 3 }} }}
  masks: {{ uses: mask/msmae, needs: [attn] }}
  pretrain: {{ uses: mae/pretrain, needs: [data, masks], with: {{ model: {TINY_MODEL}, epochs: 3, batch_size: 16, warmup_epochs: 1, warmup_mask_epochs: 1, refresh_every: 1, figure_images: 3 }} }}
  mae: {{ uses: mae/pretrain, needs: [data], with: {{ model: {TINY_MODEL}, epochs: 2, batch_size: 16, warmup_epochs: 1, cls_weight: 0.0, norm_pix_loss: true }} }}
  ft-msmae: {{ uses: finetune/msmae, needs: [pretrain, data], with: {{ epochs: 2, batch_size: 16, warmup_epochs: 1, refresh_every: 1 }} }}
  ft-mae: {{ uses: finetune/full, needs: [mae, data], with: {{ epochs: 2, batch_size: 16, warmup_epochs: 1, patience: 1 }} }}
  eval-msmae: {{ uses: eval/classify, needs: [ft-msmae] }}
  eval-mae: {{ uses: eval/classify, needs: [ft-mae] }}
  report: {{ uses: eval/compare, needs: [eval-msmae, eval-mae] }}
  seg: {{ uses: segment/setr-pup, needs: [pretrain, data], with: {{ epochs: 1, batch_size: 16, head_channels: 8, figure_images: 2 }} }}
  rounds:
    repeat: 2
    init: {{ pretrain: pretrain }}
    stages:
      attn: {{ uses: attention/extract, needs: ["${{prev.pretrain}}", data], with: {{ overlays: 1 }} }}
      masks: {{ uses: mask/msmae, needs: [attn] }}
      pretrain: {{ uses: mae/pretrain, needs: {{ data: data, masks: masks, init: "${{prev.pretrain}}" }}, with: {{ epochs: 1, batch_size: 16, warmup_epochs: 0, warmup_mask_epochs: 0, figure_images: 1 }} }}
"#
    )
}
