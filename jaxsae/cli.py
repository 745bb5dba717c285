"""The `jaxsae` command.

  jaxsae synth superposition|hierarchy|hierarchy_small|circles --out DIR [--seed S ...]
  jaxsae train CONFIG [key=value ...]
  jaxsae bench CONFIG [key=value ...]
  jaxsae export RUN_OR_CHECKPOINT_DIR --out DIR [--step N] [--dtype float32|bfloat16]
  jaxsae import SAELENS_DIR --out RUN --data DIR [key=value ...]
  jaxsae eval SAE_DIR --data DIR [--truth TRUTH] [--tokens N]
  jaxsae eval SAE_DIR... --model MODEL --text FILE... [--layer L] [--tokens N]
  jaxsae cache --model MODEL --layer L --text FILE... --tokens N --out DIR
  jaxsae stitch compare SMALL LARGE --data DIR --out DIR [--threshold 0.7]
  jaxsae stitch frankenstein BASE OTHER... --data DIR --out DIR [--retrain-decoder-tokens N]
  jaxsae analyze SAE_DIR --data DIR --out DIR
  jaxsae data inspect DIR [--hook HOOK] [--json]

Bad input exits with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
from pathlib import Path

from jaxsae import hostmem
from jaxsae.errors import JaxsaeError, require_at_least
from jaxsae.outputs import json_text


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, argparse.SUPPRESS) or \
                isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    import ast
    import inspect
    import itertools
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs, body = {}, tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _add_synth(sub) -> None:
    from jaxsae.data.synthetic import GENERATORS

    synth = sub.add_parser("synth", help="generate synthetic activations with known features",
                           description="Write ground-truth activation shards plus truth files.")
    kinds = synth.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, gen in GENERATORS.items():
        p = kinds.add_parser(kind, help=gen.description,
                             formatter_class=_DefaultsFormatter)
        p.add_argument("--out", required=True, help="output directory (must not exist)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        docs = _field_docs(gen.spec)
        for f in dataclasses.fields(gen.spec):
            default = gen.defaults.get(f.name, f.default)
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"spec_{f.name}",
                           default=list(default) if isinstance(default, tuple) else default,
                           metavar=_metavar(f.type), help=docs.get(f.name, ""))


def _add_analysis_args(p) -> None:
    p.add_argument("--data", required=True, help="the activations the SAEs were trained on")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokens", type=int, default=65536,
                   help="analyse the last N tokens of the data (held out if training held "
                        "them out)")
    p.add_argument("--hook", default=None, help="SAELens caches: the activation column")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per block")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not this command's own output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _metavar(annotation) -> str | None:
    if not isinstance(annotation, str):
        return None
    return "'[A, B, ...]'" if annotation.startswith("tuple") else annotation.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsae",
        description="Train sparse autoencoders on cached activations with JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)

    data = sub.add_parser("data", help="inspect activation directories",
                          description="Tools for activation directories.")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data_cmds.add_parser("inspect", help="validate every file and print a summary",
                             description="Validate every shard (headers, sizes, NaN/inf) of a "
                                         "jaxsae shard directory or SAELens cache and print its "
                                         "format, size, dtype and norm statistics.")
    p.add_argument("path", help="activation directory")
    p.add_argument("--hook", default=None, help="SAELens caches: the activation column")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train an SAE from a YAML config",
                       description="Train an SAE. Rerunning the same command resumes the run "
                                   "from its latest checkpoint. A sweep (`sweep:` in the config, "
                                   "or sweep.KEY=[values] overrides) trains several SAEs in "
                                   "one vmapped step on one data stream.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-3 sae.d_sae=8192 loss.1.coefficient=3;"
                        " sweep.loss.1.coefficient=[1,3,10] adds a sweep axis (sweepable: seed, "
                        "optim.lr, sae.k, loss.<i>.coefficient)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("bench", help="compare penalties on one data set: tables and plots",
                       description="Train every arm of a bench config (penalty x swept values "
                                   "x seeds, each arm one vmapped sweep) and write "
                                   "results.csv, results.md and PNG plots (L0 vs explained "
                                   "variance with Pareto frontiers, mcc vs L0, absorption vs "
                                   "L0). Rerunning resumes and skips finished arms.")
    p.add_argument("config", help="bench YAML (see configs/bench/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the bench config, e.g. seeds=[0,1,2] "
                        "base.optim.total_tokens=1e6")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("cache", help="cache a language model's activations as shards",
                       formatter_class=_DefaultsFormatter,
                       description="Run a Hugging Face causal LM over text files up to the hook "
                                   "and write its activations as a jaxsae shard directory "
                                   "(needs the extra `lm`: pip install 'jaxsae[lm]'). Each window "
                                   "of --context tokens starts with BOS; rerunning an "
                                   "interrupted command resumes it.")
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory, hub name, or .gguf file")
    p.add_argument("--layer", type=int, required=True, help="block index (0-based)")
    p.add_argument("--hook", default="resid_post", choices=["resid_post", "resid_pre"],
                   help="the block's output (resid_post) or input (resid_pre)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE",
                   help="text files, or directories of them (read in sorted order)")
    p.add_argument("--tokens", type=int, required=True, help="activations to write")
    p.add_argument("--out", required=True, help="shard directory to write")
    p.add_argument("--context", type=int, default=128, help="tokens per window, BOS included")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="shard dtype (bfloat16 shards are safetensors)")
    p.add_argument("--drop-first-position", default=True, action=argparse.BooleanOptionalAction,
                   help="leave out position 0 of each window (an attention sink, norms ~100x "
                        "the rest)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=65536, help="tokens per shard file")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    stitch = sub.add_parser("stitch", help="compare / combine SAEs of different widths",
                            description="Stitching SAEs trained on the same activations "
                                        "(any SAELens-format directories; see "
                                        "jaxsae.analysis.stitch).")
    stitch_cmds = stitch.add_subparsers(dest="stitch_command", required=True, metavar="COMMAND")
    p = stitch_cmds.add_parser(
        "compare", help="novel vs reconstruction latents and their MSE effect",
        formatter_class=_DefaultsFormatter,
        description="Split LARGE's latents by their max decoder cosine to SMALL into novel "
                    "(<= threshold) and reconstruction latents; for each, the change in "
                    "SMALL's MSE when it is inserted; for each parent -> children component, "
                    "the MSE and L0 change of swapping it in. Writes stitch.csv, "
                    "components.csv, summary.md/json and PNG plots.")
    p.add_argument("small", help="the narrower SAE (SAELens-format directory)")
    p.add_argument("large", help="the wider SAE")
    _add_analysis_args(p)
    p.add_argument("--threshold", type=float, default=0.7, help="novel: max cos <= this")
    p = stitch_cmds.add_parser(
        "frankenstein", help="stitch the novel latents of a family of widths",
        formatter_class=_DefaultsFormatter,
        description="Start from the narrowest SAE, add from each wider one the latents whose "
                    "decoder cosine to everything already included is below the threshold, "
                    "retrain only the decoder (encoder frozen) and export to OUT/sae; "
                    "frankenstein.md compares width, L0 and MSE with the family.")
    p.add_argument("base", help="an SAE of the family (ReLU or JumpReLU)")
    p.add_argument("others", nargs="+", help="the other SAEs (any order: sorted by width)")
    _add_analysis_args(p)
    p.add_argument("--threshold", type=float, default=0.7, help="add latents with cos < this")
    p.add_argument("--retrain-decoder-tokens", type=int, default=2_000_000,
                   help="tokens of decoder-only training (0: none)")
    p.add_argument("--lr", type=float, default=1e-3, help="decoder retraining learning rate")

    p = sub.add_parser("analyze", help="feature geometry of one SAE: CSV, PNG, index.html",
                       formatter_class=_DefaultsFormatter,
                       description="Firing density and activation histograms per latent, "
                                   "co-firing (Jaccard, parent/child candidates), decoder "
                                   "nearest neighbours and clusters; written as CSV and PNG "
                                   "with an index.html (see jaxsae.analysis.geometry).")
    p.add_argument("sae_dir", help="SAELens-format directory")
    _add_analysis_args(p)
    p.add_argument("--cofire-tokens", type=int, default=16384,
                   help="tokens (the first of the sample) for co-firing")
    p.add_argument("--cluster-threshold", type=float, default=0.7,
                   help="decoder clusters: cos > this")

    p = sub.add_parser("export", help="export a checkpoint as a SAELens directory",
                       description="Export a checkpointed SAE to the SAELens layout (a sweep: "
                                   "every SAE, to OUT/sweep/<i>/).")
    p.add_argument("checkpoint", help="run directory or its checkpoints/ directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--data", default=None,
                   help="activations for the firing frequencies (default: the run's data.path)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not a jaxsae export (never the run "
                        "itself, a run with checkpoints, or a file)")

    p = sub.add_parser("import", help="start a run from an existing SAELens dictionary",
                       description="Write RUN/config.yaml that trains (fine-tunes) starting from "
                                   "a SAELens-format SAE (init_from), then train it with "
                                   "`jaxsae train RUN/config.yaml`.")
    p.add_argument("sae_dir", help="SAELens-format directory (cfg.json + sae_weights.safetensors)")
    p.add_argument("--out", required=True,
                   help="run directory to create (an untrained import there is replaced)")
    p.add_argument("--data", required=True, help="activations to train on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not an untrained import (never a "
                        "run with checkpoints)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.total_tokens=10_000_000")

    p = sub.add_parser("eval", help="evaluate an exported SAE (prints JSON)",
                       description="Reconstruction metrics of a SAELens-format SAE on a shard "
                                   "directory (--data); with --truth, how it recovered the true "
                                   "features (see jaxsae.evaluate). With --model instead, the SAE "
                                   "is spliced into the language model over --text: CE loss "
                                   "recovered, KL, L0 and explained variance (see "
                                   "jaxsae.splice; needs the extra `lm`).")
    p.add_argument("sae_dir", nargs="+",
                   help="SAELens-format directory (e.g. runs/NAME/sae); with --model, several "
                        "SAEs of one hook share the clean and ablated passes")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="activation directory")
    where.add_argument("--model", help="language model (directory, hub name or .gguf file)")
    p.add_argument("--text", nargs="+", metavar="FILE",
                   help="with --model: held-out text files or directories")
    p.add_argument("--layer", type=int, default=None,
                   help="with --model: block index (default: from the SAE's hook_name)")
    p.add_argument("--context", type=int, default=None,
                   help="with --model: tokens per window (default: the SAE's context_size, "
                        "else 128)")
    p.add_argument("--drop-first-position", default=None, action=argparse.BooleanOptionalAction,
                   help="with --model: leave position 0 clean and unscored (default: as the "
                        "SAE's training data was cached, else yes)")
    p.add_argument("--clean-norm-above", type=float, default=None,
                   help="with --model: leave activations whose norm is above this multiple of "
                        "the median clean (attention sinks; default: the SAE's training "
                        "data.drop_norm_above, from its cfg.json)")
    p.add_argument("--device", default=None, help="with --model: torch device")
    p.add_argument("--truth", default=None,
                   help="the synthetic data directory (truth.json + truth.safetensors: recovery, "
                        "firing F1, absorption, circles), or a bare truth.safetensors (recovery)")
    p.add_argument("--details", action="store_true",
                   help="with --truth: also per-feature and per-parent figures")
    p.add_argument("--tokens", type=int, default=None,
                   help="with --data: evaluate the last N tokens (default: all); with --model: "
                        "evaluate about N tokens (default: 16384)")
    p.add_argument("--hook", default=None,
                   help="with --data: the SAELens cache column, when there are several; with "
                        "--model: resid_post or resid_pre (default: from the SAE's hook_name)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tokens per block with --data (default 4096); windows per forward "
                        "pass with --model (default 8)")
    p.add_argument("--no-progress", action="store_true", help="with --model: no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the program: restart once with huge pages (see jaxsae.hostmem)
        hostmem.restart_with_huge_pages()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after flags (`train CONFIG --no-progress a.b=1`); argparse leaves
    # such key=value words unparsed.
    if args.command in ("train", "import", "bench"):
        args.overrides += [word for word in extra if "=" in word and not word.startswith("-")]
        extra = [word for word in extra if word not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except JaxsaeError as e:
        code = getattr(e, "exit_code", 2)
        print(f"jaxsae {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return code
    except OSError as e:  # the file system refused: disk full, read-only, not a directory
        print(f"jaxsae {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxsae {args.command}: aborted", file=sys.stderr)
        return 130


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))


def _os_error(e: OSError) -> str:
    """`cannot write runs/x/metrics.jsonl: No space left on device`."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return _one_line(reason)
    verb = {errno.EACCES: "cannot write", errno.EPERM: "cannot write", errno.EROFS: "cannot write",
            errno.ENOSPC: "cannot write", errno.EDQUOT: "cannot write",
            errno.EFBIG: "cannot write", errno.ENOENT: "cannot find"}.get(e.errno, "cannot use")
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return _one_line(f"{verb} {where}: {reason}")


