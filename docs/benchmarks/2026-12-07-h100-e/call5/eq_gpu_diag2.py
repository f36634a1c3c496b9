import sys, time, torch, torchmdx
sys.path.insert(0, "tests")
from ase.build import molecule
from test_equiformer_capture import tiny, TINY, F64
from torchmdx.md.cuda_graph import GraphedForces
from torchmdx.nn.traced import TracedForces
reference = tiny(seed=5).eval()
fast = torchmdx.build_model({**TINY, "dtype": "float32"}).eval()
fast.load_state_dict(reference.state_dict())
fast = fast.cuda()
atoms = molecule("CH3CH2OH"); atoms.rattle(0.05, seed=4)
z = torch.tensor(atoms.numbers)
pos = torch.tensor(atoms.positions, dtype=F64)
ref = reference(z, pos)
g0 = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, use_graph=False, traced=False)
e0, f0, a0 = g0(pos.float().cuda()); a0 = a0.double().cpu().clone()
ff = g0.forcefield
print("capacity", ff.capacity, "edge_index", ff._static["edge_index"].tolist(), flush=True)
print("mask", ff._static["mask"].int().tolist(), flush=True)
for name, kw in (("options={}", dict(options={})), ("small=False", dict(small=False))):
    t0 = time.time()
    g = GraphedForces(fast, atoms, torch.device("cuda"), torch.float32, use_graph=False, traced=False)
    g.forcefield.set_traced(TracedForces(fast, **kw))
    e, f, a = g(pos.float().cuda())
    print(f"{name} ({time.time()-t0:.0f}s): dE {e.double().cpu().item() - ref['energy'].item():.3g} "
          f"atomic diff {[round(x, 4) for x in (a.double().cpu() - a0).tolist()]}", flush=True)
