"""`jaxsae cache --model MODEL --layer L --text FILE... --tokens N --out DIR`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from jaxsae.commands import Command, Flag, command, unset
from jaxsae.errors import JaxsaeError


@command("cache")
@dataclass
class Cache(Command):
    """Cache a language model's activations as shards.

    Runs a Hugging Face causal LM over text
    files up to the hook and writes its activations as a jaxsae shard directory (needs the
    extra `lm`: pip install 'jaxsae[lm]'). Each window of --context tokens starts with BOS;
    rerunning an interrupted command resumes it."""

    memory = ("--batch-size",)

    resumes = True

    model: str
    """Hugging Face model directory, hub name, or .gguf file"""
    layer: Annotated[int, tyro.conf.arg(metavar="L")]
    """block index (0-based)"""
    text: Annotated[tuple[str, ...], tyro.conf.arg(metavar="FILE")]
    """text files, or directories of them (read in sorted order)"""
    tokens: Annotated[int, tyro.conf.arg(metavar="N")]
    """activations to write"""
    out: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """shard directory to write"""
    hook: Literal["resid_post", "resid_pre", "mlp_in", "mlp_out"] = "resid_post"
    """the block's output (resid_post) or input (resid_pre), its MLP's normalised input
    (mlp_in: blocks.L.ln2.hook_normalized) or output (mlp_out: blocks.L.hook_mlp_out)"""
    target_hook: Annotated[Literal["resid_post", "resid_pre", "mlp_in", "mlp_out"] | None,
                           unset("POINT", "none")] = None
    """a transcoder's targets: also cache this point (resid_post, resid_pre, mlp_in, mlp_out) of
    the same tokens, into --out/target (e.g. --hook mlp_in --target-hook mlp_out)"""
    context: int = 128
    """tokens per window, BOS included"""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """shard dtype (bfloat16 shards are safetensors)"""
    drop_first_position: bool = True
    """leave out position 0 of each window (an attention sink, norms ~100x the rest)"""
    batch_size: int = 32
    """windows per forward pass"""
    shard_tokens: int = 65536
    """tokens per shard file"""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the model runs in"""
    device: Annotated[str | None, unset("DEVICE", "cuda if available")] = None
    """torch device"""
    overwrite: Flag = False
    """replace an existing --out"""
    no_progress: Flag = False
    """no progress bar"""

    def run(self) -> int:
        from jaxsae.data.lm import cache

        if not self.text:
            raise JaxsaeError("--text: give at least one text file or directory")
        out, wrote = cache(
            self.model, self.layer, list(self.text), self.out, tokens=self.tokens,
            hook=self.hook, context=self.context, dtype=self.dtype,
            drop_first_position=self.drop_first_position, batch_size=self.batch_size,
            shard_tokens=self.shard_tokens, model_dtype=self.model_dtype, device=self.device,
            overwrite=self.overwrite, progress=not self.no_progress,
            target_hook=self.target_hook)
        target = ("" if self.target_hook is None
                  else " " + shlex.quote(f"data.target={out}/target"))
        print(f"wrote {out}\n" * wrote + "train on it with: jaxsae train CONFIG "
              f"{shlex.quote(f'data.path={out}')}{target}")
        return 0