def _cmd_synth(args) -> int:
    from jaxsae.data import synthetic

    raw = {"kind": args.kind}
    for name, value in vars(args).items():
        if name.startswith("spec_"):
            raw[name[5:]] = _yaml_scalar(value)
    out = synthetic.generate(raw, args.out, overwrite=args.overwrite,
                             progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _yaml_scalar(value):
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value


def _cmd_train(args) -> int:
    from jaxsae.config import load_config, sweep_label
    from jaxsae.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=not args.no_progress)
    members = result.sweep or (result,)
    for member, point in zip(members, cfg.sweep.points if cfg.sweep else [None], strict=True):
        ev = member.eval
        print(f"trained {result.step} steps" + (f" ({sweep_label(point)})" if point else "")
              + f"; evaluation on {ev['tokens']} "
              f"{'held-out ' if ev['held_out'] else 'training '}tokens: "
              f"L0 {ev['l0']:.2f}, explained variance {ev['explained_variance']:.4f}, "
              f"dead {ev['dead_fraction']:.3f}")
    if result.sweep:
        print(f"{len(members)} SAEs exported to {result.sae_dir}/*/sae; "
              f"summary in {result.run_dir / 'sweep.csv'}")
    else:
        print(f"SAE exported to {result.sae_dir}")
    print(f"evaluate {'one' if result.sweep else 'it'} with: jaxsae eval {members[0].sae_dir} "
          f"--data {cfg.data.path}"
          + (f" --truth {cfg.data.path}" if cfg.data.generate else ""))
    return 0


