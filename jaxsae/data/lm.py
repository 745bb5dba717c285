"""Activations from a Hugging Face causal language model (extra `lm`: torch + transformers).

`cache()` (the `jaxsae cache` command) tokenises text files, runs the model only as far as the hook
and writes the activations as a jaxsae shard set. The model is a Hugging Face model directory, a
hub name, or a `.gguf` file (dequantised by transformers). Hook points follow TransformerLens
names, `blocks.{layer}.hook_resid_post` (the output of block `layer`) and `...hook_resid_pre` (its
input), so an exported SAE's `hook_name` means the same thing in SAELens; for transcoders, the
block's MLP: `mlp_in` its normalised input (`blocks.{layer}.ln2.hook_normalized`), `mlp_out`
its output (`blocks.{layer}.hook_mlp_out`), read by hooks on the block's `mlp` module.

Token windows: the text files are tokenised in order, each followed by the EOS token, and cut
into windows of `context` tokens, each starting with the BOS token. Position 0 of every window is
an attention sink whose residual norm is orders of magnitude above the rest; it is dropped unless
`drop_first_position=False`. The same windows feed `jaxsae.splice` (CE loss recovered).

The activation is read by a hook on the block itself, never from `output_hidden_states`: the last
entry of that tuple is the output of the final norm, not the residual stream.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxsae import outputs
from jaxsae.data.shards import (
    DTYPES,
    TARGET_DIR,
    ShardSet,
    ShardWriter,
    is_shard_dir,
    read_manifest,
)
from jaxsae.errors import DataError, JaxsaeError, require_at_least, require_at_most
from jaxsae.progress import Progress
from jaxsae.runlock import live_holder

HOOK_POINTS = ("resid_post", "resid_pre", "mlp_in", "mlp_out")
# TransformerLens's names of the points that are not blocks.{layer}.hook_{point}
_TL_NAMES = {"mlp_in": "ln2.hook_normalized", "mlp_out": "hook_mlp_out"}
MODEL_DTYPES = ("float32", "bfloat16", "float16")
TEXT_BLOCK_CHARS = 1 << 18
"""Text files are tokenised in blocks of about this many characters, cut at line ends."""


def hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.{_TL_NAMES.get(point, f'hook_{point}')}"


def parse_hook_name(name: str) -> tuple[int, str] | None:
    """(layer, point) of a TransformerLens hook name (`blocks.{layer}.hook_{point}`, ...), or
    None."""
    m = re.fullmatch(r"blocks\.(\d+)\.([\w.]+)", name or "")
    if not m:
        return None
    for point in HOOK_POINTS:
        if m[2] == _TL_NAMES.get(point, f"hook_{point}"):
            return int(m[1]), point
    return None


def require_lm():
    """Imports torch and transformers, or stops with how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise JaxsaeError(f"this command needs the optional extra `lm` (missing {e.name}): "
                          "pip install 'jaxsae[lm]'") from None
    return torch, transformers


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class LanguageModel:
    name: str
    model: Any
    """A transformers causal LM, in eval mode, without gradients."""
    tokenizer: Any
    blocks: Any
    """The model's stack of transformer blocks (a torch ModuleList)."""
    n_layers: int
    device: Any

    @property
    def bos_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise JaxsaeError(f"--model {self.name}: the tokenizer has neither a BOS nor an EOS "
                              "token to start windows with")
        return int(bos)

    @property
    def separator_id(self) -> int:
        tok = self.tokenizer
        return int(tok.eos_token_id) if tok.eos_token_id is not None else self.bos_id


def _names_a_path(name: str) -> bool:
    """Whether `name` can only be a local path: absolute, ./ or ../ or ~, more than one /,
    or a first component that is a local directory (a hub name is `org/model`)."""
    parts = Path(name).parts
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..")
            or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()))


