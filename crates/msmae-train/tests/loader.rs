//! The batch stream: every row once per epoch, memory bounded by row groups, batches a pure
//! function of (seed, epoch) whatever the prefetch depth, masks of the policy's sizes that
//! follow the weights; and the optimiser groups (no decay on 1-D params, layer decay).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use burn::prelude::*;

use msmae_data::table::{ImageRow, ImageTableWriter, SCHEMA_VERSION, Split, TableMeta};
use msmae_mask::MaskPolicy;
use msmae_train::data::{self, ImageTable, LoaderSpec, MaskSpec, Normalizer, epoch_order};
use msmae_train::model::{LayerDecay, no_decay_ids};

const SIZE: usize = 16;

/// 50 images in row groups of 8; image i is filled with the value i.
fn table(dir: &std::path::Path) -> Arc<ImageTable> {
    common::flat_table(dir, SIZE, 50, 8, ["a", "b"], |i| {
        (if i < 40 { Split::Train } else { Split::Test }, i32::from(i % 2), i)
    })
}

fn unit() -> Normalizer {
    Normalizer { mean: vec![0.0], std: vec![1.0] }
}

#[test]
fn an_epoch_visits_every_row_once_and_is_a_function_of_seed_and_epoch() {
    let d = tempfile::tempdir().expect("tmp");
    let t = table(d.path());
    let rows = t.rows_of(Split::Train);
    assert_eq!(rows.len(), 40);
    let mut spec = LoaderSpec::train(6, (0.2, 1.0));
    spec.shuffle_groups = 2;
    let o1 = epoch_order(&t, &rows, &spec, 7, 0);
    let mut sorted = o1.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, rows, "a permutation of the split");
    assert_ne!(o1, rows, "shuffled");
    assert_eq!(o1, epoch_order(&t, &rows, &spec, 7, 0));
    assert_ne!(o1, epoch_order(&t, &rows, &spec, 7, 1), "epochs differ");
    // windows of 2 row groups (16 rows): each window's rows come from at most 2 groups
    for w in o1.chunks(16) {
        let groups: HashSet<usize> = w.iter().map(|r| r / 8).collect();
        assert!(groups.len() <= 2, "{w:?}");
    }

    let collect = |prefetch: usize| {
        let mut s = spec.clone();
        s.prefetch = prefetch;
        data::stream(t.clone(), &rows, s, unit(), 7, 3).map(|b| b.expect("batch")).collect::<Vec<_>>()
    };
    let a = collect(1);
    let b = collect(4);
    assert_eq!(a.len(), 40 / 6, "drop_last keeps full batches only");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.rows, y.rows);
        assert_eq!(x.images, y.images, "augmentation does not depend on prefetch/threads");
        assert_eq!(x.labels, x.rows.iter().map(|r| (*r % 2) as i64).collect::<Vec<_>>());
        // every pixel of image r has the value r/255 (crops of a flat image stay flat)
        for (i, r) in x.rows.iter().enumerate() {
            let px = &x.images[i * SIZE * SIZE..(i + 1) * SIZE * SIZE];
            assert!(px.iter().all(|v| (v - *r as f32 / 255.0).abs() < 1e-5));
        }
    }
}

#[test]
fn the_loader_holds_at_most_its_window_of_row_groups_whatever_the_row_order() {
    let d = tempfile::tempdir().expect("tmp");
    // 48 images in 6 groups of 8, val and test rows alternating inside every group
    let t = common::flat_table(d.path(), SIZE, 48, 8, ["a", "b"], |i| {
        (if i % 2 == 0 { Split::Val } else { Split::Test }, i32::from(i % 3 == 0), i)
    });
    // Predictions visit the val rows and then the test rows: every group twice.
    let mut rows = t.rows_of(Split::Val);
    rows.extend(t.rows_of(Split::Test));
    let mut s = data::stream(t.clone(), &rows, LoaderSpec::eval(5), unit(), 1, 0);
    let mut seen = Vec::new();
    for b in s.by_ref() {
        let b = b.expect("batch");
        for (i, r) in b.rows.iter().enumerate() {
            let px = &b.images[i * SIZE * SIZE..(i + 1) * SIZE * SIZE];
            assert!(px.iter().all(|v| (v - *r as f32 / 255.0).abs() < 1e-5), "row {r} has its own pixels");
        }
        seen.extend(b.rows);
    }
    assert_eq!(seen, rows, "in the order asked");
    let st = s.stats();
    assert_eq!(st.capacity, 1);
    assert_eq!(st.peak_groups_held, 1, "one group at a time");
    assert_eq!(st.group_reads, 12, "each group read once per pass");

    // A shuffled epoch in windows of 2 groups reads each group once and holds at most 2.
    let train: Vec<usize> = (0..48).collect();
    let mut spec = LoaderSpec::train(4, None);
    spec.shuffle_groups = 2;
    let mut s = data::stream(t.clone(), &train, spec, unit(), 3, 0);
    assert_eq!(s.by_ref().map(|b| b.expect("batch").len()).sum::<usize>(), 48);
    let st = s.stats();
    assert_eq!((st.capacity, st.group_reads), (2, 6));
    assert!(st.peak_groups_held <= 2, "{st:?}");
}

