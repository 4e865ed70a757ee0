"""Export: merged Hugging Face safetensors (transformers, vLLM), PEFT adapters, GGUF (llama.cpp, Ollama).

    python -m jaxtune.export --run RUN_DIR [--step N] --out OUT --format merged|adapter|gguf [--dtype ...]

From Python: `export_merged(model, source_dir, out_dir)`, `export_adapter(model, out_dir, base)`,
`export_gguf(model, source_dir, out_path)`, `export_gguf_dir(model, source_dir, out_dir)`,
`export_run(run_dir, out_dir, format)`. Never imports torch. Names are imported on first use, so
`--help` answers without loading jax. Every directory export appears only once complete and
checked, and replaces an earlier one only then (export/staging.py).
"""

import importlib

_API = {
  "ExportError": "jaxtune.export.files",
  "export_merged": "jaxtune.export.merged",
  "export_adapter": "jaxtune.export.adapter",
  "export_gguf": "jaxtune.export.gguf",
  "export_gguf_dir": "jaxtune.export.gguf",
  "export_run": "jaxtune.export.run",
  "load_run": "jaxtune.export.run",
}
__all__ = list(_API)


def __getattr__(name: str):
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f"module 'jaxtune.export' has no attribute {name!r}")
