"""Vision-language models (task "vlm", edgekit.arch.VLM_FAMILIES): image+caption data, modality-aware pruning of
both towers, export of the vision tower + projector (ONNX Runtime) and of the language model (the decoder
exporters)."""