def load_model(name: str, *, dtype: str = "float32", device: str | None = None,
               layer: int | None = None, context: int | None = None, truncate: bool = False,
               widths: Sequence[tuple[str, int]] = (), progress: bool = True) -> LanguageModel:
    """Loads `name` (a model directory, a hub name, or a .gguf file) and its tokenizer.

    `layer`, `context` and `widths` ((what, its width) pairs: every hook point is the
    model's hidden size wide), when given, are checked against the model's config before the
    weights are loaded; `truncate` drops the blocks after `layer` (for caching: nothing after
    the hook is run)."""
    torch, transformers = require_lm()
    if dtype not in MODEL_DTYPES:
        raise JaxsaeError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    device = _torch_device(torch, device)  # before the (slow) load
    path = Path(name)
    kwargs: dict[str, Any] = {}
    if name.endswith(".gguf"):
        if not path.is_file():  # (fault testing: a directory was "no such .gguf file")
            what = ("a directory, not a .gguf file" if path.is_dir()
                    else "not a regular file" if path.exists() else "no such .gguf file")
            raise JaxsaeError(f"--model {name}: {what}")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() and not path.is_dir():
        raise JaxsaeError(f"--model {name}: expected a model directory, a hub name or a .gguf file")
    elif not path.exists() and _names_a_path(name):  # (not a hub name: no retries, no noise)
        raise JaxsaeError(f"--model {name}: no such model directory")
    else:
        where = name
    # transformers' bars are carriage-return streams: shown on a terminal only.
    progress = progress and sys.stderr.isatty()
    if progress:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
        n_layers = _n_layers(config)
        if layer is not None:
            _check_layer(name, n_layers, layer)
        longest = _max_positions(config)
        if context is not None and longest is not None and context > longest:
            raise JaxsaeError(f"--context {context}: {name} takes at most {longest} positions")
        hidden = _hidden_size(config)
        for what, width in widths:  # (fault testing: found only once the weights had loaded)
            if hidden is not None and width != hidden:
                raise JaxsaeError(f"{what} {width}, but {name}'s hook points are {hidden} wide")
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
        with _gguf_bar(progress):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError, ImportError, KeyError, struct.error) as e:
        # (struct.error: the GGUF reader's, for a .gguf cut inside its header; fault testing:
        # a traceback)
        raise JaxsaeError(f"--model {name}: cannot load it ({_first_line(e)})") from None
    try:
        model.eval().requires_grad_(False).to(device)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA" asserts
        raise JaxsaeError(f"--device {device}: cannot put the model there "
                          f"({_first_line(e)})") from None
    blocks = _find_blocks(model, n_layers, name)
    if truncate and layer is not None:
        del blocks[layer + 1 :]
    return LanguageModel(name, model, tokenizer, blocks, n_layers, torch.device(device))


