#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the web page test (skipped when present).
# Needs root (or sudo) and Debian's package index; nothing else is downloaded.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[chromium] apt-get not found: install Chromium with your system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
echo "[chromium] installing Debian's chromium package (about a minute)"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
