"""Checks made before any weights load: the student must be a full-precision model sharing the teacher's vocabulary.

The order prune -> distill -> quantize is the only one edgekit runs: training a quantized model fails (rounded
weights have no useful gradient, and fake-quant rounding error is amplified by every update), so a quantized
artifact is refused here, at the distillation entry point, whatever path it came by."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError

ORDER_REASON = ("quantizing before training destroys trainability (rounded weights get no useful gradient), so "
                "edgekit's order is prune -> distill -> quantize and it never trains a quantized model")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _config(path: Path, role: str) -> dict:
    from edgekit.models import resolve_model

    ref = resolve_model(str(path))  # clear errors for missing folders, non-models, unsupported archs
    return ref.config


QAT_REASON = ("quantization-aware training needs the full-precision weights to fake-quantize and update; a quantized "
              "model has lost them, and " + ORDER_REASON)


def check_trainable(student: Path, qat: bool = False) -> None:
    """Refuse a quantized or exported student, with the reason (QAT's own when `qat`)."""
    student = Path(student)
    if qat:
        try:
            check_trainable(student)
        except EdgekitError as e:
            msg = e.problem.partition("; " + ORDER_REASON)[0]
            raise EdgekitError(f"cannot train {msg.removeprefix('the student ')} with QAT: " + QAT_REASON,
                               "pass the full-precision (pruned or distilled) Hugging Face folder to --student "
                               "and --qat; export quantizes it afterwards") from None
        return
    if student.is_file() and student.suffix == ".gguf":
        raise EdgekitError(f"{student} is a GGUF file: a quantized deployment artifact, not a trainable model; "
                           + ORDER_REASON, "distill the full-precision (pruned) Hugging Face folder, then quantize")
    if (student / "artifact.json").is_file():
        raise EdgekitError(f"{student} is an exported edgekit artifact, not a trainable model; " + ORDER_REASON,
                           "distill the full-precision (pruned) Hugging Face folder the artifact was exported from")
    cfg = _config(student, "student")
    q = cfg.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise EdgekitError(f"the student {student} is quantized (config.json has quantization_config, method "
                           f"{method}); " + ORDER_REASON,
                           "distill the full-precision pruned model and quantize afterwards (edgekit build does this)")
    from safetensors import safe_open

    for f in sorted(student.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                dt = sf.get_slice(name).get_dtype()
                if dt not in FLOAT_DTYPES:
                    raise EdgekitError(f"the student {student} holds {dt} weights ({name} in {f.name}): a quantized "
                                       "artifact; " + ORDER_REASON,
                                       "distill the full-precision pruned model and quantize afterwards")


def _vocab(path: Path) -> dict | None:
    tj = Path(path) / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        model = json.loads(tj.read_text()).get("model", {})
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{tj} is not valid JSON ({e})", "restore the model's tokenizer.json") from e
    return model.get("vocab")


def check_same_vocab(teacher: Path, student: Path) -> None:
    """Logit distillation compares distributions token by token: both models must index the same vocabulary."""
    tc, sc = _config(teacher, "teacher"), _config(student, "student")
    if tc.get("vocab_size") != sc.get("vocab_size"):
        raise EdgekitError(f"the student's vocabulary ({sc.get('vocab_size')} tokens) is not the teacher's "
                           f"({tc.get('vocab_size')}): logits cannot be compared token by token",
                           "distill a student pruned from this teacher (width pruning keeps the vocabulary)")
    tv, sv = _vocab(teacher), _vocab(student)
    if tv is None:
        raise EdgekitError(f"the teacher {teacher} has no tokenizer.json", "pass a model folder with its tokenizer")
    if sv is not None and sv != tv:
        diff = sum(1 for k, v in sv.items() if tv.get(k) != v) + abs(len(sv) - len(tv))
        raise EdgekitError(f"the student's tokenizer differs from the teacher's ({diff} token ids differ): it was not "
                           "derived from this teacher", "distill a student pruned from this teacher, with its tokenizer")
