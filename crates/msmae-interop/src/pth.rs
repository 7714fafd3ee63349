//! PyTorch `torch.save` checkpoints (`.pth`, `.pt`) read directly: MAE's released weights,
//! the MAE/MSMAE reference code's training checkpoints (`{'model': …, 'optimizer': …,
//! 'epoch': …, 'args': …}`), or a bare state dict.
//!
//! The file is read by `pytorch-reader` (burn's maintained reader: a pickle parser in Rust
//! that never runs Python). Before that, every global the pickle names is checked against
//! an allow-list — the tensor-rebuild functions, the storage types and the containers
//! `torch.save` writes — and anything else (`os.system`, `builtins.eval`, a class of the
//! saving program) is refused naming it, so a hostile file cannot even make msmae build an
//! object of its choosing. Only the zip format of PyTorch 1.6 and later is accepted; the
//! older formats get an error saying how to re-save the file.
//!
//! The weights found (under `model`, else `state_dict`, else the whole dict) come back as
//! the f32 safetensors bytes `import/pytorch` reads (f16 and bf16 widened exactly).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use pytorch_reader::{DType, PytorchReader};

/// The globals a `torch.save` file of weights may name. Everything here is data: the
/// reader interprets the tensor-rebuild calls and containers itself and never calls
/// anything.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    // bytes under pickle protocol 2 (optimizer and RNG states)
    ("_codecs", "encode"),
    // MAE's and MSMAE's training scripts save their command line as `args`
    ("argparse", "Namespace"),
];

/// `torch.FloatStorage` and the like (storages of the legacy persistent ids), and the dtypes
/// (`torch.float32`) newer files name.
fn allowed(module: &str, name: &str) -> bool {
    ALLOWED_GLOBALS.contains(&(module, name))
        || (module == "torch" && (name.ends_with("Storage") || DTYPES.contains(&name)))
        || (module == "torch.storage" && name == "UntypedStorage")
}

const DTYPES: &[&str] =
    &["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"];

