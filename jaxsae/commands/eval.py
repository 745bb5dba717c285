"""`jaxsae eval SAE_DIR --data DIR` and `jaxsae eval SAE_DIR... --model MODEL --text FILE...`."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from jaxsae.commands import Command, Flag, command, note_training, only_with, unset
from jaxsae.commands.analyze import Outliers, TokenFilter
from jaxsae.errors import JaxsaeError, require_at_least
from jaxsae.parsing import is_positive_int


@command("eval")
@dataclass
class Eval(Command):
    """Evaluate exported SAEs (prints JSON).

    With --data: reconstruction metrics of one
    SAELens-format SAE on a shard directory or SAELens cache; with --truth, how it recovered
    the true features (see jaxsae.evaluate). With --model instead: the SAEs spliced into the
    language model over --text: CE loss recovered, KL, L0 and explained variance (see
    jaxsae.splice; needs the extra `lm`). Flags marked --data or --model go with that mode
    only."""

    memory = ("--batch-size",)

    def memory_settings(self) -> tuple[str, ...]:
        # (a review: --model refuses --batch-size, which the error named)
        return ("--windows-per-batch", "--context") if self.model else self.memory

    sae_dir: Annotated[tyro.conf.Positional[tuple[str, ...]], tyro.conf.arg(metavar="SAE_DIR...",
                    help_behavior_hint="(required)")]
    """SAELens-format directories: one with --data, one or more with --model"""
    data: Annotated[str | None, unset("DIR", "--model instead")] = None
    """activations to evaluate on (a jaxsae shard directory or SAELens cache)"""
    target: Annotated[str | None, unset("DIR", "none")] = None
    """--data, a transcoder: its targets (shards paired row by row with --data, or a SAELens
    cache of the same tokens: --data again when one cache holds both columns)"""
    target_hook: Annotated[str | None, unset("HOOK", "the only column")] = None
    """--target, a SAELens cache: the targets' column"""
    model: Annotated[str | None, unset("MODEL", "--data instead")] = None
    """Hugging Face model directory, hub name, or .gguf file to splice the SAEs into"""
    tokens: Annotated[int | None, unset(
        "N", "all of --data; about 16384 with --model")] = None
    """tokens to evaluate: the last N of --data, or about N of --text"""
    hook: Annotated[str | None, unset(
        "HOOK", "the SAE's own (cfg.json hook_name), or the only column")] = None
    """the activation the SAE reads: the column of a SAELens cache (--data), or the point of
    the block (--model): resid_post, resid_pre, mlp_in or mlp_out"""
    truth: Annotated[str | None, unset("TRUTH", "none")] = None
    """--data: the synthetic data directory (truth.json + truth.safetensors: recovery, firing
    F1, absorption, circles), or a bare truth.safetensors (recovery)"""
    details: Flag = False
    """--truth: also per-feature and per-parent figures"""
    batch_size: Annotated[int | None, unset("N", "4096")] = None
    """--data: tokens per block"""
    text: Annotated[tuple[str, ...], unset("FILE", "none")] = ()
    """--model: held-out text files, or directories of them"""
    layer: Annotated[int | None, unset("L", "from the SAE's hook_name")] = None
    """--model: block index"""
    context: Annotated[int | None, unset("N", "the SAE's context_size, else 128")] = None
    """--model: tokens per window, BOS included"""
    drop_first_position: Flag = False
    """--model: leave out position 0 of each window (default: as the SAE's training data was
    cached, else yes)"""
    no_drop_first_position: Flag = False
    """--model: score position 0 too"""
    clean_norm_above: Annotated[float | None, unset(
        "X", "the SAE's training data.drop_norm_above")] = None
    """--model: leave activations whose norm is above this multiple of the median clean
    (attention sinks)"""
    windows_per_batch: Annotated[int | None, unset("N", "8")] = None
    """--model: windows per forward pass"""
    device: Annotated[str | None, unset("DEVICE", "cuda if available")] = None
    """--model: torch device"""
    no_progress: Flag = False
    """no progress bar"""
    outliers: Outliers = field(default_factory=TokenFilter)
    """--data: tokens left out, those whose norm is far above the median (attention sinks), as
    the SAE's training with data.drop_norm_above left them out (jaxsae.data.window)"""

    def run(self) -> int:
        from jaxsae.export import load_sae
        from jaxsae.outputs import json_text

        if not self.sae_dir:
            raise JaxsaeError("SAE_DIR: required (an exported SAE directory)")
        if (self.data is None) == (self.model is None):
            raise JaxsaeError("give --data DIR (activations) or --model MODEL (a language "
                              "model), one of the two")
        if self.model is not None:
            only_with(self, "--data", "truth", "details", "batch_size", "target",
                      "target_hook")
            only_with(self.outliers, "--data", "drop_norm_above", "all_tokens")
            results = self._on_model([load_sae(d, transcoders=True) for d in self.sae_dir])
            print(json_text(results[0] if len(results) == 1 else results))
            return 0
        only_with(self, "--model", "layer", "context", "drop_first_position",
                  "no_drop_first_position", "clean_norm_above", "windows_per_batch", "device")
        if self.text:
            raise JaxsaeError("--text goes with --model")
        if self.details and not self.truth:
            raise JaxsaeError("--details goes with --truth")
        if self.target_hook is not None and self.target is None:
            raise JaxsaeError("--target-hook goes with --target (it names a column of that "
                              "SAELens cache)")
        if len(self.sae_dir) > 1:
            raise JaxsaeError("--data evaluates one SAE at a time (several go with --model)")
        metrics = self._on_data(load_sae(self.sae_dir[0], transcoders=True))
        print(json_text(metrics))
        note_training(metrics, self.data)
        return 0

    def _on_data(self, loaded) -> dict[str, Any]:
        """Reconstruction metrics on --data; with --truth, what the SAE recovered."""

        from jaxsae import evaluate
        from jaxsae.data import open_for_saes, synthetic
        from jaxsae.data.window import Window
        from jaxsae.errors import DataError
        from jaxsae.progress import Progress

        sae_dir = self.sae_dir[0]
        require_at_least(("--tokens", self.tokens, 1), ("--batch-size", self.batch_size, 1))
        if (loaded.d_out is None) != (self.target is None):
            raise JaxsaeError(f"--target: {sae_dir} is a transcoder: give its targets"
                              if self.target is None else
                              f"--target goes with a transcoder; {sae_dir} is an SAE")
        data = open_for_saes(self.data, self.hook, [loaded], whose=f"{sae_dir}'s",
                             target=self.target, target_hook=self.target_hook)
        if loaded.d_out is not None and data.d_out != loaded.d_out:
            raise DataError(f"{self.target}: its rows are {data.d_out} wide, but the "
                            f"transcoder's d_out is {loaded.d_out} ({sae_dir})")
        start = 0 if self.tokens is None else max(0, data.n_tokens - self.tokens)
        if self.tokens is not None and self.tokens > data.n_tokens:  # (as --model says when
            # its text runs out; fault testing: evaluated every token without a word)
            print(f"note: --tokens {self.tokens:,} is more than the {data.n_tokens:,} tokens of "
                  f"{self.data}; evaluating all of them", file=sys.stderr)
        batch_size = self.batch_size or 4096
        window = Window.for_saes(data, self.data, start, saes=[loaded.cfg_json],
                                 rule=self.outliers.drop_rule(), batch_size=batch_size)
        truth = None if self.truth is None else Path(self.truth)
        truth_dir = None if truth is None else (truth.parent if truth.is_file() else truth)
        full_truth = truth_dir is not None and synthetic.has_truth(truth_dir)
        # the truth is read and checked before any evaluation pass
        full, directions = None, None
        if full_truth:
            full = synthetic.load_truth(truth_dir)
            full.check_data(data, self.truth, self.data, at=start)
        elif truth is not None:
            directions = _truth_directions(truth, loaded.d_out or loaded.d_in)
        # one bar over the passes: the reconstruction, then (full truth) the true codes
        passes = 2 if full_truth else 1
        bar = Progress(window.tokens * passes, unit="tok", unit_scale=True,
                       desc=evaluate.bar_label(passes), enabled=not self.no_progress)
        metrics = evaluate.reconstruction_metrics(loaded.params, loaded.sae,
                                                  window.blocks(bar.update), d_in=data.d_in)
        metrics.pop("firing_frequency")
        metrics.update(window.report())
        if window.limit is None and not self.outliers.all_tokens:
            _note_outliers(window, self.data)  # (an SAE whose training dropped nothing)
        if truth is None:
            bar.close()
            return metrics
        if full is not None:
            # The data's own truth: everything (firing, absorption, circles) on these tokens.
            try:
                report = evaluate.truth_report(loaded.params, loaded.sae, data, full,
                                               start=start, batch_size=batch_size,
                                               details=self.details, keep=window.keep_fn,
                                               progress=bar.update)
            except evaluate.NotTheTruth as e:  # (only that: any other error of the metrics
                # was reported as one of the --truth data, fault testing)
                raise DataError(f"--truth {self.truth}: {e}") from None
            bar.close()
            return {**report, **metrics}
        bar.close()
        # directions only (e.g. a bare truth.safetensors): feature recovery
        metrics.update(evaluate.feature_recovery(directions, loaded.params["W_dec"]))
        return metrics

    def _on_model(self, saes: list) -> list[dict]:
        """The SAEs spliced into the language model (jaxsae.splice)."""
        from jaxsae import splice
        from jaxsae.data import lm as lm_data

        settings = [self._splice_settings(d, s) for d, s in zip(self.sae_dir, saes, strict=True)]
        for sae_dir, own in zip(self.sae_dir[1:], settings[1:], strict=True):
            if own != settings[0]:
                names = ("layer", "hooks (read, spliced)", "context", "first position dropped",
                         "clean norm")
                differ = "; ".join(f"{name} {_shown(mine)} against {_shown(first)}"
                                   for name, mine, first in zip(names, own, settings[0],
                                                                strict=True) if mine != first)
                raise JaxsaeError(f"{sae_dir}: spliced differently from {self.sae_dir[0]} "
                                  f"({differ}): evaluate them separately")
        layer, (read_hook, hook), context, drop_first, clean_above = settings[0]
        if not self.text:
            raise JaxsaeError("--text: required with --model (held-out text to evaluate on)")
        tokens = 16384 if self.tokens is None else self.tokens
        windows = 8 if self.windows_per_batch is None else self.windows_per_batch
        first = 1 if drop_first else 0
        # a window's spliced positions must predict a next token (fault testing: --context 2
        # with position 0 left out was a ZeroDivisionError once every pass had run)
        from_cfg = self._from_cfg(saes[0].cfg_json.get("metadata") or {})
        try:
            if context < 2 + first:
                raise JaxsaeError(f"--context must be at least {2 + first}, got {context}"
                                  + (" (position 0 is left out, and a spliced position must "
                                     "predict the next token)" if first else ""))
            require_at_least(("--tokens", tokens, 1), ("--windows-per-batch", windows, 1))
            files = lm_data.text_files(list(self.text))
            widths = [(f"{d}: the {'SAE' if s.d_out is None else 'transcoder'} has {name}",
                       width) for d, s in zip(self.sae_dir, saes, strict=True)
                      for name, width in (("d_in", s.d_in), ("d_out", s.d_out)) if width]
            lm = lm_data.load_model(self.model, device=self.device, layer=layer,
                                    context=context, widths=widths,
                                    progress=not self.no_progress)
        except JaxsaeError as e:
            flag = str(e).split(" ", 1)[0]
            if flag in from_cfg:
                raise type(e)(f"{self.sae_dir[0]}/cfg.json: {from_cfg[flag]} gives {e} (or "
                              f"pass {flag})") from None
            raise
        batches = splice.eval_windows(lm, files, context, tokens, first)
        results = splice.ce_loss_recovered(saes, lm, layer, hook, batches,
                                           drop_first_position=drop_first,
                                           clean_norm_above=clean_above, batch_size=windows,
                                           progress=not self.no_progress, read_hook=read_hook)
        evaluated = len(batches) * (context - first)
        if evaluated < tokens:  # (as `jaxsae cache` says; the result's `tokens` counts them)
            print(f"warning: the text ran out after {evaluated} evaluated positions "
                  f"(--tokens {tokens})", file=sys.stderr)
        return [{"sae": d, **r} for d, r in zip(self.sae_dir, results, strict=True)]

    @property
    def first_position_dropped(self) -> bool | None:
        """--drop-first-position: True, --no-drop-first-position: False, neither: None."""
        if self.drop_first_position and self.no_drop_first_position:
            raise JaxsaeError("--drop-first-position and --no-drop-first-position: give one")
        if self.drop_first_position or self.no_drop_first_position:
            return self.drop_first_position
        return None

    def _splice_settings(self, sae_dir: str, loaded) -> tuple:
        """(layer, (point read, point replaced), context, drop_first_position,
        clean_norm_above) for one SAE or transcoder: the flags, else what its cfg.json says
        about its training data."""
        from jaxsae.data import lm as lm_data

        meta = loaded.cfg_json.get("metadata", {})
        trained_at = lm_data.parse_hook_name(meta.get("hook_name", ""))
        layer = self.layer if self.layer is not None else trained_at and trained_at[0]
        if layer is None:
            raise JaxsaeError(f"--layer: required ({sae_dir}/cfg.json names no hook_name "
                              "like blocks.L.hook_resid_post)")
        if loaded.d_out is not None:  # a transcoder: reads one point, replaces another
            if self.hook:
                raise JaxsaeError(f"--hook: {sae_dir} is a transcoder; it reads and replaces "
                                  "the points its cfg.json names (hook_name, hook_name_out)")
            written = lm_data.parse_hook_name(meta.get("hook_name_out", ""))
            hooks = (trained_at[1] if trained_at else "mlp_in",
                     written[1] if written else "mlp_out")
            order = ("resid_pre", "mlp_in", "mlp_out", "resid_post")  # (in a block's pass)
            if order.index(hooks[0]) > order.index(hooks[1]):  # (fault testing: a KeyError
                # traceback once the model had run)
                raise JaxsaeError(f"{sae_dir}: a transcoder that reads "
                                  f"{lm_data.hook_name(layer, hooks[0])} and replaces "
                                  f"{lm_data.hook_name(layer, hooks[1])}, which the model "
                                  "computes first, cannot be spliced into it")
        else:
            hook = self.hook or (trained_at[1] if trained_at else "resid_post")
            if hook not in lm_data.HOOK_POINTS:
                raise JaxsaeError(f"--hook must be one of {', '.join(lm_data.HOOK_POINTS)}, "
                                  f"got {hook!r}")
            hooks = (hook, hook)
        # what cfg.json gives is checked as read, naming it (fault testing: a context_size
        # "32" or 32.5 was a traceback, drop_first_position "no" was taken as true)
        file = f"{sae_dir}/cfg.json"
        context = self.context
        if context is None:
            context = meta.get("context_size") or 128
            if not is_positive_int(context):
                raise JaxsaeError(f"{file}: metadata.context_size must be a positive integer "
                                  f"(or pass --context), got {context!r}")
        drop_first = self.first_position_dropped
        if drop_first is None:
            drop_first = meta.get("drop_first_position", True)
            if not isinstance(drop_first, bool):
                raise JaxsaeError(f"{file}: metadata.drop_first_position must be true or false "
                                  f"(or pass --drop-first-position), got {drop_first!r}")
        clean_above = self.clean_norm_above
        if clean_above is None:
            clean_above = loaded.cfg_json.get("jaxsae", {}).get("drop_norm_above")
        elif not (math.isfinite(clean_above) and clean_above > 0):  # (nan passed `<= 0`)
            raise JaxsaeError(f"--clean-norm-above must be a finite number > 0, got "
                              f"{clean_above}")
        return layer, hooks, context, drop_first, clean_above

    def _from_cfg(self, meta: dict) -> dict[str, str]:
        """The flags whose values were read from cfg.json's `meta` (not given, and not a
        default: a review), and the key they came from: a refusal of such a value names the
        file (fault testing: --layer 99 was blamed for a hook_name the user never wrote as a
        flag)."""
        return {flag: key for flag, key, given in (
            ("--layer", "metadata.hook_name", self.layer),
            ("--context", "metadata.context_size", self.context))
            if given is None and meta.get(key.split(".")[1])}



