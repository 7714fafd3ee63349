//! The analytic FLOPs counter against PyTorch's own counter (torch.utils.flop_counter,
//! which counts 2 FLOPs per multiply-accumulate of convolutions and matrix products) on the
//! independent reference model, at a tiny config and at ViT-B/16 with the paper's 196 and
//! 49 tokens, encoder and MAE decoder.

use std::process::Command;

use msmae_vit::flops;
use msmae_vit::{MaeConfig, VitConfig};

#[test]
fn analytic_flops_equal_pytorch_flop_counter() {
    let python = std::env::var_os("MSMAE_PYTHON")
        .unwrap_or_else(|| panic!("MSMAE_PYTHON is not set: run the suite with `cargo xtask test`"));
    let tiny = MaeConfig::new(VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(3), 16, 2, 2);
    let base = MaeConfig::vit_base_patch16(3);
    let mut base_cls = base.clone();
    base_cls.encoder.num_classes = 14;
    let cases: Vec<(&str, &MaeConfig, usize, usize, f64)> = vec![
        ("encoder", &tiny, 6, 0, flops::encoder(&tiny.encoder, 6).total()),
        ("mae", &tiny, 6, 10, flops::mae(&tiny, 6, 10).total()),
        ("encoder", &base_cls, 196, 0, flops::encoder(&base_cls.encoder, 196).total()),
        ("encoder", &base_cls, 49, 0, flops::encoder(&base_cls.encoder, 49).total()),
        ("mae", &base, 49, 88, flops::mae(&base, 49, 88).total()),
    ];
    let request: Vec<serde_json::Value> = cases
        .iter()
        .map(|(k, c, v, m, _)| serde_json::json!({"kind": k, "config": c, "visible": v, "masked": m}))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/flops.py");
    let o = Command::new(python)
        .arg(script)
        .arg(serde_json::to_string(&request).expect("json"))
        .output()
        .expect("run flops.py");
    assert!(o.status.success(), "flops.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let counts: Vec<f64> = serde_json::from_slice(&o.stdout).expect("json counts");
    for ((kind, _, v, m, ours), theirs) in cases.iter().zip(counts) {
        assert_eq!(
            2.0 * ours,
            theirs,
            "{kind} with {v} visible / {m} masked: ours {} MAC ×2 vs PyTorch {theirs}",
            ours
        );
    }
}
