"""Merges bench_ops and peers output (JSON lines) into the table of docs/cuda.md.

Floor of each op: max(bytes / copy rate, flops / bf16 matrix rate), both measured by peers.py in
the same run. Usage: python3 report.py ops.jsonl peers.jsonl
"""
import argparse

from harness import read_jsonl

GOALS_MS = {  # at Wan 2.1 14B 720p
    "kmeans_2it_qk": 3.0,
    "kmeans_init_50it_qk": 60.0,
    "kmeans_gpp2_14it_qk": 60.0,  # the default first call (docs/design.md), the same goal
    "select_blocks": 0.3,
    "permute_qkv": 1.6,
    "inverse_o_bf16": 0.6,
    "order_clusters_k": 2.0,  # svg2's first sparse call of a layer orders the key clusters
}
PEERS = {
    "kmeans_2it_qk": ("flash_kmeans_2it_q", "flash_kmeans_2it_k"),
    "kmeans_2it_q": ("flash_kmeans_2it_q",),
    "kmeans_2it_k": ("flash_kmeans_2it_k",),
    "kmeans_init_50it_qk": ("flash_kmeans_50it_q", "flash_kmeans_50it_k"),
    "kmeans_gpp2_14it_qk": ("flash_kmeans_50it_q", "flash_kmeans_50it_k"),
    "permute_qkv": ("torch_permute_qkv",),
    "inverse_o_bf16": ("torch_inverse_o",),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", help="the JSON lines of sapattn_bench_ops")
    p.add_argument("peers", help="the JSON lines of bench/peers.py")
    a = p.parse_args()
    ops, peers = read_jsonl(a.ops), read_jsonl(a.peers)
    copy = next(r["bytes_per_s"] for r in peers if r.get("op") == "floor_copy")
    mm = next(r["flops_per_s"] for r in peers if r.get("op") == "floor_matmul_bf16")
    dev = next((r for r in ops if "device" in r), {})
    print(f"device: {dev.get('device')} ({dev.get('sms')} SMs); copy {copy / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s (torch, same run)")
    peer = {(r.get("shape"), r["op"]): r for r in peers if "median_ms" in r}
    extra = {(r.get("shape"), r["op"]): r for r in ops if "value" in r}
    shapes = []
    for r in ops:
        if "shape" in r and r["shape"] not in shapes:
            shapes.append(r["shape"])
    for s in shapes:
        print(f"\n### {s}")
        share = extra.get((s, "kept_cluster_share"))
        if share:
            print(f"(selection kept {share['value']:.3f} of the cluster pairs)")
        print("| op | sapattn median ms | floor ms | x floor | rate | peer (same run) ms | goal ms |")
        print("|---|---|---|---|---|---|---|")
        for r in ops:
            if r.get("shape") != s or "median_ms" not in r:
                continue
            t = r["median_ms"]
            fb = r.get("bytes", 0) / copy * 1e3
            ff = r.get("flops", 0) / mm * 1e3
            floor = max(fb, ff)
            rate = ""
            if r.get("flops"):
                rate = f"{r['flops'] / (t * 1e-3) / 1e12:.0f} TFLOP/s"
            elif r.get("bytes"):
                rate = f"{r['bytes'] / (t * 1e-3) / 1e12:.2f} TB/s"
            if "refined_share" in r:
                rate += f", {100 * r['refined_share']:.1f}% rows re-ranked"
            names = PEERS.get(r["op"], ())
            found = [peer.get((s, n)) for n in names]
            peer_ms = f"{sum(p['median_ms'] for p in found):.2f}" if names and all(found) else ""
            goal = GOALS_MS.get(r["op"], "") if s.startswith("wan14b") else ""
            print(f"| {r['op']} | {t:.3f} | {floor:.3f} ({'flops' if ff > fb else 'bytes'}) | {t / floor if floor else 0:.2f} | {rate} | {peer_ms} | {goal} |")
    bad = [r for r in peers if "error" in r]
    for r in bad:
        print(f"peer problem: {r}")


if __name__ == "__main__":
    main()
