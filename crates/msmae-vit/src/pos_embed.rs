//! Fixed 2-D sin-cos position embeddings, exactly as MAE's `get_2d_sincos_pos_embed`
//! (docs/method.md §1), with a zero row for the CLS token. A constant, not a parameter.

/// `[1 + gh·gw, dim]` row-major: row 0 is the CLS token (zeros).
///
/// Half of the channels encode one grid axis, half the other; each half is
/// `[sin(pos·ω), cos(pos·ω)]` with `ω_k = 1 / 10000^(k / (dim/4))`. As in MAE, the first
/// half uses the column index (its `np.meshgrid(grid_w, grid_h)` puts `w` in `grid[0]`).
pub fn sincos_2d(dim: usize, gh: usize, gw: usize) -> Vec<f32> {
    assert!(dim.is_multiple_of(4), "sin-cos position embedding needs dim divisible by 4, got {dim}");
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = vec![0f32; (1 + gh * gw) * dim];
    for r in 0..gh {
        for c in 0..gw {
            let row = &mut out[(1 + r * gw + c) * dim..(2 + r * gw + c) * dim];
            for (half, pos) in [(0usize, c as f64), (1, r as f64)] {
                for (k, w) in omega.iter().enumerate() {
                    row[half * 2 * quarter + k] = (pos * w).sin() as f32;
                    row[half * 2 * quarter + quarter + k] = (pos * w).cos() as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_mae_formula_at_known_points() {
        let e = sincos_2d(8, 2, 3);
        assert_eq!(e.len(), 7 * 8);
        assert!(e[..8].iter().all(|&v| v == 0.0), "cls row is zero");
        // patch (row 1, col 2): first half encodes col 2, second half row 1
        let row = &e[(1 + 3 + 2) * 8..(2 + 3 + 2) * 8];
        let w1 = 1.0 / 10000f64.powf(0.5);
        let want = [
            (2.0f64).sin(),
            (2.0 * w1).sin(),
            (2.0f64).cos(),
            (2.0 * w1).cos(),
            (1.0f64).sin(),
            (1.0 * w1).sin(),
            (1.0f64).cos(),
            (1.0 * w1).cos(),
        ];
        for (g, w) in row.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{row:?}");
        }
    }
}
