#!/usr/bin/env bash
# Create the bpy venvs the Blender add-on tests run in (tests/test_blender_addon.py), once per machine.
# Each bpy release pins its own numpy (< 2) and Python, so each gets its own venv:
#   $RETALK_BPY_CACHE/bpy-<version>   (default ~/.cache/retalk-test)
# Usage: tools/blender_venvs.sh [VERSION ...]   (default: all tested versions)
set -euo pipefail

cache="${RETALK_BPY_CACHE:-$HOME/.cache/retalk-test}"
py311="${RETALK_PY311:-python3.11}"
py313="${RETALK_PY313:-/root/.pyenv/versions/3.13.0/bin/python}"

# bpy version -> the Python it is built for (keep in sync with BPY_VERSIONS in tests/test_blender_addon.py)
declare -A python_for=([4.2.23]="$py311" [5.0.1]="$py311" [5.2.3]="$py313")
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(4.2.23 5.0.1 5.2.3)

for version in "${versions[@]}"; do
    python="${python_for[$version]:?unknown bpy version $version (known: ${!python_for[*]})}"
    venv="$cache/bpy-$version"
    if "$venv/bin/python" -c "import bpy" >/dev/null 2>&1; then
        echo "bpy $version: $venv (ready)"
        continue
    fi
    rm -rf "$venv"
    "$python" -m venv "$venv"
    # Only bpy: the add-on brings pyzmq and msgpack itself (its bundled wheels), as in a real Blender.
    "$venv/bin/python" -m pip install -q "bpy==$version"
    "$venv/bin/python" -c "import bpy; print('bpy', bpy.app.version_string)"
    echo "bpy $version: $venv"
done
