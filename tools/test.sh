#!/usr/bin/env bash
# The README's test command: install everything the tests need on this machine, then run pytest.
#   tools/test.sh [PYTEST ARGS ...]
# 1. the system programs the tests run: espeak-ng and sox (sample speech), Xvfb (the Resolve dialog tests), ip
#    (the render farm tests' private network), and the shared libraries bpy loads; installed with apt-get when
#    run as root, else named in a message
# 2. retalk with its dev and ray extras, editable, into the Python that runs the tests: $PYTHON, default python3
#    (in an active virtual environment, its own)
# 3. the bpy venvs of the Blender add-on tests (tools/blender_venvs.sh)
# 4. pytest, with RETALK_SHARED set to ../shared beside the checkout when it is not set and that folder exists
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON="${PYTHON:-python3}"

missing=()
for program_package in espeak-ng:espeak-ng sox:sox Xvfb:xvfb ip:iproute2; do
    command -v "${program_package%%:*}" >/dev/null || missing+=("${program_package##*:}")
done
# the shared libraries bpy loads (the Blender add-on tests), by their Debian packages
libraries="$( (command -v ldconfig >/dev/null && ldconfig -p) || /sbin/ldconfig -p || true)"
for library_package in libGL.so.1:libgl1 libX11.so.6:libx11-6 libXext.so.6:libxext6 libXfixes.so.3:libxfixes3 \
    libXi.so.6:libxi6 libXrender.so.1:libxrender1 libXxf86vm.so.1:libxxf86vm1 libSM.so.6:libsm6 \
    libxkbcommon.so.0:libxkbcommon0 libgomp.so.1:libgomp1; do
    grep -q "${library_package%%:*} " <<<"$libraries" || missing+=("${library_package##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "tools/test.sh: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "tools/test.sh: the tests need the system packages ${missing[*]}: install them" \
            "(e.g. sudo apt-get install ${missing[*]}) and run tools/test.sh again" >&2
        exit 1
    fi
fi

"$PYTHON" -m pip install -q -e ".[dev,ray]"
tools/blender_venvs.sh

if [ -z "${RETALK_SHARED:-}" ] && [ -d ../shared ]; then
    RETALK_SHARED="$(cd ../shared && pwd)"
    export RETALK_SHARED
fi
echo "tools/test.sh: $("$PYTHON" --version), RETALK_SHARED=${RETALK_SHARED:-unset}"
exec "$PYTHON" -m pytest "$@"
