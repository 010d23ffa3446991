#!/usr/bin/env python3
"""The peers of sapattn's block-sparse attention, timed on the layouts sapattn_bench_attention saved.

For each shape under --layouts (DIR/<shape>/manifest.jsonl, q_offsets.npy, k_offsets.npy,
mask_d<target>.npy) it builds Q, K, V of the same shape ([B,H,S,D] bf16, random normal: attention
time does not depend on the values) and times, in this one process:

  sdpa_cudnn, sdpa_flash  torch SDPA, dense, with the cuDNN and the flash backend;
  flex                    FlexAttention (torch.compile'd) with a 128x128 BlockMask of each layout's
                          density: per head, every 128-query block row keeps the same number of
                          128-key blocks, round(head density * key blocks) (at least 1), chosen at
                          random, all of them "full" blocks (no mask_mod runs). The blocks are
                          random, not derived from the clusters: a cluster layout cut at 128-token
                          granularity would cover far more pairs than its density;
  fa4_dense, fa4          FlashAttention-4's CuTe-DSL forward (PyPI flash-attn-4, its Hopper path on
                          sm_90): dense, and with the same random 128x128 blocks as flex (one seed,
                          the same blocks) as block-sparse tensors of full blocks. Its inputs are
                          [B,S,H,D] copies made before the timing; both are checked against torch
                          (dense: SDPA; sparse: one head's first query blocks over their blocks);
  flashinfer_fa2/fa3      flashinfer's VariableBlockSparseAttentionWrapper, the official SVG2
                          backend, on the exact variable layout (block_row_sz = query-cluster sizes,
                          block_col_sz = key-cluster sizes, block_mask_map = the mask), batch and
                          heads folded into its heads; plan() and run() timed apart.

Effective TFLOP/s = 4 * pairs * D / time, pairs being the query-key pairs each method computes.
Prints one JSON object per line. With --table it instead reads the JSON lines of both programs and
prints the markdown summary table.

  attention_peers.py --layouts DIR [--shape NAME ...] [--impls a,b,...] [--iters N] [--sanity]
  attention_peers.py --table BENCH.jsonl PEERS.jsonl
"""

import argparse
import inspect
import json
import os
import sys
import time

import numpy as np

from harness import emit, log, read_jsonl, time_cuda, time_host

IMPLS = ("sdpa_cudnn", "sdpa_flash", "flex", "fa4_dense", "fa4", "flashinfer_fa2", "flashinfer_fa3")


def tflops(pairs, head_dim, ms):
    return 4.0 * pairs * head_dim / (ms * 1e-3) / 1e12


# ---- layouts --------------------------------------------------------------------------------


def load_shape(layout_dir, shape):
    """The manifest entries of one shape, each with its offsets, mask and per-head pairs."""
    base = os.path.join(layout_dir, shape)
    entries = read_jsonl(os.path.join(base, "manifest.jsonl"))
    out = []
    for e in entries:
        q_off = np.load(os.path.join(base, e["q_offsets"])).astype(np.int64)
        k_off = np.load(os.path.join(base, e["k_offsets"])).astype(np.int64)
        mask = np.load(os.path.join(base, e["mask"])) != 0
        bh = e["B"] * e["H"]
        q_sz = np.diff(q_off, axis=-1).reshape(bh, -1)
        k_sz = np.diff(k_off, axis=-1).reshape(bh, -1)
        mask = mask.reshape(bh, q_sz.shape[1], k_sz.shape[1])
        kept_keys = (mask * k_sz[:, None, :]).sum(-1)  # [BH, Cq]
        head_pairs = (kept_keys * q_sz).sum(-1).astype(np.float64)  # [BH]
        e = dict(e, q_sizes=q_sz, k_sizes=k_sz, mask_bool=mask, head_pairs=head_pairs)
        pairs = float(head_pairs.sum())
        if abs(pairs - e["pairs"]) > 1e-6 * max(1.0, e["pairs"]):
            log(f"[{shape}] {e['layout']}: pairs {pairs} from the files, {e['pairs']} in the manifest")
        e["pairs"] = pairs
        out.append(e)
    return out


# ---- the peers ------------------------------------------------------------------------------


