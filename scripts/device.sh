#!/usr/bin/env bash
# Everything that runs on a machine with a CUDA GPU, one subcommand each (docs/testing.md lists them
# with the scripts they replace):
#
#   scripts/device.sh SUBCOMMAND [ARGS...]
#   scripts/device.sh SUBCOMMAND --help     what it runs, its arguments, environment and output files
#
# Every subcommand works from the repository root, writes its logs and results to $OUT (the device
# tool's folder) or ./device-logs, describes the GPU, Python and torch in gpu.txt, builds what it
# needs in build-device when no prebuilt binary is given, and installs the wheels carried in .whl/
# into private folders under /tmp/sapattn-wheels. Exit 2: no or an unknown subcommand.
set -uo pipefail
scripts=$(cd "$(dirname "$0")" && pwd)
subcommands=(test test-python bench-ops bench-attention bench-dit bench-stack ncu-attention kernel-matrix fp8-matrix ab-attention batch wheels)

# The leading comment block of a file, without the comment marks.
header_of() { awk '!/^#/ { exit } NR > 1 || !/^#!/ { sub(/^# ?/, ""); print }' "$1"; }

usage() {
  header_of "$scripts/device.sh"
  echo
  echo "Subcommands:"
  local s
  for s in "${subcommands[@]}"; do
    printf '  %-16s %s\n' "$s" "$(header_of "$scripts/device/$s.sh" | sed -n 3p)"
  done
}

case ${1:-} in
  -h | --help | help)
    usage
    exit 0
    ;;
  "")
    usage >&2
    exit 2
    ;;
esac
subcommand=$1
shift
if [[ ! " ${subcommands[*]} " == *" $subcommand "* ]]; then
  echo "scripts/device.sh: unknown subcommand '$subcommand' (one of: ${subcommands[*]}; --help says more)" >&2
  exit 2
fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  header_of "$scripts/device/$subcommand.sh"
  exit 0
fi

cd "$scripts/.." || exit 1
# shellcheck source=scripts/device/common.sh
. scripts/device/common.sh
# shellcheck source=/dev/null  # one of scripts/device/*.sh, each defining device_main
. "scripts/device/$subcommand.sh"
device_preamble
device_main "$@"
