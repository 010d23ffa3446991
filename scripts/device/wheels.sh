# scripts/device.sh wheels SET...
#
# Installs the wheel sets named (.whl/SET/, or the parts of one carried so far): a set too large for
# one call arrives over several calls made back to back (scripts/peer_wheels.sh cuts it); each call
# runs this with the next part, and the last one joins and installs it (build-wheels/SET/whl/ then
# stays on the machine while it is warm, for the calls that use it).
#
# Writes to $OUT or ./device-logs: gpu.txt, wheels.txt (what each set's install said).

# shellcheck shell=bash disable=SC2154  # out, wheel_root: set by common.sh

device_main() {
  [ $# -gt 0 ] || { echo "usage: scripts/device.sh wheels SET..." >&2; return 2; }
  local set rc all=0
  for set in "$@"; do
    rc=0
    install_wheels "$set" >>"$out/wheels.txt" 2>&1 || rc=$?
    case $rc in
      0) echo "wheels $set: installed in $wheel_root/$set" | tee -a "$out/wheels.txt" ;;
      3) tail -n 1 "$out/wheels.txt" ;;
      *)
        tail -n 1 "$out/wheels.txt"
        echo "wheels $set: status $rc (wheels.txt)"
        all=$rc
        ;;
    esac
  done
  return $all
}
