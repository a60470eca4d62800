#!/usr/bin/env bash
# Idempotent set-up shared by scripts/repro.sh and scripts/test.sh:
#   1. Debian packages for the real renderers (TeX Live + dvipng, LilyPond, fonts) when missing and we can install;
#   2. a virtual environment at .venv with torch pinned FIRST (an unpinned torch pulls a multi-GB CUDA build),
#      then this package with its pinned dependencies.
# Re-running it does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(texlive-latex-base texlive-latex-recommended texlive-fonts-recommended dvipng lilypond
              fonts-dejavu-core libpango-1.0-0 libpangoft2-1.0-0 strace)
missing=()
for tool in latex dvipng lilypond strace; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "setup: installing Debian packages for ${missing[*]} (TeX Live, dvipng, LilyPond; a few minutes once)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "setup: warning: ${missing[*]} not found and no root/sudo; install: apt-get install ${APT_PACKAGES[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.markup2image-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv (torch 2.13.0 CPU first)"
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  # MOSES SMILES CSVs: the wheel's data files are read directly; its old dependencies are not wanted.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps molsets==0.3.1
  echo "$want" > "$stamp"
fi
