# Sourced by the device scripts: packages the device image lacks come as wheels in .whl/ (built here by
# benchmarks/device_wheels.sh; README, "A GPU machine without internet"), installed once per machine start;
# results go to $OUT.
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  installed=/tmp/site/.installed-$(ls .whl | sha1sum | cut -c1-12)
  if ! [ -e "$installed" ]; then
    # Compiled to bytecode here, once: every job's worker is a fresh process, and without .pyc files
    # (the image may set PYTHONDONTWRITEBYTECODE) each one spent 17-20 s importing on our H100 host.
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch "$installed"
  fi
  export PYTHONPATH=/tmp/site
fi
# The image sets PYTHONDONTWRITEBYTECODE and ships torch without bytecode, so every sweep's worker server
# compiled torch's modules from source (BENCHMARKS.md, "A sweep's own start"). Kept under a prefix instead, as a
# normal install keeps them beside the sources, and written once per machine start by importing what the
# workers' server imports (runner/launch.py).
export PYTHONPYCACHEPREFIX=/tmp/pycache
unset PYTHONDONTWRITEBYTECODE
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! [ -e /tmp/pycache/.written ]; then
  python3 -c "from runner.launch import PRELOADED; [__import__(module) for module in PRELOADED]" && touch /tmp/pycache/.written
fi
# A sweep's log without the per-call progress bars and the libraries' warnings (each warning is two lines:
# the message, then the source line that raised it).
quiet() { grep --line-buffered -v -E "timed [0-9]+/|FutureWarning|UserWarning|deprecate\(|^ +warnings\.warn\("; }
