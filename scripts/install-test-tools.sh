#!/usr/bin/env bash
# Install the system tools the tests drive, with Debian's packages (skipped when present):
#   chromium, fonts-dejavu-core  the web page test runs a real headless Chromium (through Playwright)
#   kubernetes-client            the k8s/ tests render the overlays with `kubectl kustomize`
# Needs root (or sudo) and Debian's package index; nothing else is downloaded (never
# `playwright install`: the tests use the system Chromium).
set -euo pipefail

missing=()
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    missing+=(chromium)
fi
if ! [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    missing+=(fonts-dejavu-core)
fi
if ! command -v kubectl >/dev/null 2>&1; then
    missing+=(kubernetes-client)
fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[test-tools] apt-get not found: install ${missing[*]} (Chromium, DejaVu fonts, kubectl) with your system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "[test-tools] need root or sudo to install ${missing[*]}" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "[test-tools] installing Debian's ${missing[*]} (about a minute)"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "[test-tools] installed ${missing[*]}"