#[test]
fn masks_have_the_policy_sizes_and_follow_the_weights() {
    let d = tempfile::tempdir().expect("tmp");
    let t = table(d.path());
    let rows = t.rows_of(Split::Train);
    let grid = [4, 4];
    // all weight on the left column: under MSMAE those patches are masked first
    let w: Vec<f32> = (0..16).map(|i| if i % 4 == 0 { 1.0 } else { 1e-6 }).collect();
    let weights: HashMap<usize, Vec<f32>> = rows.iter().map(|&r| (r, w.clone())).collect();
    let mut spec = LoaderSpec::eval(8);
    spec.masks = Some(MaskSpec {
        policy: MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 },
        weights: Some(Arc::new(weights)),
        grid,
    });
    let (mut left_masked, mut n) = (0usize, 0usize);
    for b in data::stream(t.clone(), &rows, spec, unit(), 1, 0) {
        let b = b.expect("batch");
        assert_eq!(b.plans.len(), b.len());
        for p in &b.plans {
            assert_eq!((p.masked.len(), p.thrown.len(), p.visible.len()), (7, 5, 4));
            left_masked += p.masked.iter().filter(|i| *i % 4 == 0).count();
            n += 1;
        }
    }
    // the 4 heavy patches are (almost surely) all among the 7 masked ones
    assert!(left_masked as f64 / n as f64 > 3.9, "{left_masked} of {}", 4 * n);
    // attention strategies refuse to run without weights for a row
    let mut spec = LoaderSpec::eval(8);
    spec.masks = Some(MaskSpec {
        policy: MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 },
        weights: Some(Arc::new(HashMap::new())),
        grid,
    });
    let e = data::stream(t, &rows, spec, unit(), 1, 0).next().expect("one").expect_err("no weights");
    assert!(e.to_string().contains("img00"), "{e}");
}

#[test]
fn optimiser_groups_exclude_norms_biases_and_tokens_and_decay_by_layer() {
    let dev = Device::flex();
    let cfg = msmae_vit::VitConfig::new([16, 16], 8, 1, 16, 3, 2).with_num_classes(2).with_global_pool(true);
    let vit = cfg.init(&dev);
    let ids = no_decay_ids(&vit);
    // per block: norm1/norm2 (γ, β) + qkv/proj/fc1/fc2 biases = 8; plus patch-embed bias,
    // cls token, final norm (2), fc_norm (2), head bias = 7
    assert_eq!(ids.len(), 3 * 8 + 7);
    assert!(ids.contains(&vit.cls_token.id));
    assert!(!ids.contains(&vit.blocks[0].attn.qkv.weight.id));
    let rates = LayerDecay::new(&vit, 0.5).rates(1.0);
    let lr = |id| rates.lr_from_param(id, None);
    assert_eq!(lr(vit.patch_embed.proj.weight.id), 0.5f64.powi(4));
    assert_eq!(lr(vit.cls_token.id), 0.5f64.powi(4));
    assert_eq!(lr(vit.blocks[0].mlp.fc1.weight.id), 0.5f64.powi(3));
    assert_eq!(lr(vit.blocks[2].attn.proj.weight.id), 0.5);
    let head = vit.head.as_ref().expect("head");
    assert_eq!(lr(head.weight.id), 1.0);
    assert_eq!(LayerDecay::new(&vit, 1.0).rates(0.1).lr_from_param(vit.patch_embed.proj.weight.id, None), 0.1);
}

#[test]
fn a_crashing_loader_is_an_error_not_a_short_epoch() {
    let d = tempfile::tempdir().expect("tmp");
    let t = table(d.path());
    let rows = t.rows_of(Split::Train);
    // weight maps of the wrong length make the selection panic inside the loader thread
    let weights: HashMap<usize, Vec<f32>> = rows.iter().map(|&r| (r, vec![1.0; 3])).collect();
    let mut spec = LoaderSpec::eval(8);
    spec.masks = Some(MaskSpec {
        policy: MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 },
        weights: Some(Arc::new(weights)),
        grid: [4, 4],
    });
    let got: Vec<_> = data::stream(t, &rows, spec, unit(), 1, 0).collect();
    assert_eq!(got.len(), 1, "one error, then the stream ends");
    let e = got.into_iter().next().expect("item").expect_err("an error");
    assert!(e.to_string().contains("data loader failed after 0 of 5 batches"), "{e}");
}

