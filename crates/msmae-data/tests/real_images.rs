//! Real images that install offline from PyPI, decoded by msmae and by the reference
//! decoders: DICOM (pydicom-data's PA chest radiograph and others, pydicom's own CT/MR
//! files) against pydicom's modality + VOI LUT, and scikit-image's fundus photographs
//! against Pillow. Compressed transfer syntaxes we do not decode must be named in the error.
//! The references are written by `tests/python/decode_reference.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use msmae_core::{ExecEnv, NoProgress, Stage, StageContext};
use msmae_data::dicom;
use msmae_data::manifest::{Manifest, ManifestConfig};
use msmae_data::table;

fn python() -> PathBuf {
    match std::env::var_os("MSMAE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment (pydicom, pydicom-data, Pillow, scikit-image)"
        ),
    }
}

fn references(dir: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/decode_reference.py");
    let out = std::process::Command::new(python()).arg(&script).arg(dir).output().expect("run decode_reference.py");
    assert!(out.status.success(), "decode_reference.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index")).expect("json")
}

fn f32s(p: &Path) -> Vec<f32> {
    std::fs::read(p).expect("f32 file").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn real_images_decode_like_pydicom_and_pillow() {
    let d = tempfile::tempdir().expect("tmp");
    let index = references(d.path());
    assert_eq!(
        index["skipped"].as_array().map_or(0, Vec::len),
        0,
        "every reference case must run: {}",
        index["skipped"]
    );
    let cases = index["cases"].as_array().expect("cases");
    let mut seen = BTreeMap::new();
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let src = PathBuf::from(c["source_path"].as_str().expect("path"));
        let bytes = std::fs::read(&src).expect("source");
        match c["kind"].as_str().expect("kind") {
            "dicom" => {
                let img = dicom::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                let shape = (c["shape"][0].as_u64().expect("h") as u32, c["shape"][1].as_u64().expect("w") as u32);
                assert_eq!((img.height, img.width), shape, "{name}");
                assert_eq!(img.inverted, c["inverted"] == true, "{name}: MONOCHROME1 inversion");
                assert_eq!(
                    matches!(img.voi, dicom::Voi::Window { .. }),
                    c["rule"] == "window",
                    "{name}: {:?}",
                    img.voi
                );
                let diff = max_abs(&img.values, &f32s(&d.path().join(format!("{name}.f32"))));
                assert!(diff < 1e-5, "{name}: max |msmae − pydicom| = {diff}");
                seen.insert(name.to_string(), diff);
            }
            "unsupported" => {
                let e = dicom::decode(&bytes).err().unwrap_or_else(|| panic!("{name} must be refused"));
                let uid = c["transfer_syntax_uid"].as_str().expect("uid");
                assert!(e.contains("unsupported DICOM transfer syntax") && e.contains(uid), "{name}: {e}");
                seen.insert(name.to_string(), 0.0);
            }
            "pillow" => {
                let ours: Vec<f32> = image::load_from_memory(&bytes)
                    .expect("decode")
                    .to_rgb8()
                    .into_raw()
                    .into_iter()
                    .map(|v| f32::from(v) / 255.0)
                    .collect();
                let theirs = f32s(&d.path().join(format!("{name}.f32")));
                assert_eq!(ours.len(), theirs.len(), "{name}");
                let diff = max_abs(&ours, &theirs);
                let mean = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f32>() / ours.len() as f32;
                // PNG is lossless: exact. JPEG: zune-jpeg vs libjpeg-turbo IDCT/upsampling differ by a few levels at most.
                let (max_tol, mean_tol) =
                    if src.extension().is_some_and(|e| e == "png") { (0.0, 0.0) } else { (6.0 / 255.0, 0.5 / 255.0) };
                assert!(
                    diff <= max_tol && mean <= mean_tol,
                    "{name}: max {} / mean {} levels",
                    diff * 255.0,
                    mean * 255.0
                );
                seen.insert(name.to_string(), diff);
            }
            k => panic!("unknown kind {k}"),
        }
    }
    for must in [
        "RG1_UNCR",
        "RG3_UNCR",
        "693_UNCR",
        "MR2_UNCR",
        "CT_small",
        "MR_small",
        "MR_small_RLE",
        "RG1_J2KR",
        "retina",
        "microaneurysms",
    ] {
        assert!(seen.contains_key(must), "reference case {must} missing: {seen:?}");
    }
    eprintln!("max |difference| per case: {seen:?}");
}

