"""Export an image tower (task "vision-encoder") through the vision exporters a backend declares
(exporters/vision.py): pixel_values -> (last_hidden_state, pooler_output), run in the backend's real runtime and
gated against PyTorch on held-out images, every output by cosine per row and max |delta| (edgekit.vlm.export's vision
gate). llama.cpp's mmproj is a VLM projector file, so gguf is not offered for a tower alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

MANIFEST = "vision.json"
BACKENDS = ("onnxruntime", "executorch", "tensorrt")


@dataclass(frozen=True)
class VisionExportConfig:
    backend: str = "onnxruntime"
    precision: str | None = None
    target: Any = None  # edgekit.target.Target (tensorrt)
    gate_images: int = 4
    accept_gate_failure: bool = False

    def resolved(self) -> tuple[str, str]:
        """(backend, precision) from what the backend declares (ExporterSpec.vision_precisions)."""
        from edgekit.exporters import get
        from edgekit.precision import get_precision

        if self.backend not in BACKENDS:
            raise EdgekitError(f"backend {self.backend} has no image-tower exporter",
                               f"pass --backend with one of {', '.join(BACKENDS)}")
        have = get(self.backend).vision_precisions
        p = have[0] if self.precision is None else get_precision(self.precision).name
        if p not in have:
            raise EdgekitError(f"the {self.backend} image tower is built in {', '.join(have)}, not {p}",
                               f"pass --precision {have[0]}")
        return self.backend, p


def export_vision_encoder(model_dir: Path, out: Path, cfg: VisionExportConfig = VisionExportConfig(),
                          log=print) -> dict:
    from edgekit.fsutil import atomic_dir, atomic_write_json
    from edgekit.vision.prune import load_encoder
    from edgekit.vlm.export import export_vision, vision_gate_error

    backend, precision = cfg.resolved()
    model, fam, mcfg = load_encoder(model_dir)
    with atomic_dir(Path(out)) as tmp:
        meta = export_vision(model, fam, mcfg, Path(model_dir), tmp, backend, precision, cfg.gate_images, cfg.target,
                             log=log)
        if not meta["gate"]["passed"] and not cfg.accept_gate_failure:
            raise vision_gate_error(meta)
        manifest = {"task": fam.task, "arch": fam.model_type, "source": str(model_dir),
                    "params": fam.geometry(mcfg).params(), "tokens": fam.geometry(mcfg).tokens,
                    "outputs": list(fam.outputs), **meta}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
