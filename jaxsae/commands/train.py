"""`jaxsae train CONFIG [key=value ...]`."""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from jaxsae.commands import Command, Flag, Overrides, command


@command("train")
@dataclass
class Train(Command):
    """Train an SAE from a YAML config.

    Rerunning the same command resumes the run from its
    latest checkpoint. A sweep (`sweep:` in the config, or sweep.KEY=[values] overrides) trains
    several SAEs in one vmapped step on one data stream."""

    memory = ("sae.d_sae", "optim.batch_size", "a sweep's SAEs or its sweep_chunk",
              "data.shuffle_buffer")  # (its windows: two per lane, in float32)

    resumes = True

    config: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="CONFIG")]
    """YAML config (see configs/)"""
    overrides: Overrides = ()
    """dotted overrides, e.g. optim.lr=1e-3 sae.d_sae=8192 loss.l1.coefficient=3 (a term by
    its name: its name:, else its kind; or by position: loss.1.coefficient);
    sweep.optim.lr=[1e-4,3e-4] adds a sweep axis (sweepable: seed, optim.lr, sae.k,
    loss.<name>.coefficient)"""
    no_progress: Flag = False
    """no progress bar"""

    def run(self) -> int:
        import jax

        from jaxsae.config import load_config, sweep_label
        from jaxsae.data.generated import stream_spec
        from jaxsae.data.synthetic import has_truth
        from jaxsae.train import train

        cfg = load_config(self.config, list(self.overrides))
        result = train(cfg, progress=not self.no_progress)
        if jax.process_index() != 0:  # process 0 exported and reports for the run
            return 0
        members = result.sweep or (result,)
        for member, point in zip(members, cfg.sweep.points if cfg.sweep else [None],
                                 strict=True):
            ev = member.eval
            skipped = member.skipped_steps
            said = [sweep_label(point)] if point else []
            said += [f"{skipped} skipped: a non-finite loss or gradient"] if skipped else []
            print(f"trained {f'{result.step - skipped} of ' if skipped else ''}{result.step} "
                  "steps" + (f" ({'; '.join(said)})" if said else "")
                  + f"; evaluation on {ev['tokens']} "
                  f"{'held-out ' if ev['held_out'] else 'training '}tokens: "
                  f"L0 {ev['l0']:.2f}, explained variance {_shown(ev['explained_variance'])}"
                  f", dead {ev['dead_fraction']:.3f}")
        if (note := _degenerate(cfg, [m.eval for m in members], result.step)) is not None:
            print(f"note: {note}", file=sys.stderr)
        what = "transcoder" if cfg.sae.transcoder else "SAE"
        if result.sweep:
            print(f"{len(members)} {what}s exported to {result.sae_dir}/*/sae; "
                  f"summary in {result.run_dir / 'sweep.csv'}")
        else:
            print(f"{what} exported to {result.sae_dir}")
        if cfg.data.stream:
            # the token count too: a last block shorter than the others is drawn otherwise
            # (fault testing: the default count's data held other held-out tokens)
            n = stream_spec(cfg.data.generate, cfg.optim.total_tokens, cfg.data.held_out).tokens
            ev = members[0].eval
            print("the data was streamed (nothing written); `jaxsae synth "
                  f"{cfg.data.generate.get('kind')} --tokens {n}` with data.generate's other "
                  "settings writes the same tokens, for `jaxsae eval SAE --data DIR --truth "
                  f"DIR --tokens {ev['tokens'] + ev.get('dropped_tokens', 0)}` (the held-out "
                  "tokens evaluated here)")
        else:
            # (absolute, as the SAE's path: the command works pasted anywhere)
            data = shlex.quote(str(Path(cfg.data.path).absolute()))
            ev = members[0].eval
            # on the tokens it was evaluated on here, the held-out ones (fault testing: the
            # hint without --tokens evaluated every token, mostly training tokens)
            held = (f" --tokens {ev['tokens'] + ev.get('dropped_tokens', 0)}"
                    if ev["held_out"] else "")
            # the columns it read (fault testing: the hint was refused on a cache of several)
            read = "".join(f" --{flag} {shlex.quote(value)}" for flag, value in (
                ("hook", cfg.data.hook),
                ("target", cfg.data.target and str(Path(cfg.data.target).absolute())),
                ("target-hook", cfg.data.target_hook)) if value)
            print(f"evaluate {'one' if result.sweep else 'it'} with: jaxsae eval "
                  f"{shlex.quote(str(members[0].sae_dir))} --data {data}" + read
                  + (f" --truth {data}" if has_truth(cfg.data.path) and "mcc" in ev else "")
                  + held)  # (a truth the run could not use: none, fault testing)
        return 0


