#!/usr/bin/env bash
# Create the bpy venvs the Blender add-on tests run in (tests/test_blender_addon.py), once per machine.
# Each bpy release pins its own numpy (< 2) and Python, so each gets its own venv:
#   $RETALK_BPY_CACHE/bpy-<version>   (default ~/.cache/retalk-test)
# The Python a release needs is found, in order: $RETALK_PY<XY> (e.g. RETALK_PY313=/path/to/python3.13), the
# Python running this ($PYTHON) when it is that version, pythonX.Y on PATH, a pyenv-installed X.Y, a
# uv-managed X.Y. Where none is found the venv is not made and bpy-<version>.unavailable says why: the tests of
# that release skip with that reason (README, "Tests").
# Usage: tools/blender_venvs.sh [VERSION ...]   (default: all tested versions)
set -euo pipefail

cache="${RETALK_BPY_CACHE:-$HOME/.cache/retalk-test}"
# bpy version -> the Python it is built for (keep in sync with BPY_VERSIONS in tests/test_blender_addon.py)
declare -A python_for=([4.2.23]=3.11 [5.0.1]=3.11 [5.2.3]=3.13)
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(4.2.23 5.0.1 5.2.3)

# find_python X.Y: print a Python X.Y that can make venvs, or nothing
find_python() {
    local want="$1" override="RETALK_PY${1/./}" candidate
    local candidates=("${!override:-}" "${PYTHON:-}" "python$want")
    if command -v pyenv >/dev/null; then
        candidates+=("$(pyenv prefix "$(pyenv versions --bare | grep -E "^${want//./\\.}(\.[0-9]+)?$" | tail -1)" \
            2>/dev/null)/bin/python$want")
    fi
    command -v uv >/dev/null && candidates+=("$(uv python find "$want" 2>/dev/null)")
    for candidate in "${candidates[@]}"; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c "import sys, venv, ensurepip; assert sys.version_info[:2] == (${want/./, })" \
            >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
}

mkdir -p "$cache"
for version in "${versions[@]}"; do
    want="${python_for[$version]:?unknown bpy version $version (known: ${!python_for[*]})}"
    venv="$cache/bpy-$version"
    if "$venv/bin/python" -c "import bpy" >/dev/null 2>&1; then
        echo "bpy $version: $venv (ready)"
        rm -f "$cache/bpy-$version.unavailable"
        continue
    fi
    python="$(find_python "$want")"
    if [ -z "$python" ]; then
        reason="bpy $version needs Python $want, which this machine lacks (README, Tests: install Python $want"
        reason+=" or set RETALK_PY${want/./} to one, then run tools/test.sh again)"
        echo "$reason" | tee "$cache/bpy-$version.unavailable"
        continue
    fi
    rm -rf "$venv" "$cache/bpy-$version.unavailable"
    "$python" -m venv "$venv"
    # Only bpy: the add-on brings pyzmq and msgpack itself (its bundled wheels), as in a real Blender.
    "$venv/bin/python" -m pip install -q "bpy==$version"
    "$venv/bin/python" -c "import bpy; print('bpy', bpy.app.version_string)"
    echo "bpy $version: $venv (Python $want: $python)"
done
