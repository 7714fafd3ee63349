//! `export/pytorch` and `import/pytorch` checked by the real timm (PyPI, in the test venv).
//!
//! A fine-tuned ViT (global pool + fc_norm), a CLS-token ViT and an MSMAE pre-trained MAE
//! with its CLS head, each with every parameter perturbed away from its initial value, are
//! exported by the stage; timm's `VisionTransformer` built from `config.json` loads the
//! weights (strictly for a ViT; for an MAE only the decoder is left over) and gives msmae's
//! outputs on the same images within 1e-4. Importing each export gives the model back. A
//! classifier made by timm itself imports and gives timm's logits; with timm's learned
//! position table, or against a wrong architecture, the import is refused with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use msmae_backend::{BackendRequest, DeviceRequest, seeded, select};
use msmae_core::{ExecEnv, InputArtifact, NoProgress, Stage, StageContext};
use msmae_interop::{
    CONFIG_FILE, ExportConfig, ExportPytorch, ImageSize, ImportConfig, ImportPytorch, WEIGHTS_FILE, import,
};
use msmae_train::data::Normalizer;
use msmae_train::model::{self, CheckpointKind, CheckpointMeta, Loaded, ModelSpec};
use msmae_vit::{MaeConfig, VitConfig};

const TOLERANCE: f64 = 1e-4;

fn python() -> PathBuf {
    match std::env::var_os("MSMAE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment (PyTorch, timm)"
        ),
    }
}

/// Every parameter moved by N(0, 0.2): LayerNorm scales away from 1, biases from 0, so a
/// misplaced or untransposed tensor cannot hide behind its initial value.
struct Perturb;
impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.2), &t.device());
            t + noise
        })
    }
}

fn meta(kind: CheckpointKind, vit: &VitConfig, mae: Option<MaeConfig>) -> CheckpointMeta {
    CheckpointMeta {
        format: 1,
        kind,
        vit: vit.clone(),
        mae,
        normalizer: Normalizer { mean: vec![0.4, 0.5, 0.6], std: vec![0.2, 0.25, 0.3] },
        label_names: (0..vit.num_classes).map(|i| format!("class{i}")).collect(),
        multi_label: false,
        trained_by: "test".into(),
    }
}

/// Run the stage on the checkpoint in `ckpt`; returns the export directory.
fn export(ckpt: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).expect("mkdir");
    let input = InputArtifact {
        stage: "model".into(),
        kind: msmae_core::ArtifactKind::new("vit-checkpoint"),
        dir: ckpt.to_path_buf(),
        digest: "0".repeat(64),
    };
    let mut ctx = StageContext::new(
        "export".into(),
        0,
        ExecEnv::cpu_flex(),
        2,
        Default::default(),
        &NoProgress,
        out.to_path_buf(),
        out.to_path_buf(),
        ExportPytorch.output(&ExportConfig {}),
        BTreeMap::from([("model".to_string(), vec![input])]),
    );
    ExportPytorch.run(&ExportConfig {}, &mut ctx).expect("export");
    out.to_path_buf()
}

