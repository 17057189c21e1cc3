#!/usr/bin/env bash
# The system packages the native gRPC transport is built from (setup.py builds it during
# `pip install` when `pkg-config grpc++` finds gRPC C++): Debian/Ubuntu's libgrpc++-dev,
# pkg-config and g++. The Makefile runs this before installing onnxserve. Installs what is
# missing with apt-get when it can (root, or sudo); otherwise says what to install and
# exits 0: onnxserve then installs without the native transport and grpcio serves gRPC.
set -euo pipefail
packages="libgrpc++-dev pkg-config g++"
if pkg-config --exists grpc++ 2>/dev/null && command -v g++ > /dev/null; then
    exit 0
fi
advice="install $packages for the native gRPC transport (docs/serving.md); without them onnxserve serves gRPC with grpcio"
if ! command -v apt-get > /dev/null; then
    echo "onnxserve: no apt-get here: $advice" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo > /dev/null || ! sudo -n true 2> /dev/null; then
        echo "onnxserve: not root and no sudo: $advice" >&2
        exit 0
    fi
    sudo="sudo -n"
fi
echo "installing $packages (for the native gRPC transport)"
export DEBIAN_FRONTEND=noninteractive
for step in "update -qq" "install -y -qq --no-install-recommends $packages"; do
    # shellcheck disable=SC2086  # the step's words are separate arguments
    output=$($sudo apt-get $step 2>&1) || {
        echo "onnxserve: apt-get $step failed: $output" >&2
        echo "onnxserve: $advice" >&2
        exit 0
    }
done
