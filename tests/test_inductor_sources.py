"""bench/inductor_sources.py: reading a generated kernel's definition (source-node comments and
code) back from inductor's output code, in the format ``torch._inductor.codegen.triton`` writes
(``define_kernel``: metadata comments, then ``NAME = async_compile.triton('NAME', '''...''',
device_str='cuda')``). CPU only: the output code here is written by the test."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OUTPUT_CODE = """
from torch._inductor.async_compile import AsyncCompile
async_compile = AsyncCompile()

# kernel path: /tmp/torchinductor_x/ab/cabc.py
# Topologically Sorted Source Nodes: [norm, sum_1], Original ATen: [aten.linalg_vector_norm, aten.sum]
# Source node to ATen node mapping:
#   norm => pow_1, sum_2
triton_per_fused_5 = async_compile.triton('triton_per_fused_5', '''
import triton

@triton.jit
def triton_per_fused_5(in_ptr0, out_ptr0, xnumel, r0_numel):
    xoffset = tl.program_id(0)
''', device_str='cuda')


# kernel path: /tmp/torchinductor_x/cd/ccd.py
# Topologically Sorted Source Nodes: [add], Original ATen: [aten.add]
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton.jit
def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel):
    pass
''', device_str='cuda')
"""


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import inductor_sources
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return inductor_sources


def test_kernel_definitions_are_read_back_with_their_source_nodes(tmp_path):
    sources = _module()
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "graph1.py").write_text(OUTPUT_CODE)
    (tmp_path / "ab" / "graph2.py").write_text(OUTPUT_CODE.replace("[norm, sum_1]", "[mul]"))
    (tmp_path / "ab" / "other.py").write_text("x = 1\n")
    found = sources.find_kernel_sources(["triton_per_fused_5", "triton_poi_fused_add_0", "absent"], tmp_path)
    assert found["absent"] == []
    per = found["triton_per_fused_5"]
    assert [Path(d["file"]).name for d in per] == ["graph1.py", "graph2.py"]  # one per compiled graph
    assert per[0]["comments"].splitlines()[1] == ("# Topologically Sorted Source Nodes: [norm, sum_1], "
                                                  "Original ATen: [aten.linalg_vector_norm, aten.sum]")
    assert per[0]["code"].splitlines()[-1] == "    xoffset = tl.program_id(0)"  # the code, up to its closing quotes
    assert "triton_poi_fused_add_0" not in per[0]["code"]
    add = found["triton_poi_fused_add_0"][0]
    assert add["comments"] == ("# kernel path: /tmp/torchinductor_x/cd/ccd.py\n"
                               "# Topologically Sorted Source Nodes: [add], Original ATen: [aten.add]")
    out = sources.write_kernel_sources(["triton_per_fused_5", "absent"], tmp_path / "sources.md", tmp_path, max_lines=2)
    text = out.read_text()
    assert "## triton_per_fused_5" in text and "definition 2 of 2" in text and "# ... 3 more lines" in text
    assert "## absent\nnot found in the cache" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab", "sources.md"]  # no temporary file left
