"""``finsynth export``: the tuned model as files people run, each folder with a model card.

- ``adapter``: the PEFT adapter (``adapter_model.safetensors`` + config + tokenizer) copied out of the
  train stage's folder (which is left untouched: its manifest lists its files) with a ``README.md``.
- ``merged``: the adapter merged onto the base loaded *without* quantization (a QLoRA adapter is merged
  onto the dequantised base, as :func:`training.train.merge_adapter` does), saved as safetensors with
  the tokenizer and its chat template: ``AutoModelForCausalLM.from_pretrained(folder)`` loads it, no PEFT.
- ``gguf``: the merged model converted by llama.cpp's own ``convert_hf_to_gguf.py`` (with the ``gguf``
  package from the same sources), taken from the llama.cpp tree inside the llama-cpp-python sdist
  (:func:`llama_cpp_sources`), to ``q8_0`` (default), ``f16``, ``bf16`` or ``f32``; plus an Ollama
  ``Modelfile`` with the model's chat template, stop token and system prompt.

Default output: ``<models_dir>/exports/<train.run_name>/<format>/``. Weights are read and written as
safetensors only; ``trust_remote_code`` is the config's (off by default).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import atomic_write_text, read_json, read_manifest
from datagen.manifest import TrainManifest
from datagen.llm.llamacpp_server import extract_llama_cpp, find_sdist
from lm.packaged import model_cache_dir
from datagen.prompts import load_prompt

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged", "gguf")
GGUF_TYPES = ("q8_0", "f16", "bf16", "f32")
SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # the version whose converter was measured (docs/export.md)
# what the converter needs from the llama.cpp tree inside the sdist
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# files of an adapter folder that belong in the exported adapter
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "loss.png")


_KIND_NAMES = {"adapter": "LoRA adapter", "merged": "merged model", "gguf": "GGUF"}


class ExportError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- llama.cpp's converter
def _sdist_version() -> str:
    try:
        return importlib.metadata.version(SDIST)
    except importlib.metadata.PackageNotFoundError:
        return SDIST_VERSION


def llama_cpp_sources(version: str | None = None, cache: Path | None = None) -> Path:
    """The llama.cpp folder (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) from the
    llama-cpp-python sdist of ``version`` (default: the installed llama-cpp-python, else 0.3.36),
    extracted once under the model cache. The sdist is ``$FINSYNTH_LLAMA_CPP_SDIST`` when set, else a
    ``*.tar.gz`` of that version already in ``<cache>/sdist/``, else fetched with
    ``pip download --no-binary :all: --no-deps llama-cpp-python==<version>``."""
    version = version or _sdist_version()
    cache = cache or model_cache_dir()
    target = cache / f"llama.cpp-{version}"
    if (target / ".complete").exists():
        return target
    try:
        sdist = find_sdist(version, cache)
    except RuntimeError as e:
        raise ExportError(str(e)) from None
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    extract_llama_cpp(sdist, tmp, keep=lambda rel: any(rel == p or (p.endswith("/") and rel.startswith(p))
                                                       for p in _MEMBERS))
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    (tmp / ".complete").write_text(f"{sdist.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def convert_to_gguf(merged_dir: Path, outfile: Path, outtype: str = "q8_0", sources: Path | None = None) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on a Hugging Face model folder."""
    if outtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {outtype!r} not one of {', '.join(GGUF_TYPES)}")
    sources = sources or llama_cpp_sources()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(outfile.name + ".partial")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py next to it
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    r = subprocess.run([sys.executable, str(sources / "convert_hf_to_gguf.py"), str(merged_dir),
                        "--outfile", str(tmp), "--outtype", outtype], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise ExportError(f"convert_hf_to_gguf.py failed ({r.returncode}) on {merged_dir}:\n{tail}")
    os.replace(tmp, outfile)
    return outfile


# ----------------------------------------------------------------------------- Ollama
def _strip_generation_markers(template: str) -> str:
    """TRL's ``{% generation %}`` markers are a transformers extension; llama.cpp's Jinja does not know them."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def template_family(chat_template: str | None) -> str | None:
    """Which turn format a Jinja chat template renders: ``gemma``, ``llama3``, ``chatml`` or None."""
    t = chat_template or ""
    if "<start_of_turn>" in t:
        return "gemma"
    if "<|start_header_id|>" in t:
        return "llama3"
    if "<|im_start|>" in t:
        return "chatml"
    return None


# Ollama (Go text/template) equivalents of the Jinja templates; a system message is folded into the
# first user turn for Gemma, as prompts/gemma_chat.jinja does
OLLAMA_TEMPLATES = {
    "gemma": (
        '{{- $system := .System }}\n'
        '{{- range $i, $m := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '{{- if eq $m.Role "system" }}{{ $system = $m.Content }}\n'
        '{{- else if eq $m.Role "user" }}<start_of_turn>user\n'
        '{{ if $system }}{{ $system }}\n\n{{ end }}{{ $m.Content }}<end_of_turn>\n'
        '{{ $system = "" }}\n'
        '{{- if $last }}<start_of_turn>model\n{{ end }}\n'
        '{{- else if eq $m.Role "assistant" }}<start_of_turn>model\n'
        '{{ $m.Content }}{{ if not $last }}<end_of_turn>\n{{ end }}\n'
        '{{- end }}\n'
        '{{- end }}'),
    "llama3": (
        '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}\n'
        '{{- range $i, $m := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>\n'
        '{{- if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n'
        '{{- end }}'),
    "chatml": (
        '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n'
        '{{- range $i, $m := .Messages }}\n'
        '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
        '<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n'
        '{{- if and $last (ne $m.Role "assistant") }}\n<|im_start|>assistant\n{{ end }}\n'
        '{{- end }}'),
}
STOP_TOKENS = {"gemma": ["<end_of_turn>"], "llama3": ["<|eot_id|>"], "chatml": ["<|im_end|>"]}


def modelfile(gguf_name: str, chat_template: str | None, system_prompt: str | None = None,
              num_ctx: int | None = None) -> str:
    """An Ollama ``Modelfile`` for the GGUF beside it: FROM, the chat template in Ollama's syntax, the stop
    token, the system prompt the model was trained with, greedy decoding."""
    family = template_family(chat_template)
    lines = ["# Ollama Modelfile: ollama create finsynth -f Modelfile && ollama run finsynth",
             f"FROM ./{gguf_name}"]
    if family:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[family]}"""')
        lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS[family]]
    else:
        lines.insert(1, "# the chat template is not gemma / llama3 / chatml: Ollama reads the one inside the GGUF")
    if system_prompt:
        lines.append('SYSTEM """' + system_prompt.strip().replace('"""', "'''") + '"""')
    lines.append("PARAMETER temperature 0")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the exports