def bench_sdpa(torch, shape, q, k, v, args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    B, H, S, D = q.shape
    pairs = float(B * H * S * S)
    for impl, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        if impl not in args.impls:
            continue
        rec = dict(shape=shape, impl=impl, variant="dense", layout="dense", density_target=1.0, density=1.0,
                   pairs=pairs)
        try:
            def run():
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v)

            med, mn = time_cuda(run, args.warmup, args.iters)
            emit(**rec, median_ms=med, min_ms=mn, iters=args.iters, tflops=tflops(pairs, D, med))
        except Exception as e:  # report and go on
            emit(**rec, error=f"{type(e).__name__}: {e}")


def random_blocks(torch, entry, S, device, seed):
    """Random 128x128 blocks with each head's density: every query block row keeps the same count of
    key blocks, round(head density * blocks) (at least 1), chosen at random. Returns the counts
    [B,H,n] (int32), the key blocks of each row, kept ones first and ascending, then the others
    [B,H,n,n] (int32), the kept mask [B,H,n,n] and the query-key pairs computed (the last block row
    and column may be partial)."""
    blk = 128
    B, H = entry["B"], entry["H"]
    n = (S + blk - 1) // blk
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    density = torch.tensor(entry["head_pairs"] / float(S) / float(S), dtype=torch.float64, device=device)
    count = torch.clamp(torch.round(density * n), 1, n).to(torch.int32).view(B, H, 1)  # blocks per row
    rank = torch.rand(B, H, n, n, generator=gen, device=device).argsort(-1).argsort(-1)
    selected = rank < count.view(B, H, 1, 1)
    cols = torch.arange(n, device=device)
    order = torch.where(selected, cols, cols + n).argsort(-1).to(torch.int32)
    sizes = torch.full((n,), blk, dtype=torch.float64, device=device)
    sizes[-1] = S - blk * (n - 1)
    pairs = float((selected.to(torch.float64) * sizes.view(1, 1, 1, n)).sum(-1).mul(sizes.view(1, 1, n)).sum())
    return count.expand(B, H, n).contiguous(), order, selected, pairs


def random_block_mask(torch, flex_mod, entry, S, device, seed):
    """random_blocks as a FlexAttention BlockMask of full blocks (no mask_mod runs)."""
    full_num, order, _, pairs = random_blocks(torch, entry, S, device, seed)
    kwargs = dict(full_kv_num_blocks=full_num, full_kv_indices=order, BLOCK_SIZE=128)
    params = inspect.signature(flex_mod.BlockMask.from_kv_blocks).parameters
    if "seq_lengths" in params:
        kwargs["seq_lengths"] = (S, S)
    block_mask = flex_mod.BlockMask.from_kv_blocks(torch.zeros_like(full_num), order, **kwargs)
    return block_mask, pairs


def bench_flex(torch, shape, q, k, v, entries, args):
    import torch.nn.attention.flex_attention as flex_mod

    B, H, S, D = q.shape
    flex = torch.compile(flex_mod.flex_attention, dynamic=False)
    for e in entries:
        rec = dict(shape=shape, impl="flex", variant="block128_random", layout=e["layout"],
                   density_target=e["density_target"])
        try:
            block_mask, pairs = random_block_mask(torch, flex_mod, e, S, q.device, args.seed)
            t0 = time.perf_counter()
            flex(q, k, v, block_mask=block_mask)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            med, mn = time_cuda(lambda: flex(q, k, v, block_mask=block_mask), args.warmup, args.iters)
            emit(**rec, density=pairs / (B * H * S * S), pairs=pairs, median_ms=med, min_ms=mn, iters=args.iters,
                 tflops=tflops(pairs, D, med), first_call_s=first_s)
        except Exception as e:  # report and go on
            emit(**rec, error=f"{type(e).__name__}: {e}")


