"""Diagnose test_traced_graph_inside_the_calculators_cuda_graph_gpu: which stage differs from float64."""
import sys, time, torch, torchmdx
sys.path.insert(0, "tests")
from ase.build import molecule
from test_equiformer_capture import tiny, TINY, F64
from torchmdx.md.cuda_graph import GraphedForces
from torchmdx.nn.traced import TracedForces
from torchmdx.kernels.neighbors import neighbor_list
import torchmdx.nn.traced as tr

reference = tiny(seed=5).eval()
fast = torchmdx.build_model({**TINY, "dtype": "float32"}).eval()
fast.load_state_dict(reference.state_dict())
fast = fast.cuda()
atoms = molecule("CH3CH2OH"); atoms.rattle(0.05, seed=4)
z = torch.tensor(atoms.numbers)
pos = torch.tensor(atoms.positions, dtype=F64)
ref = reference(z, pos)
print("graph_ops", getattr(fast, "graph_ops", None), "frontend", getattr(fast, "traced_frontend", None),
      "FUSED_MESSAGE_IN_GRAPH", tr.FUSED_MESSAGE_IN_GRAPH, "tf32", torch.backends.cuda.matmul.allow_tf32, flush=True)

def report(name, e, f, a=None):
    de = e.double().cpu().item() - ref["energy"].item()
    df = (f.double().cpu() - ref["forces"]).abs().max().item()
    extra = ""
    if a is not None and "atomic_energies" in ref:
        extra = f" atomic {(a.double().cpu() - ref['atomic_energies']).abs().max().item():.3g}"
    print(f"{name}: dE {de:.3g} dF {df:.3g}{extra}", flush=True)

out = fast(z.cuda(), pos.float().cuda()); report("eager cuda", out["energy"], out["forces"])
for graph in (False, True):
    g = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, use_graph=graph, traced=False)
    e, f, a = g(pos.float().cuda()); report(f"GraphedForces untraced use_graph={graph}", e, f, a)
nb = neighbor_list(pos.float().cuda(), fast.cutoff)
batch = torch.zeros(len(z), dtype=torch.long, device="cuda")
for compile in (False, True):
    t0 = time.time()
    tf = TracedForces(fast, compile=compile)
    e, f, a = tf(z.cuda(), pos.float().cuda(), batch, 1, nb.edge_index, None, None)
    report(f"TracedForces exact list compile={compile} ({time.time()-t0:.0f}s, small {tf.small_products})", e, f, a)
t0 = time.time()
tf = TracedForces(fast, compile=True, small=False)
e, f, a = tf(z.cuda(), pos.float().cuda(), batch, 1, nb.edge_index, None, None)
report(f"TracedForces exact list compile small=False ({time.time()-t0:.0f}s)", e, f, a)
tf = TracedForces(fast, compile=True, options={})
e, f, a = tf(z.cuda(), pos.float().cuda(), batch, 1, nb.edge_index, None, None)
report(f"TracedForces exact list compile options={{}} ({time.time()-t0:.0f}s)", e, f, a)
print("COMPILE_OPTIONS cuda", tr.COMPILE_OPTIONS.get("cuda"), flush=True)
for graph in (False, True):
    t0 = time.time()
    g = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, use_graph=graph, traced=True)
    e, f, a = g(pos.float().cuda()); report(f"GraphedForces traced use_graph={graph} ({time.time()-t0:.0f}s)", e, f, a)
