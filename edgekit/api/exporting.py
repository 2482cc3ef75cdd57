"""edgekit.export(): convert a model for one runtime and gate it against PyTorch. `edgekit export` is argparse
around this function."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.api.common import api_function, as_path, console
from edgekit.api.results import ExportResult

if TYPE_CHECKING:
    from edgekit.target import Target


def _check_gptq(cfg) -> None:
    """An explicit gptq=True is for GGUF only: ExecuTorch 8da4w is GPTQ-calibrated already, ONNX Runtime int4 is HQQ
    (None, the default, applies it to GGUF's 4/5-bit wherever an importance matrix is computed)."""
    from edgekit.errors import EdgekitError
    from edgekit.exporters.gguf import IMATRIX

    if cfg.backend != "gguf" or cfg.precision not in IMATRIX:
        raise EdgekitError(f"--gptq re-rounds GGUF's 4- and 5-bit blocks, not {cfg.backend} {cfg.precision}",
                           f"use -b gguf with -p {' / '.join(sorted(IMATRIX))}, or drop --gptq "
                           "(ExecuTorch 8da4w is GPTQ-calibrated already)")
    if not cfg.calibrate:
        raise EdgekitError("--gptq rounds on the blocks the importance matrix chose, which --no-calibrate turns off",
                           "drop one of --gptq / --no-calibrate")


@api_function("export")
def export(model: str | Path | None = None, *, backend: str, out: str | Path, precision: str | None = None,
           context: int | None = None, target: str | Path | Target | None = None, group_size: int | None = None,
           calibrate: bool = True, gptq: bool | None = None, calibration: str | Path | None = None,
           accept_gate_failure: bool = False, kv_cache: str | None = None,
           force: bool = False, threads: int | None = None, verbose: bool = False) -> ExportResult:
    """Write one artifact folder `out` for `backend` (onnxruntime, gguf, executorch, tensorrt) from `model` (a
    Hugging Face folder or .gguf; None: the embedded SmolLM2-135M), gated against PyTorch on held-out text.

    The keywords are `edgekit export`'s flags; `precision` takes any case and the aliases (f32, F16, Q4_K_M;
    default: the backend's most faithful). Returns an ExportResult. Raises EdgekitError, GateFailed when the gate
    fails and accept_gate_failure is False (the artifact is then kept in a rejected/ folder beside `out`)."""
    from edgekit.export import ExportConfig, export_model, model_context
    from edgekit.fsutil import check_output
    from edgekit.models import resolve_model
    from edgekit.runtime.base import ARTIFACT_FILE
    from edgekit.target import Target, get_target

    out, calibration = as_path(out), as_path(calibration)
    with console(verbose) as log:
        ref = resolve_model(None if model is None else str(model))
        model_context(ref.config, context)  # a context beyond the model: refused before anything is read or written
        check_output(out, [ref.path], ARTIFACT_FILE, force)
        if calibration is not None and not calibration.exists():
            from edgekit.errors import EdgekitError

            raise EdgekitError(f"calibration text not found: {calibration}",
                               "pass a .txt or .jsonl file or a folder of them to --calibration")
        if target is not None and not isinstance(target, Target):
            target = get_target(str(target))
        cfg = ExportConfig(backend=backend, precision=precision, context_length=context,
                           accept_gate_failure=accept_gate_failure, group_size=group_size, calibrate=calibrate,
                           gptq=gptq, calibration=calibration, target=target, threads=threads,
                           kv_cache=kv_cache)
        if gptq:
            _check_gptq(cfg.resolved())
        meta = export_model(ref.path, out, cfg, log=log)  # resolves after a QAT folder's scheme fills precision
    return ExportResult.from_meta(out, meta)