/// The chest radiograph through a manifest into the table: 16-bit through the resize,
/// grey, MONOCHROME1 inverted (the lung fields are dark, the mediastinum bright).
#[test]
fn a_real_dicom_radiograph_ingests_through_a_manifest() {
    let d = tempfile::tempdir().expect("tmp");
    let index = references(d.path());
    let rg1 = index["cases"].as_array().expect("cases").iter().find(|c| c["name"] == "RG1_UNCR").expect("RG1").clone();
    let src = rg1["source_path"].as_str().expect("path");
    std::fs::write(d.path().join("m.csv"), format!("path,finding\n{src},normal\n")).expect("csv");
    let c: ManifestConfig = serde_json::from_value(
        serde_json::json!({ "manifest": d.path().join("m.csv"), "label_column": "finding", "size": 64, "channels": 1, "aspect": "pad", "previews": 1, "allow_outside_root": true }),
    )
    .expect("config");
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut ctx = StageContext::new(
        "dcm".into(),
        1,
        ExecEnv::cpu_flex(),
        2,
        Default::default(),
        &NoProgress,
        out.clone(),
        out.clone(),
        Manifest.output(&c),
        BTreeMap::new(),
    );
    Manifest.run(&c, &mut ctx).expect("ingest");
    let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
    assert_eq!((rows[0].width, rows[0].height), (1841, 1955));
    assert_eq!(rows[0].source_sha256, rg1["source_sha256"].as_str().expect("sha"));
    // reference: the pydicom values, box-averaged onto the same 64×64 letterbox (Pad keeps
    // the aspect: 1955 rows → 64, 1841 cols → 60, centred)
    let refv = f32s(&d.path().join("RG1_UNCR.f32"));
    let (h, w) = (1955usize, 1841usize);
    let (sw, x0) = (((w as f64 * 64.0 / h as f64).round()) as usize, 0usize);
    let x_off = (64 - sw) / 2;
    let mut worst = 0f32;
    for ty in 8..56 {
        for tx in 8..(sw - 8) {
            let (ya, yb) = (ty * h / 64, (ty + 1) * h / 64);
            let (xa, xb) = ((tx + x0) * w / sw, (tx + x0 + 1) * w / sw);
            let mut s = 0f64;
            for y in ya..yb {
                for x in xa..xb {
                    s += f64::from(refv[y * w + x]);
                }
            }
            let mean = s / ((yb - ya) * (xb - xa)) as f64 * 255.0;
            let ours = f32::from(rows[0].pixels[ty * 64 + tx + x_off]);
            worst = worst.max((ours - mean as f32).abs());
        }
    }
    // triangle filter vs box average over the same footprint: a few levels at most on a radiograph
    eprintln!("RG1 at 64 px: worst difference to the box-averaged pydicom decoding {worst:.2} levels");
    assert!(worst <= 12.0, "worst difference to the box-averaged pydicom decoding: {worst} levels");
    // the same with `bit_depth: 16`: two bytes per sample, and the 8-bit table is its rounding
    let c16: ManifestConfig = serde_json::from_value(serde_json::json!({ "manifest": d.path().join("m.csv"), "label_column": "finding", "size": 64, "channels": 1, "aspect": "pad", "previews": 1, "bit_depth": 16, "allow_outside_root": true })).expect("config");
    let out16 = d.path().join("out16");
    std::fs::create_dir_all(&out16).expect("mkdir");
    let mut ctx = StageContext::new(
        "dcm16".into(),
        1,
        ExecEnv::cpu_flex(),
        2,
        Default::default(),
        &NoProgress,
        out16.clone(),
        out16.clone(),
        Manifest.output(&c16),
        BTreeMap::new(),
    );
    Manifest.run(&c16, &mut ctx).expect("ingest 16-bit");
    assert_eq!(table::read_meta(&out16.join("images.parquet")).expect("meta").bit_depth, 16);
    let rows16 = table::read_rows(&out16.join("images.parquet")).expect("rows");
    assert_eq!(rows16[0].pixels.len(), 2 * 64 * 64);
    let deep: Vec<u16> = rows16[0].pixels.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    assert!(
        deep.iter().zip(&rows[0].pixels).all(|(&v, &e)| ((f64::from(v) / 257.0).round() - f64::from(e)).abs() <= 1.0)
    );
    let distinct16 = deep.iter().collect::<std::collections::BTreeSet<_>>().len();
    let distinct8 = rows[0].pixels.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct16 > 2 * distinct8, "16 bits keep more grey levels ({distinct16} vs {distinct8})");
    let centre = f32::from(rows[0].pixels[32 * 64 + 32]);
    let lung = f32::from(rows[0].pixels[28 * 64 + 18]);
    assert!(centre > lung, "mediastinum ({centre}) brighter than the lung field ({lung}) after MONOCHROME1 inversion");
}
