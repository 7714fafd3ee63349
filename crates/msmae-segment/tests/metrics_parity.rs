//! Dice/IoU against an independent numpy implementation on fixed masks.

use std::io::Write;
use std::process::{Command, Stdio};

use msmae_segment::metrics::dice_iou;

#[test]
fn dice_and_iou_match_numpy() {
    let python = std::env::var_os("MSMAE_PYTHON")
        .unwrap_or_else(|| panic!("MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment (numpy)"));
    // fixed cases: overlaps, disjoint, empty/empty, empty prediction, full masks, and
    // pseudo-random 32×32 masks
    let mut cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (vec![1, 1, 1, 0, 0], vec![1, 1, 0, 1, 0]),
        (vec![1, 0, 0, 0], vec![0, 0, 0, 1]),
        (vec![0; 9], vec![0; 9]),
        (vec![0; 9], vec![0, 0, 1, 1, 0, 0, 0, 0, 0]),
        (vec![1; 16], vec![1; 16]),
    ];
    let mut s = 12345u64;
    for k in 0..20 {
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) % 100
        };
        let density = 5 + 4 * k as u64;
        let p: Vec<u8> = (0..1024).map(|_| u8::from(next() < density)).collect();
        let g: Vec<u8> = (0..1024).map(|_| u8::from(next() < 30)).collect();
        cases.push((p, g));
    }
    let input = serde_json::to_vec(&cases).expect("json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/dice_iou.py");
    let mut child =
        Command::new(python).arg(script).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python");
    child.stdin.take().expect("stdin").write_all(&input).expect("write");
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<(f64, f64)> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(want.len(), cases.len());
    for ((p, g), (wd, wi)) in cases.iter().zip(want) {
        let (d, i) = dice_iou(p, g);
        assert!((d - wd).abs() < 1e-12 && (i - wi).abs() < 1e-12, "ours ({d}, {i}), numpy ({wd}, {wi})");
    }
}
