#!/usr/bin/env bash
# Makes the Triton Inference Server environment the integration tests (tests/triton/) and
# `vlexport triton` users on a CPU machine run: its own virtualenv, since the nvidia-pytriton wheel that
# bundles tritonserver 2.51 + the python backend pins numpy < 2 (the main environment has numpy 2).
#
#   scripts/tritonserver_env.sh            # -> $VLEXPORT_TRITON_ENV (default ~/.cache/vlexport/tritonserver-env)
#   $ENV/bin/tritonserver --model-repository REPO ...   # a wrapper with LD_LIBRARY_PATH set
#
# Layout inside $ENV (what the issue found working): tritonserver/ is a copy of the wheel's
# pytriton/tritonserver, with python_backend_stubs/3.11/triton_python_backend_stub put into
# backends/python/; LD_LIBRARY_PATH holds the interpreter's sysconfig LIBDIR (libpython for the stub) and
# the wheel's nvidia_pytriton.libs (the bundled libcudart). Besides nvidia-pytriton the venv holds exactly
# what a repository's python models import (vlexport/serve/requirements.txt, which `vlexport triton` writes
# into REPO/requirements.txt): no torch, no transformers, no vlexport; the repositories carry their own
# copy of vlexport's serving runtime. Idempotent: a finished env (stamp matches this script and the
# requirements) is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${VLEXPORT_TRITON_ENV:-$HOME/.cache/vlexport/tritonserver-env}"
python="${PYTHON:-python3.11}"
stamp="$env_dir/.vlexport-stamp"
requirements="$here/vlexport/serve/requirements.txt"
want="$(cat "$0" "$requirements" | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "tritonserver env up to date: $env_dir"
  exit 0
fi
start=$(date +%s)
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip install -q)
"${pip[@]}" --upgrade "pip>=24" setuptools wheel
"${pip[@]}" "nvidia-pytriton==0.7.0" -r "$requirements"

site="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
libdir="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
pyver="$("$env_dir/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
wheel="$site/pytriton/tritonserver"
[ -x "$wheel/bin/tritonserver" ] || { echo "nvidia-pytriton has no $wheel/bin/tritonserver" >&2; exit 1; }
stub="$wheel/python_backend_stubs/$pyver/triton_python_backend_stub"
[ -x "$stub" ] || { echo "nvidia-pytriton has no python backend stub for Python $pyver ($stub)" >&2; exit 1; }
cp -a "$wheel" "$env_dir/tritonserver"
cp "$stub" "$env_dir/tritonserver/backends/python/triton_python_backend_stub"

cat > "$env_dir/bin/tritonserver" <<WRAP
#!/usr/bin/env bash
# tritonserver from nvidia-pytriton with the libraries it needs; python models run this venv's packages.
export LD_LIBRARY_PATH="$libdir:$site/nvidia_pytriton.libs:$env_dir/tritonserver/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$env_dir/bin:\$PATH"
export PYTHONPATH="$site"  # this venv's packages only: repositories bring their own vlexport
exec "$env_dir/tritonserver/bin/tritonserver" --backend-directory="$env_dir/tritonserver/backends" "\$@"
WRAP
chmod +x "$env_dir/bin/tritonserver"
# The binary starts, so its libraries are found (--help prints the usage and exits 1 by design).
help="$("$env_dir/bin/tritonserver" --help 2>&1 || true)"
grep -q "Usage: tritonserver" <<<"$help" || { echo "tritonserver does not start: ${help:0:400}" >&2; exit 1; }
echo "$want" > "$stamp"
echo "tritonserver env made in $(( $(date +%s) - start )) s: $env_dir"
