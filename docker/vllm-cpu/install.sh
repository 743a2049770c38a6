#!/bin/sh
# Runs inside the throwaway build container, with no network: the wheelhouse is mounted
# read-only at /wheelhouse and this directory at /recipe. The last line it prints is the
# engine's version as the installed package reports it, which becomes the image's label.
set -eu
prefix="$1"
engine="$2"
python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --no-index --no-deps --no-cache-dir --no-compile \
    --find-links /wheelhouse --requirement /recipe/requirements.txt
"$prefix/bin/pip" check || true
# Byte-compile once here instead of in every engine container (its root is not persistent).
"$prefix/bin/python" -m compileall -q -j 0 "$prefix/lib" >/dev/null || true
"$prefix/bin/python" -c "import vllm, transformers, torch" >/dev/null
rm -rf /root/.cache
echo "BERTH_ENGINE_VERSION=$("$prefix/bin/python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$engine")"
