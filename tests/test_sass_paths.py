"""benchmarks/qfl_sass_paths.py: how the SASS counting walks a loop's common path (synthetic
listings in cuobjdump's form; the real kernels are counted by `make paper-bounds`)."""

from __future__ import annotations

import pytest

from benchmarks.qfl_sass_paths import common_path, parse, runtime_env

# A scalar loop of the (labels, scores) kernel's shape: "is this column the label" (two
# registers compared), the negative element, a jump over the label's general element, and the
# back edge.
SCALAR_LOOP = """
        Function : scalar_loop
        /*0000*/                   LDG.E.U16.CONSTANT R2, desc[UR6][R2.64] ;
        /*0010*/                   ISETP.NE.AND P3, PT, R19, R21, PT ;
        /*0020*/               @!P3 BRA 0x0060 ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   FADD R14, R3, R14 ;
        /*0050*/                   BRA 0x00a0 ;
        /*0060*/                   MUFU.LG2 R3, R24 ;
        /*0070*/                   MUFU.EX2 R23, R26 ;
        /*0080*/                   MUFU.RCP R23, R23 ;
        /*0090*/                   FADD R14, R3, R14 ;
        /*00a0*/               @!P0 BRA 0x0000 ;
"""


@pytest.mark.parametrize("labels", [True, False])
def test_the_scalar_label_test_takes_its_common_case(labels) -> None:
    """In the labels form, a column is the label in one row in C at most: the path is the
    negative element's (the label's cost is counted apart, as the positive's patch); without
    the labels form the comparison is a data test, decided false."""
    ins = parse(SCALAR_LOOP)["scalar_loop"]
    env = runtime_env(ins, -1, -1, 2, False, word=8 if labels else None, labels=labels)
    path = common_path(ins, 0x0, 0xA0, env)
    mufu = [t.split()[0] for t in path if t.startswith("MUFU")]
    assert mufu == (["MUFU.EX2"] if labels else ["MUFU.LG2", "MUFU.EX2", "MUFU.RCP"])
