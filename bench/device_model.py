"""A plain HF model dir of the default model, for a machine that cannot download it.

Why: vLLM (and `--model`) need a transformers-format dir, and a lent GPU
machine has no network and takes at most 64 MiB per call, less than the
94 MiB GGUF of SmolLM2-135M-Instruct. So, in order of preference:

1. a GGUF file is given (reassembled from carried parts): dequantized through
   transformers (`gguf_file=`) and saved with `save_pretrained`;
2. the embedded package is installed: the server's own cached conversion;
3. only the architecture is at hand (config + tokenizer, a few MiB): the same
   architecture with seeded random weights. Speed and kernel counts are those of
   the real model; the generated text is noise (checks against PEFT on the same
   weights still compare like with like).

    python -m bench.device_model --dest /tmp/model [--gguf F.gguf] [--arch DIR]

Prints the dir; writes `<dest>/loraplex_source.json` saying which of the three it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from server.model.load import EMBEDDED_MODEL_ID, EMBEDDED_PACKAGE, ensure_embedded_cache
from server.settings import default_cache_dir

SOURCE_FILE = "loraplex_source.json"
ARCH_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def from_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF through transformers and save it as safetensors + tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None  # plain tensors now: transformers refuses to save a GGUF marker
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def from_arch(arch: Path, dest: Path, seed: int = 0) -> None:
    """The architecture in `arch` with seeded random weights (transformers' own initialisation)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch), dtype=torch.float32)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(arch).save_pretrained(dest)


def save_arch(model_dir: Path, dest: Path) -> None:
    """Copy the config and tokenizer files of `model_dir` (what `from_arch` needs) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARCH_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)


def resolve(dest: Path, gguf: Path | None, arch: Path | None) -> tuple[Path, str]:
    """(model dir, source): an earlier conversion in `dest`, else the order in the module docstring
    (a given GGUF first, so a CPU dry run converts exactly what a GPU node would)."""
    if (dest / SOURCE_FILE).is_file():
        return dest, json.loads((dest / SOURCE_FILE).read_text())["source"]
    if gguf is not None and gguf.is_file():
        from_gguf(gguf, dest)
        source = f"{EMBEDDED_MODEL_ID} (converted from {gguf.name})"
    elif importlib.util.find_spec(EMBEDDED_PACKAGE) is not None:
        cache = Path(os.environ.get("LORAPLEX_CACHE_DIR", default_cache_dir()))
        return ensure_embedded_cache(cache), f"{EMBEDDED_MODEL_ID} (embedded package)"
    elif arch is not None and (arch / "config.json").is_file():
        from_arch(arch, dest)
        source = f"{EMBEDDED_MODEL_ID} architecture, random weights (the GGUF did not travel)"
    else:
        raise SystemExit("no model: no --gguf, the embedded package is not installed, and no --arch")
    (dest / SOURCE_FILE).write_text(json.dumps({"source": source}) + "\n")
    return dest, source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_model", description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, required=True, help="dir to write a converted or random model into")
    p.add_argument("--gguf", type=Path, help="the default model's GGUF file")
    p.add_argument("--arch", type=Path, help="dir with its config and tokenizer files")
    p.add_argument("--save-arch", type=Path, help="instead: copy the resolved model's config and tokenizer here")
    a = p.parse_args(argv)
    path, source = resolve(a.dest, a.gguf, a.arch)
    if a.save_arch:
        save_arch(path, a.save_arch)
        path = a.save_arch
    print(json.dumps({"path": str(path), "source": source}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
