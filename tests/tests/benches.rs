//! The benchmark programs work (how fast is for the benchmarks themselves to say):
//! `bench_model --parity` on the CPU in both precisions, and `bench_loader` on a tiny table
//! with both loaders, msmae's and torchvision's.

use std::process::Command;

use msmae_tests::example_bin;

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn bench_model_parity_passes_on_the_cpu_in_f32_and_bf16() {
    for precision in ["f32", "bf16"] {
        let out = run(Command::new(example_bin("bench_model")).args([
            "--parity",
            "--device",
            "cpu",
            "--precision",
            precision,
        ]));
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("parity {precision} "))).collect();
        assert_eq!(lines.len(), 5, "forward, map, loss and two gradients:\n{out}");
        assert!(lines.iter().all(|l| l.ends_with(": ok")), "{out}");
        assert!(out.contains("gradient of block 1 qkv weight"), "{out}");
    }
}

#[test]
fn bench_loader_measures_msmae_and_torchvision_on_the_same_table() {
    let mut cmd = Command::new(example_bin("bench_loader"));
    cmd.args(["--images", "80", "--size", "32", "--channels", "1", "--batch", "16", "--threads", "1"]);
    let python = std::env::var_os("MSMAE_PYTHON");
    match &python {
        Some(py) => cmd.env("MSMAE_PYTHON", py),
        None => cmd.arg("--no-torch"),
    };
    let out = run(&mut cmd);
    let row = out.lines().find(|l| l.starts_with("| 1 |")).unwrap_or_else(|| panic!("no row for 1 thread:\n{out}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    let rate = |i: usize| cells.get(i).and_then(|c| c.parse::<f64>().ok());
    assert!(rate(1).is_some_and(|r| r > 0.0), "msmae images/s: {row}");
    if python.is_some() {
        assert!(rate(3).is_some_and(|r| r > 0.0), "torchvision images/s: {row}\n{out}");
        assert!(cells.get(5).is_some_and(|c| c.ends_with('×')), "{row}");
    }
}

/// `bench attention` on a tiny pipeline of its shape: one row per supervised model ×
/// smoothing, one coverage column per map method, figures from the artifacts (coverage in
/// [0, 1]).
#[test]
fn bench_attention_tabulates_coverage_by_setting_and_map_method() {
    let d = tempfile::tempdir().expect("tmp");
    let model = msmae_tests::TINY_MODEL;
    let sup = "epochs: 2, batch_size: 16, warmup_epochs: 1";
    let mut yaml = format!(
        "name: cov\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 96, size: 32, modality: xray, previews: 1, contrast: 0.6, lesion_radius: [0.1, 0.15] }} }}\n  sup-a:\n    uses: attention/train-supervised\n    description: \"setting A\"\n    needs: [data]\n    with: {{ model: {model}, {sup} }}\n  sup-b:\n    uses: attention/train-supervised\n    description: \"setting B, no augmentation\"\n    needs: [data]\n    with: {{ model: {model}, {sup}, augment: false }}\n"
    );
    for s in ["a", "b"] {
        for m in ["cls", "rollout", "gradient"] {
            yaml.push_str(&format!("  attn-{s}-{m}: {{ uses: attention/extract, needs: [sup-{s}, data], with: {{ method: {m}, overlays: 1 }} }}\n"));
        }
    }
    // smoothed readings of setting A only: a max3 row with rollout alone, a mean3 row with cls alone
    yaml.push_str("  attn-a-rollout-max3: { uses: attention/extract, needs: [sup-a, data], with: { method: rollout, smooth: { op: max, size: 3 }, overlays: 1 } }\n");
    yaml.push_str("  attn-a-cls-mean3: { uses: attention/extract, needs: [sup-a, data], with: { method: cls, smooth: { op: mean, size: 3 }, overlays: 1 } }\n");
    let pipeline = d.path().join("cov.yaml");
    std::fs::write(&pipeline, yaml).expect("write");
    let out = run(Command::new(example_bin("bench_attention"))
        .arg("--pipeline")
        .arg(&pipeline)
        .arg("--store")
        .arg(d.path().join("store"))
        .args(["--seeds", "3,4"]));
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| `sup-") && l.contains("`: ")).collect();
    assert_eq!(rows.len(), 4, "setting A raw, max3, mean3; setting B raw: {out}");
    assert!(
        rows[0].starts_with("| `sup-a`: setting A | none |")
            && rows[3].contains("setting B")
            && rows[3].contains("| none |"),
        "{out}"
    );
    assert!(rows[1].contains("| max3 |") && rows[2].contains("| mean3 |"), "{out}");
    for (k, r) in rows.iter().enumerate() {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        // cells: "", setting, smoothing, val acc, train s, cls, rollout, gradient, hits, secs, ""
        // (a smoothed row has only the readings the pipeline asks for: "—" elsewhere)
        let present: &[usize] = match k {
            1 => &[6],
            2 => &[5],
            _ => &[5, 6, 7],
        };
        for (i, c) in cells.iter().enumerate().take(8).skip(5) {
            if !present.contains(&i) {
                assert_eq!(*c, "—", "{r}");
                continue;
            }
            let mean: f64 = c
                .split(' ')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("coverage cell `{c}` in {r}"));
            assert!((0.0..=1.0).contains(&mean) && c.contains('±'), "two seeds give mean ± sd: {r}");
        }
    }
    // the detail table: one row per setting × reading, right/wrong coverage and the curve
    // up to the top 100 %, where every lesion pixel is covered
    let detail: Vec<&str> = out.lines().filter(|l| l.starts_with("| `sup-") && !l.contains("`: ")).collect();
    assert_eq!(detail.len(), 8, "{out}");
    assert!(
        detail.iter().any(|l| l.contains("| rollout+max3 |")) && detail.iter().any(|l| l.contains("| cls+mean3 |")),
        "{out}"
    );
    assert!(out.contains("top 5 %") && out.contains("top 100 %"), "{out}");
    assert!(detail.iter().all(|l| l.trim_end().ends_with("| 1.000 |")), "{out}");
}

/// `bench scale` on two tiny releases: every stage of each size runs in its own process,
/// and the table gives each a time and a peak RSS (a process of msmae takes more than
/// 10 MiB), with the growth columns filled.
#[test]
fn bench_scale_times_and_measures_every_stage_at_every_size() {
    let d = tempfile::tempdir().expect("tmp");
    let out = run(Command::new(example_bin("bench_scale"))
        .args(["--rows", "60,120", "--pool", "2", "--size", "32", "--batch", "8"])
        .arg("--dir")
        .arg(d.path()));
    let rows: Vec<&str> =
        out.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| stage") && !l.starts_with("|---")).collect();
    assert_eq!(rows.len(), 5, "ingest, epoch, extraction, masks, evaluation:\n{out}");
    for r in &rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        // "", stage, s, MiB, s, MiB, s/1k, MiB/10k, ""
        let num = |i: usize| cells[i].parse::<f64>().unwrap_or_else(|_| panic!("cell {i} of {r}"));
        for (s, mib) in [(2, 3), (4, 5)] {
            assert!(num(s) > 0.0 && num(mib) > 10.0, "{r}");
        }
        assert!(num(6).is_finite() && num(7).is_finite(), "{r}");
    }
    // the generated release has NIH's layout, and the second size has twice the rows
    let csv = std::fs::read_to_string(d.path().join("release-120/Data_Entry_2017_v2020.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 121, "header + 120 rows");
    assert!(d.path().join("release-120/images_001/images").is_dir());
}

/// `bench accum` on small images: both models, each accumulation a column of time and
/// peak RSS from its own process.
#[test]
fn bench_accum_measures_each_accumulation_in_its_own_process() {
    let out = run(Command::new(example_bin("bench_accum"))
        .args(["--accum", "1,2", "--images", "40", "--size", "32", "--batch", "8"]));
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ViT-S")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    for r in rows {
        let cells: Vec<f64> = r
            .split('|')
            .map(str::trim)
            .skip(2)
            .filter(|c| !c.is_empty())
            .map(|c| c.parse().unwrap_or(f64::NAN))
            .collect();
        assert_eq!(cells.len(), 4, "{r}");
        assert!(cells.iter().all(|v| *v > 0.0), "{r}");
    }
    assert!(out.contains("accum 2 (micro-batch 4)"), "{out}");
}