def load_fa4():
    """flash_attn.cute's forward and its block-sparse tuple, its version, or why they do not import."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        import flash_attn.cute as fa4

        return flash_attn_func, BlockSparseTensorsTorch, getattr(fa4, "__version__", "?"), None
    except Exception as e:  # not carried, or broken: say why
        return None, None, None, f"{type(e).__name__}: {e}"


def rel_l2(torch, a, b):
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def sparse_reference(torch, q, k, v, selected, head, rows):
    """Attention of query blocks `rows` of (batch 0, head `head`) over their kept key blocks, in fp32
    ([B,S,H,D] inputs, 128-token blocks): what a block-sparse kernel must return there."""
    S, D = q.shape[1], q.shape[3]
    out = []
    for r in rows:
        qb = q[0, 128 * r:128 * (r + 1), head].float()
        keys = torch.nonzero(selected[0, head, r]).flatten().tolist()
        idx = torch.cat([torch.arange(128 * c, min(S, 128 * (c + 1)), device=q.device) for c in keys])
        kb, vb = k[0, idx, head].float(), v[0, idx, head].float()
        p = torch.softmax(qb @ kb.T / D**0.5, dim=-1)
        out.append(p @ vb)
    return torch.cat(out)


def bench_fa4(torch, shape, q, k, v, entries, args):
    impls = [i for i in ("fa4_dense", "fa4") if i in args.impls]
    if not impls:
        return
    fwd, sparse_cls, version, why = load_fa4()
    if fwd is None:
        for impl in impls:
            emit(shape=shape, impl=impl, error=f"flash-attn-4 unavailable: {why}")
        return
    B, H, S, D = q.shape
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B,S,H,D], outside the timing
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731 (out, lse) or out
    if "fa4_dense" in impls:
        pairs = float(B * H * S * S)
        rec = dict(shape=shape, impl="fa4_dense", version=version, variant="dense", layout="dense",
                   density_target=1.0, density=1.0, pairs=pairs)
        try:
            t0 = time.perf_counter()
            out = first(fwd(qs, ks, vs))
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ref = torch.nn.functional.scaled_dot_product_attention(q[:1, :2], k[:1, :2], v[:1, :2])
            err = rel_l2(torch, out[:1, :, :2].transpose(1, 2), ref)
            med, mn = time_cuda(lambda: fwd(qs, ks, vs), args.warmup, args.iters)
            emit(**rec, median_ms=med, min_ms=mn, iters=args.iters, tflops=tflops(pairs, D, med),
                 first_call_s=first_s, rel_l2_vs_sdpa=err)
        except Exception as e:  # report and go on
            emit(**rec, error=f"{type(e).__name__}: {e}")
    if "fa4" in impls:
        for e in entries:
            rec = dict(shape=shape, impl="fa4", version=version, variant="block128_random", layout=e["layout"],
                       density_target=e["density_target"])
            try:
                count, order, selected, pairs = random_blocks(torch, e, S, q.device, args.seed)
                blocks = sparse_cls(mask_block_cnt=torch.zeros_like(count), mask_block_idx=order,
                                    full_block_cnt=count, full_block_idx=order, block_size=(128, 128))
                run = lambda: fwd(qs, ks, vs, block_sparse_tensors=blocks)  # noqa: E731
                t0 = time.perf_counter()
                out = first(run())
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                rows = [0, 1, (S - 1) // 128]
                got = torch.cat([out[0, 128 * r:128 * (r + 1), 0].float() for r in rows])
                err = rel_l2(torch, got, sparse_reference(torch, qs, ks, vs, selected, 0, rows))
                med, mn = time_cuda(run, args.warmup, args.iters)
                emit(**rec, density=pairs / (B * H * S * S), pairs=pairs, median_ms=med, min_ms=mn,
                     iters=args.iters, tflops=tflops(pairs, D, med), first_call_s=first_s, rel_l2_vs_torch=err)
            except Exception as ex:  # report and go on
                emit(**rec, error=f"{type(ex).__name__}: {ex}")
            torch.cuda.empty_cache()
    del qs, ks, vs


def load_flashinfer():
    try:
        import flashinfer
        from flashinfer.sparse import VariableBlockSparseAttentionWrapper
        return VariableBlockSparseAttentionWrapper, getattr(flashinfer, "__version__", "?"), None
    except Exception as e:  # a missing or broken install: say why
        return None, None, f"{type(e).__name__}: {e}"


def bench_flashinfer(torch, shape, q, k, v, entries, args):
    backends = [i.split("_", 1)[1] for i in args.impls if i.startswith("flashinfer_")]
    if not backends:
        return
    wrapper_cls, version, why = load_flashinfer()
    if wrapper_cls is None:
        for be in backends:
            emit(shape=shape, impl=f"flashinfer_{be}", error=f"flashinfer unavailable: {why}")
        return
    B, H, S, D = q.shape
    bh = B * H
    qf, kf, vf = (t.reshape(bh, S, D) for t in (q, k, v))  # batch and heads folded: independent problems
    float_ws = torch.empty(args.flashinfer_workspace_mb << 20, dtype=torch.uint8, device=q.device)
    for be in backends:
        impl = f"flashinfer_{be}"
        try:
            wrapper = wrapper_cls(float_ws, backend=be)
        except Exception as e:
            emit(shape=shape, impl=impl, version=version, error=f"{type(e).__name__}: {e}")
            continue
        for e in entries:
            rec = dict(shape=shape, impl=impl, version=version, variant="variable_block", layout=e["layout"],
                       density_target=e["density_target"], density=e["density"], pairs=e["pairs"])
            try:
                mask = torch.from_numpy(e["mask_bool"]).to(q.device)
                row_sz = torch.from_numpy(e["q_sizes"].astype(np.int32)).to(q.device)
                col_sz = torch.from_numpy(e["k_sizes"].astype(np.int32)).to(q.device)

                def plan():
                    wrapper.plan(mask, row_sz, col_sz, bh, bh, D, q_data_type=torch.bfloat16,
                                 kv_data_type=torch.bfloat16)

                t0 = time.perf_counter()
                plan()  # the first plan also loads (or JIT-builds) the kernel module
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                plan_ms, _ = time_host(plan, args.plan_iters)
                med, mn = time_cuda(lambda: wrapper.run(qf, kf, vf), args.warmup, args.iters)
                emit(**rec, plan_ms=plan_ms, median_ms=med, min_ms=mn, iters=args.iters,
                     tflops=tflops(e["pairs"], D, med), first_plan_s=first_s)
            except Exception as ex:  # report and go on
                emit(**rec, error=f"{type(ex).__name__}: {ex}")
            torch.cuda.empty_cache()


def sanity(torch):
    """The two ceilings in this process: device copy rate and a bf16 matrix product."""
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    med, _ = time_cuda(lambda: b.copy_(a), 3, 10)
    emit(op="sanity_copy", median_ms=med, tb_s=2 * a.numel() * 2 / (med * 1e-3) / 1e12)
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    med, _ = time_cuda(lambda: x @ y, 3, 10)
    emit(op="sanity_matmul_bf16_8192", median_ms=med, tflops=2 * m**3 / (med * 1e-3) / 1e12)


def run_peers(args):
    import torch

    if not torch.cuda.is_available():
        sys.exit("attention_peers.py needs a CUDA GPU")
    emit(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
         cudnn=torch.backends.cudnn.version())
    if args.sanity:
        sanity(torch)
    shapes = args.shape or sorted(d for d in os.listdir(args.layouts)
                                  if os.path.exists(os.path.join(args.layouts, d, "manifest.jsonl")))
    for shape in shapes:
        entries = load_shape(args.layouts, shape)
        if not entries:
            continue
        B, H, S, D = (entries[0][x] for x in ("B", "H", "S", "D"))
        log(f"[{shape}] B{B} H{H} S{S} D{D}, {len(entries)} layouts")
        gen = torch.Generator(device="cuda")
        gen.manual_seed(args.seed)
        q, k, v = (torch.randn(B, H, S, D, generator=gen, device="cuda", dtype=torch.float32).to(torch.bfloat16)
                   for _ in range(3))
        bench_sdpa(torch, shape, q, k, v, args)
        if "flex" in args.impls:
            log(f"[{shape}] FlexAttention (first call compiles)")
            bench_flex(torch, shape, q, k, v, entries, args)
        if "fa4" in args.impls or "fa4_dense" in args.impls:
            log(f"[{shape}] FlashAttention-4 (first calls compile)")
            bench_fa4(torch, shape, q, k, v, entries, args)
        log(f"[{shape}] flashinfer")
        bench_flashinfer(torch, shape, q, k, v, entries, args)
        del q, k, v
        torch.cuda.empty_cache()


# ---- the summary table ----------------------------------------------------------------------


def cell(r, with_plan=False):
    if r is None:
        return ""
    if "error" in r:
        return "error"
    s = f"{r['median_ms']:.2f} ({r['tflops']:.0f})"
    if with_plan and "plan_ms" in r:
        s = f"{r['plan_ms']:.1f} + {s}"
    return s


def print_table(bench_path, peers_path):
    bench, peers = read_jsonl(bench_path, lenient=True), read_jsonl(peers_path, lenient=True)
    for r in bench + peers:
        if "device" in r:
            print(f"device: {r['device']}" + (f", torch {r['torch']}" if "torch" in r else ""))
    for r in peers:
        if r.get("op", "").startswith("sanity"):
            val = f"{r['tb_s']:.2f} TB/s" if "tb_s" in r else f"{r['tflops']:.0f} TFLOP/s"
            print(f"{r['op']}: {val}")
    shapes = []
    for r in bench + peers:
        if "shape" in r and r["shape"] not in shapes:
            shapes.append(r["shape"])
    for shape in shapes:
        sap = {}
        plan = {}
        layouts = {}
        for r in bench:
            if r.get("shape") != shape:
                continue
            if r.get("op") == "layout":
                layouts[r["layout"]] = r
            elif r.get("impl") == "sapattn" and r.get("variant") == "plan":
                plan[r["layout"]] = r
            elif r.get("impl") == "sapattn":
                sap[(r["layout"], r["variant"], r["kernel"])] = r
        peer = {}
        for r in peers:
            if r.get("shape") == shape and "impl" in r:
                peer[(r.get("layout", "dense"), r["impl"])] = r
        print(f"\n### {shape}")
        setup_ops = ("workload", "cluster_sizes", "kmeans_50it_qk", "check_fused_vs_unfused", "failed")
        for r in bench:
            if r.get("shape") == shape and r.get("op") in setup_ops:
                print("    " + json.dumps({k: v for k, v in r.items() if k != "shape"}))
        for (layout, impl), r in peer.items():
            if "error" in r:
                print(f"    {impl} {layout}: {r['error'][:300]}")
        for key, r in sap.items():
            if "error" in r:
                print(f"    sapattn {'/'.join(key)}: {r['error'][:300]}")
        print("\nms (effective TFLOP/s on the computed pairs); flashinfer: plan ms + run ms; x cuDNN: dense cuDNN "
              "time over sapattn fused_qk (auto) time\n")
        print("| density target / got | sapattn unfused | unfused + permutes | fused qk | fused q | sm80 unfused "
              "| sm80 fused qk | plan ms | SDPA cuDNN | SDPA flash | Flex 128² (density) | FA4 (dense; 128²) "
              "| flashinfer fa3 | flashinfer fa2 | x cuDNN |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        cudnn = peer.get(("dense", "sdpa_cudnn"))
        print("| dense | " + " | ".join([
            cell(sap.get(("dense", "dense", "auto"))), "", "", "", cell(sap.get(("dense", "dense", "sm80"))), "", "",
            cell(cudnn), cell(peer.get(("dense", "sdpa_flash"))), "", cell(peer.get(("dense", "fa4_dense"))), "", "",
            ""]) + " |")
        for layout in sorted(layouts, key=lambda x: layouts[x]["density_target"]):
            lay = layouts[layout]
            fused = sap.get((layout, "fused_qk", "auto"))
            ratio = ""
            if cudnn and fused and "error" not in cudnn and "error" not in fused:
                ratio = f"{cudnn['median_ms'] / fused['median_ms']:.2f}"
            flex = peer.get((layout, "flex"))
            flex_cell = cell(flex)
            if flex and "error" not in flex:
                flex_cell += f" ({flex['density']:.3f})"
            p = plan.get(layout)
            plan_cell = f"{p['plan_ms']:.3f}" if p and "plan_ms" in p else ""
            cells = [f"{lay['density_target']:.2f} / {lay['density']:.3f}"]
            cells += [cell(sap.get((layout, variant, "auto"))) for variant in ("unfused", "unfused_e2e")]
            cells += [cell(fused), cell(sap.get((layout, "fused_q", "auto")))]
            cells += [cell(sap.get((layout, variant, "sm80"))) for variant in ("unfused", "fused_qk")]
            cells += [plan_cell, "", "", flex_cell, cell(peer.get((layout, "fa4")))]
            cells += [cell(peer.get((layout, impl)), True) for impl in ("flashinfer_fa3", "flashinfer_fa2")]
            print("| " + " | ".join(cells + [ratio]) + " |")
        notes = [f"{layouts[x]['layout']}: {layouts[x]['note']}" for x in layouts if "note" in layouts[x]]
        for n in notes:
            print(f"\n- {n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", help="the --out directory of sapattn_bench_attention")
    ap.add_argument("--shape", action="append", help="shape folder(s) to run (default: all found)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list out of " + ",".join(IMPLS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--plan-iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--flashinfer-workspace-mb", type=int, default=256)
    ap.add_argument("--sanity", action="store_true", help="also measure the copy rate and a bf16 matmul")
    ap.add_argument("--table", nargs=2, metavar=("BENCH_JSONL", "PEERS_JSONL"), help="print the summary table")
    args = ap.parse_args()
    if args.table:
        print_table(*args.table)
        return
    if not args.layouts:
        ap.error("--layouts is required (or --table)")
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        ap.error(f"unknown impls {unknown}; known: {IMPLS}")
    run_peers(args)


if __name__ == "__main__":
    main()