def _first_line(error: BaseException) -> str:
    """An exception's first line (its type's name if it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _torch_device(torch, device: str | None) -> str:
    """`device` checked (a torch device this PyTorch has), or the default: cuda when there is
    one, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise JaxsaeError(f"--device {device!r}: not a PyTorch device "
                          f"({_first_line(e)})") from None
    if parsed.type == "meta":  # (shapes only: the first value read was a traceback)
        raise JaxsaeError(f"--device {device}: holds no values, only shapes; use cpu or cuda")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise JaxsaeError(f"--device {device}: this PyTorch sees no CUDA device (use cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise JaxsaeError(f"--device {device}: this PyTorch sees {count} CUDA device(s)")
    return device


@contextmanager
def _gguf_bar(enabled: bool):
    """transformers' GGUF loader draws its own tqdm bar ("Converting and de-quantizing"),
    which ignores transformers' progress setting: off unless `enabled`."""
    import importlib

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    if enabled or module is None or not hasattr(module, "tqdm"):
        yield
        return
    original = module.tqdm
    module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def _text_config(config):
    """The language model's own config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_layers(config) -> int:
    text = _text_config(config)
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not isinstance(n, int):
        raise ValueError("its config gives no number of layers")
    return n


def _hidden_size(config) -> int | None:
    text = _text_config(config)
    n = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    return n if isinstance(n, int) else None


def _max_positions(config) -> int | None:
    text = _text_config(config)
    n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return n if isinstance(n, int) else None


def _find_blocks(model, n: int, name: str):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise JaxsaeError(f"--model {name}: cannot find its stack of {n} transformer blocks")


def check_layer(lm: LanguageModel, layer: int) -> None:
    _check_layer(lm.name, lm.n_layers, layer)


def _check_layer(name: str, n_layers: int, layer: int) -> None:
    if not 0 <= layer < n_layers:
        raise JaxsaeError(f"--layer {layer}: {name} has layers 0..{n_layers - 1}")


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once the activation is read."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(lm: LanguageModel, layer: int, point: str, fn):
    """Within the block, `fn(x)` sees the activation x [B, T, d] at the hook and returns its
    replacement (None keeps x)."""
    if point not in HOOK_POINTS:
        raise JaxsaeError(f"--hook must be one of {', '.join(HOOK_POINTS)}, got {point!r}")
    block = lm.blocks[layer]
    # the block itself, or its MLP (mlp_in: the MLP's input, the block's normalised residual)
    module = block if point.startswith("resid") else _mlp_of(lm, block)
    if point in ("resid_post", "mlp_out"):
        def after(module, args, output):
            new = fn(_hidden(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handle = module.register_forward_hook(after)
    else:
        def before(module, args, kwargs):
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs), None)
            new = fn(args[0] if args else kwargs[key])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, key: new}
        handle = module.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _mlp_of(lm: LanguageModel, block):
    """The block's MLP module (`mlp` in Llama, Qwen, Gemma, Mistral, GPT-2, ...)."""
    import torch

    for name in ("mlp", "feed_forward", "ffn"):
        if isinstance(getattr(block, name, None), torch.nn.Module):
            return getattr(block, name)
    raise JaxsaeError(f"--model {lm.name}: its blocks have no mlp module to hook "
                      "(mlp_in / mlp_out)")


@contextmanager
def recording_prefix(lm: LanguageModel, layer: int):
    """Within, a forward pass records what the blocks before `layer` hand to it (the output
    of block layer − 1) in the dict yielded, for `reusing_prefix`."""
    box: dict[str, Any] = {}
    if layer == 0:
        yield box
        return

    def record(module, args, output):
        box["output"] = output

    handle = lm.blocks[layer - 1].register_forward_hook(record)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def reusing_prefix(lm: LanguageModel, layer: int, recorded: dict[str, Any]):
    """Within, the blocks before `layer` do no work: block layer − 1 returns the output
    `recording_prefix` saw and the ones before it pass their input through, so a forward pass
    on the same tokens recomputes only the embedding and blocks `layer`.. (whose input is
    unchanged: a splice at `layer` changes nothing before it)."""
    if layer == 0:
        yield
        return
    if "output" not in recorded:
        raise RuntimeError("no recorded prefix: run a pass inside recording_prefix first")
    output = recorded["output"]

    def passed_through(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    skipped = lm.blocks[:layer]
    for block in skipped[:-1]:
        block.forward = passed_through
    skipped[-1].forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for block in skipped:
            del block.forward  # back to the class's forward


def capture(lm: LanguageModel, layer: int, point: str | tuple[str, ...],
            ids: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
    """The float32 activation [B, T, d] at the hook for token ids [B, T] (a tuple of points:
    one array each, from one pass); the blocks after the last point read, the final norm and
    the unembedding are never run."""
    import torch

    points = (point,) if isinstance(point, str) else tuple(point)
    box: dict[str, Any] = {}

    def grab(name):
        def keep(x):
            box[name] = x
            if len(box) == len(points):
                raise _Captured
        return keep

    with contextlib.ExitStack() as stack:
        for name in points:
            stack.enter_context(hooked(lm, layer, name, grab(name)))
        with torch.inference_mode(), contextlib.suppress(_Captured):
            lm.model(input_ids=torch.as_tensor(ids, device=lm.device), use_cache=False)
    arrays = tuple(box[name].float().cpu().numpy() for name in points)
    return arrays[0] if isinstance(point, str) else arrays


# ---------------------------------------------------------------------------------------------
# Text


def text_files(paths: Sequence[str]) -> list[Path]:
    """The files named, with directories expanded to their files (sorted, hidden ones skipped);
    a file named twice (or inside a directory named too) is refused."""
    files: list[Path] = []
    given: dict[tuple[int, int], str] = {}  # (device, inode) -> the file as first named
    for p in paths:
        path = Path(p)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts))
        else:  # (fault testing: /dev/null was "no such file or directory")
            raise DataError(f"--text {p}: " + ("not a regular file or directory"
                                               if path.exists() else "no such file or directory"))
        for file in found:
            # (fault testing: `--text A A`, or a directory and a file in it, cached the text
            # twice, silently; training held out tokens whose text it trained on)
            named = str(file) if str(file) == p else f"{file} (in --text {p})"
            info = file.stat()
            key = (info.st_dev, info.st_ino)
            if key in given:
                again = "given twice" if given[key] == named else f"the same file as {given[key]}"
                raise DataError(f"--text {named}: {again}; its text would be read twice")
            given[key] = named
        files += found
    if not files:
        raise DataError(f"--text {' '.join(paths)}: no text files")
    for file in files:
        _check_text(file)
    return files


_TEXT_HEAD = 1 << 16


def _check_text(file: Path) -> None:
    """Refuses a file whose start is not UTF-8 text (a NUL byte, or more than 1 % of it
    undecodable): a binary file, a shard or a model among the text was tokenised as text
    (fault testing: `--text` naming a shard directory cached garbage, exit 0)."""
    with open(file, "rb") as fh:
        head = fh.read(_TEXT_HEAD)
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - (len(head) == _TEXT_HEAD)  # (a character cut at the end)
    nul = b"\0" in head
    if nul or bad > 0.01 * max(len(text), 1):
        what = "NUL bytes" if nul else f"{bad} undecodable bytes"
        raise DataError(f"--text {file}: not UTF-8 text ({what} in its first {len(head):,} "
                        "bytes); give text files (or the directory of only those)")


def _token_blocks(tokenizer, files: Sequence[Path], separator: int) -> Iterator[np.ndarray]:
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as fh:
            buf: list[str] = []
            size = 0
            for line in itertools.chain(fh, [None]):
                if line is not None:
                    buf.append(line)
                    size += len(line)
                if buf and (line is None or size >= TEXT_BLOCK_CHARS):
                    ids = tokenizer("".join(buf), add_special_tokens=False)["input_ids"]
                    yield np.asarray(ids, np.int64)
                    buf, size = [], 0
        yield np.asarray([separator], np.int64)


def token_windows(lm: LanguageModel, files: Sequence[Path], context: int) -> Iterator[np.ndarray]:
    """Windows [context] of token ids: BOS, then the next context-1 tokens of the text stream."""
    body = context - 1
    pending, n = [], 0
    for ids in _token_blocks(lm.tokenizer, files, lm.separator_id):
        pending.append(ids)
        n += len(ids)
        if n < body:
            continue
        stream = np.concatenate(pending)
        cut = len(stream) - len(stream) % body
        for start in range(0, cut, body):
            yield np.concatenate([[lm.bos_id], stream[start : start + body]])
        pending, n = [stream[cut:]], len(stream) - cut


def batched(windows: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    while batch := list(itertools.islice(windows, size)):
        yield np.stack(batch)


# ---------------------------------------------------------------------------------------------
# Caching


def cache(model: str, layer: int, text: Sequence[str], out: str | Path, *, tokens: int,
          hook: str = "resid_post", context: int = 128, dtype: str = "float32",
          drop_first_position: bool = True, batch_size: int = 32, shard_tokens: int = 65536,
          model_dtype: str = "float32", device: str | None = None, overwrite: bool = False,
          progress: bool = True, target_hook: str | None = None) -> tuple[Path, bool]:
    """Caches `tokens` activations of `model` at `blocks.{layer}.hook_{hook}` to `out`; with
    `target_hook`, a transcoder's pairs: the activations at that point of the same tokens,
    from the same forward pass, to `out/target` (published with `out`). Returns `out` and
    whether anything was written (not when `out` holds this cache already).

    Resumable: an interrupted run leaves `<out>.partial/`, and the same call continues from its
    last complete shard and writes exactly what an uninterrupted run would have written."""
    points = (hook,) if target_hook is None else (hook, target_hook)
    for point, flag in zip(points, ("--hook", "--target-hook"), strict=False):
        if point not in HOOK_POINTS:
            raise JaxsaeError(f"{flag} must be one of {', '.join(HOOK_POINTS)}, got {point!r}")
    if target_hook == hook:
        raise JaxsaeError(f"--target-hook: the same point as --hook ({hook}); a transcoder maps "
                          "one activation to another")
    if dtype not in DTYPES:
        raise JaxsaeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    require_at_least(("--layer", layer, 0), ("--context", context, 2), ("--tokens", tokens, 1),
                     ("--batch-size", batch_size, 1), ("--shard-tokens", shard_tokens, 1))
    # (windows are counted with itertools.islice, which takes no count above sys.maxsize;
    # fault testing: --tokens 1e21 or --batch-size 1e23 was a traceback)
    require_at_most(("--tokens", tokens, sys.maxsize), ("--batch-size", batch_size, sys.maxsize))
    files = text_files(text)
    out = outputs.canonical(out)
    # what this reads is never replaced; checked before the model loads (each file too: one
    # reached through a link lies elsewhere, and fault testing saw --overwrite replace it)
    inputs = (*text, *files, *([model] if Path(model).exists() else []))
    # (its place is checked once there is something to write: a finished cache on a
    # read-only file system is "already cached", as it was; a review)
    outputs.check_target(out, "shards", overwrite=overwrite, inputs=inputs, writable=False)
    # What the cache was read from, recorded in its manifest: a local model and text files by
    # absolute path (fault testing: paths as given depended on the working directory), with
    # their sizes and modification times. A resumed call continues only the same cache: a
    # text file or a local model file rewritten since (even to the same size) starts it
    # afresh instead of mixing shards of two versions; a finished cache is that cache only
    # for the same files (fault testing: a rerun after the text or the weights changed said
    # "already cached" and kept the old activations).
    local = Path(model).exists()
    inputs_now = {"files": [[str(f.absolute()), *_stamp(f)] for f in files],
                  "model_files": (None if not local else _stamp(Path(model))
                                  if Path(model).is_file()
                                  else outputs.file_inventory(Path(model)))}
    sources = [{"model": str(Path(model).absolute()) if local else model, "layer": layer,
                "hook": hook_name(layer, point),
                "text": [str(Path(t).absolute()) for t in text], "context": context,
                "drop_first_position": drop_first_position, "prepend_bos": True,
                "model_dtype": model_dtype, "inputs": inputs_now} for point in points]
    if out.exists() and not overwrite:
        if _already_cached(out, sources, tokens, dtype):
            print(f"{out}: already cached ({read_manifest(out).n_tokens} tokens); nothing "
                  "written", file=sys.stderr)
            return out, False
        raise DataError(f"{out}: already exists{_how_it_differs(out, sources)} (remove it, "
                        "choose another --out, or pass --overwrite)")
    outputs.refuse_unwritable_place(out, f"--out {out}")
    # (and what the shards hold and how windows are batched: a rerun asking for other tokens,
    # dtype, shards or batches starts afresh; a partial of more tokens than asked was
    # published whole, and one batched otherwise was not bit-identical: fault testing)
    keys = [{**source, "cache": {"tokens": tokens, "dtype": dtype,
                                 "shard_tokens": shard_tokens, "batch_size": batch_size}}
            for source in sources]
    staging = outputs.partial_path(out)
    holder = live_holder(staging)
    if holder is not None:  # (refused before the model loads, not after)
        raise DataError(f"{staging}: another jaxsae process is writing {out.name} here "
                        f"({holder}); wait for it to finish or stop it")

    lm = load_model(model, dtype=model_dtype, device=device, layer=layer, context=context,
                    truncate=True, progress=progress)
    first = 1 if drop_first_position else 0
    probe = capture(lm, layer, points, np.full((1, 2), lm.bos_id))
    widths = [a.shape[-1] for a in probe]
    per_window = context - first
    file_type = "safetensors" if dtype == "bfloat16" else "npy"
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(
            out, widths[0], dtype=dtype, shard_tokens=shard_tokens, source=sources[0],
            file_type=file_type, overwrite=overwrite, resume_key=keys[0], inputs=inputs))]
        if target_hook is not None:  # inside the inputs' staging: published with them
            writers.append(stack.enter_context(ShardWriter(
                writers[0].staging / TARGET_DIR, widths[1], dtype=dtype,
                shard_tokens=shard_tokens, source=sources[1], file_type=file_type,
                resume_key=keys[1])))
        # Each writer kept its complete shards; start at the window the fewest reach.
        # From the first window of the batch that holds it, batched as an uninterrupted run
        # batches (the model's numbers depend on the batch's size on the CPU): the rows the
        # writers already hold are skipped below.
        done = min(w.n_tokens for w in writers)
        start = done // per_window // batch_size * batch_size
        windows = itertools.islice(token_windows(lm, files, context), start,
                                   math.ceil(tokens / per_window))
        at = start * per_window  # the token index of the next window's first row
        bar = Progress(tokens, initial=done, unit="tok", unit_scale=True, enabled=progress,
                       desc=f"caching {', '.join(hook_name(layer, p) for p in points)}")
        with bar:
            for ids in batched(windows, batch_size):
                arrays = capture(lm, layer, points, ids)
                rows = [a[:, first:].reshape(-1, w) for a, w in zip(arrays, widths,
                                                                    strict=True)]
                before = min(w.n_tokens for w in writers)
                for writer, acts in zip(writers, rows, strict=True):
                    # rows a writer already holds (a resumed shard) are skipped
                    writer.write(acts[writer.n_tokens - at: tokens - at])
                bar.update(min(w.n_tokens for w in writers) - before)
                at += len(rows[0])
            if not writers[0].n_tokens:
                raise DataError(f"--text {' '.join(map(str, text))}: not one window of "
                                f"--context {context} tokens in it; nothing to cache")
            if writers[0].n_tokens < tokens:  # recorded: a rerun is then already cached
                for writer in writers:
                    writer.source[TEXT_RAN_OUT] = [[str(f.absolute()), f.stat().st_size]
                                                   for f in files]
        if writers[0].n_tokens < tokens:
            print(f"warning: the text ran out after {writers[0].n_tokens} tokens "
                  f"(--tokens {tokens})", file=sys.stderr)
    return out, True


