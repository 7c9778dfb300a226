#!/usr/bin/env bash
# Convert an HF Qwen2 folder to GGUF with llama.cpp's convert_hf_to_gguf.py.
# usage: LLAMA_CPP_SRC=/path/to/llama.cpp convert_gguf.sh [HF_DIR] [OUT_DIR] [OUTTYPES...]
#   HF_DIR   default: models/tiny-coder (relative to the repo root)
#   OUT_DIR  default: ./gguf ; writes OUT_DIR/<name>-<outtype>.gguf
#   OUTTYPES default: f32 f16 q8_0
# The converter only knows pre-tokenizers by a hash of their output; ours (byte-level BPE
# with the GPT-2 split regex) is unknown, so an unrecognised hash is mapped to GGUF_PRE
# (default "gpt-2") by monkeypatching get_vocab_base_pre; vendored files stay untouched.
set -euo pipefail

: "${LLAMA_CPP_SRC:?set LLAMA_CPP_SRC to the llama.cpp source tree (holds convert_hf_to_gguf.py)}"
conv="$LLAMA_CPP_SRC/convert_hf_to_gguf.py"
[ -f "$conv" ] || { echo "error: $conv not found" >&2; exit 1; }

root="$(cd "$(dirname "$0")/../.." && pwd)"
hf="${1:-$root/models/tiny-coder}"
out="${2:-gguf}"
shift $(( $# > 2 ? 2 : $# ))
types=("$@"); [ ${#types[@]} -gt 0 ] || types=(f32 f16 q8_0)
name="$(basename "$hf")"
mkdir -p "$out"

for t in "${types[@]}"; do
  GGUF_PRE="${GGUF_PRE:-gpt-2}" python3 - "$conv" "$hf" --outtype "$t" --outfile "$out/$name-$t.gguf" <<'PY'
import os, runpy, sys
conv = sys.argv[1]
src = os.path.dirname(os.path.abspath(conv))
sys.path[:0] = [src, os.path.join(src, "gguf-py")]
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        pre = os.environ["GGUF_PRE"]
        base.logger.warning("unknown BPE pre-tokenizer hash; using %r", pre)
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = sys.argv[1:]
runpy.run_path(conv, run_name="__main__")
PY
  echo "wrote $out/$name-$t.gguf"
done
