"""A real reward-model checkpoint built locally: the embedded model with a seeded score head.

``prepare_seeded_reward_model()`` writes a sequence-classification checkpoint
(``Gemma3ForSequenceClassification``, ``num_labels=1``) made of the embedded Gemma 3 270M's
weights and a linear score head drawn from a seeded normal distribution. vLLM serves it on
its pooling runner (in-process ``vllm.LLM(runner="pooling")`` or ``vllm serve --runner
pooling``, ``/classify``): the reward of a text is ``score.weight @ h_last``, the final
(normed) hidden state of its last token. It exists so the reward-model judge mode can be
tested end to end on CPU with a real checkpoint and a real pooling engine. Its rewards are
**not** a measure of quality: the head is random.

Nothing is downloaded and no weights are copied: the folder links the embedded model's
``model.safetensors`` and adds ``score.safetensors`` (one 640-float row) with a
``model.safetensors.index.json`` naming both (vLLM loads both; transformers 5.19's
``AutoModelForSequenceClassification`` left ``score.weight`` uninitialised here, so the
tests compute their reference from the base model's hidden state and this head). The
folder is written to a staging sibling and renamed into place (an interrupted build never
leaves a folder that looks complete).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefcurate.inference.models import cache_dir, resolve_model_path

SEEDED_REWARD_NAME = "gemma3-270m-seeded-reward"
#: vLLM maps ``<Base>ForSequenceClassification`` onto ``<Base>ForCausalLM`` plus a score head
REWARD_ARCHITECTURE = "Gemma3ForSequenceClassification"
_MARKER = "prefcurate-seeded-reward.json"
_LINKED = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def seeded_reward_model_dir(seed: int = 0) -> Path:
    return cache_dir() / "models" / f"{SEEDED_REWARD_NAME}-s{seed}"


def prepare_seeded_reward_model(seed: int = 0, base: str = "default", scale: float = 1.0) -> Path:
    """The seeded reward checkpoint's folder, built on first use (a second, cheap); idempotent.

    ``scale``: the head's weights are ``N(0, scale / sqrt(hidden))`` (seeded), so rewards of
    different texts spread by about ``scale``.
    """
    target = seeded_reward_model_dir(seed)
    marker = {"seed": seed, "scale": scale, "base": str(Path(resolve_model_path(base)).resolve())}
    if (target / _MARKER).exists() and json.loads((target / _MARKER).read_text()) == marker:
        return target

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    source = Path(marker["base"])
    config = json.loads((source / "config.json").read_text())
    hidden = int(config["hidden_size"])
    config.update({
        "architectures": [REWARD_ARCHITECTURE],
        "num_labels": 1,
        "id2label": {"0": "reward"},
        "label2id": {"reward": 0},
        "problem_type": "regression",
    })  # fmt: skip
    head = np.random.default_rng(seed).normal(0.0, scale / np.sqrt(hidden), size=(1, hidden))

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in _LINKED:
        if (source / name).exists():
            os.symlink(source / name, staging / name)
    save_file({"score.weight": head.astype(np.float32)}, staging / "score.safetensors")
    with safe_open(str(source / "model.safetensors"), "np") as weights:
        weight_map = dict.fromkeys(weights.keys(), "model.safetensors")
    weight_map["score.weight"] = "score.safetensors"
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / _MARKER).write_text(json.dumps(marker))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