def _note_outliers(window, data: str) -> None:
    """A note on stderr when tokens every one of which was scored include outliers (attention
    sinks): a few of them can dominate mse and explained_variance."""
    import sys

    from jaxsae.data.window import OUTLIER_MULTIPLE

    above, sampled = window.outliers()
    if above:
        print(f"note: {above} of {sampled} tokens sampled from {data} have a norm above "
              f"{OUTLIER_MULTIPLE:g}x the median (attention sinks?): scored here, they can "
              f"dominate mse and explained_variance; --drop-norm-above {OUTLIER_MULTIPLE:g} "
              "leaves such tokens out", file=sys.stderr)


def _truth_directions(truth: Path, width: int):
    """The true feature directions [n_features, width] of a bare truth file (or a directory
    holding one), read before any evaluation; anything else is refused naming --truth."""
    import numpy as np

    from jaxsae import tensorfile
    from jaxsae.data import synthetic
    from jaxsae.errors import DataError

    file = truth / synthetic.TRUTH_TENSORS if truth.is_dir() else truth
    if not file.is_file():
        raise DataError(f"--truth {truth}: not a ground-truth directory (truth.json + "
                        f"{synthetic.TRUTH_TENSORS}) or a {synthetic.TRUTH_TENSORS} file")
    try:
        directions = tensorfile.read(file).get("directions")
    except DataError as e:
        raise DataError(f"--truth {truth}: not a ground-truth directory or a "
                        f"{synthetic.TRUTH_TENSORS} file ({e})") from None
    if directions is None:
        raise DataError(f"--truth {file}: no 'directions' [n_features, {width}] tensor")
    directions = np.asarray(directions)
    synthetic.check_directions(directions, f"--truth {file}", width)
    return directions


def _shown(value) -> str:
    """A splice setting in a message: hooks as `read -> spliced`, the rest as written."""
    if isinstance(value, tuple):
        return " -> ".join(map(str, value))
    return str(value)