TEXT_RAN_OUT = "text_ran_out"
"""Manifest source key of a cache whose text ran out before --tokens: the text files (absolute
paths; a jaxsae before 2026-12-07 evening wrote them as given) and sizes it read to the end."""


def _stamp(file: Path) -> list[int]:
    """[size, modification time in ns] of `file`."""
    info = file.stat()
    return [info.st_size, info.st_mtime_ns]


def _how_it_differs(out: Path, sources: list[dict]) -> str:
    """", cached from other contents of ..." when `out` is this cache but for the contents of
    its inputs, else ""."""
    try:
        written = dict(read_manifest(out).source)
    except (DataError, OSError):
        return ""
    written.pop(TEXT_RAN_OUT, None)
    mine = sources[0]
    same = {k: v for k, v in written.items() if k != "inputs"} == {
        k: v for k, v in mine.items() if k != "inputs"}
    if not same or "inputs" not in written or written["inputs"] == mine["inputs"]:
        return ""  # (another cache; or one of a jaxsae that did not record its inputs)
    return (", cached from other contents of its text files or model (changed since: "
            "--overwrite caches them again)")


def _already_cached(out: Path, sources: list[dict], tokens: int, dtype: str) -> bool:
    """Whether `out` holds this cache: the same settings and dtype, and exactly --tokens
    tokens, or fewer when that is all the text holds.
    One whose manifest says so but whose shards are missing or damaged is refused."""
    dirs = [out, out / TARGET_DIR][:len(sources)]
    for directory, source in zip(dirs, sources, strict=True):
        if not is_shard_dir(directory):
            return False
        done = read_manifest(directory)
        written = dict(done.source)
        ran_out = written.pop(TEXT_RAN_OUT, None)
        if written != source or done.dtype != dtype:
            return False
        # The text is the same (`inputs`: each file by absolute path, size and time), so only
        # whether it ran out is read from TEXT_RAN_OUT, not its paths: they were written as
        # given, and the same file named another way was "already exists" (fault testing);
        # a manifest written so still reads as this cache.
        if done.n_tokens != tokens and not (done.n_tokens < tokens and ran_out is not None):
            return False  # (more tokens than asked is another cache, not this one)
    # This cache by its manifests; its shards are opened (checked against them, memory-mapped:
    # cheap) before saying so (fault testing: a shard deleted or truncated was "already cached;
    # nothing written", exit 0)
    for directory in dirs:
        try:
            ShardSet(directory)
        except DataError as e:
            raise DataError(f"{out}: already cached but damaged ({e}); pass --overwrite to "
                            "cache it again") from None
    return True