def default_out(cfg: Config, fmt: str) -> Path:
    return cfg.paths.models_dir / "exports" / cfg.train.run_name / fmt


def adapter_dir(cfg: Config) -> Path:
    """The train stage's adapter folder, finished (its manifest written)."""
    from training.train import STAGE as TRAIN

    d = TRAIN.output(cfg)
    if not (d / "adapter_config.json").exists() or read_manifest(d) is None:
        raise FileNotFoundError(f"no finished adapter in {d}; run `finsynth train` (or `finsynth run`) first")
    return d


def _report(cfg: Config) -> dict[str, Any] | None:
    from training.evaluate import STAGE as EVALUATE

    p = EVALUATE.output(cfg) / "report.json"
    return read_json(p) if p.exists() else None


def write_model_card(cfg: Config, folder: Path, kind: str, adapter: Path, usage: str) -> Path:
    from training.model_card import build_model_card
    from training.report import table_rows

    report = _report(cfg)
    rows = None
    if report is not None:
        try:
            rows = table_rows(report)
        except (KeyError, TypeError, ValueError) as e:  # a report of another shape: say so, do not guess
            log.warning("evaluation report not readable for the model card: %s", e)
    from datagen.dataset.chat_format import STAGE as FORMAT

    card_path = FORMAT.output(cfg) / "README.md"
    dataset_card = os.path.relpath(card_path, folder) if card_path.exists() else None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    text = build_model_card(
        title=f"{cfg.card.dataset_name}: {cfg.train.run_name} ({_KIND_NAMES[kind]})", kind=kind,
        name_or_path=cfg.model.name_or_path, license=cfg.card.license,
        train_manifest=read_manifest(adapter, TrainManifest) or TrainManifest(config_hash=""),
        report=report, table_rows=rows, dataset_card=dataset_card, dataset_name=cfg.card.dataset_name,
        files=files + ["README.md"], usage=usage)
    atomic_write_text(folder / "README.md", text)
    return folder / "README.md"


