//! Parity with an independent PyTorch implementation (tests/python/reference.py): the same
//! weights (exported as PyTorch/timm-named safetensors) and inputs give the same position
//! table, patchify, encoder output, decoder predictions, losses (with and without
//! norm-pix), CLS logits, attention map, and gradients of one step — within 1e-4 absolute
//! at f32. Also: loading that PyTorch-named checkpoint back and exporting it again is
//! bit-exact.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::Distribution;
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, compiled_backends, seeded, select};
use msmae_vit::attention_map::cls_attention_map;
use msmae_vit::patch::{index_tensor, patchify};
use msmae_vit::{MaeConfig, MaskedAutoencoder, VitConfig};

const TOLERANCE: f64 = 1e-4;

fn python() -> PathBuf {
    match std::env::var_os("MSMAE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment (PyTorch 2.9.0)"
        ),
    }
}

fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// Export with PyTorch names: `encoder.` dropped (MAE's flat layout), Linear weights
/// transposed and LayerNorm `gamma/beta` renamed by burn's adapter.
fn export(m: &MaskedAutoencoder, path: &Path) {
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping(r"^encoder\.", "")
        .overwrite(true);
    m.save_into(&mut store).expect("export safetensors");
}

fn import(m: &mut MaskedAutoencoder, path: &Path) {
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(PyTorchToBurnAdapter)
        .with_key_remapping(r"^(patch_embed\.|cls_token|blocks\.|norm\.|head\.)", "encoder.$1");
    let r = m.load_from(&mut store).expect("import safetensors");
    assert!(r.missing.is_empty() && r.unused.is_empty() && r.errors.is_empty(), "import: {r:?}");
}

fn case(norm_pix: bool, backend: BackendRequest) {
    let dir = tempfile::tempdir().expect("tmp");
    let dev = select(backend, DeviceRequest::Cpu).expect("backend").device.autodiff();
    let cfg = MaeConfig::new(VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(3), 16, 2, 2)
        .with_norm_pix_loss(norm_pix);
    let (m, imgs) = seeded(&dev, if norm_pix { 11 } else { 7 }, || {
        (cfg.init(&dev), Tensor::<4>::random([2, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    // attention-like weights; 24 patches → 10 masked, 8 thrown, 6 visible
    let plans: Vec<_> = (0..2u64)
        .map(|i| {
            let w: Vec<f32> = (0..24).map(|k| ((k * 7 + i as usize * 3) % 11) as f32 + 0.5).collect();
            msmae_mask::msmae_select(&w, 0.45, 0.30, &mut msmae_mask::sample_rng(5, "mask", 0, i))
        })
        .collect();
    assert_eq!((plans[0].masked.len(), plans[0].thrown.len(), plans[0].visible.len()), (10, 8, 6));
    let vis_rows: Vec<Vec<usize>> = plans.iter().map(|p| p.visible.clone()).collect();
    let msk_rows: Vec<Vec<usize>> = plans.iter().map(|p| p.masked.clone()).collect();
    let (vis, msk) = (index_tensor(&vis_rows, &dev), index_tensor(&msk_rows, &dev));
    let labels = vec![2i64, 0];
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [2]), &dev);
    let cls_weight = 0.1;

    export(&m, &dir.path().join("w0.safetensors"));
    let latent = m.forward_encoder(imgs.clone(), vis.clone());
    let out =
        m.forward(imgs.clone(), vis.clone(), msk.clone(), Some((msmae_vit::ClassTargets::Classes(y), cls_weight)));
    let (_, attn) = m.encoder.forward_with_attention(imgs.clone());
    let rust = serde_json::json!({
        "pos_embed": flat(m.encoder.pos_embed.clone()),
        "patchify": flat(patchify(imgs.clone(), 4)),
        "latent": flat(latent),
        "pred": flat(out.pred.clone()),
        "logits": flat(out.logits.clone().expect("head")),
        "loss": out.loss.clone().into_scalar::<f32>(),
        "reconstruction_loss": out.reconstruction_loss.clone().into_scalar::<f32>(),
        "attention_map": flat(cls_attention_map(attn)),
    });
    let grads = GradientsParams::from_grads(out.loss.backward(), &m);
    let m1 = SgdConfig::new().init().step(1.0, m.clone(), grads);
    export(&m1, &dir.path().join("w1.safetensors"));
    let case = serde_json::json!({
        "config": cfg,
        "cls_weight": cls_weight,
        "inputs": { "imgs": flat(imgs), "imgs_shape": [2, 3, 16, 24], "visible": vis_rows, "masked": msk_rows, "labels": labels },
        "rust": rust,
    });
    std::fs::write(dir.path().join("case.json"), serde_json::to_vec(&case).expect("json")).expect("write case");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/reference.py");
    let o = Command::new(python()).arg(script).arg(dir.path()).output().expect("run the PyTorch reference");
    assert!(o.status.success(), "reference.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).expect("report")).expect("report json");
    for q in [
        "pos_embed",
        "patchify",
        "latent",
        "pred",
        "logits",
        "loss",
        "reconstruction_loss",
        "attention_map",
        "gradients",
    ] {
        let d = report[q].as_f64().unwrap_or_else(|| panic!("report lacks {q}: {report}"));
        assert!(
            d <= TOLERANCE,
            "{backend:?}, norm_pix={norm_pix}: {q} differs from PyTorch by {d:e} (> {TOLERANCE:e}); report: {report}"
        );
    }
    eprintln!("{backend:?}, norm_pix={norm_pix}: max abs differences vs PyTorch: {report}");
    assert!(report["grad_scale"].as_f64().unwrap_or(0.0) > 1e-3, "gradients are not trivially zero: {report}");

    // Weight interop: PyTorch-named checkpoint → fresh model → export: bit-exact.
    let mut fresh = seeded(&dev, 999, || cfg.init(&dev));
    import(&mut fresh, &dir.path().join("w0.safetensors"));
    export(&fresh, &dir.path().join("w0_roundtrip.safetensors"));
    let o = Command::new(python())
        .args(["-c", "import sys; from safetensors.torch import load_file as l; a=l(sys.argv[1]); b=l(sys.argv[2]); assert a.keys()==b.keys(), (a.keys()^b.keys()); bad=[k for k in a if not (a[k]==b[k]).all()]; assert not bad, bad; print(len(a))"])
        .arg(dir.path().join("w0.safetensors"))
        .arg(dir.path().join("w0_roundtrip.safetensors"))
        .output()
        .expect("compare checkpoints");
    assert!(o.status.success(), "round trip not bit-exact: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn mae_matches_pytorch_without_norm_pix() {
    case(false, BackendRequest::Flex);
}

#[test]
fn mae_matches_pytorch_with_norm_pix() {
    case(true, BackendRequest::Flex);
}

/// The same checks on libtorch, whose fused LayerNorm, flash attention and linear ops
/// take other code paths than flex's composed ones.
#[test]
#[cfg_attr(not(feature = "tch"), ignore = "built without libtorch (burn-flex only): `cargo xtask test` builds it in")]
fn mae_matches_pytorch_on_libtorch() {
    assert!(
        compiled_backends().contains(&BackendKind::Tch),
        "the `tch` feature is on, so libtorch must be compiled in"
    );
    case(false, BackendRequest::Tch);
    case(true, BackendRequest::Tch);
}
