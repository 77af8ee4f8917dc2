# Sourced by the scripts: sets UV to a uv of the pinned version, installed from the package
# registry into .tools/ when the machine has none of that version.
UV_VERSION=0.13.8
export UV_PYTHON_DOWNLOADS=never
UV=$(command -v uv || true)
if [ -z "$UV" ] || [ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  UV=.tools/uv-$UV_VERSION/bin/uv
  if [ ! -x "$UV" ]; then
    mkdir -p .tools
    if ! "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check \
      --target ".tools/uv-$UV_VERSION" "uv==$UV_VERSION" >.tools/uv-install.log 2>&1; then
      cat .tools/uv-install.log >&2
      echo "could not install uv $UV_VERSION with pip" >&2
      exit 1
    fi
  fi
fi
