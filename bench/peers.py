"""The floors and the peers of bench_ops, measured in the same run on the same GPU.

Floors: the device-to-device copy rate (torch, bytes read + written) and the bf16 matrix-product
rate (torch, 8192^3, random data). Peers: flash-kmeans (its PyPI wheel, Triton) at the same shapes,
2 warm-started iterations and 50 from a sample; a torch permutation (stable argsort + gather),
the way the official SVG2 code permutes. Prints one JSON object per line.
"""
import argparse
import sys

import torch

from harness import SHAPES, emit, shape_selected, time_cuda


def dims(name):
    """(B, H, S, D, Cq, Ck) of a shape of bench/shapes.json, S the video tokens as bench_ops.cu takes them."""
    s = SHAPES[name]
    return s["batch"], s["heads"], s["video_tokens"], s["head_dim"], s["q_clusters"], s["k_clusters"]


def points(bh, n, d, modes, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    centres = torch.randn(bh, modes, d, device="cuda", generator=g)
    mode = torch.randint(0, modes, (bh, n), device="cuda", generator=g)
    x = 1.5 * torch.gather(centres, 1, mode[..., None].expand(-1, -1, d)) + torch.randn(bh, n, d, device="cuda", generator=g)
    return x.to(torch.bfloat16)


def floors():
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    med, mn = time_cuda(lambda: y.copy_(x), 3, 20)
    emit(op="floor_copy", median_ms=med, min_ms=mn, bytes_per_s=2 * x.numel() * 2 / (med * 1e-3))
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    med, mn = time_cuda(lambda: a @ b, 3, 20)
    emit(op="floor_matmul_bf16", median_ms=med, min_ms=mn, flops_per_s=2 * 8192**3 / (med * 1e-3))


def flash_kmeans(name, reps):
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except Exception as e:  # noqa: BLE001
        emit(shape=name, op="flash_kmeans_unavailable", error=str(e))
        return
    B, H, S, D, Cq, Ck = dims(name)
    for side, C, seed in (("q", Cq, 1), ("k", Ck, 2)):
        x = points(B * H, S, D, 4 * C, seed)
        init = x[:, :C].clone()
        try:
            # tol < 0: every iteration runs (its convergence test still reads the shift back each one).
            _, cent, _ = batch_kmeans_Euclid(x, C, max_iters=50, tol=-1.0, init_centroids=init.clone())
            med, mn = time_cuda(lambda: batch_kmeans_Euclid(x, C, max_iters=2, tol=-1.0, init_centroids=cent.clone()), 2, reps)
            emit(shape=name, op=f"flash_kmeans_2it_{side}", median_ms=med, min_ms=mn, reps=reps)
            med, mn = time_cuda(lambda: batch_kmeans_Euclid(x, C, max_iters=50, tol=-1.0, init_centroids=init.clone()), 1, 3)
            emit(shape=name, op=f"flash_kmeans_50it_{side}", median_ms=med, min_ms=mn, reps=3)
        except Exception as e:  # noqa: BLE001
            emit(shape=name, op=f"flash_kmeans_failed_{side}", error=repr(e)[:300])
        del x, init
        torch.cuda.empty_cache()


def torch_permute(name, reps):
    B, H, S, D, Cq, Ck = dims(name)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ql = torch.randint(0, Cq, (B, H, S), device="cuda")
    kl = torch.randint(0, Ck, (B, H, S), device="cuda")

    def permute():
        qi = torch.argsort(ql, dim=-1, stable=True)
        ki = torch.argsort(kl, dim=-1, stable=True)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        qp = torch.gather(qh, 2, qi[..., None].expand(-1, -1, -1, D))
        kp = torch.gather(kh, 2, ki[..., None].expand(-1, -1, -1, D))
        vp = torch.gather(vh, 2, ki[..., None].expand(-1, -1, -1, D))
        return qi, qp, kp, vp

    med, mn = time_cuda(permute, 3, reps)
    emit(shape=name, op="torch_permute_qkv", median_ms=med, min_ms=mn, reps=reps)
    qi, qp, _, _ = permute()
    out = torch.empty(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    med, mn = time_cuda(lambda: out.scatter_(2, qi[..., None].expand(-1, -1, -1, D), qp), 3, reps)
    emit(shape=name, op="torch_inverse_o", median_ms=med, min_ms=mn, reps=reps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="all")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    emit(op="torch", version=torch.__version__, device=torch.cuda.get_device_name(0))
    floors()
    for name in SHAPES:
        if SHAPES[name]["in_all"] and shape_selected(name, a.shape):
            torch_permute(name, a.reps)
            flash_kmeans(name, a.reps)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
