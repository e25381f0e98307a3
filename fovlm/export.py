"""Export a trained FoveatedVLM to a Hugging Face-style folder, load it back, optionally push it to the Hub.

    fovlm export runs/stage3/checkpoints/last.ckpt exported/fovlm-135m [--results results.json]
                 [--tokenizer DIR] [--push-to-hub user/fovlm-135m [--private]]

The folder holds:

- ``model.safetensors``: every tensor of the model (tied LLM embeddings stored once);
- ``config.json``: the FoveatedVLM hyperparameters plus the full LLM and DINOv2 configs, so the model rebuilds
  offline with no hub access and no training code path (no Lightning, no data pipeline), and the frame settings
  it was trained with (frame size, most frames, image replication: ``data``);
- the tokenizer (with its chat template);
- ``README.md``: a model card generated from the config, with the multiple-choice table when results are given.

Nothing here unpickles arbitrary objects: weights are read from safetensors, and a Lightning checkpoint is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, Dinov2Config, Dinov2Model

from fovlm.model.vlm import FoveatedVLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "fovlm"
FORMAT_VERSION = 1


# How frames reach the model (fovlm.data.frames); exported with the model so inference reads frames the way training
# did. A checkpoint's DataModule hyperparameters supply them; these are the recipe's values otherwise.
DATA_DEFAULTS: dict[str, Any] = {"frame_size": 224, "max_frames": 64, "image_frames": 8}


class ExportError(ValueError):
    """A checkpoint or exported folder that cannot be used; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# writing


def model_config(model: FoveatedVLM) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` without its weights: hyperparameters and both backbone configs."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "query_dim": model.query_dim,
        "visual_scale": model.visual_scale,
        "deep_query": model.encoder.deep_query,
        "llm_config": model.llm.config.to_dict(),
        "vision_config": model.encoder.dino.config.to_dict(),
    }


def export_model(
    model: FoveatedVLM,
    tokenizer,
    out_dir: str | Path,
    results: dict | None = None,
    source: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as an exported folder (see the module docstring); returns the folder.

    Args:
        model: the model to export.
        tokenizer: its tokenizer (saved with the chat template).
        out_dir: target folder (created; existing files of the same names are replaced).
        results: multiple-choice results (:meth:`fovlm.eval.report.MultipleChoiceReport.compute`) for the card.
        source: provenance recorded in the config (checkpoint path, LLM/vision names).
        data: frame settings (``frame_size``, ``max_frames``, ``image_frames``); :data:`DATA_DEFAULTS` fill gaps.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    config["source"] = source or {}
    config["data"] = {**DATA_DEFAULTS, **(data or {})}
    save_model(model, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    tokenizer.save_pretrained(out)
    if results:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / CARD_NAME).write_text(model_card(config, results))
    return out


def model_card(config: dict[str, Any], results: dict | None = None) -> str:
    """A model card (markdown) from an exported config and optional multiple-choice results."""
    from fovlm.eval.report import markdown_table

    llm, vision = config["llm_config"], config["vision_config"]
    lines = [
        "---",
        "library_name: fovlm",
        "pipeline_tag: video-text-to-text",
        "tags: [video, vision-language, foveated, dinov2, smollm2]",
        "---",
        "",
        "# Foveated video vision-language model (fovlm)",
        "",
        "Each frame is encoded once by DINOv2; a learned query travels through every DINO layer as one extra "
        "token and comes out as **one visual token per frame**. The language model reads those tokens before "
        "the text and writes the query for the next frame.",
        "",
        "| part | value |",
        "|---|---|",
        f"| LLM | {llm.get('model_type')} {llm.get('hidden_size')} wide, {llm.get('num_hidden_layers')} layers, "
        f"vocabulary {llm.get('vocab_size')} |",
        f"| vision | DINOv2 {vision.get('hidden_size')} wide, {vision.get('num_hidden_layers')} layers, patch "
        f"{vision.get('patch_size')} |",
        f"| query | {config['query_dim']} wide, {'deep' if config['deep_query'] else 'shallow'} |",
        f"| visual scale | {config['visual_scale']} |",
        "| frames | 1 FPS, at most {max_frames}, {frame_size} px (cover + centre crop); images x{image_frames} |".format(
            **{**DATA_DEFAULTS, **config.get("data", {})}),
        "",
    ]
    source = config.get("source") or {}
    if source:
        lines += ["Exported from: " + ", ".join(f"{k} `{v}`" for k, v in source.items()), ""]
    if results and any(k != "val_loss" for k in results):
        lines += [
            "## Multiple-choice evaluation",
            "",
            "Mean answer-token negative log-likelihood of each lettered option, lowest wins, in three modes "
            "(coarse_only: static query; coarse_fine: two-pass training mode; autoregressive: frame-by-frame "
            "inference). Accuracy in %:",
            "",
            markdown_table(results),
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "from fovlm.eval.predict import answer, load_media",
        "from fovlm.export import load_any",
        "",
        'model, tokenizer, data = load_any("this-folder")  # or FoveatedVLM.from_pretrained("this-folder")',
        'frames, _ = load_media("clip.mp4", max_frames=data["max_frames"], image_frames=data["image_frames"],',
        '                       size=data["frame_size"])',
        'print(answer(model, tokenizer, frames, "What happens in this video?"))',
        "```",
        "",
        "or from the command line: `fovlm predict clip.mp4 --model this-folder --prompt \"What happens?\"`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# loading


