"""The layout SAELens users upload to the Hugging Face Hub (`jaxsae export RUN --hub`).

One folder per SAE, named for its hook (`blocks.15.hook_resid_post`; a sweep's SAEs add their
values, `blocks.15.hook_resid_post__sae.k-8`), each a SAELens directory whose cfg.json
metadata says what it was trained on and how it did; a README.md model card (front matter
`library_name: saelens`, the SAEs with their figures, how to load one, the training config) and
the run's curves (to the checkpoint exported) beside them. Nothing here talks to the Hub:
uploading is `huggingface-cli upload USER/REPO DIR . --exclude .jaxsae-output.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from jaxsae import curves
from jaxsae.config import Config
from jaxsae.errors import DataError
from jaxsae.outputs import CURVES, write_file

CARD = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _number(value: Any, spec: str) -> str:
    """A figure of the model card; "n/a" where none was measured (null, NaN)."""
    if value is None or value != value:
        return "n/a"
    return format(value, spec)


def folder_name(hook_name: str | None, run_name: str, point: dict | None) -> str:
    """The SAE's folder: its hook (else the run's name), plus a sweep SAE's values (none for
    a sweep of one point that varies nothing)."""
    name = hook_name or run_name
    if point:
        name += "__" + "_".join(f"{k}-{v}" for k, v in point.items())
    name = re.sub(r"[^\w.-]+", "-", name)
    # (fault testing: a long bench arm's name made a folder name too long to create)
    if len(name.encode()) > _FOLDER_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = name.encode()[:_FOLDER_BYTES - 14].decode(errors="ignore") + "--" + digest
    return name


_FOLDER_BYTES = 200
"""The longest folder name written (file systems take 255 bytes): longer ones are cut, with
a digest of the whole name to keep them apart."""


def write_card(out: Path, cfg: Config, saes: list[dict[str, Any]], run_dir: Path,
               step: int) -> None:
    """README.md (and curves.png) in `out`: `saes` holds each SAE's `folder`, `cfg` (its
    cfg.json) and `eval` (the evaluation), exported from `run_dir`'s checkpoint `step`.
    curves.png, where the run draws its curves, is drawn again to `step` (fault testing: a
    copy of the run's went on past it, to the run's end or to where a run still training
    had got, beside the figures of an earlier checkpoint)."""
    meta = saes[0]["cfg"].get("metadata", {})
    model = meta.get("model_name")
    front: dict[str, Any] = {"library_name": "saelens",
                             "tags": ["sparse-autoencoder", "saelens", "jaxsae"]}
    if isinstance(model, str) and _REPO_ID.match(model) and not Path(model).exists():
        front["base_model"] = model
    if (run_dir / CURVES).is_file():
        with contextlib.suppress(DataError):  # (its metrics.jsonl gone: no curves)
            series = [s for s in curves.run_series(run_dir, cfg.name, until=step) if s[1]]
            if series:
                curves.plot(series, out / CURVES, title=cfg.name)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {cfg.name}", "",
             _summary(cfg, meta, len(saes)), "",
             "| folder | architecture | d_in | d_sae | L0 | explained variance | "
             "dead fraction | training tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sae in saes:
        c, ev = sae["cfg"], sae["eval"]
        lines.append(f"| `{sae['folder']}` | {c['architecture']} | {c['d_in']} | {c['d_sae']} | "
                     f"{_number(ev['l0'], '.2f')} | "
                     f"{_number(ev['explained_variance'], '.4f')} | "
                     f"{_number(ev['dead_fraction'], '.4f')} | "
                     f"{c['metadata']['training_tokens']:,} |")
    held = "held-out" if saes[0]["eval"].get("held_out") else "training"
    other = meta.get("eval_dataset_path")
    of = f" of `{other}`" if other else ""
    trained = meta.get("training_tokens")
    when = ("at the end of training" if trained == cfg.optim.total_steps * cfg.optim.batch_size
            else f"after {trained:,} training tokens (a checkpoint before the end)")
    lines += ["", f"Figures measured on {saes[0]['eval']['tokens']:,} {held} tokens{of} "
              f"{when}.", "", "## Load", "", "```python",
              "from huggingface_hub import snapshot_download",
              "from sae_lens import SAE", "",
              f'folder = "{saes[0]["folder"]}"',
              'path = snapshot_download("USER/REPO", allow_patterns=[f"{folder}/*"])',
              'sae = SAE.load_from_disk(f"{path}/{folder}")', "```", ""]
    if (out / CURVES).is_file():
        lines += ["## Training curves", "", f"![training curves]({CURVES})", ""]
    lines += ["## Training config", "",
              "Trained with jaxsae (`jaxsae train config.yaml`, JAX); each SAE's cfg.json "
              "says the rest (`metadata`, and `jaxsae` for the loss and optimiser).", "",
              "```yaml", cfg.to_yaml().rstrip(), "```", ""]
    write_file(out / CARD, "\n".join(lines))


def _summary(cfg: Config, meta: dict[str, Any], n: int) -> str:
    what = f"{n} sparse autoencoders" if n > 1 else "A sparse autoencoder"
    if meta.get("model_name"):
        on = f"on `{meta.get('hook_name') or 'activations'}` of `{meta['model_name']}`"
        if meta.get("context_size"):
            on += f" (context {meta['context_size']} tokens)"
    elif cfg.data.generate is not None:
        on = f"on synthetic `{cfg.data.generate.get('kind')}` data with known features"
    else:
        on = f"on the activations in `{meta.get('dataset_path', cfg.data.path)}`"
    return f"{what} trained {on}, in the SAELens format."


def without_evaluation(metadata: dict[str, Any]) -> dict[str, Any]:
    """cfg.json's metadata less the training's evaluation (`eval_*`): for an SAE made from
    another (converted, repaired), whose figures those are not."""
    return {k: v for k, v in metadata.items() if not k.startswith("eval_")}


def training_metadata(cfg: Config, metrics: dict[str, Any], steps: int | None = None
                      ) -> dict[str, Any]:
    """What cfg.json's metadata says of the training (`steps` trained: default the run's
    total) and its outcome."""
    steps = cfg.optim.total_steps if steps is None else steps
    return {"training_tokens": steps * cfg.optim.batch_size,
            "eval_l0": metrics["l0"], "eval_explained_variance": metrics["explained_variance"],
            "eval_dead_fraction": metrics["dead_fraction"], "eval_tokens": metrics["tokens"],
            "eval_held_out": metrics["held_out"]}
