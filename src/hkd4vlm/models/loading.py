"""Loading any VLM that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load: from a local folder, a
shipped base (``zoo:NAME``) or a Hugging Face Hub id (``org/name[@revision]``, models.hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

#: files any one of which holds a tokenizer that loads without extra packages or conversion
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    lora: dict | None = None,
    freeze_vision: bool = False,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> tuple[Any, Any]:
    """(model, processor) from a local checkpoint directory, a shipped base by name (``zoo:tiny-llava-l``,
    checked against its manifest; stored in half precision, loaded as float32 unless ``dtype`` says
    otherwise), or a Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``, ``org/name@revision``; ``revision`` overrides
    the ``@``), fetched into the Hub cache unless ``local_files_only`` (default: ``HF_HUB_OFFLINE``) keeps
    it to what is cached; see :func:`resolve_model`. Safetensors only.

    ``lora``: keyword arguments of ``peft.LoraConfig`` (e.g. ``{"r": 8, "target_modules": "all-linear"}``).
    ``freeze_vision``: no gradient for the vision tower.

    A folder that is missing, lacks its config, weights or tokenizer, holds a corrupt one, or whose weights
    are not all finite raises :class:`~hkd4vlm.errors.ModelError` naming the folder and the file.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .scoring import READOUT_KEY, VERDICT_KEY, check_readout
    from .zoo import is_zoo

    check_device(device)

    if is_zoo(path) and dtype == "auto":
        dtype = "float32"
    torch_dtype = parse_dtype(dtype)
    path = resolve_model(path, revision=revision, local_files_only=local_files_only)
    check_model_dir(path)
    model: Any  # a transformers model, or the peft model that wraps it (lora)
    info: dict
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(  # type: ignore[misc]
            path,
            dtype=torch_dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by check_loading_info, naming the weights
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(
            f"{path}: the model cannot be loaded from its config.json and *.safetensors "
            f"({type(e).__name__}: {str(e)[:400]})"
        ) from e
    except Exception as e:  # safetensors' own error type (a truncated or corrupt file) is not an OSError
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"{path}: a *.safetensors file is corrupt or truncated ({e})") from e
    check_loading_info(path, info)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path}: the processor (tokenizer and image processor) cannot be loaded "
            f"({type(e).__name__}: {str(e)[:400]})"
        ) from e
    bad = nonfinite_parameters(model)
    if bad:
        raise ModelError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); refusing to use the model (was it trained with a "
            "learning rate that diverged?)"
        )
    if any(getattr(model.config, key, None) is not None for key in (READOUT_KEY, VERDICT_KEY)):
        try:  # a readout the config names must work with this tokenizer, before any record is scored
            check_readout(model, processor)
        except ValueError as e:
            raise ModelError(f"{path / 'config.json'}: {e}") from None
    if device and not device_map:
        model.to(device)
    if freeze_vision:
        freeze_vision_tower(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**lora))
    return model, processor


def resolve_model(ref: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The local folder a model reference names: ``zoo:NAME`` is the zoo's folder (zoo.ZooError for an unknown
    name, or files that do not match the manifest); a local path is itself; anything else that reads as a Hub
    id is its snapshot in the Hub cache (models.hub.hub_snapshot: downloaded unless offline, ModelError naming
    the id and how to download it). A path that is neither is returned as is (check_model_dir names it)."""
    from .hub import hub_snapshot, is_hub_id
    from .zoo import is_zoo, resolve

    if is_zoo(ref):
        return resolve(ref)
    if is_hub_id(ref):
        return hub_snapshot(ref, revision=revision, local_files_only=local_files_only)
    return Path(ref)


#: the dtypes a model may be loaded in, by name ("auto": as saved)
DTYPES = ("auto", "float32", "float16", "bfloat16")


def parse_dtype(dtype):
    """``"auto"``, a torch dtype, or the torch dtype of one of :data:`DTYPES`; ModelError for anything else."""
    import torch

    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def check_device(device: str | None) -> None:
    """ModelError for a device this torch build cannot use (an unknown name, CUDA on a CPU-only build, a GPU
    index that is not there), before the model is loaded."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"device {device!r}: not a device name (cpu, cuda, cuda:N, mps) ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r}: this torch build has no CUDA device available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device {device!r}: use cpu, cuda, cuda:N or mps")


def check_loading_info(path: Path, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its config: a missing weight would be left randomly
    initialised (and the model would still answer), an unexpected one ignored."""
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of the wrong shape"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    if problems:
        raise ModelError(
            f"{path}: the *.safetensors weights do not match config.json: weight tensor(s) "
            + "; ".join(problems)
            + "; save the model again from the run that trained it"
        )


def check_model_dir(path: Path) -> None:
    """Refuse a folder that cannot be a model before transformers tries (its messages point elsewhere, e.g.
    at installing sentencepiece when tokenizer.json is missing)."""
    if not path.is_dir():
        raise ModelError(
            f"model directory {path} does not exist; models load from local folders, zoo:NAME or a Hub id (org/name)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} is not a model directory (no config.json)")
    for f in sorted(path.glob("*.json")):  # config, tokenizer, processor: transformers' messages name none of them
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            what = "empty" if f.stat().st_size == 0 else f"not valid JSON ({e})"
            raise ModelError(f"{f}: {what}; copy it again from the folder the model was saved from") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{path}: no *.safetensors weights (models load from safetensors only)")
    from safetensors import safe_open

    for f in weights:  # reads the header only; a truncated or foreign file names itself here
        try:
            with safe_open(f, framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error type (not an OSError) for a bad header
            raise ModelError(f"{f}: not a readable safetensors file, corrupt or truncated ({e})") from None
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{path}: no tokenizer file (tokenizer.json is missing); copy it from the folder the model was saved from"
        )


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters that hold a NaN or an infinite value (buffers may hold -inf by design, e.g. masks)."""
    import torch

    return [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def vision_tower(model):
    """The image encoder of a VLM: ``model.model.vision_tower`` (LLaVA), ``model.model.vision_model``
    (Idefics3 / SmolVLM), ``model.model.visual`` (Qwen2-VL / Qwen2.5-VL), ...

    Found through transformers' own lookup (``get_encoder(modality="image")``), which knows the names
    that families use for it.
    """
    tower = model.get_encoder(modality="image")
    # the lookup falls back to the model itself (or its base model) when it finds no image encoder
    if tower is model or tower is model.base_model:
        raise ValueError(
            f"{type(model).__name__} has no image encoder under a known name (vision_tower, visual, vision_model, "
            "vision_encoder, image_tower); train it without freeze_vision, or freeze its encoder by hand"
        )
    return tower


def freeze_vision_tower(model):
    """Turn off gradients for every parameter of the model's image encoder; returns the encoder."""
    tower = vision_tower(model)
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def special_tokens(processor) -> frozenset[str]:
    """The strings a model's tokenizer reads as control rather than text: its special tokens (bos, eos,
    pad, ...), the added tokens marked special (image and chat-template markers) and the processor's own
    markers (``image_token``, ``video_token``, ...). Text holding one is refused (data.text_checks)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    found |= {
        t.content
        for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
        if getattr(t, "special", False)
    }
    for owner in (processor, tokenizer):
        for name in (
            "image_token",
            "video_token",
            "boi_token",
            "eoi_token",
            "fake_image_token",
            "global_image_token",
            "end_of_utterance_token",
        ):
            value = getattr(owner, name, None)
            if isinstance(value, str):
                found.add(value)
    return frozenset(t for t in found if t and t.strip())
