"""Kernel-time breakdown and roofline of one fused energy + forces call (``bench_model.py --profile SYSTEMS``).

For each system and variant (:data:`PROFILE_VARIANTS`: the eager fused call, the calculator's
CUDA-graph replay): torch.profiler's kernel times, the roofline table of ``roofline.py`` (FLOP/s
and bytes/s against the GPU's peaks, the bound) printed and written to ``roofline.md`` in
``--out``, the profiler's own table per variant (``profile_<label>.txt``) and the inductor source
of its largest generated kernels (``kernel_sources_<label>.md``, ``inductor_sources.py``).
"""

from __future__ import annotations

import dataclasses
import os

import torch

import gpu_timing
from gpu_timing import error_text, synchronize
from inductor_sources import write_kernel_sources
from model_setup import ET_MD17, graph_call, make_model, read_xyz


#: the variants of ``--profile`` (env BENCH_PROFILE_VARIANTS): "eager" the fused call, "graph" what the
#: calculator replays (capacity-padded list, compiled parts), "traced" the same with the whole model
#: traced into one inductor graph (what ``compile: auto`` picks up to 64 atoms)
PROFILE_VARIANTS = tuple(os.environ.get("BENCH_PROFILE_VARIANTS", "eager,graph").split(","))
#: how many of a variant's largest inductor kernels get their source written (``kernel_sources_<label>.md``,
#: bench/inductor_sources.py): the generated names say nothing past 10 fused operators
KERNEL_SOURCES = 12


def bench_profile(names, data_dir, out_dir, results):
    """CUDA kernel time of one fused energy + forces call, by kernel (torch.profiler), and its
    roofline table (bench/roofline.py: FLOP/s and bytes/s against the GPU's peaks, the bound)."""
    from torch.profiler import ProfilerActivity, profile

    import roofline
    from torchmdx.kernels import message_triton
    from torchmdx.kernels.neighbors import neighbor_list

    gpu = torch.cuda.get_device_name(0) if gpu_timing.DEVICE == "cuda" else "cpu"
    found = roofline.peaks_for(gpu)
    results["profile"] = {}
    markdown = []
    for name in names:
        z_np, pos_np, _, _ = read_xyz(data_dir / f"{name}.xyz")
        z = torch.tensor(z_np, device=gpu_timing.DEVICE)
        pos = torch.tensor(pos_np, dtype=torch.float32, device=gpu_timing.DEVICE)
        model = make_model("triton")
        edges = int(neighbor_list(pos, model.cutoff).edge_index.shape[1])
        profiler_flops = {}  # kernel name -> FLOPs per call from the non-graph profiles (a replay has no operators)
        for variant in PROFILE_VARIANTS:
            label = name if variant == "eager" else f"{name} {variant}"
            model.set_compiled(variant != "eager")
            try:
                if variant == "graph":  # what the calculator replays: capacity-padded list, compiled parts
                    call, _ = graph_call(model, z, pos, None, None)
                elif variant == "traced":  # the whole model and its forces as one inductor graph (compile: whole)
                    call, _ = graph_call(model, z, pos, None, None, traced=True)
                else:
                    call = lambda: model(z, pos)  # noqa: E731
                for _ in range(3):
                    call()
                synchronize()
                cfg = dict(message_triton.LAST_CONFIG) or dataclasses.asdict(message_triton.resolved_config(len(z_np), gpu))
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_flops=True,
                             record_shapes=True) as prof:
                    for _ in range(3):
                        call()
                    synchronize()
            except Exception as exc:  # noqa: BLE001 - one variant must not stop the others
                results["profile"][label] = {"error": error_text(exc)}
                print(f"profile {label}: {error_text(exc)}", flush=True)
                continue
            records = roofline.records_from_profiler(prof.events(), calls=3)
            for rec in records:
                if rec.flops:
                    profiler_flops[rec.name] = rec.flops
                elif rec.name in profiler_flops:
                    rec.flops = profiler_flops[rec.name]
            shape = roofline.MessageShape(atoms=len(z_np), edges=edges, features=ET_MD17["embedding_dimension"],
                                          heads=ET_MD17["num_heads"], rbf=ET_MD17["num_rbf"], layers=ET_MD17["num_layers"],
                                          chunk_channels=cfg["chunk_channels"], filters=cfg["filters"],
                                          sender_side=cfg["sender_side"], precision=cfg["dot_precision"])
            rows = roofline.build_rows(records, roofline.message_work(shape), found[1] if found else None)
            total = sum(r.ms for r in rows)
            text = roofline.table(rows, gpu, title=f"### {label}: {len(z_np)} atoms, {edges} edges, launch {cfg}")
            markdown.append(text)
            results["profile"][label] = {"gpu_busy_ms": round(total, 3), "kernels": len(rows),
                                         "launches": sum(r.launches for r in rows), "launch_config": cfg,
                                         "edges": edges, "groups": {g: [round(v[0], 4), v[1], round(v[2], 4)]
                                                                    for g, v in roofline.group_totals(rows).items()},
                                         "roofline": roofline.rows_json(rows)}
            print(f"profile {label}: GPU busy {total:.3f} ms per call", flush=True)
            print(text, flush=True)
            (out_dir / f"profile_{label.replace(' ', '_')}.txt").write_text(
                prof.key_averages().table(sort_by="device_time_total", row_limit=80))
            generated = [r.name for r in sorted(rows, key=lambda r: -r.ms) if r.name.startswith("triton_")]
            if generated:  # what inductor's largest kernels compute (their names stop at 10 operators)
                sources = write_kernel_sources(generated[:KERNEL_SOURCES],
                                               out_dir / f"kernel_sources_{label.replace(' ', '_')}.md")
                results["profile"][label]["kernel_sources"] = sources.name
            (out_dir / "roofline.md").write_text("\n\n".join(markdown) + "\n")
            del prof