def _cmd_bench(args) -> int:
    from jaxsae.bench import load_bench_config, run_bench

    cfg = load_bench_config(args.config, args.overrides)
    rows = run_bench(cfg, progress=not args.no_progress)
    out = cfg.directory
    print(f"{len(rows)} SAEs in {len(cfg.arms)} arms; results in {out / 'results.md'}, "
          f"{out / 'results.csv'} and {out}/*.png")
    return 0


def _cmd_data(args) -> int:
    from jaxsae.data.inspect import format_summary, inspect

    summary = inspect(args.path, hook=args.hook, progress=not args.no_progress)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


def _cmd_import(args) -> int:
    from jaxsae.export import import_config

    config = import_config(args.sae_dir, args.out, args.data, args.overrides,
                           overwrite=args.overwrite)
    print(f"wrote {config}\ntrain it with: jaxsae train {config}")
    return 0


def _cmd_export(args) -> int:
    from jaxsae.finish import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                            data=args.data, overwrite=args.overwrite)
    print(f"exported {out}")
    return 0


def _cmd_cache(args) -> int:
    from jaxsae.data.lm import cache

    out = cache(args.model, args.layer, args.text, args.out, tokens=args.tokens, hook=args.hook,
                context=args.context, dtype=args.dtype,
                drop_first_position=args.drop_first_position, batch_size=args.batch_size,
                shard_tokens=args.shard_tokens, model_dtype=args.model_dtype,
                device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}\ntrain on it with: jaxsae train CONFIG data.path={out}")
    return 0