def build_from_config(config: dict[str, Any]) -> FoveatedVLM:
    """A FoveatedVLM with random weights and the exported architecture (no download, no weights loaded)."""
    if config.get("format") != FORMAT:
        raise ExportError(f"not a fovlm export config (format {config.get('format')!r})")
    llm_config = config["llm_config"]
    if llm_config.get("model_type") not in CONFIG_MAPPING:
        raise ExportError(f"unknown LLM model_type {llm_config.get('model_type')!r} in the exported config")
    llm_config = CONFIG_MAPPING[llm_config["model_type"]].from_dict(llm_config)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation="sdpa")
    vision = Dinov2Model(Dinov2Config.from_dict(config["vision_config"]))
    return FoveatedVLM(
        vision, llm, query_dim=config["query_dim"], visual_scale=config["visual_scale"],
        deep_query=config["deep_query"],
    )


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> FoveatedVLM:
    """Load an exported folder into a FoveatedVLM in eval mode (strict: every tensor must match)."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise ExportError(f"{needed} does not exist: {folder} is not an exported fovlm folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{config_path} is not valid JSON: {err}") from err
    model = build_from_config(config)
    missing, unexpected = load_model(model, str(weights_path), strict=False)
    # Tied LLM embeddings are stored once; the other name of the same tensor is "missing" by design.
    tied = {name for name in missing if _is_tied_alias(model, name)}
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"{weights_path} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()


def _is_tied_alias(model: torch.nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    return any(other != name and p is params[name] for other, p in params.items())


def load_exported_tokenizer(path: str | Path):
    """The tokenizer saved in an exported folder."""
    from fovlm.model.loading import load_tokenizer

    return load_tokenizer(str(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"checkpoint {path} cannot be read safely (weights_only): {err}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"checkpoint {path} has no state_dict: not a Lightning checkpoint of a FoveatedModule")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> FoveatedVLM:
    """Rebuild the FoveatedVLM of a FoveatedModule checkpoint (:func:`read_checkpoint`) and load its weights."""
    from fovlm.model.loading import build_vlm

    hp = checkpoint.get("hyper_parameters") or {}
    if "llm" not in hp or "vision" not in hp:
        raise ExportError(f"checkpoint {path} has no model hyperparameters (llm, vision)")
    model = build_vlm(
        hp["llm"], hp["vision"], gguf_file=hp.get("gguf_file"), query_dim=hp.get("query_dim", 384),
        visual_scale=hp.get("visual_scale", 0.14), deep_query=hp.get("deep_query", True),
    )
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"checkpoint {path} does not match the model its hyperparameters describe: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def data_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Frame settings of a checkpoint's DataModule (its saved hyperparameters), else :data:`DATA_DEFAULTS`."""
    data_hp = checkpoint.get("datamodule_hyper_parameters") or {}
    return {key: data_hp.get(key, default) for key, default in DATA_DEFAULTS.items()}


