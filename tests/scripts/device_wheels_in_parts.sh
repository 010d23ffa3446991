#!/usr/bin/env bash
# `scripts/device.sh wheels SET` over back-to-back "calls", without a GPU: a wheel set cut into three
# parts (as scripts/peer_wheels.sh cuts one) arrives one part per call in .whl/SET/parts/; the first
# two calls keep their part in build-wheels/SET/ and say which are there, the third joins them,
# checks the sum and installs both wheels (python3 is a stub that records pip's arguments); a part
# that arrives corrupted makes the join fail with status 2 and drops the parts.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$tmp/path" "$tmp/repo" "$tmp/set"
cp -r "$repo/scripts" "$tmp/repo/"
printf '#!/usr/bin/env bash\necho "$@" >>"%s/pip.txt"\n' "$tmp" >"$tmp/path/python3" && chmod +x "$tmp/path/python3"
printf '#!/usr/bin/env bash\necho "name, driver_version"\n' >"$tmp/path/nvidia-smi" && chmod +x "$tmp/path/nvidia-smi"
head -c 5000 /dev/urandom >"$tmp/set/alpha-1.0-py3-none-any.whl"
head -c 3000 /dev/urandom >"$tmp/set/beta-2.0-py3-none-any.whl"
(cd "$tmp/set" && tar -cf peer.tar ./*.whl && sha256sum peer.tar >SHA256SUMS && split -d -n 3 peer.tar peer.tar.)
echo 3 >"$tmp/set/COUNT"

call() {  # PART [CORRUPT]: one call carrying that part; output in $tmp/call.txt, exit status returned
  local parts=$tmp/repo/.whl/peer/parts rc=0
  mkdir -p "$parts"
  cp "$tmp/set/SHA256SUMS" "$tmp/set/COUNT" "$tmp/set/peer.tar.$1" "$parts/"
  [ "${2:-}" = corrupt ] && printf 'x' >>"$parts/peer.tar.$1"
  (cd "$tmp/repo" && PATH="$tmp/path:$PATH" OUT="$tmp/out" bash scripts/device.sh wheels peer) >"$tmp/call.txt" 2>&1 ||
    rc=$?
  rm -rf "$tmp/repo/.whl"  # the next call carries only its own part
  return $rc
}

call 00 || fail "first part: exit $?: $(cat "$tmp/call.txt")"
grep -q "parts of peer.tar here: 00 (of 3) - carry the next" "$tmp/call.txt" || fail "first part: $(cat "$tmp/call.txt")"
call 01 || fail "second part: exit $?"
grep -q "here: 00 01 (of 3)" "$tmp/call.txt" || fail "second part: $(cat "$tmp/call.txt")"
[ ! -e "$tmp/pip.txt" ] || fail "pip ran before every part was there"
call 02 || fail "last part: exit $?: $(cat "$tmp/call.txt") $(cat "$tmp/out/wheels.txt")"
grep -q "wheels peer: installed" "$tmp/call.txt" || fail "last part: $(cat "$tmp/call.txt")"
grep -q -- "--target /tmp/sapattn-wheels/peer build-wheels/peer/whl/./alpha-1.0-py3-none-any.whl build-wheels/peer/whl/./beta-2.0-py3-none-any.whl\|--target /tmp/sapattn-wheels/peer build-wheels/peer/whl/alpha-1.0-py3-none-any.whl build-wheels/peer/whl/beta-2.0-py3-none-any.whl" \
  "$tmp/pip.txt" || fail "pip did not get both wheels: $(cat "$tmp/pip.txt")"
cmp -s "$tmp/set/alpha-1.0-py3-none-any.whl" "$tmp/repo/build-wheels/peer/whl/alpha-1.0-py3-none-any.whl" ||
  fail "the joined wheel differs from the original"

rm -rf "$tmp/repo/build-wheels" "$tmp/pip.txt"
call 00 && call 01 && call 02 corrupt && fail "a corrupted part installed"
grep -q "does not match SHA256SUMS" "$tmp/call.txt" || fail "corrupted part: $(cat "$tmp/call.txt")"
[ ! -e "$tmp/pip.txt" ] || fail "pip ran on a corrupted set"
echo "device.sh wheels: a set in three parts installs on the third call; a corrupted part is refused"
