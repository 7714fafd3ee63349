"""scikit-learn's numbers for the cases in a JSON file (argv[1]); prints JSON.

Used by crates/msmae-eval/tests/sklearn.rs as the independent reference for
msmae_eval::metrics. Each case is either
  {"kind": "single", "y": [class...], "probs": [[p_0..p_{n-1}]...]}
  {"kind": "multi", "Y": [[0/1...]...], "S": [[score...]...], "threshold": t}
"""

import json
import sys

import numpy as np
import sklearn
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)


def binary_auc(t, s):
    """roc_auc_score, or None where scikit-learn refuses (one class only)."""
    if len(np.unique(t)) < 2:
        return None
    return float(roc_auc_score(t, s))


def curve(t, s):
    if len(np.unique(t)) < 2:
        return []
    fpr, tpr, _ = roc_curve(t, s, drop_intermediate=False)
    return [[float(a), float(b)] for a, b in zip(fpr, tpr)]


def single(case):
    y = np.asarray(case["y"], dtype=np.int64)
    probs = np.asarray(case["probs"], dtype=np.float64)
    n = probs.shape[1]
    pred = probs.argmax(axis=1)
    p, r, f, sup = precision_recall_fscore_support(y, pred, labels=list(range(n)), zero_division=0)
    per_class_auc = [binary_auc((y == k).astype(int), probs[:, k]) for k in range(n)]
    present = np.unique(y)
    if len(present) == n and n > 2:
        # scikit-learn's own multi-class call (it raises when a class is absent from y).
        macro_auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    elif len(present) == n == 2:
        # Binary: scikit-learn takes the positive class's column; with rows summing to 1
        # both one-vs-rest AUCs equal it.
        macro_auc = float(roc_auc_score(y, probs[:, 1]))
    else:
        # msmae skips classes absent from y_true and averages the rest.
        defined = [a for a in per_class_auc if a is not None]
        macro_auc = float(np.mean(defined)) if defined else None
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "precision": p.tolist(),
        "recall": r.tolist(),
        "f1": f.tolist(),
        "support": sup.tolist(),
        "confusion": confusion_matrix(y, pred, labels=list(range(n))).tolist(),
        "per_class_auc": per_class_auc,
        "macro_auc": macro_auc,
        "roc_curves": [curve((y == k).astype(int), probs[:, k]) for k in range(n)],
    }


def multi(case):
    Y = np.asarray(case["Y"], dtype=np.int64)
    S = np.asarray(case["S"], dtype=np.float64)
    pred = (S >= case["threshold"]).astype(np.int64)
    p, r, f, sup = precision_recall_fscore_support(Y, pred, zero_division=0)
    per_label = [binary_auc(Y[:, j], S[:, j]) for j in range(Y.shape[1])]
    defined = [a for a in per_label if a is not None]
    if len(defined) == Y.shape[1]:
        mean_auc = float(roc_auc_score(Y, S, average="macro"))
    else:
        mean_auc = float(np.mean(defined)) if defined else None
    return {
        "per_label_auc": per_label,
        "mean_auc": mean_auc,
        "macro_f1": float(f1_score(Y, pred, average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(Y, pred)),
        "precision": p.tolist(),
        "recall": r.tolist(),
        "f1": f.tolist(),
        "support": sup.tolist(),
    }


def main():
    with open(sys.argv[1]) as fh:
        cases = json.load(fh)
    out = [single(c) if c["kind"] == "single" else multi(c) for c in cases]
    json.dump({"sklearn": sklearn.__version__, "results": out}, sys.stdout)


if __name__ == "__main__":
    main()