def _replace_dir(tmp: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def export_adapter(cfg: Config, out: Path | None = None) -> Path:
    src = adapter_dir(cfg)
    out = out or default_out(cfg, "adapter")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\n"
             f"base = AutoModelForCausalLM.from_pretrained(\"{_base_ref(cfg)}\")\n"
             "model = PeftModel.from_pretrained(base, \"<this folder>\")\n"
             "tok = AutoTokenizer.from_pretrained(\"<this folder>\")  # carries the chat template\n```")
    write_model_card(cfg, tmp, "adapter", src, usage)
    return _replace_dir(tmp, out)


def _base_ref(cfg: Config) -> str:
    from training.model_card import _hub_base_model

    return _hub_base_model(cfg.model.name_or_path, None) or cfg.model.name_or_path


def export_merged(cfg: Config, out: Path | None = None) -> Path:
    from training.train import merge_adapter

    src = adapter_dir(cfg)
    out = out or default_out(cfg, "merged")
    tmp = out.with_name(out.name + ".merging")
    merge_adapter(cfg, src, tmp, device="cpu")  # writes tmp atomically (via tmp.partial)
    cfg_json = tmp / "config.json"
    c = read_json(cfg_json)
    if "quantization_config" in c:  # merged onto an unquantized base: the weights are plain
        del c["quantization_config"]
        atomic_write_text(cfg_json, json.dumps(c, indent=2) + "\n")
    usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")  # no PEFT needed\n"
             "tok = AutoTokenizer.from_pretrained(\"<this folder>\")\n"
             "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"...\"}], add_generation_prompt=True,"
             " return_tensors=\"pt\", return_dict=True)\n"
             "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))\n```")
    write_model_card(cfg, tmp, "merged", src, usage)
    return _replace_dir(tmp, out)


def export_gguf(cfg: Config, out: Path | None = None, outtype: str = "q8_0") -> Path:
    """Merge, convert to GGUF ``outtype``, write the Modelfile and the card; returns the GGUF file."""
    src = adapter_dir(cfg)
    out = out or default_out(cfg, "gguf")
    sources = llama_cpp_sources()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged = export_merged(cfg, tmp / "_merged")
    template = (merged / "chat_template.jinja")
    tok_cfg = read_json(merged / "tokenizer_config.json")
    chat_template = template.read_text(encoding="utf-8") if template.exists() else tok_cfg.get("chat_template")
    if isinstance(chat_template, str):  # the GGUF carries a template llama.cpp's Jinja can parse
        plain = _strip_generation_markers(chat_template)
        if template.exists():
            template.write_text(plain, encoding="utf-8")
        else:
            tok_cfg["chat_template"] = plain
            atomic_write_text(merged / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    name = f"{cfg.train.run_name}-{outtype}.gguf"
    convert_to_gguf(merged, tmp / name, outtype, sources)
    shutil.rmtree(merged)
    system = load_prompt(cfg.format.system_prompt).text if cfg.format.system_prompt else None
    atomic_write_text(tmp / "Modelfile", modelfile(name, chat_template, system, num_ctx=cfg.train.max_length))
    usage = ("```bash\n"
             f"ollama create finsynth -f Modelfile && ollama run finsynth\n"
             f"# or llama.cpp: llama-server -m {name} --port 8080\n"
             f"# or llama-cpp-python: python -m llama_cpp.server --model {name} --chat_format "
             f"{template_family(chat_template) or 'chatml'}\n```")
    write_model_card(cfg, tmp, "gguf", src, usage)
    _replace_dir(tmp, out)
    return out / name


def export(cfg: Config, fmt: str, out: Path | None = None, outtype: str = "q8_0") -> dict[str, Any]:
    """One export; returns what was written (path, size, seconds) for the CLI to print."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} not one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    if fmt == "adapter":
        path = export_adapter(cfg, out)
    elif fmt == "merged":
        path = export_merged(cfg, out)
    else:
        path = export_gguf(cfg, out, outtype)
    folder = path if path.is_dir() else path.parent
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"format": fmt if fmt != "gguf" else f"gguf ({outtype})", "path": str(path), "folder": str(folder),
            "bytes": size, "model_card": str(folder / "README.md"), "seconds": round(time.perf_counter() - t0, 1)}