/// Write `x` and msmae's output `name`, run the timm script, return its report.
fn timm_report<const D: usize>(
    dir: &Path,
    export_dir: &Path,
    x: &Tensor<4>,
    name: &str,
    out: Tensor<D>,
) -> serde_json::Value {
    let bytes = |t: Vec<f32>| t.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let xs = x.dims().to_vec();
    let os = out.dims().to_vec();
    let xb = bytes(x.to_data().try_into_vec::<f32>().expect("f32"));
    let ob = bytes(out.into_data().try_into_vec::<f32>().expect("f32"));
    let views = vec![
        ("x".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, xs, &xb).expect("view")),
        (name.to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, os, &ob).expect("view")),
    ];
    let io = dir.join(format!("{name}-io.safetensors"));
    std::fs::write(&io, safetensors::serialize(views, None).expect("serialize")).expect("write io");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/timm_export.py");
    let o = Command::new(python()).arg(script).arg(export_dir).arg(&io).output().expect("run python");
    assert!(o.status.success(), "timm could not use the export: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn vit_exports_load_strictly_into_timm_and_give_the_same_logits() {
    let dev = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device;
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, global_pool) in [("finetuned", true), ("cls-token", false)] {
        let cfg = VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(3).with_global_pool(global_pool);
        let (vit, x) = seeded(&dev, 17, || {
            (
                cfg.init(&dev).map(&mut Perturb),
                Tensor::<4>::random([2, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev),
            )
        });
        let ckpt = tmp.path().join(name);
        std::fs::create_dir_all(&ckpt).expect("mkdir");
        model::save(&ckpt, &vit, &meta(CheckpointKind::Vit, &cfg, None)).expect("save");
        let out = export(&ckpt, &tmp.path().join(format!("{name}-export")));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(CONFIG_FILE)).expect("config")).expect("json");
        assert_eq!(config["model_args"]["global_pool"], if global_pool { "avg" } else { "token" });
        assert_eq!(config["input"]["mean"], serde_json::json!([0.4f32, 0.5f32, 0.6f32]));
        assert_eq!(config["label_names"], serde_json::json!(["class0", "class1", "class2"]));
        let logits = vit.forward(x.clone());
        let r = timm_report(tmp.path(), &out, &x, "logits", logits);
        let d = r["logits"].as_f64().expect("logits diff");
        assert!(d <= TOLERANCE, "{name}: timm's logits differ by {d:e}: {r}");
        // `norm` + `fc_norm` would both be there if the Identity norm were not dropped.
        let want = 2 + 1 + 1 + 2 * 12 + 2 + 2; // patch embed, cls, pos, blocks, (fc_)norm, head
        assert_eq!(r["tensors"], want, "{name}: {r}");
        // Back in: the same model (a global-pool classifier's unused `norm` aside, which
        // timm does not have).
        let c = import_cfg(CheckpointKind::Vit);
        let (back, m) =
            import(std::fs::read(out.join(WEIGHTS_FILE)).expect("read"), &c, None).expect("import the export");
        assert_eq!((m.vit.global_pool, m.vit.num_classes), (global_pool, 3));
        let Loaded::Vit(back) = back else { panic!("a ViT") };
        back.forward(x.clone()).into_data().assert_eq(&vit.forward(x.clone()).into_data(), true);
        if !global_pool {
            assert_eq!(weights_of(&back), weights_of(&vit), "{name}: the round trip is bit-exact");
        }
    }
}

