#!/usr/bin/env bash
# Sets up minillm in an isolated environment (.venv, created if missing) and the data it needs.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MINILLM_VENV:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || { echo "== creating $venv"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# A plain `pip install torch` on a Linux machine pulls the multi-GB CUDA build, so pick the build first.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== NVIDIA GPU found: installing PyTorch with CUDA"
    "${pip[@]}" "torch>=2.4"
  else
    echo "== no NVIDIA GPU: installing the CPU build of PyTorch"
    "${pip[@]}" --retries 1 --timeout 20 "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu || {
      echo "Could not install a CPU build of PyTorch. Install one by hand, then run this again:" >&2
      echo "  $venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu" >&2
      exit 1
    }
  fi
fi

stamp="$venv/.minillm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing minillm and its dependencies"
  "${pip[@]}" -e ".[dev]"
  touch "$stamp"
fi

# WordNet for chapter 01's lemmatiser: nltk.download when online, Debian's packages when not.
"$venv/bin/minillm" setup-nltk