def tokenizer_for(checkpoint: dict[str, Any], explicit: str | None = None):
    """The tokenizer of a checkpoint: ``explicit`` if given, else its DataModule's, else its LLM's own (the real
    SmolLM2 one for "tiny"/"smollm2": the tiny LLM is shaped like SmolLM2)."""
    from fovlm.model.loading import SMOLLM2, TINY, load_tokenizer, prepare_smollm2

    if explicit:
        return load_tokenizer(explicit)
    data_hp = checkpoint.get("datamodule_hyper_parameters") or {}
    if data_hp.get("tokenizer"):
        return load_tokenizer(str(data_hp["tokenizer"]), gguf_file=data_hp.get("gguf_file"))
    hp = checkpoint.get("hyper_parameters") or {}
    llm = hp.get("llm", TINY)
    if llm in (TINY, SMOLLM2):
        return load_tokenizer(str(prepare_smollm2()))
    return load_tokenizer(llm, gguf_file=hp.get("gguf_file"))


def load_any(path: str | Path, device: str | torch.device = "cpu", tokenizer: str | None = None):
    """(model, tokenizer, frame settings) from an exported folder or a Lightning checkpoint file."""
    path = Path(path)
    if path.is_dir():
        model = load_pretrained(path, device)
        config = json.loads((path / CONFIG_NAME).read_text())
        return model, load_exported_tokenizer(tokenizer or path), {**DATA_DEFAULTS, **config.get("data", {})}
    checkpoint = read_checkpoint(path)
    return model_from_checkpoint(checkpoint, path).to(device), tokenizer_for(checkpoint, tokenizer), data_settings(
        checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# command line


def push_to_hub(folder: str | Path, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to a Hub model repository (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                             commit_message="Upload fovlm export")
    return str(getattr(info, "commit_url", info))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fovlm export", description="Export a FoveatedModule checkpoint as a Hugging Face-style folder."
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a FoveatedModule")
    parser.add_argument("out_dir", help="folder to write (created)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id (default: the checkpoint's DataModule's)")
    parser.add_argument("--results", help="results.json of `fovlm eval` to put in the model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    if args.push_to_hub is not None and args.push_to_hub.count("/") != 1:
        parser.error(f"--push-to-hub expects a repository id 'owner/name', got {args.push_to_hub!r}")
    if args.private and args.push_to_hub is None:
        parser.error("--private only applies with --push-to-hub")
    if args.results is not None and not Path(args.results).is_file():
        parser.error(f"--results file {args.results} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    """``fovlm export CKPT OUT_DIR [--results JSON] [--tokenizer DIR] [--push-to-hub REPO [--private]]``."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, args.checkpoint)
        tokenizer = tokenizer_for(checkpoint, args.tokenizer)
        results = json.loads(Path(args.results).read_text()) if args.results else None
        hp = checkpoint.get("hyper_parameters") or {}
        source = {"checkpoint": str(args.checkpoint), "llm": hp.get("llm"), "vision": hp.get("vision")}
        out = export_model(model, tokenizer, args.out_dir, results=results, source=source,
                           data=data_settings(checkpoint))
    except (ExportError, OSError, ValueError) as err:
        print(f"fovlm export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    if args.push_to_hub:
        try:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, private=args.private)}")
        except Exception as err:  # hub errors (offline, auth, network) come in many types; the export stands
            print(f"fovlm export: error: the upload to {args.push_to_hub} failed ({type(err).__name__}: {err}); "
                  f"the exported folder {out} is complete", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