#[test]
fn mae_exports_give_timm_the_encoder_and_keep_the_decoder() {
    let dev = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device;
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = MaeConfig::new(VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(3), 16, 1, 2);
    let (mae, x) = seeded(&dev, 23, || {
        (cfg.init(&dev).map(&mut Perturb), Tensor::<4>::random([2, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    let ckpt = tmp.path().join("mae");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    model::save(&ckpt, &mae, &meta(CheckpointKind::Mae, &cfg.encoder, Some(cfg.clone()))).expect("save");
    let out = export(&ckpt, &tmp.path().join("mae-export"));
    let (tokens, _) = mae.encoder.forward_with_attention(x.clone());
    let r = timm_report(tmp.path(), &out, &x, "tokens", tokens);
    let d = r["tokens"].as_f64().expect("tokens diff");
    assert!(d <= TOLERANCE, "timm's encoder features differ by {d:e}: {r}");
    assert_eq!(r["missing"], serde_json::json!([]), "{r}");
    let unexpected: Vec<&str> = r["unexpected"].as_array().expect("list").iter().filter_map(|v| v.as_str()).collect();
    assert!(
        unexpected.iter().all(|k| k.starts_with("decoder_") || *k == "mask_token")
            && unexpected.contains(&"decoder_pos_embed")
            && unexpected.contains(&"mask_token"),
        "{r}"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(CONFIG_FILE)).expect("config")).expect("json");
    assert_eq!(
        (config["model_args"]["decoder_embed_dim"].as_u64(), config["model_args"]["decoder_depth"].as_u64()),
        (Some(16), Some(1))
    );
    // Back in, bit-exact (the CLS head included).
    let c = ImportConfig { norm_pix_loss: false, ..import_cfg(CheckpointKind::Mae) };
    let (back, m) = import(std::fs::read(out.join(WEIGHTS_FILE)).expect("read"), &c, None).expect("import the export");
    assert_eq!((m.mae.as_ref().map(|m| m.decoder_embed_dim), m.vit.num_classes), (Some(16), 3));
    let Loaded::Mae(back) = back else { panic!("an MAE") };
    assert_eq!(weights_of(&back), weights_of(&mae), "the round trip is bit-exact");
    // The wrong kind is named.
    let e = import(std::fs::read(out.join(WEIGHTS_FILE)).expect("read"), &import_cfg(CheckpointKind::Vit), None)
        .expect_err("refused");
    assert!(e.contains("import it with `checkpoint: mae`"), "{e}");
}

/// The small architecture of these tests as an import config.
fn import_cfg(kind: CheckpointKind) -> ImportConfig {
    serde_json::from_value(serde_json::json!({
        "weights": "w.safetensors", "checkpoint": kind, "image_size": [16, 24],
        "model": { "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2 },
    }))
    .expect("config")
}

/// Every parameter of a module, burn-named, as safetensors bytes (for exact comparison).
fn weights_of<M: Module>(m: &M) -> Vec<u8> {
    use burn::store::{ModuleSnapshot, SafetensorsStore};
    let mut store = SafetensorsStore::from_bytes(None).clear_metadata();
    m.save_into(&mut store).expect("collect");
    store.get_bytes().expect("bytes")
}

#[test]
fn a_timm_classifier_imports_with_its_logits_and_learned_positions_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/timm_make.py");
    let o = Command::new(python()).arg(script).arg(tmp.path()).output().expect("run python");
    assert!(o.status.success(), "timm_make.py: {}", String::from_utf8_lossy(&o.stderr));
    let read = |n: &str| std::fs::read(tmp.path().join(n)).expect("read");
    let c = ImportConfig {
        label_names: Some(["a", "b", "c", "d", "e"].map(String::from).to_vec()),
        ..import_cfg(CheckpointKind::Vit)
    };
    let (loaded, meta) = import(read("sincos.safetensors"), &c, None).expect("import timm's classifier");
    assert_eq!((meta.vit.global_pool, meta.vit.num_classes, meta.label_names[4].as_str()), (true, 5, "e"));
    assert_eq!(meta.normalizer.mean, [0.485, 0.456, 0.406], "ImageNet's by default");
    let io = read("io.safetensors");
    let io = safetensors::SafeTensors::deserialize(&io).expect("io");
    let get = |n: &str| -> (Vec<usize>, Vec<f32>) {
        let t = io.tensor(n).expect("tensor");
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let dev = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device;
    let (xs, xv) = get("x");
    let x = Tensor::<4>::from_data(TensorData::new(xv, xs), &dev);
    let (_, want) = get("logits");
    let Loaded::Vit(vit) = loaded else { panic!("a ViT") };
    let got = vit.forward(x).into_data().try_into_vec::<f32>().expect("f32");
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(f64::from(d) <= TOLERANCE && got.len() == want.len(), "timm's logits differ by {d:e}");

    let e = import(read("learned.safetensors"), &c, None).expect_err("refused");
    assert!(
        e.contains("`pos_embed` is not the fixed 2-D sin-cos table")
            && e.contains("learned position embeddings are not supported"),
        "{e}"
    );
    // A wrong architecture is named, with the tensors that do not fit.
    let deeper = ImportConfig { model: ModelSpec { depth: Some(3), ..c.model.clone() }, ..c.clone() };
    let e = import(read("sincos.safetensors"), &deeper, None).expect_err("refused");
    assert!(e.contains("tensors missing for the declared architecture") && e.contains("blocks.2."), "{e}");
    let wider = ImportConfig { model: ModelSpec { embed_dim: Some(64), ..c.model.clone() }, ..c.clone() };
    let e = import(read("sincos.safetensors"), &wider, None).expect_err("refused");
    assert!(e.contains("`pos_embed` is F32 [1, 25, 32]; the model needs f32 [1, 25, 64]"), "{e}");
    let e =
        import(read("sincos.safetensors"), &ImportConfig { label_names: Some(vec!["x".into()]), ..c.clone() }, None)
            .expect_err("refused");
    assert!(e.contains("label_names lists 1 names, the head has 5 outputs"), "{e}");
    let e = import(b"not safetensors".to_vec(), &c, None).expect_err("refused");
    assert!(e.contains("not a safetensors file"), "{e}");
    // Tensors the architecture has no place for, and shapes burn's loader refuses.
    let shallower = ImportConfig { model: ModelSpec { depth: Some(1), ..c.model.clone() }, ..c.clone() };
    let e = import(read("sincos.safetensors"), &shallower, None).expect_err("refused");
    assert!(e.contains("tensors the declared architecture has no place for") && e.contains("blocks.1."), "{e}");
    let narrow_mlp = ImportConfig { model: ModelSpec { mlp_ratio: Some(2.0), ..c.model.clone() }, ..c.clone() };
    let e = import(read("sincos.safetensors"), &narrow_mlp, None).expect_err("refused");
    assert!(e.contains("tensors do not fit the declared architecture") && e.contains("fc1"), "{e}");
    // A half-precision tensor, and a state dict without its position table.
    let sincos = read("sincos.safetensors");
    let st = safetensors::SafeTensors::deserialize(&sincos).expect("parse");
    // Keep, change (dtype, bytes) or drop (`None`) each tensor.
    type Edit<'a> = dyn Fn(&str, safetensors::tensor::TensorView<'_>) -> Option<(safetensors::Dtype, Vec<u8>)> + 'a;
    let rebuilt = |edit: &Edit<'_>| -> Vec<u8> {
        let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter_map(|(n, t)| {
                let shape = t.shape().to_vec();
                edit(&n, t).map(|(d, b)| (n, d, shape, b))
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = kept
            .iter()
            .map(|(n, d, sh, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, sh.clone(), b).expect("view")))
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    };
    let half = rebuilt(&|n, t| {
        Some(if n == "blocks.0.mlp.fc1.weight" {
            (safetensors::Dtype::F16, t.data()[..t.data().len() / 2].to_vec())
        } else {
            (t.dtype(), t.data().to_vec())
        })
    });
    let e = import(half, &c, None).expect_err("refused");
    assert!(e.contains("tensor `blocks.0.mlp.fc1.weight` is F16") && e.contains("v.float()"), "{e}");
    let no_pos = rebuilt(&|n, t| (n != "pos_embed").then(|| (t.dtype(), t.data().to_vec())));
    let e = import(no_pos, &c, None).expect_err("refused");
    assert!(e.contains("no `pos_embed`"), "{e}");
    // An export's config.json supplies the defaults the config leaves out.
    let exported = serde_json::json!({ "label_names": ["p", "q", "r", "s", "t"], "multi_label": true, "input": { "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6] } });
    let (_, m) = import(sincos.clone(), &import_cfg(CheckpointKind::Vit), Some(&exported)).expect("import");
    assert_eq!(
        (m.label_names[0].as_str(), m.multi_label, m.normalizer.mean.clone(), m.normalizer.std[2]),
        ("p", true, vec![0.1, 0.2, 0.3], 0.6)
    );
    let (_, m) = import(sincos.clone(), &c, Some(&exported)).expect("import");
    assert_eq!(m.label_names[0], "a", "the config wins over the file");
    let two_means = serde_json::json!({ "input": { "mean": [0.1, 0.2], "std": [0.4, 0.5] } });
    let e = import(sincos.clone(), &import_cfg(CheckpointKind::Vit), Some(&two_means)).expect_err("refused");
    assert!(e.contains("normalisation for 3 channels with positive std expected, found mean [0.1, 0.2]"), "{e}");
}

#[test]
fn import_configs_are_checked_before_anything_runs() {
    let bad = |v: serde_json::Value| -> String {
        let mut c = serde_json::json!({ "weights": "w.safetensors", "checkpoint": "vit", "image_size": 32, "model": { "preset": "tiny" } });
        c.as_object_mut().expect("obj").extend(v.as_object().expect("obj").clone());
        let c: ImportConfig = serde_json::from_value(c).expect("parses");
        ImportPytorch.validate(&c).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert_eq!(bad(serde_json::json!({})), "");
    assert_eq!(
        bad(serde_json::json!({ "weights": "mae_pretrain_vit_base.pth" })),
        "",
        "a torch.save file is read directly"
    );
    assert!(
        bad(serde_json::json!({ "weights": "weights.bin" }))
            .contains("must be a .safetensors file or a torch.save checkpoint")
    );
    assert!(
        bad(serde_json::json!({ "channels": 1, "mean": [0.5, 0.5] }))
            .contains("needs one value per channel (1), found 2")
    );
    assert!(bad(serde_json::json!({ "channels": 1, "mean": [0.5], "std": [0.0] })).contains("must be positive"));
    assert!(bad(serde_json::json!({ "image_size": 30 })).contains("multiple of the patch size"));
    let c: ImportConfig = serde_json::from_value(
        serde_json::json!({ "weights": "w.safetensors", "checkpoint": "mae", "image_size": [32, 48] }),
    )
    .expect("parses");
    assert_eq!((c.image_size.hw(), ImportPytorch.output(&c).kind.as_str()), ([32, 48], "mae-checkpoint"));
    assert!(matches!(c.image_size, ImageSize::Rect(_)));
}

/// `torch.save` files read directly: MAE's checkpoint layout (`model`, `optimizer`, `epoch`,
/// `args`), a bare state dict, f16 and bf16 tensors import to exactly the model their
/// safetensors conversion (by PyTorch) gives; a pickle that would call `os.system` is
/// refused naming the global, and nothing runs; legacy and truncated files are clear errors.
#[test]
fn torch_save_checkpoints_import_bit_for_bit_and_hostile_pickles_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    for script in ["timm_make.py", "torch_save.py"] {
        let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
        let o = Command::new(python()).arg(path).arg(tmp.path()).output().expect("run python");
        assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let c = import_cfg(CheckpointKind::Vit);
    let model_of = |bytes: Vec<u8>| -> Vec<u8> {
        match import(bytes, &c, None).expect("import") {
            (Loaded::Vit(m), _) => weights_of(&m),
            _ => panic!("a ViT"),
        }
    };
    let read = |n: &str| std::fs::read(tmp.path().join(n)).expect("read");
    let pth = |n: &str| msmae_interop::pth::to_safetensors(&tmp.path().join(n));
    for (file, reference) in [
        ("release.pth", "sincos.safetensors"),
        ("bare.pth", "sincos.safetensors"),
        ("half.pth", "half.safetensors"),
        ("bf16.pth", "bf16.safetensors"),
    ] {
        let got = model_of(pth(file).unwrap_or_else(|e| panic!("{file}: {e}")));
        assert!(got == model_of(read(reference)), "{file} imports to other tensors than {reference}");
    }
    let e = pth("evil.pth").expect_err("refused");
    assert!(
        e.contains("refused") && e.contains("system") && (e.contains("`posix.system`") || e.contains("`os.system`")),
        "{e}"
    );
    assert!(!tmp.path().join("pwned").exists(), "nothing in the file ran");
    let e = pth("legacy.pth").expect_err("refused");
    assert!(e.contains("not a zip-format torch.save file") && e.contains("re-save"), "{e}");
    let e = pth("truncated.pth").expect_err("refused");
    assert!(e.contains("damaged or truncated") || e.contains("truncated"), "{e}");
}
