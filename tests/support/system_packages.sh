#!/usr/bin/env bash
# System packages the test suite needs, installed when missing (make test runs this):
# Debian's libb64-0d, which Triton's perf_analyzer links
# (tests/served/test_perf_analyzer_served.py).
set -euo pipefail
if ldconfig -p | grep -q 'libb64\.so\.0d'; then
    exit 0
fi
echo "installing libb64-0d (for perf_analyzer)"
sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
for step in "update -qq" "install -y -qq libb64-0d"; do
    # shellcheck disable=SC2086  # the step's words are separate arguments
    output=$($sudo apt-get $step 2>&1) || {
        echo "apt-get $step failed (perf_analyzer's tests need libb64-0d): $output" >&2
        exit 1
    }
done
