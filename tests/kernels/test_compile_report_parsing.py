"""The compile report's SASS reading: tensor-core instructions and async copies count only inside loop bodies."""
from gpt2_engine.kernels.compile_report import counts_in_loops

SASS = """
        /*0100*/                   HMMA.16816.F32 R4, R8, R12, R4 ;      /* prologue: not in a loop */
        /*0200*/               @P0 BRA 0x0500 ;                          /* forward branch: no loop */
        /*0300*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0310*/                   HGMMA.64x128x16.F32 gdesc[UR4], RZ ;
        /*0400*/               @P1 BRA 0x0300 ;                          /* back edge: loop [0x300, 0x400] */
        /*0500*/                   HMMA.16816.F32 R4, R8, R12, R4 ;      /* epilogue */
        /*0600*/                   BRA 0x0600;                           /* the trailing self-loop */
"""


def test_mma_counted_in_loops_only():
    assert counts_in_loops(SASS, "HMMA") == (1, 3)
    assert counts_in_loops(SASS, "HGMMA") == (1, 1)
    assert counts_in_loops("", "HMMA") == (0, 0)


def test_prefetching_copies_counted_in_loops_only():
    sass = SASS.replace("HGMMA.64x128x16.F32 gdesc[UR4], RZ", "LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR4][R6.64]")
    assert counts_in_loops(sass, "LDGSTS") == (1, 1)
    assert counts_in_loops(SASS, "LDGSTS") == (0, 0)