def _degenerate(cfg, evals: list[dict], steps: int) -> str | None:
    """What may have gone wrong, when an SAE learnt nothing usable: no latent fires, or it
    reconstructs worse than the mean token (fault testing: the defaults on a small data set
    and a short run printed "explained variance -0.1568" and nothing else)."""
    silent = [i for i, ev in enumerate(evals) if ev["l0"] == 0]
    worse = [i for i, ev in enumerate(evals) if (ev["explained_variance"] or 0.0) < 0]
    if not (silent or worse):
        return None
    from jaxsae.config import sweep_label

    which = ""  # a sweep's: which SAEs (review: the note did not say)
    if cfg.sweep is not None:
        which = f" (sweep SAE{'s' * (len(silent or worse) > 1)} " + ", ".join(
            f"{i}: {sweep_label(cfg.sweep.points[i])}" for i in (silent or worse)) + ")"
    # (penalties of the codes' size, whose balance with the reconstruction depends on the
    # data's scale; a TopK run's mse alone does not)
    scaled = [name for t, name in zip(cfg.loss, cfg.term_keys(), strict=True)
              if t.term in ("l1", "group_l1_l2") and t.coefficient]
    scale = (" Loss coefficients are at SAELens's scale, for activations normalised to "
             "E|x|^2 = d_in (data.normalize: unit_mean_squared_norm); this run's are not "
             "normalised." if scaled and cfg.data.normalize == "none" else "")
    if silent:
        values = [evals[i]["explained_variance"] for i in silent]
        if all(v is None or not math.isfinite(v) for v in values):  # (the same tokens for
            # every SAE; fault testing: blamed on the penalty)
            return (f"no latent fires on the evaluated tokens{which}, which do not vary "
                    "(explained variance undefined): the held-out tokens are the data's last "
                    "data.eval_tokens.")
        # far worse than the mean with no latent firing: the decoder's bias alone is far from
        # the tokens, which a divergence leaves (or a bias still on its way to their mean)
        far = any(v is not None and v < -1 for v in values)
        return (f"no latent fires on the evaluated tokens{which}" + (
            ": the sparsity penalty outweighs the reconstruction" + (
                " at this data's scale" if scale else "")
            + f" (lower {scaled[0]}.coefficient)" if scaled else "") + f".{scale}" + (
            " If the loss in metrics.jsonl grew by orders of magnitude, the training diverged "
            "instead (lower optim.lr)." if far else ""))
    # (fault testing: an L1 7x the preset's left L0 0.27, and the note said only "more
    # tokens, or a higher optim.lr")
    rare = min(evals[i]["l0"] for i in worse)
    penalty = (f"; at L0 {rare:.2g} almost no latent fires: the sparsity penalty may outweigh "
               f"the reconstruction (lower {scaled[0]}.coefficient)"
               if scaled and rare < 1 else "")
    return (f"explained variance below 0{which}: after {steps:,} steps the reconstruction is "
            "further from the tokens than their mean; a short run may not have left its start "
            f"(more tokens, or a higher optim.lr){penalty}.{scale}")


def _shown(value: float | None) -> str:
    """A metric as eval.json has it: null (undefined: the tokens do not vary) when not finite."""
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "null (undefined)"
