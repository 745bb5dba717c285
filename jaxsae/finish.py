"""The end of a run, and the `jaxsae export` command: the trained parameters evaluated on the
held-out tokens (with ground-truth metrics for generated data) and exported in the SAELens
layout; a checkpoint restored and exported the same way; the run directory's per-SAE layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import evaluate, export, hub, outputs, sae, sparsify
from jaxsae.build import Built, build
from jaxsae.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    Restored,
    abstract_with_shardings,
    json_digest,
)
from jaxsae.config import CheckpointConfig, Config
from jaxsae.data import GeneratedSource, open_source, synthetic
from jaxsae.data.generated import refuse_other_sampler
from jaxsae.data.saelens import SAELensCache
from jaxsae.data.source import fingerprint
from jaxsae.data.stats import DataStats
from jaxsae.data.window import Window, trained_end
from jaxsae.errors import DataError, JaxsaeError, NonFiniteError
from jaxsae.outputs import write_csv
from jaxsae.parsing import list_index
from jaxsae.progress import Progress
from jaxsae.runlock import RunLock, RunLocked


def member_dirs(cfg: Config, run_dir: Path) -> list[Path]:
    """Where each SAE's config.yaml, metrics.jsonl, sae/ and eval.json go: the run directory
    itself, or run/sweep/<i> for the i-th SAE of a sweep."""
    if cfg.sweep is None:
        return [run_dir]
    n = len(cfg.sweep.points)
    width = max(2, len(str(n - 1)))
    return [run_dir / "sweep" / f"{i:0{width}d}" for i in range(n)]


SWEEP_TABLE_METRICS = ("l0", "mse", "explained_variance", "dead_fraction")


def write_sweep_table(path: Path, cfg: Config, members: list[Config], dirs: list[Path],
                      evaluations: list[dict[str, Any]], skipped: list[int] | None = None
                      ) -> None:
    """sweep.csv: one row per SAE: its directory, the swept values, its evaluation, and
    (`optim.skip_nonfinite`) the steps it skipped, `skipped`."""
    keys = list(dict.fromkeys(k for point in cfg.sweep.points for k in point))
    more = ["skipped_steps"] if skipped is not None else []
    rows = [{"sae": str(directory.relative_to(path.parent)),
             **{k: _dotted_value(member, k) for k in keys},
             **{m: evaluation[m] for m in SWEEP_TABLE_METRICS},
             **({"skipped_steps": skipped[i]} if more else {})}
            for i, (member, directory, evaluation) in enumerate(zip(members, dirs, evaluations,
                                                                    strict=True))]
    write_csv(path, rows, ["sae", *keys, *SWEEP_TABLE_METRICS, *more])


def _dotted_value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg.to_dict()
    for part in dotted.split("."):
        node = node[list_index(node, part, dotted)] if isinstance(node, list) else node[part]
    return node


def ground_truth(cfg: Config, source, log: Callable[[str], None] = print
                 ) -> synthetic.Truth | None:
    """The truth of data written by `jaxsae synth` or streamed (None for other data, and for
    data whose size is not its truth's, which `log` is told)."""
    if isinstance(source, GeneratedSource):
        return source.truth
    if not synthetic.has_truth(cfg.data.path):
        return None
    try:
        truth = synthetic.load_truth(cfg.data.path)
    except synthetic.OtherSamplerError as e:  # (fault testing: a run on such data could be
        # neither resumed nor exported; its tokens are all training needs)
        log(f"note: {e.drawn_by}: its true codes cannot be regenerated, so no ground-truth "
            "metrics")
        return None
    if truth.spec.tokens != source.n_tokens:  # (fault testing: the truth metrics went unsaid)
        log(f"note: {cfg.data.path} holds {source.n_tokens:,} tokens but its truth describes "
            f"{truth.spec.tokens:,} (the data was changed after it was written): no "
            "ground-truth metrics")
        return None
    if getattr(source, "d_out", 0) and "input_directions" not in truth.arrays:
        # a transcoder on data whose truth describes its tokens alone (fault testing: it
        # trained, then its evaluation failed in a traceback, on every rerun)
        log(f"note: the truth in {cfg.data.path} is a {truth.spec.kind} generator's, not a "
            "transcoder's (no targets in it): no ground-truth metrics")
        return None
    width = getattr(source, "d_out", 0) or source.d_in  # what decoder rows are compared in
    directions = truth.directions_of(bool(getattr(source, "d_out", 0)))
    if directions.ndim != 2 or directions.shape[1] != width:
        what = f"data.target {cfg.data.target}'s" if cfg.data.target else "the data's"
        raise DataError(f"{Path(cfg.data.path) / synthetic.TRUTH_TENSORS}: its directions are "
                        f"{list(directions.shape)}, but {what} tokens have {width} "
                        "values: not the truth of this data")
    return truth


def finalise(params: sae.Params, cfg: Config, source, n_train: int,
             out: Path | None, *, stats: DataStats | None = None, dtype: str = "float32",
             truth: synthetic.Truth | None = None, overwrite: bool = False,
             inputs: tuple = (), layout: str = "saelens", progress: bool = False,
             steps: int | None = None, eval_data: str | None = None,
             trained_source: Any = None) -> dict[str, Any]:
    """Folds the input scale into the parameters, evaluates on the held-out tokens (else the
    last training tokens) in raw units, leaving out the tokens training dropped
    (data.drop_norm_above) — with the ground-truth metrics when `truth` is given (see
    ground_truth) — and exports to `out` (`layout`: saelens, or sparsify for a TopK SAE).
    `progress`: a bar over the evaluation's tokens. `eval_data`: the data evaluated on, when
    it is not `cfg.data.path`, the data trained on (cfg.json records both), which is then
    `trained_source`, opened (None: gone)."""
    return finalise_all([(params, cfg, out)], source, n_train, stats=stats, dtype=dtype,
                        truth=truth, overwrite=overwrite, inputs=inputs, layout=layout,
                        progress=progress, steps=steps, eval_data=eval_data,
                        trained_source=trained_source)[0]


def finalise_all(saes: list[tuple[sae.Params, Config, Path | None]], source, n_train: int, *,
                 stats: DataStats | None = None, dtype: str = "float32",
                 truth: synthetic.Truth | None = None, overwrite: bool = False,
                 inputs: tuple = (), layout: str = "saelens", progress: bool = False,
                 steps: int | None = None, eval_data: str | None = None,
                 trained_source: Any = None,
                 data_digest: str | None = None) -> list[dict[str, Any]]:
    """`finalise` of several SAEs trained on the same data (a sweep's): the evaluation tokens
    are read once for all of them, each block evaluated by every SAE in turn. `steps`: the
    steps the parameters were trained (default: the run's total). `data_digest`: the
    `fingerprint` of the data trained on (training's, taken at its start), recorded in the
    exports for `jaxsae bench` to tell replaced data."""
    scale = 1.0 if stats is None else stats.scale
    target_scale = 1.0 if stats is None else stats.target_scale
    # the weights the export will hold (rounded to `dtype`) are the ones evaluated
    folded = [export.as_stored(sae.fold_input_scale(params, scale,
                                                    target_scale if source.d_out else None),
                               dtype)
              for params, _, _ in saes]
    held_out = source.n_tokens > n_train
    eval_start = n_train if held_out else max(0, n_train - 65536)
    batch_size = saes[0][1].optim.batch_size
    window = Window(source, eval_start, batch_size=batch_size,
                    limit=None if stats is None else stats.drop_above)
    sums = [evaluate.ReconstructionSums(params, cfg.sae)
            for params, (_, cfg, _) in zip(folded, saes, strict=True)]
    # one bar over the passes: the reconstruction, then (with a truth) the true codes
    passes = 1 if truth is None else 2
    bar = Progress(window.tokens * passes, unit="tok", unit_scale=True,
                   desc=evaluate.bar_label(passes), enabled=progress)
    for block in window.blocks(bar.update):
        on_device = jnp.asarray(block)
        x, target = on_device, None
        if source.d_out:  # a transcoder's rows: inputs, then targets
            x, target = on_device[:, :source.d_in], on_device[:, source.d_in:]
        for one in sums:
            one.add(x, target)
    # (before the truth's pass, whose numbers of a diverged SAE overflow: fault testing)
    _refuse_diverged([{"mse": one.result()["mse"]} for one in sums])
    reports = [None] * len(saes)
    if truth is not None:
        try:
            reports = evaluate.truth_reports(
                [(params, cfg.sae) for params, (_, cfg, _) in zip(folded, saes, strict=True)],
                source, truth, start=eval_start, batch_size=batch_size, keep=window.keep_fn,
                progress=bar.update)
        except evaluate.TruthTooLarge as e:  # (the run's end: an error here came back at
            # every resume, and the SAE was never exported)
            bar.write(f"note: {e}: the evaluation goes on without them (jaxsae eval --truth "
                      "computes them on a machine with more memory)")
    bar.close()
    # export --data OTHER: the training data's size (opened once for all of a sweep's SAEs)
    trained_on = None if trained_source is None else trained_source.n_tokens
    results, frequencies = [], []
    for one, report in zip(sums, reports, strict=True):
        metrics = one.result()
        frequencies.append(metrics.pop("firing_frequency"))
        metrics["held_out"] = held_out
        metrics.update(window.report())
        results.append(metrics if report is None else {**report, **metrics})
    for params, (_, cfg, out), metrics, frequency in zip(folded, saes, results, frequencies,
                                                         strict=True):
        _export(params, cfg, out, metrics, frequency, source, dtype=dtype, overwrite=overwrite,
                inputs=inputs, layout=layout, steps=steps, eval_data=eval_data,
                n_train=n_train, trained_on=trained_on, data_digest=data_digest,
                described=source if trained_source is None else trained_source)
    return results


def _refuse_diverged(results: list[dict[str, Any]]) -> None:
    """A trained SAE whose reconstruction error is not finite diverged (its weights are
    finite — optim.skip_nonfinite kept the last finite step — but overflow on real tokens):
    nothing is exported, rather than a dictionary no tool can use."""
    bad = [i for i, m in enumerate(results) if not math.isfinite(m["mse"])]
    if not bad:
        return
    which = ("the SAE" if len(results) == 1 else
             f"SAE{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the sweep")
    raise NonFiniteError(f"training diverged: the reconstruction error of {which} on the "
                         "evaluation tokens is not finite; nothing is exported. Lower optim.lr "
                         "(an earlier checkpoint may still export: jaxsae export RUN --out DIR "
                         "--step N)")


def _export(params: sae.Params, cfg: Config, out: Path | None, metrics: dict[str, Any],
            frequency, source, *, dtype: str, overwrite: bool, inputs: tuple,
            layout: str, steps: int | None, eval_data: str | None, n_train: int,
            trained_on: int | None, data_digest: str | None, described) -> None:
    """`described`: the data whose model, hook and context cfg.json names (the data trained
    on, where it can be read; fault testing: export --data OTHER named OTHER's hook, one the
    SAE was never trained at)."""
    if out is not None and layout == "sparsify":
        sparsify.export_sparsify(params, cfg.sae, out, dtype=dtype, overwrite=overwrite,
                                 inputs=inputs)
    elif out is not None:
        trained = hub.training_metadata(cfg, metrics, steps)
        export.export_sae(
            params, cfg.sae, out, dtype=dtype,
            log10_firing=evaluate.log10_firing(frequency),
            metadata={"dataset_path": (str(Path(cfg.data.path).absolute()) if cfg.data.path
                                       else f"streamed {cfg.data.generate.get('kind')}"),
                      **_inherited_metadata(cfg, _source_metadata(described)), **trained,
                      **({"eval_dataset_path": str(Path(eval_data).absolute())}
                         if eval_data is not None else {})},
            training={"run": cfg.name,
                      "steps": cfg.optim.total_steps if steps is None else steps,
                      "tokens": trained["training_tokens"],
                      "drop_norm_above": cfg.data.drop_norm_above,
                      # the scale the loss coefficients are at (an import fine-tunes at it)
                      "normalize": cfg.data.normalize,
                      # where the training tokens end in dataset_path: what an evaluation on
                      # it can tell apart (jaxsae.data.window.trained_end)
                      **({} if (end := _training_end(cfg, n_train, eval_data,
                                                     trained_on)) is None
                         else {"held_out_from": end}),
                      "loss": [t.to_dict() for t in cfg.resolved_loss],
                      "optim": {"lr": cfg.optim.lr, "batch_size": cfg.optim.batch_size},
                      # what was measured (the eval.json training writes beside the export
                      # holds it, as JSON reads it) and the data trained on (`fingerprint`):
                      # `jaxsae bench` reuses an arm only while both still agree
                      "eval_digest": json_digest(json.loads(outputs.json_text(metrics))),
                      **({} if data_digest is None else {"data_digest": data_digest})},
            overwrite=overwrite, inputs=inputs,
        )


def _training_end(cfg: Config, n_train: int, eval_data: str | None,
                  trained_on: int | None) -> int | None:
    """Training read tokens [0, N) of cfg.data.path: N is `n_train`, or, when the evaluation's
    data is another (`export --data`, whose count `n_train` is), computed from the training
    data's size `trained_on` (None: it is gone); later where the `init_from` SAE's training
    on the same data ended. None for streamed data."""
    if not cfg.data.path:
        return None
    if eval_data is None:
        end = n_train
    elif trained_on is None:
        return None
    else:
        end = max(trained_on - cfg.data.held_out(trained_on), 0)
    return max(end, _inherited_end(cfg))


def _training_source(cfg: Config):
    """cfg.data.path opened (None when it cannot be opened any more, or is streamed)."""
    if not cfg.data.path:
        return None
    try:
        return open_source(cfg.data)
    except (JaxsaeError, OSError):
        return None


def _inherited_end(cfg: Config) -> int:
    """Where the tokens the `init_from` SAE was trained on end in cfg.data.path (0: none of
    them, it is not recorded, or the SAE is gone): a run that starts from it has seen them
    too (a stitched SAE's decoder retrained on its members' data, say)."""
    if cfg.init_from is None:
        return 0
    try:
        start = export.read_cfg(cfg.init_from)
    except (JaxsaeError, OSError):
        return 0
    return trained_end([start], cfg.data.path, cfg.data.hook) or 0


def export_checkpoint(path: str | Path, out: str | Path, *, step: int | None = None,
                      dtype: str = "float32", data: str | None = None, overwrite: bool = False,
                      layout: str = "saelens", hub_layout: bool = False,
                      log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Exports a checkpointed SAE (a run directory or its checkpoints/) to `out`, in the
    SAELens layout (or sparsify's, `layout`); a sweep's SAEs go to out/sweep/<i>/. With
    `hub_layout`, the folder SAELens users upload to the Hugging Face Hub instead (see
    jaxsae.hub). Without `step`, the newest checkpoint that restores: a damaged one is
    skipped with a message (and set aside as `<step>.corrupt` unless a training process holds
    the run)."""
    if layout not in ("saelens", "sparsify"):
        raise JaxsaeError(f"--format must be saelens or sparsify, got {layout!r}")
    if hub_layout and layout != "saelens":
        raise JaxsaeError("--hub writes the SAELens layout; leave out --format sparsify")
    path = Path(path)
    directory = path if path.name == "checkpoints" else path / "checkpoints"
    if not path.exists():  # (fault testing: "no checkpoints/ directory" of a mistyped path)
        raise JaxsaeError(f"{path}: does not exist (expected a run directory)")
    if not directory.is_dir():
        run = path.absolute().parent.parent  # (a sweep's SAE is RUN/sweep/NN)
        if path.absolute().parent.name == "sweep" and (run / "checkpoints").is_dir():
            raise JaxsaeError(f"{path}: an SAE of the sweep in {run}, whose checkpoints hold "
                              f"them all; export {run} (it writes every SAE of the sweep)")
        raise JaxsaeError(f"{path}: no checkpoints/ directory (expected a run directory)")
    run_dir = directory.parent
    lock = RunLock(run_dir, log, doing="exporting")
    try:  # holding the lock (no training in progress), export may tidy the run directory
        lock.acquire()
        read_only = False
    except (RunLocked, OSError):
        read_only = True
    try:
        restored, cfg, built, source = _restore_for_export(directory, step, data, read_only,
                                                           log)
    finally:  # (a lock file this call made goes: a run copied without one stays as it was)
        lock.discard() if lock.created else lock.release()
    n_train = max(source.n_tokens - cfg.data.held_out(source.n_tokens), 0)
    stats = DataStats.from_dict(restored.loader["data_stats"])
    params = jax.device_get(restored.state.params)
    trained = int(np.max(jax.device_get(restored.state.step)))  # (--step: fewer than the run's)
    # Evaluated on `cfg.data` (--data, if given); cfg.json and the card name the data the SAE
    # was trained on (the run's), and the evaluation's beside it.
    run_cfg, members, eval_data, trained_source = cfg, built.members, None, None
    if data is not None:
        run_cfg, eval_data = restored.config, data
        members = [dataclasses.replace(m, data=run_cfg.data) for m in members]
        trained_source = _training_source(run_cfg)
    truth = ground_truth(cfg, source)
    inputs = (run_dir, *([cfg.data.path] if cfg.data.path else []))
    if hub_layout and cfg.sae.transcoder:
        raise JaxsaeError(f"{run_dir}: a transcoder run; --hub writes the Hub layout of SAEs "
                          "only (export it without --hub)")
    # The layout and the target are checked before the evaluation, not after it.
    if layout == "sparsify":
        for member in built.members:
            sparsify.check_exportable(member.sae, dtype)
    kind = "hub-export" if hub_layout else "sweep-export" if cfg.sweep is not None else "sae"
    outputs.check_target(out, kind, overwrite=overwrite, inputs=inputs)
    if (inside_run := outputs.run_around(out)) is not None:  # its sae/ is the run's own
        raise outputs.OutputError(f"--out {out}: lies inside the training run {inside_run}, "
                                  "whose outputs are its own; export elsewhere")
    if hub_layout:
        points = cfg.sweep.points if cfg.sweep is not None else [None]
        hook = _source_metadata(source if trained_source is None else trained_source
                                ).get("hook_name")
        with outputs.staged_directory(out, "hub-export", overwrite=overwrite,
                                      inputs=inputs) as staging:
            folders = [hub.folder_name(hook, cfg.name, point) for point in points]
            evaluations = finalise_all(
                [(built.member_params(params, i), member, staging / folder)
                 for i, (member, folder) in enumerate(zip(members, folders,
                                                          strict=True))],
                source, n_train, stats=stats, dtype=dtype, truth=truth, progress=progress,
                steps=trained, eval_data=eval_data, trained_source=trained_source)
            saes = [{"folder": folder, "cfg": export.read_cfg(staging / folder),
                     "eval": metrics} for folder, metrics in zip(folders, evaluations,
                                                                 strict=True)]
            hub.write_card(staging, run_cfg, saes, run_dir, trained)
        return Path(out)
    if cfg.sweep is None:
        finalise(params, members[0], source, n_train, Path(out), stats=stats,
                 dtype=dtype, truth=truth, overwrite=overwrite, inputs=inputs, layout=layout,
                 progress=progress, steps=trained, eval_data=eval_data,
                 trained_source=trained_source)
        return Path(out)
    # A sweep exports every SAE, to OUT/sweep/<i> (the layout of its run directory).
    with outputs.staged_directory(out, "sweep-export", overwrite=overwrite,
                                  inputs=inputs) as staging:
        finalise_all([(built.member_params(params, i), member, member_dir)
                      for i, (member, member_dir) in enumerate(
                          zip(members, member_dirs(cfg, staging), strict=True))],
                     source, n_train, stats=stats, dtype=dtype, truth=truth, layout=layout,
                     progress=progress, steps=trained, eval_data=eval_data,
                     trained_source=trained_source)
    return Path(out)


def _restore_for_export(directory: Path, step: int | None, data: str | None, read_only: bool,
                        log: Callable[[str], None]) -> tuple[Restored, Config, Built, Any]:
    """The checkpoint to export (restored onto one device, whatever mesh the run used), its
    config (data.path replaced by `data`), the build it restored into, and the data."""
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=read_only)
    found: dict[str, Any] = {}

    def abstract_for(loader_state: dict, cfg: Config):
        if data is not None:  # (streamed data: the same tokens, written by `jaxsae synth`)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data,
                                                                    stream=False))
        relative = "" if data is not None or Path(cfg.data.path).is_absolute() else (
            " (a relative data.path is read from the working directory: export from the "
            "one training ran in, or pass the data as --data)")
        if relative and not cfg.data.stream and not Path(cfg.data.path).exists():
            # (fault testing: exported from another directory, it said only that the data
            # directory does not exist)
            raise DataError(f"{cfg.data.path}: data directory does not exist{relative}")
        source = open_source(cfg.data, train_tokens=cfg.optim.total_tokens)
        # (fault testing: it evaluated a run streamed by another sampler on other tokens)
        refuse_other_sampler(loader_state.get("sampler"), source, directory,
                             "export it with the jaxsae that trained it, or pass the tokens "
                             "it drew, written by that jaxsae's `jaxsae synth`, as --data")
        # Data of other widths would not restore the state: refused as input (the search
        # stops), not taken for a damaged checkpoint (set aside, and the run restarted).
        for what, want, got in (("d_in", loader_state.get("d_in"), source.d_in),
                                ("d_out", loader_state.get("d_out", 0), source.d_out)):
            if want is not None and want != got:
                raise DataError(f"{data or cfg.data.path}: {what} is {got}, but the run was "
                                f"trained on {what} {want}")
        saved = loader_state.get("data_digest")
        if data is None and saved is not None and not cfg.data.stream and (
                fingerprint(source) != saved):
            # (fault testing: exported from another directory, a relative data.path read
            # other data there, and the export recorded it, evaluated on it, as trained on)
            raise DataError(f"{cfg.data.path}: holds other values than the data the run "
                            f"{directory.parent} trained on{relative}")
        one = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, model=1))
        built = build(one, source.d_in, jax.devices()[:1], d_out=source.d_out)
        found.update(cfg=cfg, built=built, source=source)
        return abstract_with_shardings(built.abstract, built.state_sharding)

    try:
        steps = ckpt.steps()
        if not steps:
            raise JaxsaeError(f"{directory}: no complete checkpoint")
        if step is None:
            restored = ckpt.restore_newest(abstract_for, log)
            if restored is None:
                raise CheckpointError(f"{directory}: no checkpoint restores (each one skipped "
                                      "is named above)")
        elif step not in steps:
            raise JaxsaeError(f"--step {step}: no such checkpoint in {directory} "
                              f"(available: {', '.join(map(str, steps))})")
        else:
            try:
                loader_state, cfg = ckpt.restore_meta(step)
                restored = ckpt.restore(step, abstract_for(loader_state, cfg))
            except CorruptCheckpoint as e:
                raise CheckpointError(f"{directory}: {e}") from None
    finally:
        ckpt.close()
    return restored, found["cfg"], found["built"], found["source"]


# What a SAELens cfg.json says of the model whose activations an SAE reads: kept from the SAE a
# run starts from (init_from), for the model's users to splice the fine-tuned one back in.
_MODEL_METADATA = ("model_name", "model_class_name", "model_from_pretrained_kwargs",
                   "hook_head_index", "prepend_bos", "exclude_special_tokens", "context_size",
                   "hook_name")


def _inherited_metadata(cfg: Config, ours: dict[str, Any]) -> dict[str, Any]:
    """`ours` (what the data says of its model) with what the init_from SAE's metadata says of
    the model where the data says nothing, if they do not disagree on the model or the hook
    (fault testing: an imported SAE's model_name, prepend_bos, ... were lost in the
    fine-tune's export)."""
    if not cfg.init_from:
        return ours
    try:
        theirs = json.loads((Path(cfg.init_from) / export.CFG_FILE).read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return ours
    if not isinstance(theirs, dict) or any(
            key in ours and key in theirs and ours[key] != theirs[key]
            for key in ("model_name", "hook_name")):
        return ours
    return {**{k: theirs[k] for k in _MODEL_METADATA if k in theirs}, **ours}


def _source_metadata(source) -> dict[str, Any]:
    inputs = getattr(source, "inputs", source)  # a transcoder's pairs: their inputs
    src = getattr(getattr(source, "manifest", None), "source", {}) or {}
    out = {}
    if isinstance(inputs, SAELensCache):  # the hook is the column's name
        out["hook_name"] = inputs.hook
        out["context_size"] = inputs.context_size
    if "model" in src:
        out["model_name"] = src["model"]
    if "hook" in src:
        out["hook_name"] = src["hook"]
    if "context" in src:  # written by `jaxsae cache`: how the windows were built
        out["context_size"] = src["context"]
        out["prepend_bos"] = src.get("prepend_bos", True)
        out["drop_first_position"] = src.get("drop_first_position", True)
    targets = getattr(getattr(getattr(source, "targets", None), "manifest", None), "source", {})
    if targets and "hook" in targets:  # a transcoder's: what it writes
        out["hook_name_out"] = targets["hook"]
    if isinstance(getattr(source, "targets", None), SAELensCache):
        out["hook_name_out"] = source.targets.hook
    return out
