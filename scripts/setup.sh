#!/usr/bin/env bash
# Everything the project needs on a fresh machine of this kind: a venv with the package and
# its test dependencies (re-made only when pyproject.toml changes), and, as root, what the
# eBPF tracker needs (bcc, kernel headers linked for this kernel, tracefs; each step only when
# missing, so a re-run takes a few milliseconds). A failed BPF step never fails this script:
# the tracker then reports itself unavailable with the reason (`ckptsim check`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.ckptsim-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
    "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    echo "$want" > "$stamp"
fi

bpf_notice() { echo "setup: eBPF tracker: $*; checkpoints will fall back to full dumps" >&2; }

bpf_packages() {
    # bcc's Python module, the 6.1 headers bcc compiles tracepoint programs against, bpftool
    local missing=()
    for pkg in python3-bpfcc linux-headers-amd64 bpftool; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || { bpf_notice "no apt-get to install ${missing[*]}"; return 1; }
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >/tmp/ckptsim-setup-apt.log 2>&1 \
        || { bpf_notice "apt-get install ${missing[*]} failed (/tmp/ckptsim-setup-apt.log)"; return 1; }
}

bpf_header_links() {
    # bcc looks for /lib/modules/$(uname -r)/build; there are no headers for this kernel, the
    # newest Debian ones work for tracepoint programs (they read no kernel structs)
    local mod="/lib/modules/$(uname -r)" hdr
    [ -e "$mod/build/include" ] && [ -e "$mod/source/include" ] && return 0
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$hdr" ] || { bpf_notice "no /usr/src/linux-headers-*-amd64"; return 1; }
    mkdir -p "$mod"
    ln -sfn "$hdr" "$mod/build"
    ln -sfn "${hdr%-amd64}-common" "$mod/source"
}

bpf_mounts() {
    grep -q " /sys/kernel/tracing tracefs " /proc/self/mounts \
        || mount -t tracefs nodev /sys/kernel/tracing \
        || { bpf_notice "cannot mount tracefs at /sys/kernel/tracing"; return 1; }
}

bpf_venv_link() {
    # bcc is pure Python over libbcc.so: the venv's Python imports it when it sees just that
    # package (not all of Debian's dist-packages, whose other modules would shadow the venv's)
    local site dist=/usr/lib/python3/dist-packages/bcc
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -d "$dist" ] || { bpf_notice "$dist is missing"; return 1; }
    [ "$(readlink "$site/bcc" 2>/dev/null)" = "$dist" ] || ln -sfn "$dist" "$site/bcc"
}

if [ "$(id -u)" -ne 0 ]; then
    bpf_notice "not root, nothing installed"
else
    bpf_packages && bpf_header_links && bpf_mounts && bpf_venv_link || true
fi