def _check_positive(args, *names) -> None:
    require_at_least(*((f"--{name.replace('_', '-')}", getattr(args, name), 1)
                       for name in names))


def _cmd_stitch(args) -> int:
    from jaxsae.analysis import stitch

    _check_positive(args, "tokens", "batch_size")
    if not 0 < args.threshold < 1:
        raise JaxsaeError(f"--threshold must be between 0 and 1, got {args.threshold}")
    common = {"threshold": args.threshold, "tokens": args.tokens, "batch_size": args.batch_size,
              "hook": args.hook, "progress": not args.no_progress, "overwrite": args.overwrite}
    if args.stitch_command == "compare":
        stitch.compare(args.small, args.large, args.data, args.out, **common)
        print(Path(args.out, "summary.md").read_text())
    else:
        if args.retrain_decoder_tokens < 0:
            raise JaxsaeError("--retrain-decoder-tokens must be >= 0")
        stitch.frankenstein([args.base, *args.others], args.data, args.out, lr=args.lr,
                            retrain_decoder_tokens=args.retrain_decoder_tokens, **common)
        print(Path(args.out, "frankenstein.md").read_text())
    print(f"written to {args.out}")
    return 0


def _cmd_analyze(args) -> int:
    from jaxsae.analysis.geometry import analyze

    _check_positive(args, "tokens", "batch_size", "cofire_tokens")
    summary = analyze(args.sae_dir, args.data, args.out, tokens=args.tokens,
                      cofire_tokens=args.cofire_tokens, batch_size=args.batch_size,
                      cluster_threshold=args.cluster_threshold, hook=args.hook,
                      progress=not args.no_progress, overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    print(f"open {Path(args.out) / 'index.html'}")
    return 0


def _splice_settings(args, sae_dir: str, loaded) -> tuple:
    """(layer, hook, context, drop_first_position, clean_norm_above) for one SAE: the flags,
    else what its cfg.json says about its training data."""
    from jaxsae.data import lm as lm_data

    meta = loaded.cfg_json.get("metadata", {})
    trained_at = lm_data.parse_hook_name(meta.get("hook_name", ""))
    layer = args.layer if args.layer is not None else trained_at and trained_at[0]
    if layer is None:
        raise JaxsaeError(f"--layer: required ({sae_dir}/cfg.json names no hook_name "
                          "like blocks.L.hook_resid_post)")
    hook = args.hook or (trained_at[1] if trained_at else "resid_post")
    if hook not in lm_data.HOOK_POINTS:
        raise JaxsaeError(f"--hook must be one of {', '.join(lm_data.HOOK_POINTS)}, got {hook!r}")
    context = args.context or meta.get("context_size") or 128
    drop_first = args.drop_first_position
    if drop_first is None:
        drop_first = meta.get("drop_first_position", True)
    clean_above = args.clean_norm_above
    if clean_above is None:
        clean_above = loaded.cfg_json.get("jaxsae", {}).get("drop_norm_above")
    elif clean_above <= 0:
        raise JaxsaeError(f"--clean-norm-above must be > 0, got {clean_above}")
    return layer, hook, context, drop_first, clean_above


def _eval_model(args, saes: list) -> list[dict]:
    """`jaxsae eval --model`: the SAEs spliced into the language model (jaxsae.splice)."""
    from jaxsae import splice
    from jaxsae.data import lm as lm_data

    settings = [_splice_settings(args, d, s) for d, s in zip(args.sae_dir, saes, strict=True)]
    for sae_dir, own in zip(args.sae_dir[1:], settings[1:], strict=True):
        if own != settings[0]:
            raise JaxsaeError(f"{sae_dir}: evaluated as (layer, hook, context, first position "
                              f"dropped, clean norm) {own}, but {args.sae_dir[0]} as "
                              f"{settings[0]}: evaluate them separately")
    layer, hook, context, drop_first, clean_above = settings[0]
    if not args.text:
        raise JaxsaeError("--text: required with --model (held-out text to evaluate on)")
    tokens = 16384 if args.tokens is None else args.tokens
    batch_size = 8 if args.batch_size is None else args.batch_size
    require_at_least(("--context", context, 2), ("--tokens", tokens, 1),
                     ("--batch-size", batch_size, 1))
    files = lm_data.text_files(args.text)
    lm = lm_data.load_model(args.model, device=args.device, layer=layer, context=context,
                            progress=not args.no_progress)
    windows = splice.eval_windows(lm, files, context, tokens, 1 if drop_first else 0)
    results = splice.ce_loss_recovered(saes, lm, layer, hook, windows,
                                       drop_first_position=drop_first,
                                       clean_norm_above=clean_above, batch_size=batch_size,
                                       progress=not args.no_progress)
    return [{"sae": d, **r} for d, r in zip(args.sae_dir, results, strict=True)]


def _cmd_eval(args) -> int:
    import numpy as np

    from jaxsae import evaluate, tensorfile
    from jaxsae.config import DataConfig
    from jaxsae.data import open_source, synthetic
    from jaxsae.data.source import iter_blocks
    from jaxsae.errors import DataError
    from jaxsae.export import load_sae

    if args.model:
        if args.truth:
            raise JaxsaeError("--truth goes with --data, not --model")
        results = _eval_model(args, [load_sae(d) for d in args.sae_dir])
        print(json_text(results[0] if len(results) == 1 else results))
        return 0
    if len(args.sae_dir) > 1:
        raise JaxsaeError("--data evaluates one SAE at a time (several go with --model)")
    args.sae_dir = args.sae_dir[0]
    loaded = load_sae(args.sae_dir)
    data = open_source(DataConfig(path=args.data, hook=args.hook))
    if data.d_in != loaded.d_in:
        raise DataError(f"{args.data}: d_in {data.d_in} does not match the SAE's d_in "
                        f"{loaded.d_in} ({args.sae_dir})")
    start = 0 if args.tokens is None else max(0, data.n_tokens - args.tokens)
    batch_size = args.batch_size or 4096
    metrics = evaluate.reconstruction_metrics(
        loaded.params, loaded.sae, iter_blocks(data, batch_size, start=start))
    metrics.pop("firing_frequency")
    if args.truth:
        truth = Path(args.truth)
        directory = truth.parent if truth.is_file() else truth
        if (directory / synthetic.TRUTH_JSON).is_file():
            # The data's own truth: everything (firing, absorption, circles) on these tokens.
            full = synthetic.load_truth(directory)
            full.check_data(data, args.truth, args.data)
            try:
                report = evaluate.truth_report(loaded.params, loaded.sae, data, full,
                                               start=start, batch_size=batch_size,
                                               details=args.details)
            except ValueError as e:
                raise DataError(f"--truth {args.truth}: {e}") from None
            metrics = {**report, **metrics}
        else:  # directions only (e.g. a bare truth.safetensors): feature recovery
            if truth.is_dir():
                truth = truth / synthetic.TRUTH_TENSORS
            if not truth.is_file():
                raise DataError(f"{truth}: truth file not found")
            directions = tensorfile.read(truth).get("directions")
            if directions is None or directions.ndim != 2 or directions.shape[1] != loaded.d_in:
                raise DataError(f"{truth}: no 'directions' [n_features, {loaded.d_in}] tensor")
            metrics.update(evaluate.feature_recovery(np.asarray(directions),
                                                     loaded.params["W_dec"]))
    print(json_text(metrics))
    return 0


COMMANDS = {"synth": _cmd_synth, "data": _cmd_data, "train": _cmd_train, "export": _cmd_export,
            "bench": _cmd_bench,
            "import": _cmd_import, "eval": _cmd_eval, "cache": _cmd_cache,
            "stitch": _cmd_stitch, "analyze": _cmd_analyze}

if __name__ == "__main__":
    sys.exit(main())