/// Read a `torch.save` file into f32 safetensors bytes of its weights.
pub fn to_safetensors(path: &Path) -> Result<Vec<u8>, String> {
    let pickle = zip_pickle(path)?;
    check_globals(&pickle)?;
    let all = PytorchReader::new(path).map_err(|e| format!("not a readable PyTorch checkpoint: {e}"))?;
    // MAE's and MSMAE's checkpoints keep the weights under `model`; others under
    // `state_dict`; a bare state dict is the weights.
    let key = ["model", "state_dict"].into_iter().find(|k| all.keys().iter().any(|n| n.starts_with(&format!("{k}."))));
    let reader = match key {
        Some(k) => PytorchReader::with_top_level_key(path, k).map_err(|e| format!("reading `{k}`: {e}"))?,
        None => all,
    };
    if reader.is_empty() {
        return Err("holds no tensors (expected a state dict, or one under `model` or `state_dict`)".into());
    }
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in reader.tensors() {
        let raw = t.read().map_err(|e| format!("tensor `{name}`: {e}"))?;
        let f32_bytes: Vec<u8> = match t.dtype() {
            DType::F32 => raw,
            DType::F16 => raw
                .chunks_exact(2)
                .flat_map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes())
                .collect(),
            DType::BF16 => raw
                .chunks_exact(2)
                .flat_map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes())
                .collect(),
            other => return Err(format!("tensor `{name}` is {other:?}; weights must be f32, f16 or bf16")),
        };
        tensors.insert(name.clone(), (t.shape().to_vec(), f32_bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("tensor `{k}`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| format!("converting the weights: {e}"))
}

/// The `data.pkl` of a zip-format `torch.save` file.
fn zip_pickle(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Seek;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = [0u8; 4];
    let n = file.read(&mut head).and_then(|n| file.rewind().map(|()| n)).map_err(|e| e.to_string())?;
    if n < 4 || &head != b"PK\x03\x04" {
        return Err(
            "not a zip-format torch.save file (PyTorch 1.6 or later); an older (legacy) checkpoint can be re-saved with `torch.save(torch.load(f, map_location='cpu', weights_only=True), f2)`"
                .into(),
        );
    }
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("a damaged or truncated zip archive: {e}"))?;
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let name = names
        .into_iter()
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or("a zip archive without `data.pkl`: not a torch.save file")?;
    let mut entry = zip.by_name(&name).map_err(|e| format!("`{name}`: {e}"))?;
    let limit = pytorch_reader::MAX_PICKLE_SIZE;
    let mut out = Vec::new();
    (&mut entry)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("reading `{name}` (truncated file?): {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("`{name}` is larger than {limit} bytes"));
    }
    Ok(out)
}

/// Refuse a pickle that names any global outside [`ALLOWED_GLOBALS`] (or uses the copyreg
/// extension registry, which names globals by number), without interpreting anything.
pub fn check_globals(pickle: &[u8]) -> Result<(), String> {
    for (module, name) in globals(pickle)? {
        if !allowed(&module, &name) {
            return Err(format!(
                "refused: the pickle names the global `{module}.{name}`, which is not a tensor or a container; msmae reads weights only (nothing in the file was run)"
            ));
        }
    }
    Ok(())
}

/// Every `(module, name)` a pickle's `GLOBAL`, `INST` and `STACK_GLOBAL` opcodes name, by a
/// walk over its opcodes that tracks only the strings `STACK_GLOBAL` takes its operands from.
pub fn globals(p: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut i = 0usize;
    // What each push left on the stack, as far as strings go, and the memo of those.
    let mut stack: Vec<Option<String>> = Vec::new();
    let mut memo: BTreeMap<u64, Option<String>> = BTreeMap::new();
    let bad = |what: &str, at: usize| format!("a damaged pickle ({what} at byte {at})");
    let take = |i: &mut usize, n: usize| -> Result<std::ops::Range<usize>, String> {
        let end =
            i.checked_add(n).filter(|&e| e <= p.len()).ok_or_else(|| format!("a truncated pickle (at byte {i})"))?;
        let r = *i..end;
        *i = end;
        Ok(r)
    };
    let line = |i: &mut usize| -> Result<String, String> {
        let start = *i;
        let len = p[start..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("a truncated pickle (at byte {start})"))?;
        *i = start + len + 1;
        Ok(String::from_utf8_lossy(&p[start..start + len]).into_owned())
    };
    let uint = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    loop {
        let at = i;
        let Some(&op) = p.get(i) else { return Err(format!("a truncated pickle: no STOP opcode (at byte {at})")) };
        i += 1;
        match op {
            b'.' => return Ok(out),
            // text-line arguments
            b'I' | b'L' | b'F' | b'P' => {
                line(&mut i)?;
                stack.push(None);
            }
            b'S' | b'V' => {
                let s = line(&mut i)?;
                stack.push(Some(s.trim_matches(['\'', '"']).to_string()));
            }
            b'c' | b'i' => {
                let (m, n) = (line(&mut i)?, line(&mut i)?);
                out.push((m, n));
                stack.push(None);
            }
            b'g' => {
                let k: u64 = line(&mut i)?.trim().parse().map_err(|_| bad("GET", at))?;
                stack.push(memo.get(&k).cloned().flatten());
            }
            b'p' => {
                let k: u64 = line(&mut i)?.trim().parse().map_err(|_| bad("PUT", at))?;
                memo.insert(k, stack.last().cloned().flatten());
            }
            // fixed-size arguments
            b'K' | b'M' | b'J' | b'G' => {
                take(
                    &mut i,
                    match op {
                        b'K' => 1,
                        b'M' => 2,
                        b'J' => 4,
                        _ => 8,
                    },
                )?;
                stack.push(None);
            }
            0x80 => {
                take(&mut i, 1)?;
            }
            0x95 => {
                take(&mut i, 8)?;
            }
            b'h' | b'j' => {
                let r = take(&mut i, if op == b'h' { 1 } else { 4 })?;
                stack.push(memo.get(&uint(&p[r])).cloned().flatten());
            }
            b'q' | b'r' => {
                let r = take(&mut i, if op == b'q' { 1 } else { 4 })?;
                memo.insert(uint(&p[r]), stack.last().cloned().flatten());
            }
            0x94 => {
                memo.insert(memo.len() as u64, stack.last().cloned().flatten());
            }
            // length-prefixed data
            b'U' | b'C' | 0x8c | 0x8a | b'T' | b'X' | b'B' | 0x8b | 0x8d | 0x8e | 0x96 => {
                let w = match op {
                    b'U' | b'C' | 0x8c | 0x8a => 1,
                    b'T' | b'X' | b'B' | 0x8b => 4,
                    _ => 8,
                };
                let r = take(&mut i, w)?;
                let n = usize::try_from(uint(&p[r])).map_err(|_| bad("length", at))?;
                let data = take(&mut i, n)?;
                let is_text = matches!(op, b'U' | 0x8c | b'T' | b'X' | 0x8d);
                stack.push(is_text.then(|| String::from_utf8_lossy(&p[data]).into_owned()));
            }
            0x93 => {
                let name = stack.pop().flatten();
                let module = stack.pop().flatten();
                match (module, name) {
                    (Some(m), Some(n)) => out.push((m, n)),
                    _ => {
                        return Err(format!(
                            "refused: a STACK_GLOBAL at byte {at} whose module and name are not plain strings"
                        ));
                    }
                }
                stack.push(None);
            }
            0x82..=0x84 => {
                return Err(format!(
                    "refused: the pickle names a global through the copyreg extension registry (opcode {op:#04x} at byte {at})"
                ));
            }
            // no argument
            b'(' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e' | b'l' | b']' | b'o'
            | b's' | b't' | b')' | b'u' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | 0x8f | 0x90 | 0x91 | 0x92
            | 0x97 | 0x98 => {
                stack.push(None);
            }
            other => return Err(bad(&format!("unknown opcode {other:#04x}"), at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globals_are_found_in_every_spelling() {
        // protocol 0: cos\nsystem\n(S'echo hi'\ntR.
        let p0 = b"cos\nsystem\n(S'echo hi'\ntR.";
        assert_eq!(globals(p0).expect("walk"), [("os".to_string(), "system".to_string())]);
        assert!(check_globals(p0).expect_err("refused").contains("`os.system`"));
        // protocol 4: STACK_GLOBAL from two short strings, the module memoised and reused
        let mut p4 = vec![0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0];
        for s in ["builtins", "eval"] {
            p4.push(0x8c);
            p4.push(s.len() as u8);
            p4.extend_from_slice(s.as_bytes());
            p4.push(0x94);
        }
        p4.extend_from_slice(&[0x93, b'h', 0, 0x8c, 4]);
        p4.extend_from_slice(b"exec");
        p4.extend_from_slice(&[0x93, b'.']);
        assert_eq!(
            globals(&p4).expect("walk"),
            [("builtins".into(), "eval".into()), ("builtins".into(), "exec".into())]
        );
        // the containers and rebuild functions torch.save writes are allowed
        let ok = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02ctorch\nFloatStorage\nq\x03.";
        assert!(check_globals(ok).is_ok());
        // damaged input is an error, never a panic
        assert!(globals(b"\x80\x02X\xff\xff\xff\x7f").is_err());
        assert!(globals(b"\x80\x02").is_err());
        assert!(globals(b"\x82\x01.").expect_err("ext").contains("extension registry"));
    }
}
