"""Reference decodings of real images (pydicom, Pillow) for the Rust decode parity test.

Usage: python decode_reference.py OUT_DIR

Writes OUT_DIR/<name>.f32 (raw little-endian float32, row-major H×W, or H×W×3 for colour) and
OUT_DIR/index.json, a list of cases:
  {name, kind, source_path (absolute), source_sha256, shape, ...}
kind:
  "dicom"       pydicom: v = apply_voi_lut(apply_modality_lut(pixel_array)) in float64, then
                normalised to [0, 1] (see /work/notes/dicom.md §3-5):
                rule "window": n = (v - y_min) / (y_max - y_min), with pydicom's y_min/y_max
                  (0..2^BS-1 if PixelRepresentation 0, else the signed range; then *slope+intercept
                  when both rescale tags are present);
                rule "minmax": no window and no VOI LUT: n = (v - min) / (max - min) of the
                  modality values (0 where max == min);
                then n = 1 - n for MONOCHROME1.
  "unsupported" a DICOM file whose transfer syntax we do not decode (no .f32): the Rust error must
                name it (transfer_syntax_uid / transfer_syntax_name).
  "pillow"      np.asarray(Image.open(p).convert("RGB")) / 255, for the real fundus photographs
                that ship inside the scikit-image wheel (skimage/data/). scikit-image is located,
                never imported, so `pip install --no-deps scikit-image` is enough; without it the
                pillow cases are listed under "skipped" in index.json.
Needs numpy, pydicom, pydicom-data, pillow. No network: pydicom-data resolves the files locally.
"""
import hashlib
import importlib.util
import json
import os
import sys

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICOM_CASES = [
    "RG1_UNCR.dcm",  # real PA chest radiograph, MONOCHROME1, window
    "RG3_UNCR.dcm",  # MONOCHROME1, BS 10, window
    "693_UNCR.dcm",  # signed BS 14, rescale + window
    "MR2_UNCR.dcm",  # BS 12, fractional rescale + window
    "CT_small.dcm",  # signed, rescale, no window -> minmax
    "MR_small.dcm",  # signed BS 16, window
    "MR_small_RLE.dcm",  # same pixels, RLE Lossless
]
UNSUPPORTED_CASES = ["RG1_J2KR.dcm", "emri_small_jpeg_ls_lossless.dcm"]
PILLOW_CASES = ["retina.jpg", "microaneurysms.png"]  # files in skimage/data/


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def case_name(file_name):
    return os.path.splitext(file_name)[0]


def resolve_dicom(file_name):
    path = get_testdata_file(file_name)
    if path is None:
        sys.exit(f"{file_name}: not found (is pydicom-data installed?)")
    return os.path.abspath(str(path))


def first(value):
    """Index 0 of a multi-valued element, as pydicom's apply_windowing does."""
    if isinstance(value, pydicom.multival.MultiValue):
        return float(value[0])
    return float(value)


def dicom_case(file_name, out_dir):
    path = resolve_dicom(file_name)
    ds = pydicom.dcmread(path)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        sys.exit(f"{file_name}: multi-frame files are not reference cases")
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        sys.exit(f"{file_name}: LUT sequences are not covered by this reference")
    pi = str(ds.PhotometricInterpretation).strip()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        sys.exit(f"{file_name}: {pi} is not monochrome")

    modality = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    v = np.asarray(apply_voi_lut(modality, ds), dtype=np.float64)
    has_rescale = ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None
    entry = {}
    if "WindowCenter" in ds and "WindowWidth" in ds:
        bs = int(ds.BitsStored)
        if int(ds.PixelRepresentation) == 0:
            y_min, y_max = 0.0, float(2**bs - 1)
        else:
            y_min, y_max = float(-(2 ** (bs - 1))), float(2 ** (bs - 1) - 1)
        if has_rescale:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
        n = (v - y_min) / (y_max - y_min)
        entry.update(
            rule="window",
            window={
                "center": first(ds.WindowCenter),
                "width": first(ds.WindowWidth),
                "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper(),
            },
            y_min=y_min,
            y_max=y_max,
        )
    else:
        lo, hi = float(v.min()), float(v.max())
        n = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
        entry.update(rule="minmax", window=None, y_min=lo, y_max=hi)
    if pi == "MONOCHROME1":
        n = 1.0 - n

    name = case_name(file_name)
    write_f32(out_dir, name, n)
    ts = ds.file_meta.TransferSyntaxUID
    return {
        "name": name,
        "kind": "dicom",
        "source_path": path,
        "source_sha256": sha256_file(path),
        "shape": list(n.shape),
        "transfer_syntax_uid": str(ts),
        "transfer_syntax_name": ts.name,
        "photometric_interpretation": pi,
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "rescale": {"slope": float(ds.RescaleSlope), "intercept": float(ds.RescaleIntercept)} if has_rescale else None,
        "inverted": pi == "MONOCHROME1",
        **entry,
    }


def unsupported_case(file_name):
    path = resolve_dicom(file_name)
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return {
        "name": case_name(file_name),
        "kind": "unsupported",
        "source_path": path,
        "source_sha256": sha256_file(path),
        "shape": None,
        "transfer_syntax_uid": str(ts),
        "transfer_syntax_name": ts.name,
    }


def skimage_data_dir():
    """skimage/data inside the installed package, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def pillow_case(path, out_dir):
    path = os.path.abspath(path)
    with Image.open(path) as im:
        source_mode = im.mode
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255)
    name = case_name(os.path.basename(path))
    write_f32(out_dir, name, arr)
    return {
        "name": name,
        "kind": "pillow",
        "source_path": path,
        "source_sha256": sha256_file(path),
        "shape": list(arr.shape),
        "source_mode": source_mode,
    }


def write_f32(out_dir, name, arr):
    np.ascontiguousarray(arr, dtype="<f4").tofile(os.path.join(out_dir, f"{name}.f32"))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: decode_reference.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    cases = [dicom_case(f, out_dir) for f in DICOM_CASES]
    cases += [unsupported_case(f) for f in UNSUPPORTED_CASES]
    skipped = []
    data_dir = skimage_data_dir()
    for f in PILLOW_CASES:
        p = os.path.join(data_dir, f) if data_dir else None
        if p and os.path.isfile(p):
            cases.append(pillow_case(p, out_dir))
        else:
            skipped.append({"name": case_name(f), "reason": "scikit-image (its wheel ships the file) is not installed"})
    index = {
        "versions": {"pydicom": pydicom.__version__, "pillow": Image.__version__, "numpy": np.__version__},
        "cases": cases,
        "skipped": skipped,
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({"cases": len(cases), "skipped": [s["name"] for s in skipped]}))


if __name__ == "__main__":
    main()
