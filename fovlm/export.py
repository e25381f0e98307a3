"""Export a trained FoveatedVLM as a Hugging Face-style folder, optionally push it to the Hub.

    fovlm export runs/stage3/checkpoints/last.ckpt exported/fovlm-135m [--results results.json]
                 [--tokenizer DIR] [--push-to-hub user/fovlm-135m [--private]] [--quiet]

The folder (:mod:`fovlm.model.exported`) holds the weights as safetensors, a ``config.json`` that rebuilds the
model offline with the frame settings it was trained with, the tokenizer with its chat template, and a model
card (``README.md``) generated from the config, with the multiple-choice table when results are given. The
checkpoint is read with ``torch.load(weights_only=True)`` (:mod:`fovlm.model.pretrained`). On a terminal a
progress bar on stderr names each file as it is written; ``--quiet`` turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from transformers import PreTrainedTokenizerBase

from fovlm.data.contract import FRAME_SETTINGS, FrameSettings
from fovlm.eval.report import markdown_table
from fovlm.model.checkpoint import CheckpointError
from fovlm.model.exported import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, frame_settings
from fovlm.model.pretrained import checkpoint_tokenizer, data_settings, model_from_checkpoint, read_checkpoint
from fovlm.model.stored import model_config
from fovlm.model.vlm import FoveatedVLM

# ---------------------------------------------------------------------------------------------------------------
# writing


def export_model(
    model: FoveatedVLM,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    results: dict | None = None,
    source: dict[str, Any] | None = None,
    data: FrameSettings = FRAME_SETTINGS,
    progress: bool | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as an exported folder (:mod:`fovlm.model.exported`); returns the folder.

    Args:
        model: the model to export.
        tokenizer: its tokenizer (saved with the chat template).
        out_dir: target folder (created; existing files of the same names are replaced).
        results: multiple-choice results (:meth:`fovlm.eval.report.MultipleChoiceReport.compute`) for the card.
        source: provenance recorded in the config (checkpoint path, LLM/vision names).
        data: the frame settings the model was trained with (stored as the config's ``data``).
        progress: a progress bar of the files on stderr: True shows it, False hides it, None shows it on a
            terminal only.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(model)
    config["source"] = source or {}
    config["data"] = data.as_dict()
    writes = [
        (WEIGHTS_NAME, lambda: save_model(model, str(out / WEIGHTS_NAME))),
        (CONFIG_NAME, lambda: (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")),
        ("tokenizer", lambda: tokenizer.save_pretrained(out)),
        ("results.json", lambda: (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")),
        (CARD_NAME, lambda: (out / CARD_NAME).write_text(model_card(config, results))),
    ]
    writes = [(name, write) for name, write in writes if results or name != "results.json"]
    with tqdm(total=len(writes), desc=f"export {out.name}", unit="file", file=sys.stderr, dynamic_ncols=True,
              disable=None if progress is None else not progress) as bar:
        for name, write in writes:
            bar.set_postfix_str(name)
            write()
            bar.update()
    return out


def model_card(config: dict[str, Any], results: dict | None = None) -> str:
    """A model card (markdown) from an exported config and optional multiple-choice results."""
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
        f"| query | {config['query_dim']} wide, {'deep' if config['deep_query'] else 'shallow'}, "
        f"up to {config.get('num_queries', 1)} per frame, "
        f"{'after the question' if config.get('question_first') else 'before the text'} |",
        f"| visual scale | {config['visual_scale']} |",
        "| frames | 1 FPS, at most {max_frames}, {frame_size} px (cover + centre crop); images x{image_frames} |".format(
            **frame_settings(config).as_dict()),
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
        "from fovlm.model.pretrained import load_any",
        "",
        'model, tokenizer, data = load_any("this-folder")  # or FoveatedVLM.from_pretrained("this-folder")',
        'frames, _ = load_media("clip.mp4", max_frames=data.max_frames, image_frames=data.image_frames,',
        '                       size=data.frame_size)',
        'print(answer(model, tokenizer, frames, "What happens in this video?"))',
        "```",
        "",
        "or from the command line: `fovlm predict clip.mp4 --model this-folder --prompt \"What happens?\"`.",
        "",
    ]
    return "\n".join(lines)


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
    """The options of ``fovlm export``; exits with code 2 and a message on a bad combination."""
    parser = argparse.ArgumentParser(
        prog="fovlm export", description="Export a FoveatedModule checkpoint as a Hugging Face-style folder."
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of a FoveatedModule")
    parser.add_argument("out_dir", help="folder to write (created)")
    parser.add_argument("--tokenizer", help="tokenizer folder or id (default: the checkpoint's DataModule's)")
    parser.add_argument("--results", help="results.json of `fovlm eval` to put in the model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it shows on a terminal only)")
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
    if args.quiet:  # the libraries' bars too (loading the backbones' weights)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, args.checkpoint)
        tokenizer = checkpoint_tokenizer(checkpoint, args.tokenizer, args.checkpoint)
        results = json.loads(Path(args.results).read_text()) if args.results else None
        hp = checkpoint.get("hyper_parameters") or {}
        source = {"checkpoint": str(args.checkpoint), "llm": hp.get("llm"), "vision": hp.get("vision")}
        out = export_model(model, tokenizer, args.out_dir, results=results, source=source,
                           data=data_settings(checkpoint), progress=False if args.quiet else None)
    except (CheckpointError, OSError, ValueError) as err:
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