#[test]
fn class_sorted_tables_still_give_mixed_batches_and_duplicate_ids_are_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let meta = TableMeta {
        schema_version: SCHEMA_VERSION,
        label_names: vec!["a".into(), "b".into()],
        multi_label: false,
        height: 4,
        width: 4,
        channels: 1,
        has_masks: false,
        bit_depth: 8,
        mask_classes: Vec::new(),
        provenance: serde_json::Value::Null,
    };
    let write = |name: &str, dup: bool| {
        let p = d.path().join(name);
        let mut w = ImageTableWriter::create(&p, meta.clone(), 8).expect("create");
        for i in 0..64u8 {
            let id = if dup && i == 63 { "img00".to_string() } else { format!("img{i:02}") };
            w.push(ImageRow {
                id,
                patient_id: format!("p{i}"),
                split: Split::Train,
                label: Some(i32::from(i >= 32)),
                labels: None,
                width: 4,
                height: 4,
                channels: 1,
                pixels: vec![i; 16],
                mask: None,
                source_path: String::new(),
                source_sha256: String::new(),
            })
            .expect("push");
        }
        w.finish().expect("finish");
        p
    };
    // rows sorted by class, as an ImageFolder ingestion writes them
    let t = Arc::new(ImageTable::open(&write("sorted.parquet", false)).expect("open"));
    let rows = t.rows_of(Split::Train);
    let mixed = data::stream(t.clone(), &rows, LoaderSpec::train(16, (0.5, 1.0)), unit(), 4, 0)
        .map(|b| b.expect("batch"))
        .filter(|b| b.labels.contains(&0) && b.labels.contains(&1))
        .count();
    assert_eq!(mixed, 4, "every batch holds both classes");
    let e = ImageTable::open(&write("dup.parquet", true)).expect_err("duplicate id");
    assert!(e.to_string().contains("img00") && e.to_string().contains("duplicate"), "{e}");
}

/// A 16-bit table (bit_depth 16): the loader reads two bytes per sample, the channel
/// statistics and the rendered batches carry the full depth.
#[test]
fn sixteen_bit_tables_stream_at_full_depth() {
    let d = tempfile::tempdir().expect("tmp");
    let meta = TableMeta {
        schema_version: SCHEMA_VERSION,
        label_names: vec!["a".into()],
        multi_label: false,
        height: 4,
        width: 4,
        channels: 1,
        has_masks: false,
        bit_depth: 16,
        mask_classes: Vec::new(),
        provenance: serde_json::Value::Null,
    };
    let p = d.path().join("images.parquet");
    let mut w = ImageTableWriter::create(&p, meta, 4).expect("create");
    for i in 0..10u16 {
        // 1000·i + 1: not a multiple of 257, so an 8-bit table could not hold it
        let v = 1000 * i + 1;
        let row = ImageRow {
            id: format!("i{i}"),
            patient_id: format!("p{i}"),
            split: Split::Train,
            label: Some(0),
            labels: None,
            width: 4,
            height: 4,
            channels: 1,
            pixels: [v; 16].iter().flat_map(|x| x.to_le_bytes()).collect(),
            mask: None,
            source_path: String::new(),
            source_sha256: String::new(),
        };
        w.push(row).expect("push");
    }
    let short = ImageRow {
        id: "bad".into(),
        patient_id: "p".into(),
        split: Split::Train,
        label: Some(0),
        labels: None,
        width: 4,
        height: 4,
        channels: 1,
        pixels: vec![0; 16],
        mask: None,
        source_path: String::new(),
        source_sha256: String::new(),
    };
    assert!(w.push(short).is_err(), "8-bit bytes in a 16-bit table are refused");
    w.finish().expect("finish");
    let t = Arc::new(ImageTable::open(&p).expect("open"));
    let rows = t.rows_of(Split::Train);
    let stats = t.channel_stats(&rows).expect("stats");
    let mean = (0..10).map(|i| f64::from(1000 * i + 1) / 65535.0).sum::<f64>() / 10.0;
    assert!((f64::from(stats.mean[0]) - mean).abs() < 1e-6, "{stats:?} vs {mean}");
    let mut got = HashMap::new();
    for b in data::stream(t.clone(), &rows, LoaderSpec::eval(4), unit(), 1, 0) {
        let b = b.expect("batch");
        for (k, &r) in b.rows.iter().enumerate() {
            got.insert(r, b.images[k * 16]);
        }
    }
    assert_eq!(got.len(), 10);
    for (r, v) in got {
        let want = f64::from(1000 * r as u16 + 1) / 65535.0;
        assert!((f64::from(v) - want).abs() < 1e-6, "row {r}: {v} vs {want}");
    }
}
